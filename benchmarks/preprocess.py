"""Preprocessing throughput and memory: our Ray Data build against the original ClimaX script.

Both runs read the same WeatherBench-layout NetCDF files (``pipelines.sample_data``, 5.625 deg,
6-hourly, 15 time-varying variables + 3 constants) and are launched by this process, each in its
own child process, one after the other:

* baseline: what ``src/data_preprocessing/nc2np_equally_era5.py`` of microsoft/ClimaX does, in one
  process: constants repeated along time, then for each year and each variable folder
  ``xarray.open_dataset`` loads the whole year of that variable (per level) into memory, numpy
  computes that year's mean/std/climatology (per-year stds, later combined across years as the
  original does), and uncompressed ``np.savez`` writes ``--baseline-shards`` shard files per year
  of float32 arrays (T, 1, H, W), constants included in every shard. Unlike the original it keeps
  the 366th day of leap years (it truncates to 365 days), so both outputs hold the same steps.
* ours: ``pipelines.build.build(recipe, overwrite=True)`` after ``ray.init(num_cpus=--num-cpus)``
  (scan, shards, climatology, manifest), in a child that starts its own local Ray.

Memory: this process samples every ``--interval`` s (0.05 by default) the RSS (and PSS) of each child's whole process
tree from /proc: for ours the driver, the raylet-spawned Ray workers, and Ray's fixed daemons
(gcs_server, raylet, dashboard, agents, log monitor), reported separately. The headline "peak RSS" is
the maximum over samples of (driver + workers) RSS; the daemons' peak and the total are printed
too. RSS sums count shared pages (libraries, the Ray object store) once per process; PSS splits
them, so the PSS sum is the better "machine memory" number. The baseline is sampled the same way
(its tree is one process) and its own ``ru_maxrss`` is printed as a cross-check.

Page cache: every input file is read once before each run, so both runs read from a warm cache.
Wall time is the work only (after imports; for ours after ``ray.init``, whose time is printed apart).
Throughput = bytes of the NetCDF files read / wall time.

    python benchmarks/preprocess.py [--years 3] [--repeat 1] [--workdir DIR] [--keep]
        [--shard-bytes B] [--compression-level L] [--pss] [--profile] [--json FILE]

The input is generated once under ``--workdir``/raw (``pipelines.sample_data``, not timed) and each
run reads a folder of symlinks holding only the benchmarked years. ``--repeat`` alternates the two
runs and keeps the best wall time and the worst peak (the machine may be shared).

``--profile`` also runs one shard task in-process under cProfile and prints where its time goes
(decode, regrid, statistics, Parquet encoding, ...).

Why one file of ~790 lines: a benchmark script, run as a whole; the baseline it measures against (a
re-implementation of the original ClimaX preprocessing) lives here so that nothing in the product
depends on it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIABLES = [  # 3 constants + 17 time-varying channels (issue 14's benchmark input)
    "land_sea_mask", "orography", "latitude", "2m_temperature", "10m_u_component_of_wind",
    "10m_v_component_of_wind", "geopotential_250", "geopotential_500", "geopotential_850", "temperature_250",
    "temperature_500", "temperature_850", "u_component_of_wind_250", "u_component_of_wind_500",
    "u_component_of_wind_850", "v_component_of_wind_250", "v_component_of_wind_500", "v_component_of_wind_850",
    "specific_humidity_850", "relative_humidity_850",
]
FIRST_YEAR = 2015
#: the original's constant fields -> WeatherBench constants file variables
CONST_FIELDS = {"land_sea_mask": "lsm", "orography": "orography", "latitude": "lat2d"}
MB = 1e6


# ----------------------------------------------------------------------------- helpers
def splits_for(years: list[int]) -> dict[str, list[int]]:
    """Last year test, the one before val, the rest train (fewer years: train first)."""
    if len(years) == 1:
        return {"train": [years[0], years[0]]}
    if len(years) == 2:
        return {"train": [years[0], years[0]], "val": [years[1], years[1]]}
    return {"train": [years[0], years[-3]], "val": [years[-2], years[-2]], "test": [years[-1], years[-1]]}


def input_files(root: str, years: list[int]) -> list[str]:
    """The NetCDF files both runs read: the variable folders of those years, plus the constants."""
    from pipelines.sources.weatherbench import file_year, list_files

    out = []
    for folder, files in list_files(root, VARIABLES).items():
        out += [f for f in files if folder == "constants" or file_year(f) in years]
    return sorted(out)


def dir_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def warm_cache(files: list[str]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def ensure_data(raw: Path, years: list[int], step_hours: int = 1) -> str:
    root = raw / "weatherbench"
    have = set()
    if root.is_dir():
        from pipelines.sources.weatherbench import years as wb_years

        try:
            have = set(wb_years(str(root)))
        except Exception:  # noqa: BLE001 - an empty or partial folder: regenerate
            have = set()
    missing = [y for y in years if y not in have]
    if missing:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipelines.sample_data", str(raw), "--years", *map(str, missing),
                        "--formats", "weatherbench", "--step-hours", str(step_hours), "--quiet",
                        "--variables", *[v for v in VARIABLES if v != "latitude"]], check=True, cwd=ROOT)
        print(f"generated sample data for {missing} in {time.perf_counter() - t:.0f} s", flush=True)
    return str(root)


def vm_hwm_mb() -> float:
    """This process's own peak RSS since exec (unlike ru_maxrss, which inherits the peak of the
    process that forked it), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB
    return float("nan")


