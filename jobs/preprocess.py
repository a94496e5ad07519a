"""Preprocess raw ERA5 / CMIP6 archives (GRIB, NetCDF or Zarr; local, s3:// or gs://) into training shards.

    python -m jobs.preprocess RECIPE.yaml [key=value ...] [--overwrite]

Writes regridded Parquet tensor shards, constants, statistics, climatology and manifest.json
(last) to the recipe's output. A re-run resumes: finished shards are skipped.
"""

from __future__ import annotations

import sys

from jobs.common import error_line, init_ray, setup_logging
from jobs.config import fail, parse_args
from pipelines.recipe import Recipe


def main(argv: list[str] | None = None) -> dict:
    recipe, args = parse_args(Recipe, __doc__, argv, flags={"overwrite": "rebuild every shard, ignoring finished ones"})
    setup_logging()
    init_ray()
    from pipelines.build import build

    try:
        manifest = build(recipe, overwrite=args.overwrite)
    except Exception as e:  # one clear line, non-zero exit; nothing half-written looks finished
        fail(error_line(e), code=1)
    for name, split in sorted(manifest["splits"].items(), key=lambda kv: ("train", "val", "test").index(kv[0])):
        print(f"{name:5s}: {split['rows']:6d} time steps in {len(split['shards'])} shards "
              f"({split['start']} .. {split['end']})")
    gaps = manifest["time"].get("gaps") or []
    if gaps:  # time.missing: allow
        print(f"gaps: {sum(n for _, n in gaps)} time steps left out in {len(gaps)} gap(s), first at {gaps[0][0]} "
              "(listed in the manifest's time.gaps; training skips the samples that need them)")
    print(f"manifest: {recipe.output.rstrip('/')}/manifest.json")
    return manifest


if __name__ == "__main__":
    main(sys.argv[1:])
