"""Training-data loading: our ForecastLoader against the original ClimaX loader, on the same data.

Both read one split of a preprocessed dataset (by default the demo's, ``make demo``:
demo_output/shards, 5.625 deg, 6-hourly, 13 time-varying variables + 3 constants) and produce
normalised (x, y, lead time) batches of ``--batch-size`` with x = 3 constants + 13 variables and
y = the 13 variables, random lead times of 1..27 steps (6..162 h). Each run is its own child
process (clean memory, first-batch time without warm caches of the process), one after the other:

* baseline: what microsoft/ClimaX ``src/climax/pretrain/dataset.py`` + ``datamodule.py`` do, in one
  process (``num_workers=0``): ``NpyReader`` shuffles the shard list and ``np.load``s a whole shard
  into memory; ``Forecast`` concatenates the variables, drops the last ``max_predict_range`` (28)
  steps of the shard (no pair crosses a shard edge) and draws a random lead per sample;
  ``IndividualForecastDataIter`` normalises every sample on its own with torchvision
  ``transforms.Normalize``; ``ShuffleIterableDataset`` with a ``--buffer`` (10,000) sample buffer;
  a ``DataLoader`` with the original ``collate_fn`` (``torch.stack``). It reads ``.npz`` shards
  like the original: our Parquet shards are converted once, before any timing, into the original
  layout (one uncompressed ``np.savez`` per shard, each variable (T, 1, H, W) float32, constants
  repeated along time, as ``nc2np_equally_era5.py`` writes them).
* ours: ``climax.data.ShardDataset`` + ``ForecastLoader`` (default options: rows kept decoded when the
  split fits in ``cache_mb``), and ``--stream`` again with ``cache_mb=0`` (every epoch decodes).

Page cache: every file is read once before each run. Time to the first batch counts from building
the pipeline (after imports) to the first batch in hand; samples/s are per epoch (first batch
included in epoch 1). ``--step-ms`` also runs ours behind a simulated training step (a sleep) and
reports how long the step waited for each batch. Machine load (``os.getloadavg``) is printed beside
each run: the machine may be shared.

    python benchmarks/loader.py [--root demo_output/shards] [--split train] [--repeat 3]
        [--epochs 2] [--batch-size 32] [--buffer 10000] [--step-ms 0] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_PREDICT_RANGE = 28  # the original's pretraining default (mpi-esm: 28 steps, 6 h each)


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s() -> float:
    """CPU seconds used by this process so far, all threads (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def warm_cache(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass


def to_npz(root: Path, split: str, dest: Path) -> list[Path]:
    """Our shards in the original's npz layout (not timed; done once, reused)."""
    import numpy as np

    from climax import shards as S

    manifest = S.Manifest.from_json((root / S.MANIFEST).read_text())
    _, consts = S.read_shard(str(root / S.CONSTANTS))
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for s in manifest.shards(split):
        path = dest / (s["path"].replace("/", "_").removesuffix(".parquet") + ".npz")
        if not path.exists():
            times, arrays = S.read_shard(str(root / s["path"]))
            arrays.update({k: np.broadcast_to(v, (len(times), *v.shape[-2:])) for k, v in consts.items()})
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **{k: np.ascontiguousarray(v, dtype=np.float32)[:, None] for k, v in arrays.items()})
            os.replace(tmp, path)
        out.append(path)
    return out


# ----------------------------------------------------------------------------- the original loader
def baseline_loader(files: list[str], in_vars: list[str], out_vars: list[str], mean_in, std_in, mean_out, std_out,
                    batch_size: int, buffer: int):
    """A re-implementation of the original pretraining pipeline's behaviour (see the module doc)."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, IterableDataset
    from torchvision.transforms import transforms

    class NpyReader(IterableDataset):
        def __iter__(self):
            order = list(files)
            random.shuffle(order)
            for path in order:
                data = np.load(path)
                yield {k: data[k] for k in in_vars}, in_vars, out_vars

    class Forecast(IterableDataset):
        def __init__(self, source):
            self.source = source

        def __iter__(self):
            for data, variables, outs in self.source:
                x = torch.from_numpy(np.concatenate([data[k].astype(np.float32) for k in data], axis=1))
                y = torch.from_numpy(np.concatenate([data[k].astype(np.float32) for k in outs], axis=1))
                inputs = x[:-MAX_PREDICT_RANGE]
                steps = torch.randint(low=1, high=MAX_PREDICT_RANGE, size=(inputs.shape[0],))
                lead = (6 * steps / 100).to(inputs.dtype)
                yield inputs, y[torch.arange(inputs.shape[0]) + steps], lead, variables, outs

    class PerSample(IterableDataset):
        def __init__(self, source, tin, tout):
            self.source, self.tin, self.tout = source, tin, tout

        def __iter__(self):
            for inp, out, lead, variables, outs in self.source:
                for i in range(inp.shape[0]):
                    yield self.tin(inp[i]), self.tout(out[i]), lead[i], variables, outs

    class ShuffleBuffer(IterableDataset):
        def __init__(self, source, size):
            self.source, self.size = source, size

        def __iter__(self):
            buf = []
            for item in self.source:
                if len(buf) == self.size:
                    k = random.randint(0, self.size - 1)
                    yield buf[k]
                    buf[k] = item
                else:
                    buf.append(item)
            random.shuffle(buf)
            while buf:
                yield buf.pop()

    def collate(batch):
        return (torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch]),
                torch.stack([b[2] for b in batch]), list(batch[0][3]), list(batch[0][4]))

    pipeline = ShuffleBuffer(PerSample(Forecast(NpyReader()), transforms.Normalize(mean_in, std_in),
                                       transforms.Normalize(mean_out, std_out)), buffer)
    return DataLoader(pipeline, batch_size=batch_size, drop_last=True, num_workers=0, collate_fn=collate)


# ----------------------------------------------------------------------------- child runs
def run_child(spec: dict) -> dict:
    import numpy as np
    import torch  # noqa: F401 - imported before timing, like a training process

    from climax import shards as S
    from climax.data import ForecastLoader, ShardDataset
    from climax.sampling import lead_hours

    root = Path(spec["root"])
    manifest = S.Manifest.from_json((root / S.MANIFEST).read_text())
    in_vars, out_vars = manifest.constants + manifest.variables, manifest.variables
    paths = [Path(p) for p in spec["files"]]
    warm_cache(paths)
    epochs, load = [], [os.getloadavg()[0]]
    all_waits: list[float] = []
    t0, c0 = time.perf_counter(), cpu_s()
    if spec["which"] == "baseline":
        mi, si = manifest.mean_std(in_vars)
        mo, so = manifest.mean_std(out_vars)
        loader = baseline_loader(spec["files"], in_vars, out_vars, mi, si, mo, so, spec["batch_size"], spec["buffer"])
        iterate = lambda e: iter(loader)  # noqa: E731
    else:
        ds = ShardDataset(str(root))
        kw = {"cache_mb": 0} if spec["which"] == "stream" else {}
        loader = ForecastLoader(ds, spec["split"], in_vars, out_vars, lead_hours(6, 6 * (MAX_PREDICT_RANGE - 1), 6),
                                random_lead=True, batch_size=spec["batch_size"], seed=0, **kw)

        def iterate(e):
            loader.set_epoch(e)
            return iter(loader)
    first = None
    for e in range(spec["epochs"]):
        t = time.perf_counter() if e else t0
        c = cpu_s() if e else c0
        n, waits = 0, []
        it = iterate(e)
        while True:
            w = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                break
            if first is None:
                first = time.perf_counter() - t0
            elif spec["step_ms"]:
                waits.append(time.perf_counter() - w)
            n += len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch)
            if spec["step_ms"]:
                time.sleep(spec["step_ms"] / 1000)
        wall, cpu = time.perf_counter() - t, cpu_s() - c
        epochs.append({"samples": n, "wall_s": wall, "samples_per_s": n / wall, "cpu_s": cpu,
                       "samples_per_cpu_s": n / cpu, "wait_ms_mean": 1000 * float(np.mean(waits)) if waits else None})
        all_waits += waits
        load.append(os.getloadavg()[0])
    return {"which": spec["which"], "first_batch_s": first, "epochs": epochs, "peak_rss_mb": vm_hwm_mb(),
            "load": load, "wait_ms_mean": 1000 * float(np.mean(all_waits)) if all_waits else None,
            "wait_ms_p95": 1000 * float(np.percentile(all_waits, 95)) if all_waits else None}


def launch(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_child", json.dumps(spec)], cwd=ROOT, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(ROOT / "demo_output" / "shards"), help="a preprocessed dataset (local)")
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--buffer", type=int, default=10_000, help="the baseline's shuffle buffer (samples)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="runs of each loader, alternating; best and median")
    p.add_argument("--step-ms", type=float, default=0.0, help="also run ours behind a simulated step of this length")
    p.add_argument("--npz-dir", default=None, help="where the baseline's npz shards go (default: beside --root)")
    p.add_argument("--json", default=None)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        print(json.dumps(run_child(json.loads(args._child))))
        return 0

    from benchmarks.common import machine
    from climax import shards as S

    root = Path(args.root).resolve()
    if not (root / S.MANIFEST).exists():
        print(f"{root}: no dataset; run `make demo` (or give --root)", file=sys.stderr)
        return 2
    manifest = S.Manifest.from_json((root / S.MANIFEST).read_text())
    npz = to_npz(root, args.split, Path(args.npz_dir) if args.npz_dir else root.parent / f"npz_{args.split}")
    parquet = [root / s["path"] for s in manifest.shards(args.split)] + [root / S.CONSTANTS]
    rows = sum(s["rows"] for s in manifest.shards(args.split))
    print(f"machine: {machine()}")
    print(f"data: {root} split {args.split}: {rows} steps in {len(npz)} shards, grid {manifest.raw['grid']['shape']}, "
          f"x {len(manifest.constants) + len(manifest.variables)} variables, y {len(manifest.variables)}; "
          f"batch {args.batch_size}; Parquet {sum(f.stat().st_size for f in parquet) / 1e6:.0f} MB, "
          f"npz {sum(f.stat().st_size for f in npz) / 1e6:.0f} MB", flush=True)
    base = {"root": str(root), "split": args.split, "batch_size": args.batch_size, "buffer": args.buffer,
            "epochs": args.epochs, "step_ms": 0.0}
    runs: dict[str, list[dict]] = {"baseline": [], "ours": [], "stream": []}
    for r in range(args.repeat):
        for which in runs:
            files = [str(f) for f in (npz if which == "baseline" else parquet)]
            res = launch({**base, "which": which, "files": files})
            runs[which].append(res)
            sps = " ".join(f"{e['samples_per_s']:.0f}" for e in res["epochs"])
            spc = " ".join(f"{e['samples_per_cpu_s']:.0f}" for e in res["epochs"])
            print(f"  run {r + 1} {which:8s}: first batch {res['first_batch_s']:.3f} s, samples/s per epoch {sps} "
                  f"(per CPU-second {spc}) "
                  f"({res['epochs'][0]['samples']} samples/epoch), peak RSS {res['peak_rss_mb']:.0f} MB, "
                  f"load {' '.join(f'{x:.1f}' for x in res['load'])}", flush=True)
    if args.step_ms:
        res = launch({**base, "which": "ours", "files": [str(f) for f in parquet], "step_ms": args.step_ms})
        runs["ours_step"] = [res]
        per_epoch = ", ".join(f"epoch {e + 1} {x['wait_ms_mean']:.2f} ms" for e, x in enumerate(res["epochs"]))
        print(f"  ours behind a {args.step_ms:.0f} ms step: waited {res['wait_ms_mean']:.2f} ms per batch on average "
              f"(p95 {res['wait_ms_p95']:.2f} ms) after the first ({per_epoch}); "
              f"load {' '.join(f'{x:.1f}' for x in res['load'])}")

    def summary(which: str, epoch: int, key: str = "samples_per_s") -> tuple[float, float]:
        v = [r["epochs"][epoch][key] for r in runs[which]]
        return max(v), statistics.median(v)

    print("\n| loader | first batch best / median | epoch | samples/s best / median | vs baseline (best / median) "
          "| samples per CPU-s (median) | vs baseline | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for which in ("baseline", "ours", "stream"):
        fb = [r["first_batch_s"] for r in runs[which]]
        for e in range(args.epochs):
            best, med = summary(which, e)
            bbest, bmed = summary("baseline", e)
            cpu = summary(which, e, "samples_per_cpu_s")[1]
            bcpu = summary("baseline", e, "samples_per_cpu_s")[1]
            print(f"| {which} | {min(fb):.3f} / {statistics.median(fb):.3f} s | {e + 1} | {best:.0f} / {med:.0f} | "
                  f"{best / bbest:.2f}x / {med / bmed:.2f}x | {cpu:.0f} | {cpu / bcpu:.2f}x | "
                  f"{max(r['peak_rss_mb'] for r in runs[which]):.0f} MB |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