def subset_root(raw_root: str, years: list[int], dest: Path) -> str:
    """A WeatherBench folder of symlinks holding only ``years`` (and the constants), so that both
    runs see exactly the files they read (our scan stage opens every file under the root)."""
    from pipelines.sources.weatherbench import file_year, list_files

    root = dest / "weatherbench"
    if root.exists():
        shutil.rmtree(root)
    for folder, files in list_files(raw_root).items():
        for f in files:
            if folder == "constants" or file_year(f) in years:
                (root / folder).mkdir(parents=True, exist_ok=True)
                (root / folder / os.path.basename(f)).symlink_to(f)
    return str(root)


def split_bytes(out: str, which: str) -> dict[str, int]:
    """Output bytes by kind: shards (time steps), climatology/statistics, the rest."""
    kinds = {"shards": 0, "climatology+stats": 0, "other": 0}
    for p in Path(out).rglob("*"):
        if not p.is_file():
            continue
        rel = p.relative_to(out).as_posix()
        if which == "baseline":
            kind = "climatology+stats" if "climatology" in rel or "normalize" in rel else "shards"
        elif rel.split("/")[0] in ("train", "val", "test"):
            kind = "shards"
        elif rel.startswith("climatology"):
            kind = "climatology+stats"
        else:
            kind = "other"
        kinds[kind] += p.stat().st_size
    return kinds


