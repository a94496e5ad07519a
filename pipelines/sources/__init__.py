"""Data-source readers: GRIB, NetCDF (ERA5 / CMIP6), WeatherBench folders and Zarr stores (WeatherBench 2,
ARCO-ERA5), one module each.

Public entry point: :func:`open_source`. The returned Dataset's contract (the preprocessing
pipeline relies on it):

* data variables named by ClimaX names (see :mod:`pipelines.names`), only those requested
  (all that map when ``variables`` is None); anything missing raises :class:`SourceError`;
* dims ``("time", "lat", "lon")`` for time-varying fields, ``("lat", "lon")`` for constants;
  float32, canonical units; attrs ``units``, ``source_name``, ``source_file``;
* ``time`` datetime64[ns] valid times (forecast base time + step), unique; ``lat`` as in the
  file (float64, either order); ``lon`` in [0, 360) ascending; Dataset attrs ``calendar``
  (the file's original calendar), ``source_file``, ``source_format``;
* lazy: ``ds.isel(time=slice(a, b)).load()`` reads only those steps (no dask).

This package imports neither torch nor ray.
"""

from __future__ import annotations

import os
from pathlib import Path

import xarray as xr

from pipelines.sources.base import Candidate, DataSource, SourceError, assemble
from pipelines.sources.climatebench import ClimateBenchSource
from pipelines.sources.grib import GribSource
from pipelines.sources.netcdf import NetCDFSource
from pipelines.sources.weatherbench import (
    WeatherBenchSource,
    is_weatherbench_file,
    list_files,
    open_weatherbench,
    years,
)
from pipelines.sources.zarr import ZarrSource, is_zarr_path

__all__ = [
    "Candidate", "DataSource", "SourceError", "assemble", "open_source", "detect_format",
    "SOURCES", "GribSource", "NetCDFSource", "WeatherBenchSource", "list_files",
    "open_weatherbench", "years", "GRIB_EXTENSIONS", "NETCDF_EXTENSIONS", "ZarrSource", "is_zarr_path",
]

SOURCES: dict[str, DataSource] = {
    "grib": GribSource(),
    "netcdf": NetCDFSource(),
    "weatherbench": WeatherBenchSource(),
    "climatebench": ClimateBenchSource(),
    "zarr": ZarrSource(),
}

GRIB_EXTENSIONS = (".grib", ".grib1", ".grib2", ".grb", ".grb1", ".grb2")
NETCDF_EXTENSIONS = (".nc", ".nc4", ".netcdf", ".cdf")

_FORMAT_ALIASES = {
    "auto": "auto", "grib": "grib", "grib1": "grib", "grib2": "grib", "grb": "grib",
    "netcdf": "netcdf", "nc": "netcdf", "netcdf4": "netcdf", "era5": "netcdf",
    "era5-netcdf": "netcdf", "cmip6": "netcdf", "weatherbench": "weatherbench", "wb": "weatherbench",
    "climatebench": "climatebench", "zarr": "zarr",
}


def _normalise_format(fmt: str) -> str:
    key = str(fmt or "auto").strip().lower()
    if key not in _FORMAT_ALIASES:
        raise SourceError(f"unknown source format {fmt!r}; use one of auto, grib, netcdf, "
                          "cmip6, weatherbench, climatebench, zarr")
    return _FORMAT_ALIASES[key]


def detect_format(path: str) -> str:
    """grib / netcdf / weatherbench / climatebench / zarr for a local path: by extension (and
    ClimateBench's inputs_/outputs_ pair), a ``*.zarr`` path or a folder with Zarr metadata is a Zarr
    store, another directory is a WeatherBench root, else by magic bytes (b"GRIB", b"CDF",
    b"\\x89HDF")."""
    p = Path(path)
    if is_zarr_path(path):
        return "zarr"
    name = p.name.lower()
    if p.is_dir():
        if name.endswith(GRIB_EXTENSIONS + NETCDF_EXTENSIONS):  # e.g. a glob *.grib matched a folder
            raise SourceError(f"{path}: is a directory, not a {'GRIB' if name.endswith(GRIB_EXTENSIONS) else 'NetCDF'} "
                              "file; remove it or narrow the source path so that it matches only files")
        return "weatherbench"
    if name.endswith(GRIB_EXTENSIONS):
        return "grib"
    if name.endswith(NETCDF_EXTENSIONS):
        if p.name.startswith("inputs_") and (p.parent / f"outputs_{p.name[len('inputs_'):]}").is_file():
            return "climatebench"  # a ClimateBench scenario: inputs_<s>.nc beside outputs_<s>.nc
        return "weatherbench" if is_weatherbench_file(p) else "netcdf"
    try:
        with open(p, "rb") as f:
            head = f.read(1024)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read it ({exc})") from None
    return _format_from_head(head, path, f"extension {p.suffix or 'none'}",
                             "format='grib', 'netcdf' or 'weatherbench'")


