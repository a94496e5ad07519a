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
  split fits in ``cache_mb``);
* stream: ours with ``cache_mb=0`` (every epoch decodes: what a split larger than memory gets), whose
  default order is then the block shuffle (``shuffle_mode="auto"`` -> ``"block"``);
* stream-global: ``cache_mb=0`` with the global per-epoch shuffle (``shuffle_mode="global"``), the
  previous default, for comparison.

For our loaders the rows decoded per sample (``loader.stats``) are printed per epoch.

``--hires`` measures instead Parquet decode at 1.40625 deg with the 48 ClimaX variables (45
time-varying + 3 constants): a few days of hourly data are generated with ``pipelines.sample_data``
and built into shards with ``pipelines.build`` (local Ray, once, under ``--hires-dir``), then decoded
on one thread (MB of float32 per CPU-second = per core) and streamed by ``ForecastLoader``
(``cache_mb=0``, block shuffle, one reader thread: samples per CPU-second).

Page cache: every file is read once before each run. Time to the first batch counts from building
the pipeline (after imports) to the first batch in hand; samples/s are per epoch (first batch
included in epoch 1). ``--step-ms`` also runs ours behind a simulated training step (a sleep) and
reports how long the step waited for each batch. Machine load (``os.getloadavg``) is printed beside
each run: the machine may be shared.

    python benchmarks/loader.py [--root demo_output/shards] [--split train] [--repeat 3]
        [--epochs 3] [--batch-size 32] [--buffer 10000] [--step-ms 0] [--json FILE]
    python benchmarks/loader.py --hires [--hires-dir demo_output/hires] [--hires-days 4]
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
        kw = {"stream": {"cache_mb": 0},
              "stream-global": {"cache_mb": 0, "shuffle_mode": "global"}}.get(spec["which"], {})
        loader = ForecastLoader(ds, spec["split"], in_vars, out_vars, lead_hours(6, 6 * (MAX_PREDICT_RANGE - 1), 6),
                                random_lead=True, batch_size=spec["batch_size"], seed=0, **kw)

        def iterate(e):
            loader.reset_stats()
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
        rps = loader.stats["rows_per_sample"] if spec["which"] != "baseline" else None
        epochs.append({"samples": n, "wall_s": wall, "samples_per_s": n / wall, "cpu_s": cpu,
                       "samples_per_cpu_s": n / cpu, "wait_ms_mean": 1000 * float(np.mean(waits)) if waits else None,
                       "rows_per_sample": rps})
        all_waits += waits
        load.append(os.getloadavg()[0])
    extra = {}
    if spec["which"] != "baseline":
        extra = {"shuffle_mode": loader.shuffle_mode, "block_steps": loader.block_steps,
                 "window_blocks": loader.window_blocks}
    return {"which": spec["which"], **extra, "first_batch_s": first, "epochs": epochs, "peak_rss_mb": vm_hwm_mb(),
            "load": load, "wait_ms_mean": 1000 * float(np.mean(all_waits)) if all_waits else None,
            "wait_ms_p95": 1000 * float(np.percentile(all_waits, 95)) if all_waits else None}