# ----------------------------------------------------------------------------- process-tree sampler
PAGE = os.sysconf("SC_PAGE_SIZE")
DAEMON_MARKERS = ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "runtime_env",
                  "agent", "ray_client_server")


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (all its threads) from /proc/PID/task/*/children."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return out


def _rss_pss(pid: int, with_pss: bool) -> tuple[int, int]:
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE
        pss = 0
        if with_pss:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss = int(line.split()[1]) * 1024
                        break
        return rss, pss
    except (OSError, ValueError, IndexError):
        return 0, 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _title(cmd: str) -> str:
    if cmd.startswith("ray::"):
        return cmd.split()[0]
    for part in cmd.split():
        if part.endswith(".py") or "gcs_server" in part or "raylet" in part:
            return os.path.basename(part)
    return os.path.basename(cmd.split()[0]) if cmd else "?"


def classify(pid: int, root: int, cmd: str) -> str:
    """driver (the child itself), daemons (Ray's fixed per-node processes), or workers (processes the
    raylet starts for tasks and actors, Ray Data's own actors included)."""
    if pid == root:
        return "driver"
    title = _title(cmd)
    if title in ("ray::DashboardAgent", "ray::RuntimeEnvAgent") or (
            not cmd.startswith("ray::") and any(m in title for m in DAEMON_MARKERS)):
        return "daemons"
    if "default_worker.py" in cmd or cmd.startswith("ray::"):
        return "workers"
    return "other"  # e.g. a shell; counted with the driver


class TreeSampler:
    """Samples RSS/PSS of ``root``'s process tree every ``interval`` s in a thread."""

    def __init__(self, root: int, interval: float = 0.2, with_pss: bool = False):
        self.root, self.interval, self.with_pss = root, interval, with_pss
        self.peak = {k: 0 for k in ("driver", "workers", "daemons", "main", "total", "main_pss", "total_pss")}
        self.max_workers = 0
        self.samples = 0
        self.at_peak: list[tuple[str, str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        tree, todo = [], [self.root]
        while todo:
            p = todo.pop()
            tree.append(p)
            todo += _children(p)
        rss = {k: 0 for k in ("driver", "workers", "daemons")}
        pss = {k: 0 for k in ("driver", "workers", "daemons")}
        n_workers = 0
        procs = []
        for p in tree:
            cmd = _cmdline(p)  # read each time: workers retitle themselves (ray::IDLE, ray::Map(apply))
            kind = classify(p, self.root, cmd)
            kind = "driver" if kind == "other" else kind
            r, s = _rss_pss(p, self.with_pss)
            rss[kind] += r
            pss[kind] += s
            n_workers += kind == "workers"
            procs.append((kind, _title(cmd), r))
        self.samples += 1
        main, main_pss = rss["driver"] + rss["workers"], pss["driver"] + pss["workers"]
        if main > self.peak["main"]:
            self.at_peak = sorted(procs, key=lambda x: -x[2])
        vals = {**rss, "main": main, "total": main + rss["daemons"], "main_pss": main_pss,
                "total_pss": main_pss + pss["daemons"]}
        for k, v in vals.items():
            self.peak[k] = max(self.peak[k], v)
        self.max_workers = max(self.max_workers, n_workers)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def report(self) -> dict:
        return {**{f"peak_{k}_mb": v / MB for k, v in self.peak.items()}, "samples": self.samples,
                "max_workers": self.max_workers,
                "at_peak": [f"{kind}:{title} {r / MB:.0f}" for kind, title, r in self.at_peak]}


# ----------------------------------------------------------------------------- the two runs (children)
def run_baseline(root: str, years: list[int], out: str, n_shards: int) -> dict:
    """The original ClimaX nc2np_equally_era5.py approach (see the module docstring)."""
    import numpy as np
    import xarray as xr

    from benchmarks.common import peak_rss_mb
    from pipelines.sources.weatherbench import file_year, list_files

    t0 = time.perf_counter()
    folders = list_files(root, VARIABLES)
    const_file = folders.pop("constants")[0]
    wanted = {}  # folder -> None (surface) or list of levels
    for v in VARIABLES:
        for folder in folders:
            if v == folder:
                wanted[folder] = None
            elif v.startswith(folder + "_") and v[len(folder) + 1:].isdigit():
                wanted.setdefault(folder, []).append(int(v[len(folder) + 1:]))
    splits = splits_for(years)

    def nc2np(partition: str, part_years: list[int]) -> None:
        os.makedirs(os.path.join(out, partition), exist_ok=True)
        normalize_mean: dict = {}
        normalize_std: dict = {}
        climatology: dict = {}
        constants = xr.open_dataset(const_file)
        steps = None
        for year in part_years:
            np_vars = {}
            for folder, levels in wanted.items():
                path = next(f for f in folders[folder] if file_year(f) == year)
                ds = xr.open_dataset(path)  # one variable, one year
                code = next(iter(ds.data_vars))
                names = [(folder, None)] if levels is None else [(f"{folder}_{lv}", lv) for lv in levels]
                for name, lv in names:
                    da = ds[code].expand_dims("val", axis=1) if lv is None else ds[code].sel(level=[lv])
                    np_vars[name] = da.to_numpy()  # the whole year in memory
                    if partition == "train":
                        normalize_mean.setdefault(name, []).append(np_vars[name].mean(axis=(0, 2, 3)))
                        normalize_std.setdefault(name, []).append(np_vars[name].std(axis=(0, 2, 3)))
                    climatology.setdefault(name, []).append(np_vars[name].mean(axis=0))
                ds.close()
            steps = len(next(iter(np_vars.values())))
            for f, code in CONST_FIELDS.items():  # the original repeats the constants along time
                np_vars[f] = np.expand_dims(constants[code].to_numpy(), axis=(0, 1)).repeat(steps, axis=0)
                if partition == "train" and f not in normalize_mean:
                    normalize_mean[f] = np_vars[f].mean(axis=(0, 2, 3))
                    normalize_std[f] = np_vars[f].std(axis=(0, 2, 3))
            per = -(-steps // n_shards)
            for shard_id in range(n_shards):
                sharded = {k: v[shard_id * per:(shard_id + 1) * per] for k, v in np_vars.items()}
                np.savez(os.path.join(out, partition, f"{year}_{shard_id}.npz"), **sharded)
            del np_vars
        if partition == "train":
            for var in list(normalize_mean):
                if var in CONST_FIELDS:
                    continue
                mean, std = np.stack(normalize_mean[var]), np.stack(normalize_std[var])
                variance = (std ** 2).mean(axis=0) + (mean ** 2).mean(axis=0) - mean.mean(axis=0) ** 2
                normalize_mean[var], normalize_std[var] = mean.mean(axis=0), np.sqrt(variance)
            np.savez(os.path.join(out, "normalize_mean.npz"), **normalize_mean)
            np.savez(os.path.join(out, "normalize_std.npz"), **normalize_std)
        clim = {k: np.stack(v).mean(axis=0) for k, v in climatology.items()}
        np.savez(os.path.join(out, partition, "climatology.npz"), **clim)
        constants.close()

    for partition, (a, b) in splits.items():
        nc2np(partition, [y for y in years if a <= y <= b])
    wall = time.perf_counter() - t0
    const_bytes = 0
    for p in Path(out).glob("*/*_*.npz"):
        if p.name.startswith("climatology"):
            continue
        with np.load(p) as z:
            const_bytes += sum(z[k].nbytes for k in CONST_FIELDS if k in z.files)
    return {"wall_s": wall, "ru_maxrss_mb": peak_rss_mb(), "vm_hwm_mb": vm_hwm_mb(),
            "repeated_constant_bytes": const_bytes}


