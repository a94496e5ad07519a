"""Zarr reader: WeatherBench 2 and ARCO-ERA5 stores, local, ``s3://`` or ``gs://``.

Layout covered (WeatherBench 2's ``gs://weatherbench2/datasets/era5/*.zarr``, Google's ARCO-ERA5):
dims ``time``, ``level`` (hPa), ``latitude`` (either order), ``longitude`` (in either dim order:
the 240x121 stores are ``(time, level, longitude, latitude)``); variables named by long names
(``geopotential``, ``temperature``, ``specific_humidity``, ``2m_temperature``,
``10m_u_component_of_wind``, ...) or producer short names; constants without a time dim in the
same store (``land_sea_mask``, ``geopotential_at_surface`` = orography times g); consolidated
metadata (Zarr v2 ``.zmetadata`` or v3 ``zarr.json``), unconsolidated stores too.

Nothing is read but metadata until a field is indexed: the store is opened by xarray without dask
(``chunks=None``, ``cache=False``), so ``open_source(...).isel(time=slice(a, b)).load()`` fetches
only the chunks of the requested variables, levels and time steps (see tests/test_zarr.py, which
corrupts every other chunk of a store and still builds it).

Remote stores are read in place through fsspec (s3fs, gcsfs) as an async zarr ``FsspecStore``;
nothing is copied to local disk (unlike GRIB, which ecCodes reads from files).
"""

from __future__ import annotations

import os
import warnings

import xarray as xr

from pipelines import names as V
from pipelines.sources.base import SourceError, assemble
from pipelines.sources.netcdf import candidates

#: Files that mark a directory (or prefix) as a Zarr store: consolidated v2, v2 group, v3.
METADATA_KEYS = (".zmetadata", "zarr.json", ".zgroup")


def is_zarr_path(path: str) -> bool:
    """``*.zarr`` (local or remote, trailing slash allowed), or a local folder holding Zarr
    metadata (a store named otherwise)."""
    p = str(path).rstrip("/")
    if p.lower().endswith(".zarr"):
        return True
    if "://" in p and not p.startswith("file://"):
        return False
    local = p[len("file://"):] if p.startswith("file://") else p
    return os.path.isdir(local) and any(os.path.isfile(os.path.join(local, k)) for k in METADATA_KEYS)


def metadata_path(path: str, storage_options: dict | None = None) -> str:
    """The store's metadata object (for fingerprints): consolidated if there is one.

    A Zarr store is a folder of objects; its metadata changes whenever arrays are added, resized
    (e.g. times appended) or re-encoded, which is what a resumed build must notice.
    """
    from pipelines import storage

    fs, root = storage.filesystem(path, storage_options)
    for key in METADATA_KEYS:
        if fs.exists(f"{root.rstrip('/')}/{key}"):
            return f"{str(path).rstrip('/')}/{key}"
    raise SourceError(f"{path}: not a Zarr store (none of {', '.join(METADATA_KEYS)} in it); check "
                      "the path, or set the source's format to what the files are")


def open_raw(path: str, storage_options: dict | None = None) -> xr.Dataset:
    """The store as a lazy xarray Dataset (metadata only; no dask, no in-memory cache)."""
    from pipelines import storage

    path = str(path)
    if storage.is_remote(path):
        import zarr.storage

        fs, root = storage.filesystem(path, storage_options, asynchronous=True)
        store = zarr.storage.FsspecStore(fs, path=root.rstrip("/"), read_only=True)
    else:
        store = path[len("file://"):] if path.startswith("file://") else path
        if not os.path.isdir(store):
            raise SourceError(f"{path}: no such Zarr store (not a directory); check the path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "not consolidated" falls back to reading each array's
            return xr.open_dataset(store, engine="zarr", chunks=None, cache=False, decode_timedelta=True)
    except Exception as exc:  # zarr / fsspec errors differ by backend and version
        if storage.is_remote(path) and not isinstance(exc, (KeyError, ValueError)):
            err = storage.explain(exc, path, storage_options)
            raise SourceError(f"{err}; is it a Zarr store (with {' or '.join(METADATA_KEYS[:2])})?") from None
        raise SourceError(f"{path}: cannot be opened as a Zarr store ({type(exc).__name__}: {exc}); "
                          "check the path points at the store's root (the folder with .zmetadata "
                          "or zarr.json)") from None


class ZarrSource:
    format = "zarr"

    def open(self, path: str, *, variables: list[str] | None = None, member: int | None = None,
             storage_options: dict | None = None) -> xr.Dataset:
        path = str(path).rstrip("/")
        ds = open_raw(path, storage_options)
        cands, calendar = candidates(ds, path)
        for c in cands:  # WeatherBench 2 stores write units; when one does not, take WB2's
            c.assume_units = V.long_name_units(c.source_name, c.base)
        out = assemble(path, cands, variables=variables, member=member, fmt="zarr", calendar=calendar)
        return out