def launch(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_child", json.dumps(spec)], cwd=ROOT, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- 1.40625 deg decode
def hires_data(out: Path, days: int) -> Path:
    """A few days of hourly 1.40625 deg data with the 48 ClimaX variables, built into shards by the
    project's own pipeline (generator + jobs.preprocess), once."""
    import yaml

    shards = out / "shards"
    if (shards / "manifest.json").exists():
        return shards
    from pipelines.sample_data import generate

    variables = yaml.safe_load((ROOT / "configs" / "model" / "climax-1.40625.yaml").read_text())["default_vars"]
    generated = [v for v in variables if v != "latitude"]  # the build derives latitude from the grid
    t = time.perf_counter()
    generate(out / "sample", years=(2015,), resolution=1.40625, step_hours=1, variables=generated,
             formats=("weatherbench",), progress=False, max_days=days)
    print(f"generated {days} days of hourly 1.40625 deg data in {time.perf_counter() - t:.0f} s", flush=True)
    recipe = {"sources": [{"path": str(out / "sample" / "weatherbench"), "format": "weatherbench"}],
              "variables": variables, "grid": {"resolution": 1.40625, "method": "bilinear"},
              "time": {"start": "2015-01-01", "end": f"2015-01-{days:02d}T23:00", "step": "1h"},
              "splits": {"train": [2015, 2015]}, "output": str(shards)}
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jobs.preprocess", str(out / "recipe.yaml")], cwd=ROOT, check=True)
    print(f"built shards in {time.perf_counter() - t:.0f} s", flush=True)
    return shards


def hires(out: Path, days: int, batch_size: int) -> int:
    """Decode MB/s per core and streaming samples per CPU-second at 1.40625 deg, 48 variables."""
    import pyarrow.parquet as pq

    from benchmarks.common import machine
    from climax import shards as S
    from climax.data import ForecastLoader, ShardDataset, tensor_column
    from climax.sampling import lead_hours

    root = hires_data(out.resolve(), days)
    manifest = S.Manifest.from_json((root / S.MANIFEST).read_text())
    tv = manifest.variables
    files = [root / s["path"] for s in manifest.shards("train")]
    warm_cache(files)
    rows = sum(s["rows"] for s in manifest.shards("train"))
    h, w = manifest.raw["grid"]["shape"]
    row_mb = len(tv) * h * w * 4 / 1e6
    disk = sum(f.stat().st_size for f in files) / 1e6
    print(f"machine: {machine()}")
    print(f"data: {root}: {rows} hourly steps, grid {h} x {w}, {len(tv)} time-varying variables + "
          f"{len(manifest.constants)} constants; one step {row_mb:.2f} MB of float32, Parquet {disk:.0f} MB "
          f"({disk / (rows * row_mb):.2f} of raw)")
    # 1. Parquet decode alone, one thread: row groups (one step each) to numpy, 8 steps per read
    for rep in range(3):
        c, t, mb = cpu_s(), time.perf_counter(), 0.0
        for f in files:
            pf = pq.ParquetFile(f)
            n = pf.metadata.num_row_groups
            for a in range(0, n, 8):
                table = pf.read_row_groups(list(range(a, min(a + 8, n))), columns=tv, use_threads=False)
                for v in tv:
                    mb += tensor_column(table, v).nbytes / 1e6
        cpu, wall = cpu_s() - c, time.perf_counter() - t
        print(f"  decode, one thread, run {rep + 1}: {mb:.0f} MB in {cpu:.2f} CPU-s ({wall:.2f} s wall): "
              f"{mb / cpu:.0f} MB/s per core, {1000 * cpu / (mb / row_mb):.1f} ms CPU per step", flush=True)
    # 2. the streaming loader (cache_mb=0, block shuffle), leads 1..24 h, all threads
    ds = ShardDataset(str(root))
    ld = ForecastLoader(ds, "train", manifest.constants + tv, tv, lead_hours(1, 24, 1), random_lead=True,
                        batch_size=batch_size, cache_mb=0)
    for e in range(3):
        ld.reset_stats()
        ld.set_epoch(e)
        c, t, n = cpu_s(), time.perf_counter(), 0
        for b in ld:
            n += len(b)
        cpu, wall = cpu_s() - c, time.perf_counter() - t
        print(f"  loader ({ld.shuffle_mode} shuffle, blocks of {ld.block_steps} x {ld.window_blocks}, batch "
              f"{batch_size}), epoch {e + 1}: {n} samples, {n / cpu:.1f} samples per CPU-s ({n / wall:.1f}/s wall, "
              f"{cpu / wall:.2f} cores busy), rows decoded per sample {ld.stats['rows_per_sample']:.2f}, "
              f"decoded {ld.stats['bytes_decoded'] / 1e6 / cpu:.0f} MB per CPU-s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(ROOT / "demo_output" / "shards"), help="a preprocessed dataset (local)")
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--buffer", type=int, default=10_000, help="the baseline's shuffle buffer (samples)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeat", type=int, default=3, help="runs of each loader, alternating; best and median")
    p.add_argument("--step-ms", type=float, default=0.0, help="also run ours behind a simulated step of this length")
    p.add_argument("--npz-dir", default=None, help="where the baseline's npz shards go (default: beside --root)")
    p.add_argument("--json", default=None)
    p.add_argument("--hires", action="store_true", help="the 1.40625 deg, 48-variable decode measurement instead")
    p.add_argument("--hires-dir", default=str(ROOT / "demo_output" / "hires"), help="its data (built once)")
    p.add_argument("--hires-days", type=int, default=4, help="hourly days of 1.40625 deg data to generate")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        print(json.dumps(run_child(json.loads(args._child))))
        return 0
    if args.hires:
        return hires(Path(args.hires_dir), args.hires_days, args.batch_size)

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
    runs: dict[str, list[dict]] = {"baseline": [], "ours": [], "stream": [], "stream-global": []}
    for r in range(args.repeat):
        for which in runs:
            files = [str(f) for f in (npz if which == "baseline" else parquet)]
            res = launch({**base, "which": which, "files": files})
            runs[which].append(res)
            sps = " ".join(f"{e['samples_per_s']:.0f}" for e in res["epochs"])
            spc = " ".join(f"{e['samples_per_cpu_s']:.0f}" for e in res["epochs"])
            rps = " ".join(f"{e['rows_per_sample']:.2f}" for e in res["epochs"]) if which != "baseline" else "-"
            print(f"  run {r + 1} {which:13s}: first batch {res['first_batch_s']:.3f} s, samples/s per epoch {sps} "
                  f"(per CPU-second {spc}), rows decoded per sample {rps} "
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
          "| samples per CPU-s (median) | vs baseline | rows decoded per sample | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for which in ("baseline", "ours", "stream", "stream-global"):
        fb = [r["first_batch_s"] for r in runs[which]]
        for e in range(args.epochs):
            best, med = summary(which, e)
            bbest, bmed = summary("baseline", e)
            cpu = summary(which, e, "samples_per_cpu_s")[1]
            bcpu = summary("baseline", e, "samples_per_cpu_s")[1]
            rps = "-" if which == "baseline" else \
                f"{statistics.median(r['epochs'][e]['rows_per_sample'] for r in runs[which]):.2f}"
            print(f"| {which} | {min(fb):.3f} / {statistics.median(fb):.3f} s | {e + 1} | {best:.0f} / {med:.0f} | "
                  f"{best / bbest:.2f}x / {med / bmed:.2f}x | {cpu:.0f} | {cpu / bcpu:.2f}x | {rps} | "
                  f"{max(r['peak_rss_mb'] for r in runs[which]):.0f} MB |")
    # the acceptance line: streaming (cache_mb=0, default order) against the original, every epoch
    ratios = [summary("stream", e)[1] / summary("baseline", e)[1] for e in range(args.epochs)]
    worst_rps = max(e["rows_per_sample"] for r in runs["stream"] for e in r["epochs"])
    print(f"\nstream (cache_mb=0, {runs['stream'][0]['shuffle_mode']} shuffle, blocks of "
          f"{runs['stream'][0]['block_steps']} steps x {runs['stream'][0]['window_blocks']} per window) "
          "vs the original, "
          f"median samples/s per epoch: {' '.join(f'{x:.2f}x' for x in ratios)} (target >= 1.0x in every epoch: "
          f"{'met' if min(ratios) >= 1.0 else 'MISSED'}); rows decoded per sample at most {worst_rps:.2f} "
          f"(target <= 1.2: {'met' if worst_rps <= 1.2 else 'MISSED'})")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