def make_recipe(root: str, years: list[int], out: str, shard_bytes: int | None, level: int | None,
                step_hours: int = 1):
    from pipelines.recipe import Recipe

    d = {
        "sources": [{"path": root}], "variables": VARIABLES,
        "grid": {"resolution": 5.625, "method": "bilinear"},
        "time": {"start": f"{years[0]}-01-01", "end": f"{years[-1]}-12-31T{24 - step_hours:02d}:00",
                 "step": f"{step_hours}h"},
        "splits": splits_for(years), "output": out,
    }
    if shard_bytes:
        d["shard_bytes"] = shard_bytes
    if level is not None:
        d["compression_level"] = level
    return Recipe.model_validate(d)


def run_ours(root: str, years: list[int], out: str, num_cpus: int, shard_bytes: int | None,
             level: int | None, step_hours: int = 1, nodes: int = 0) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster this benchmark starts itself
    import ray

    from benchmarks.common import peak_rss_mb
    from pipelines.build import build

    stages: dict[str, float] = {}
    recipe = make_recipe(root, years, out, shard_bytes, level, step_hours)
    t = time.perf_counter()
    cluster = None
    if nodes:  # scale-out: `nodes` Ray nodes of one CPU each on this machine (ray.cluster_utils)
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, log_to_driver=False)
    init_s = time.perf_counter() - t
    t0 = time.perf_counter()
    manifest = build(recipe, overwrite=True, progress=False, timings=stages)
    wall = time.perf_counter() - t0
    shards = sum(len(s["shards"]) for s in manifest["splits"].values())
    rows = sum(s["rows"] for s in manifest["splits"].values())
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
    return {"wall_s": wall, "stages_s": stages, "ray_init_s": init_s, "driver_ru_maxrss_mb": peak_rss_mb(),
            "driver_vm_hwm_mb": vm_hwm_mb(), "shards": shards,
            "rows": rows, "shard_bytes": recipe.shard_bytes, "compression_level": recipe.compression_level}


# ----------------------------------------------------------------------------- 0.25 deg GRIB mode
GRIB_VARS = ["2m_temperature", "temperature_850"]


def ensure_grib(raw: Path, days: int, step_hours: int, resolution: float = 0.25) -> list[str]:
    """0.25 deg GRIB 2 from the sample generator (not timed): ``days`` days of GRIB_VARS."""
    grib_dir = raw / "grib"
    if not any(grib_dir.glob("*.grib")):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipelines.sample_data", str(raw), "--years", str(FIRST_YEAR),
                        "--formats", "grib", "--resolution", str(resolution), "--step-hours", str(step_hours),
                        "--max-days", str(days), "--quiet", "--variables", *GRIB_VARS], check=True, cwd=ROOT)
        print(f"generated {resolution} deg GRIB in {time.perf_counter() - t:.0f} s", flush=True)
    return sorted(str(p) for p in grib_dir.glob("*.grib"))


def run_grib_decode(files: list[str], out: str) -> dict:
    """Baseline of the GRIB mode: every message decoded by ecCodes in one process, values
    discarded. The physical limit of reading these files on one core (no regrid, no output)."""
    import eccodes

    t0 = time.perf_counter()
    n = 0
    for path in files:
        with open(path, "rb") as f:
            while True:
                h = eccodes.codes_grib_new_from_file(f)
                if h is None:
                    break
                eccodes.codes_get_values(h)
                eccodes.codes_release(h)
                n += 1
    return {"wall_s": time.perf_counter() - t0, "messages": n}