def _format_from_head(head: bytes, path: str, what: str, formats: str) -> str:
    """netcdf or grib from a file's first bytes (local or one ranged read of an object)."""
    if head.startswith(b"CDF") or head.startswith(b"\x89HDF"):
        return "netcdf"
    if b"GRIB" in head:
        return "grib"
    raise SourceError(f"{path}: cannot tell the format ({what}, first bytes {head[:4]!r}); pass {formats}")


def open_source(path: str, format: str = "auto", *, variables: list[str] | None = None,
                member: int | None = None, storage_options: dict | None = None) -> xr.Dataset:
    """Open one source file (GRIB, NetCDF), WeatherBench root or Zarr store as a contract Dataset.

    ``path`` may be local or an object-store URL (``s3://``, ``gs://``, any fsspec protocol):
    GRIB and NetCDF 4 are streamed by byte ranges (:mod:`pipelines.streaming`), other files are
    copied to the node's bounded download cache (:mod:`pipelines.node_cache`); Zarr stores are
    read in place, chunk by chunk.
    """
    from pipelines import storage  # imported here: storage imports sources.base

    fmt = _normalise_format(format)
    path = str(path)
    if variables is not None and isinstance(variables, str):
        variables = [variables]
    if fmt == "zarr" or (fmt == "auto" and is_zarr_path(path)):
        return SOURCES["zarr"].open(path, variables=variables, member=member,
                                    storage_options=storage_options)
    if storage.is_remote(path):
        return _open_remote(path, fmt, variables, member, storage_options)
    local = path[len("file://"):] if path.startswith("file://") else path
    if not os.path.exists(local):
        raise SourceError(f"{path}: no such file or directory")
    return _open_local(local, fmt, variables, member)


def remote_format(path: str, storage_options: dict | None = None) -> str:
    """grib / netcdf / weatherbench for an object-store URL: by extension (a WeatherBench file by
    its ``<folder>/<folder>_...nc`` name), else by the magic bytes of one ranged read."""
    name = path.rsplit("/", 1)[-1].lower()
    if name.endswith(GRIB_EXTENSIONS):
        return "grib"
    if name.endswith(NETCDF_EXTENSIONS):
        return "weatherbench" if is_weatherbench_file(path) else "netcdf"
    from pipelines import streaming

    fs, p, size, _ = streaming.object_info(path, storage_options)
    if size == 0:
        raise SourceError(f"{path}: is empty; the file is truncated or corrupt; re-download it")
    head = streaming.read_ranges(fs, p, [(0, min(1024, size))], path, storage_options)[0]
    return _format_from_head(head, path, "no known extension", "format='grib' or 'netcdf'")


def _open_remote(path: str, fmt: str, variables, member, storage_options) -> xr.Dataset:
    from pipelines import node_cache
    from pipelines.sources.weatherbench import open_file

    if fmt == "auto":
        fmt = remote_format(path, storage_options)
    if fmt == "weatherbench" and not is_weatherbench_file(path):
        raise SourceError(f"{path}: WeatherBench roots must be local folders; copy it first "
                          "(e.g. `aws s3 sync`) or list its files with expand_paths")
    if fmt == "grib":
        return GribSource().open(path, variables=variables, member=member,
                                 storage_options=storage_options)
    if fmt == "netcdf":
        return NetCDFSource().open(path, variables=variables, member=member,
                                   storage_options=storage_options)
    if fmt == "weatherbench":
        return open_file(path, variables, member=member, storage_options=storage_options)
    # formats that need a local file (ClimateBench reads its files eagerly): the node's cache
    with node_cache.local_copy(path, storage_options) as local:
        try:
            ds = _open_local(local, fmt, variables, member)
        except SourceError as exc:
            raise SourceError(str(exc).replace(local, path)) from None
    ds.attrs["source_file"] = path
    for v in ds.data_vars.values():
        v.attrs["source_file"] = path
    return ds


def _open_local(path: str, fmt: str, variables, member) -> xr.Dataset:
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt in ("grib", "netcdf") and os.path.isdir(path):
        raise SourceError(f"{path}: is a directory; format {fmt!r} needs a file: give the files (e.g. "
                          f"{path.rstrip('/')}/*.{'grib' if fmt == 'grib' else 'nc'}) or narrow the source path")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise SourceError(f"{path}: is empty; the file is truncated or corrupt; re-download it")
    return SOURCES[fmt].open(path, variables=variables, member=member)
