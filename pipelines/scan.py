"""The build's first stage: which source files there are, and what each holds.

``expand_sources`` lists the recipe's source files; ``scan_file`` (one Ray task per file) reads one
file's metadata: variables, valid times, grid, calendar and a cheap fingerprint that the shards'
footers record, so that a re-run rebuilds what a changed file fed.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from pipelines import storage
from pipelines.recipe import Recipe
from pipelines.sources import is_zarr_path, list_files, open_source
from pipelines.sources.weatherbench import file_year

__all__ = ["expand_sources", "scan_file", "fingerprint_file"]


def fingerprint_file(path: str, storage_options: dict | None) -> str:
    """Size and modification time (local) or ETag and size (object storage): cheap and stable.
    A Zarr store (a folder of objects) by its metadata object (see sources.zarr.metadata_path)."""
    if is_zarr_path(path):
        from pipelines.sources.zarr import metadata_path

        path = metadata_path(path, storage_options)
    fs, p = storage.filesystem(path, storage_options)
    info = fs.info(p)
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return hashlib.sha256(f"{info.get('size')}|{tag}".encode()).hexdigest()[:16]


def expand_sources(recipe: Recipe) -> list[dict]:
    """One item per source file: path, format, member, storage options."""
    items = []
    for src in recipe.sources:
        fmt = src.format
        local_dir = not storage.is_remote(src.path) and os.path.isdir(src.path)
        if local_dir and (fmt == "weatherbench" or fmt == "auto" and not is_zarr_path(src.path)):
            # yearly files of the recipe's years only (constants have no year)
            files = [f for fs in list_files(src.path, recipe.variables).values() for f in fs
                     if file_year(f) is None or recipe.split_of(file_year(f)) is not None]
            fmt = "weatherbench"
        else:
            files = storage.expand_paths(src.path, src.storage_options)
        items += [dict(path=f, format=fmt, member=src.member, storage_options=src.storage_options)
                  for f in files]
    return items


def scan_file(item: dict, variables: list[str]) -> dict:
    """Metadata of one source file (runs as a Ray task)."""
    ds = open_source(item["path"], item["format"], member=item["member"],
                     storage_options=item["storage_options"] or None)
    wanted = [v for v in ds.data_vars if v in variables]
    meta = {
        "variables": {v: {"units": ds[v].attrs.get("units", ""), "source_name": ds[v].attrs.get("source_name", ""),
                          "constant": "time" not in ds[v].dims} for v in wanted},
        "times": [int(t) for t in np.asarray(ds["time"].values, "datetime64[ns]").astype(np.int64)]
        if "time" in ds.coords and ds["time"].ndim == 1 else [],
        "lat": [float(x) for x in ds["lat"].values],
        "lon": [float(x) for x in ds["lon"].values],
        "calendar": ds.attrs.get("calendar", "standard"),
        "fingerprint": fingerprint_file(item["path"], item["storage_options"] or None),
    }
    ds.close()
    return {**item, **meta}