def run_grib_ours(files: list[str], out: str, num_cpus: int, resolution: float, step_hours: int, days: int,
                  max_task_mb: int | None) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster this benchmark starts itself
    import ray

    from pipelines.build import build
    from pipelines.recipe import Recipe

    end = (np.datetime64(f"{FIRST_YEAR}-01-01T00:00")
           + np.timedelta64(days * 24 - step_hours, "h")).astype("datetime64[m]")
    d = {"sources": [{"path": os.path.dirname(files[0]) + "/*.grib", "format": "grib"}], "variables": GRIB_VARS,
         "grid": {"resolution": resolution, "method": "conservative"},
         "time": {"start": f"{FIRST_YEAR}-01-01", "end": str(end), "step": f"{step_hours}h"},
         "splits": {"train": [FIRST_YEAR, FIRST_YEAR]}, "output": out,
         "regrid_cache": os.path.join(os.path.dirname(out), "regrid_cache")}
    if max_task_mb:
        d["max_task_mb"] = max_task_mb
    recipe = Recipe.model_validate(d)
    ray.init(num_cpus=num_cpus, log_to_driver=False)
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    manifest = build(recipe, overwrite=True, progress=False, timings=stages)
    wall = time.perf_counter() - t0
    ray.shutdown()
    return {"wall_s": wall, "stages_s": stages, "rows": sum(s["rows"] for s in manifest["splits"].values()),
            "max_task_mb": recipe.max_task_mb}


def grib_main(args: argparse.Namespace, workdir: str) -> None:
    files = ensure_grib(Path(workdir) / f"raw_grib_{args.grib_days}d", args.grib_days, 6)
    in_bytes = sum(os.path.getsize(f) for f in files)
    print(f"input: {len(files)} GRIB 2 files, 0.25 deg (721 x 1440), {', '.join(GRIB_VARS)}, "
          f"{args.grib_days} days 6-hourly, {in_bytes / MB:.0f} MB; whole-tree PSS sampled every {args.interval} s",
          flush=True)
    rows = []
    base = launch_generic({"which": "grib_decode", "files": files}, args, os.path.join(workdir, "out_decode"), files)
    rows.append(("ecCodes decode only (1 process)", base))
    for res in (5.625, 1.40625):
        spec = {"which": "grib_ours", "files": files, "resolution": res, "step_hours": 6, "days": args.grib_days,
                "num_cpus": args.num_cpus, "max_task_mb": args.max_task_mb}
        rows.append((f"ours -> {res} deg conservative", launch_generic(spec, args, os.path.join(workdir, f"out_{res}"),
                                                                        files)))
    print(f"\n{'run':36s} {'wall s':>7s} {'GRIB MB/s':>10s} {'peak PSS MB (whole tree)':>25s} {'out MB':>7s}")
    for name, r in rows:
        print(f"{name:36s} {r['wall_s']:7.2f} {in_bytes / MB / r['wall_s']:10.1f} {r['peak_total_pss_mb']:25.0f} "
              f"{r['output_bytes'] / MB:7.1f}")
    for name, r in rows[1:]:
        print(f"{name}: {base['wall_s'] / r['wall_s']:.2f}x the single-process decode rate; stages "
              + ", ".join(f"{k} {v:.1f} s" for k, v in r["stages_s"].items()) + f"; max_task_mb {r['max_task_mb']}; "
              f"at peak: {', '.join(r['at_peak'][:6])}")
    ok = all(r["peak_total_pss_mb"] <= 2000 for _, r in rows[1:])
    print(f"target whole-tree PSS <= 2.0 GB: {'met' if ok else 'MISSED'}")


def scaling_main(args: argparse.Namespace, workdir: str) -> None:
    years = list(range(FIRST_YEAR, FIRST_YEAR + args.years))
    raw_root = ensure_data(Path(workdir) / f"raw_{args.step_hours}h", years, args.step_hours)
    root = subset_root(raw_root, years, Path(workdir) / f"input_{args.years}y")
    files = input_files(root, years)
    in_bytes = sum(os.path.getsize(f) for f in files)
    print(f"input: {len(files)} NetCDF files, {in_bytes / MB:.0f} MB; ours on 1 then 2 one-CPU Ray nodes "
          "(ray.cluster_utils.Cluster on this machine)", flush=True)
    res = {}
    for n in (1, 2):
        spec = {"which": "ours", "root": root, "years": years, "baseline_shards": 0, "num_cpus": 1,
                "shard_bytes": args.shard_bytes, "level": args.compression_level, "step_hours": args.step_hours,
                "nodes": n}
        res[n] = launch_generic(spec, args, os.path.join(workdir, f"out_nodes{n}"), files)
        r = res[n]
        print(f"{n} node(s): wall {r['wall_s']:.1f} s, {in_bytes / MB / r['wall_s']:.1f} MB/s, whole-tree PSS peak "
              f"{r['peak_total_pss_mb']:.0f} MB (workers {r['peak_workers_mb']:.0f} MB RSS), stages "
              + ", ".join(f"{k} {v:.1f} s" for k, v in r["stages_s"].items()), flush=True)
    same = all((Path(workdir, "out_nodes1", p.relative_to(Path(workdir, "out_nodes2"))).read_bytes() == p.read_bytes())
               for p in Path(workdir, "out_nodes2").rglob("*.parquet"))
    print(f"throughput 2 nodes / 1 node: {res[1]['wall_s'] / res[2]['wall_s']:.2f}x (target 1.8x); "
          f"shards byte-identical: {same}")


