"""Bytes read from object storage by a build from s3:// (issue 14, item 4).

Writes sample GRIB 2 and WeatherBench NetCDF 4 (every message / chunk of them is needed by the
recipe), uploads them to moto's S3 on 127.0.0.1 behind a server-side byte counter
(``tests.helpers.CountingS3Server``), builds the same recipe from s3:// and from the local copies
on a local Ray, and prints per format: bytes served / bytes of input, GET requests, wall time of
the s3:// build against the local build (same process), and what the build left in the download
cache. Before streaming, each worker process downloaded each object it opened whole (at least
1x per process, plus the scan task's copy).

    python benchmarks/s3_stream.py --resolution 1.40625 --days 4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARS = ["2m_temperature", "geopotential_500", "temperature_850"]
BUCKET = "climax-bench"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=float, default=1.40625)
    ap.add_argument("--days", type=float, default=4)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray

    from benchmarks.common import machine
    from pipelines import node_cache, storage
    from pipelines.build import build
    from pipelines.recipe import Recipe
    from pipelines.sample_data import generate
    from pipelines.sources import grib_index as GI
    from tests.helpers import CountingS3Server

    tmp = Path(tempfile.mkdtemp(prefix="bench-s3-stream-"))
    os.environ["CLIMAX_GRIB_INDEX_DIR"] = str(tmp / "index")  # count building the index too
    paths = generate(tmp / "in", years=(2015,), resolution=args.resolution, step_hours=6, variables=VARS,
                     formats=("grib", "weatherbench"), progress=False, max_days=args.days)
    local = {"grib": sorted(paths["grib"].glob("*.grib")),
             "netcdf": sorted(p for p in paths["weatherbench"].glob("*/*.nc") if p.parent.name != "constants")}
    server = CountingS3Server()
    opts, counter = server.start()
    fs, _ = storage.filesystem(f"s3://{BUCKET}", opts)
    fs.mkdir(BUCKET)
    for p in local["grib"]:
        fs.put(str(p), f"{BUCKET}/grib/{p.name}")
    for p in local["netcdf"]:
        fs.put(str(p), f"{BUCKET}/wb/{p.parent.name}/{p.name}")
    end = f"2015-01-{int(args.days):02d}T18:00"
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    print(f"machine: {machine()}")
    print(f"input: {args.resolution} deg, {args.days:g} days 6-hourly, {len(VARS)} variables")
    try:
        warm = True
        for fmt, remote, prefix in (("grib", f"s3://{BUCKET}/grib/*.grib", "grib/"),
                                    ("netcdf", f"s3://{BUCKET}/wb/*/*.nc", "wb/")):
            def recipe(sources, out):
                return Recipe.model_validate({
                    "sources": sources, "variables": VARS, "grid": {"resolution": 5.625, "method": "bilinear"},
                    "time": {"start": "2015-01-01", "end": end, "step": "6h"},
                    "splits": {"train": [2015, 2015]}, "output": str(out)})

            needed = sum(p.stat().st_size for p in local[fmt])
            if warm:  # Ray Data's first run in a process starts its executor: keep it out of both
                build(recipe([{"path": str(p)} for p in local[fmt]], tmp / "warm-up"))
                warm = False
            GI.clear_memory_cache()
            counter.reset()
            t0 = time.perf_counter()
            build(recipe([{"path": remote, "storage_options": opts}], tmp / f"out-s3-{fmt}"))
            t_s3 = time.perf_counter() - t0
            served, gets = counter.served(f"{BUCKET}/{prefix}")
            t0 = time.perf_counter()
            build(recipe([{"path": str(p)} for p in local[fmt]], tmp / f"out-local-{fmt}"))
            t_local = time.perf_counter() - t0
            left = node_cache.entries()
            print(f"{fmt}: served {served / 1e6:.2f} MB in {gets} GETs for {needed / 1e6:.2f} MB of input "
                  f"= {served / needed:.3f}x; build from s3:// {t_s3:.1f} s vs local {t_local:.1f} s "
                  f"({t_s3 / t_local:.2f}x); download cache entries left: {len(left)}")
    finally:
        ray.shutdown()
        server.stop()


if __name__ == "__main__":
    main()