def launch_generic(spec: dict, args: argparse.Namespace, out: str, files: list[str], pss: bool = True) -> dict:
    """Run ``spec`` in a child process on a warm page cache, sampling its whole process tree."""
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    warm_cache(files)
    res_path = out.rstrip("/") + ".result.json"
    spec = {**spec, "out": out, "result": res_path}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, __file__, "--_child", json.dumps(spec)], cwd=ROOT, env=env)
    with TreeSampler(proc.pid, args.interval, pss) as sampler:
        rc = proc.wait()
    if rc:
        raise SystemExit(f"{spec['which']} run failed with exit status {rc}")
    with open(res_path) as f:
        res = json.load(f)
    os.unlink(res_path)
    res.update(sampler.report())
    res["output_bytes"] = dir_bytes(out)
    return res


def child_main(argv: list[str]) -> None:
    a = json.loads(argv[0])
    if a["which"] == "grib_decode":
        res = run_grib_decode(a["files"], a["out"])
    elif a["which"] == "grib_ours":
        res = run_grib_ours(a["files"], a["out"], a["num_cpus"], a["resolution"], a["step_hours"], a["days"],
                            a["max_task_mb"])
    elif a["which"] == "baseline":
        res = run_baseline(a["root"], a["years"], a["out"], a["baseline_shards"])
    else:
        res = run_ours(a["root"], a["years"], a["out"], a["num_cpus"], a["shard_bytes"], a["level"], a["step_hours"],
                       a.get("nodes", 0))
    with open(a["result"], "w") as f:
        json.dump(res, f)


def launch(which: str, args: argparse.Namespace, root: str, years: list[int], out: str, files: list[str]) -> dict:
    spec = {"which": which, "root": root, "years": years, "baseline_shards": args.baseline_shards,
            "num_cpus": args.num_cpus, "shard_bytes": args.shard_bytes, "level": args.compression_level,
            "step_hours": args.step_hours}
    t = time.perf_counter()
    res = launch_generic(spec, args, out, files, pss=args.pss)
    res["process_s"] = time.perf_counter() - t
    res["output_by_kind"] = split_bytes(out, which)
    res["loadavg_after"] = os.getloadavg()[0]
    return res


# ----------------------------------------------------------------------------- profile one shard task
def profile_one_shard(root: str, years: list[int], workdir: str, shard_bytes: int | None, level: int | None,
                      step_hours: int = 1) -> None:
    """Run the biggest window task in-process (no Ray) under cProfile; print where its time goes."""
    import cProfile
    import pstats

    from pipelines import build as B

    recipe = make_recipe(root, years[:1], os.path.join(workdir, "profile_out"), shard_bytes, level, step_hours)
    files = [B.scan_file(it, recipe.variables) for it in B.expand_sources(recipe)]
    plan = B.plan_chunks(recipe, files)
    ctx = B.BuildContext(recipe_fp=recipe.fingerprint(), files=tuple(files), output=recipe.output,
                         storage_options=None, lat=tuple(plan.dst.lat.tolist()), lon=tuple(plan.dst.lon.tolist()),
                         method=recipe.grid.method, regrid_cache=recipe.regrid_cache,
                         time_vars=tuple(plan.time_vars), overwrite=True,
                         compression_level=recipe.compression_level, block_bytes=recipe.max_task_mb * 2**19)
    unit = max((u for u in plan.units if u.kind == "window"), key=lambda u: len(u.slots))
    B.run_unit(unit, ctx)  # warm-up: regridder weights, imports, open files
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    B.run_unit(unit, ctx)
    prof.disable()
    total = time.perf_counter() - t
    st = pstats.Stats(prof)
    cum: dict[tuple[str, str], float] = {}
    for (file, _, fn), (_, _, _, ct, _) in st.stats.items():
        key = (os.path.basename(file), fn)
        cum[key] = max(cum.get(key, 0.0), ct)
    read, rg = cum.get(("shard_task.py", "_read_into"), 0.0), cum.get(("regrid.py", "__call__"), 0.0)
    parts = {
        "decode + NaN check + regrid (_read_into)": read,
        "  of which regrid": rg,
        "statistics (Moments.of, of_diffs)": cum.get(("stats.py", "of"), 0.0) + cum.get(("stats.py", "of_diffs"), 0.0),
        "Arrow table build": cum.get(("shards.py", "table_from_arrays"), 0.0),
        "Parquet encode (table_bytes)": cum.get(("output.py", "table_bytes"), 0.0),
        "write_atomic (write, fsync, rename)": cum.get(("output.py", "write_atomic"), 0.0),
        "sha256": cum.get(("shard_task.py", "_write_table"), 0.0) - cum.get(("output.py", "table_bytes"), 0.0)
        - cum.get(("output.py", "write_atomic"), 0.0),
    }
    steps = sum(len(c.times) for c in unit.chunks)
    nbytes = steps * len(plan.time_vars) * plan.dst.shape[0] * plan.dst.shape[1] * 4
    print(f"\nprofile of one window task in-process ({steps} steps x {len(plan.time_vars)} variables, "
          f"{nbytes / MB:.0f} MB float32, zstd level {recipe.compression_level}): {total:.2f} s, "
          f"{nbytes / MB / total:.0f} MB/s of shard data")
    for name, v in parts.items():
        print(f"  {name:42s} {v:6.2f} s  {100 * v / total:5.1f} %")
    print("  top functions by cumulative time:")
    st.sort_stats("cumulative").print_stats(22)


# ----------------------------------------------------------------------------- main
def summarise(runs: list[dict]) -> dict:
    """Best (minimum) wall time over repeats, worst (maximum) peaks; all values kept."""
    best = dict(min(runs, key=lambda r: r["wall_s"]))
    best["wall_s_all"] = [round(r["wall_s"], 2) for r in runs]
    for k in [k for k in runs[0] if k.startswith("peak_")]:
        best[k] = max(r[k] for r in runs)
    best["at_peak"] = max(runs, key=lambda r: r["peak_main_mb"])["at_peak"]
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--years", type=int, default=3, help="number of years, from 2015 (default 3)")
    p.add_argument("--workdir", default=None, help="where the sample data and outputs go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the data and outputs")
    p.add_argument("--repeat", type=int, default=1, help="alternate baseline/ours this many times; best wall time")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--shard-bytes", type=int, default=None, help="recipe shard_bytes (default: the recipe's)")
    p.add_argument("--compression-level", type=int, default=None, help="recipe compression_level")
    p.add_argument("--baseline-shards", type=int, default=4, help="npz shards per year of the baseline")
    p.add_argument("--step-hours", type=int, default=1, help="time step of the generated input (default hourly)")
    p.add_argument("--interval", type=float, default=0.25, help="memory sampling period, s")
    p.add_argument("--no-pss", dest="pss", action="store_false",
                   help="sample RSS only (PSS reads smaps_rollup: ~10 ms per process per sample)")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--profile", action="store_true", help="also profile one shard task in-process")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--scaling", action="store_true",
                   help="scale-out mode: ours on a ray.cluster_utils.Cluster of 1 then 2 one-CPU nodes")
    p.add_argument("--grib", action="store_true",
                   help="the 0.25 deg GRIB mode: 0.25 -> 5.625 and 1.40625 deg conservative, whole-tree PSS")
    p.add_argument("--grib-days", type=int, default=60, help="days of 6-hourly 0.25 deg GRIB (default 60: 240 steps)")
    p.add_argument("--max-task-mb", type=int, default=None, help="recipe max_task_mb (default: the recipe's)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        child_main([args._child])
        return 0

    workdir = args.workdir or tempfile.mkdtemp(prefix="climax-preprocess-bench-")
    os.makedirs(workdir, exist_ok=True)
    if args.scaling:
        try:
            scaling_main(args, workdir)
        finally:
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
        return 0
    if args.grib:
        try:
            grib_main(args, workdir)
            from benchmarks.common import machine

            print(f"machine: {machine()}; load average after: {os.getloadavg()[0]:.1f}")
        finally:
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
        return 0
    years = list(range(FIRST_YEAR, FIRST_YEAR + args.years))
    try:
        raw_root = ensure_data(Path(workdir) / f"raw_{args.step_hours}h", years, args.step_hours)
        root = subset_root(raw_root, years, Path(workdir) / f"input_{args.years}y")
        files = input_files(root, years)
        in_bytes = sum(os.path.getsize(f) for f in files)
        print(f"input: {len(files)} NetCDF files, {in_bytes / MB:.1f} MB, years {years[0]}..{years[-1]}, "
              f"{len(VARIABLES)} variables ({len(VARIABLES) - 3} time-varying); memory sampled every "
              f"{args.interval} s over each child's process tree; load average before: {os.getloadavg()[0]:.1f}",
              flush=True)
        runs: dict[str, list[dict]] = {"baseline": [], "ours": []}
        for _ in range(args.repeat):  # alternate, so that load from elsewhere hits both alike
            if not args.skip_baseline:
                runs["baseline"].append(launch("baseline", args, root, years, os.path.join(workdir, "out_baseline"),
                                               files))
            runs["ours"].append(launch("ours", args, root, years, os.path.join(workdir, "out_ours"), files))
        results = {name: summarise(rs) for name, rs in runs.items() if rs}
        for r in results.values():
            r["input_bytes"] = in_bytes
            r["mb_per_s"] = in_bytes / MB / r["wall_s"]

        print(f"\n{'':9s} {'wall s':>7s} {'in MB/s':>8s} {'peak RSS MB':>12s} {'peak PSS MB':>12s} "
              f"{'daemons MB':>11s} {'out MB':>7s} {'shards MB':>10s}")
        for name, r in results.items():
            pss = f"{r['peak_main_pss_mb']:12.0f}" if args.pss else f"{'n/a':>12s}"
            print(f"{name:9s} {r['wall_s']:7.2f} {r['mb_per_s']:8.1f} {r['peak_main_mb']:12.0f} {pss} "
                  f"{r['peak_daemons_mb']:11.0f} {r['output_bytes'] / MB:7.1f} "
                  f"{r['output_by_kind']['shards'] / MB:10.1f}   (walls {r['wall_s_all']})")
        o = results["ours"]
        if args.pss:
            print(f"whole-tree PSS peak (driver + workers + Ray daemons): ours {o['peak_total_pss_mb']:.0f} MB, "
                  f"baseline {results.get('baseline', {}).get('peak_total_pss_mb', float('nan')):.0f} MB")
        print("ours by stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in o["stages_s"].items()))
        print(f"ours: {o['shards']} shards, {o['rows']} rows, shard_bytes {o['shard_bytes']}, zstd level "
              f"{o['compression_level']}, ray.init {o['ray_init_s']:.1f} s (not in wall), up to {o['max_workers']} "
              f"Ray worker processes; peak driver {o['peak_driver_mb']:.0f} MB, workers {o['peak_workers_mb']:.0f} MB, "
              f"driver+workers {o['peak_main_mb']:.0f} MB, daemons {o['peak_daemons_mb']:.0f} MB, "
              f"total {o['peak_total_mb']:.0f} MB (RSS" + (f"; PSS total {o['peak_total_pss_mb']:.0f} MB)"
                                                            if args.pss else ")"))
        print("ours at its peak (MB): " + ", ".join(o["at_peak"]))
        print(f"ours output: {', '.join(f'{k} {v / MB:.1f} MB' for k, v in o['output_by_kind'].items())}")
        ratios = {}
        if "baseline" in results:
            b = results["baseline"]
            print(f"baseline: VmHWM {b['vm_hwm_mb']:.0f} MB (sampled {b['peak_main_mb']:.0f} MB, ru_maxrss "
                  f"{b['ru_maxrss_mb']:.0f} MB); output "
                  f"{', '.join(f'{k} {v / MB:.1f} MB' for k, v in b['output_by_kind'].items())}, "
                  f"of which {b['repeated_constant_bytes'] / MB:.1f} MB are constants repeated per time step")
            base_peak = max(b["peak_main_mb"], b["vm_hwm_mb"])
            ratios = {
                "throughput ours/baseline": o["mb_per_s"] / b["mb_per_s"],
                "output bytes ours/baseline (all files)": o["output_bytes"] / b["output_bytes"],
                "shard bytes ours/baseline": o["output_by_kind"]["shards"] / b["output_by_kind"]["shards"],
                "shard bytes ours/(baseline without repeated constants)":
                    o["output_by_kind"]["shards"] / (b["output_by_kind"]["shards"] - b["repeated_constant_bytes"]),
                "peak RSS ours/baseline": o["peak_main_mb"] / base_peak,
            }
            print("ratios: " + "; ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
        targets = {"throughput >= 1.0x baseline": ratios.get("throughput ours/baseline", 0) >= 1.0,
                   "whole-tree PSS <= 2.0 GB": o.get("peak_total_pss_mb", 9e9) <= 2000,
                   "output (shards + climatology) <= 0.75x baseline":
                       ratios.get("output bytes ours/baseline (all files)", 9) <= 0.75}
        print("targets: " + "; ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in targets.items()))

        from benchmarks.common import machine  # imports torch: only after the children ran

        mach = machine()
        print(f"machine: {mach}; load average after: {os.getloadavg()[0]:.1f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": mach, "years": years, "args": {k: v for k, v in vars(args).items()
                                                                     if k != "_child"},
                           "results": results, "ratios": ratios, "targets": targets}, f, indent=1)
        if args.profile:
            profile_one_shard(root, years, workdir, args.shard_bytes, args.compression_level, args.step_hours)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
