"""NetCDF reader: CDS-style ERA5 (``latitude``/``longitude``, ``time`` or ``valid_time``,
``pressure_level``/``level``/``isobaricInhPa``) and CMIP6 (``plev`` in Pa, bounds variables,
cftime calendars). Engine h5netcdf, falling back to netcdf4 (NetCDF 3 files, odd HDF5 layouts).

Times are decoded with cftime and converted to datetime64[ns] with ``convert_calendar``
(``align_on="year"`` for 360_day, ``"date"`` otherwise); the original calendar is kept in the
Dataset's ``calendar`` attribute.
"""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr

from pipelines import names as V
from pipelines.sources.base import Candidate, SourceError, assemble, to_datetime64ns

LAT_NAMES = ("latitude", "lat")
LON_NAMES = ("longitude", "lon")
TIME_NAMES = ("valid_time", "time")
LEVEL_NAMES = ("pressure_level", "isobaricInhPa", "level", "plev")
STEP_NAMES = ("step", "forecast_period")
MEMBER_NAMES = ("number", "realization", "member")

STANDARD_CALENDARS = {"standard", "gregorian", "proleptic_gregorian"}
_REDOWNLOAD = "the file is truncated or corrupt; re-download it"


def open_raw(path: str, storage_options: dict | None = None) -> xr.Dataset:
    """xarray Dataset, lazy, times as cftime objects; SourceError for unreadable files.

    A local file is opened with netCDF4 (h5netcdf as the fallback). A remote ``path`` (s3://,
    gs://, ...) is streamed: h5netcdf reads the HDF5 file through an
    fsspec file object with a block cache (:func:`pipelines.streaming.open_file`), so a task
    fetches the metadata and the chunks it reads, never the whole object. NetCDF 3 objects, which
    h5netcdf cannot read, are copied to the node's bounded download cache
    (:mod:`pipelines.node_cache`) and opened from there.
    """
    if "://" in str(path) and not str(path).startswith("file://"):
        return _open_remote(str(path), storage_options)
    # netCDF4 (the C library) first for local files: it reads NetCDF 3 and 4, and its per-read
    # overhead is ~3x lower than h5netcdf's (0.6-0.7 ms against 2.0-2.4 ms for a 120-step
    # single-level slice, measured on the benchmark input). h5netcdf stays the fallback, and the
    # engine for remote file objects, which netCDF4 cannot take.
    engines = ["netcdf4", "h5netcdf"]
    errors = []
    for engine in engines:
        try:
            return _open_dataset(path, engine)
        except Exception as exc:  # engine-specific errors (OSError, ValueError, ...)
            errors.append(f"{engine}: {exc}")
    raise SourceError(f"{path}: cannot be opened as NetCDF ({'; '.join(errors)}); {_REDOWNLOAD}")


def _open_dataset(target, engine: str) -> xr.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return xr.open_dataset(
            target, engine=engine, cache=False, decode_timedelta=True,
            decode_times=xr.coders.CFDatetimeCoder(use_cftime=True),
        )


def _open_remote(url: str, storage_options: dict | None) -> xr.Dataset:
    from pipelines import node_cache, streaming

    f = streaming.open_file(url, storage_options)
    try:
        magic = f.read(8)
        f.seek(0)
    except Exception as exc:
        f.close()
        raise SourceError(f"{url}: cannot read it ({type(exc).__name__}: {exc})") from None
    if magic.startswith(b"CDF"):  # NetCDF 3 (classic / 64-bit offset): not HDF5
        f.close()
        with node_cache.local_copy(url, storage_options) as local:
            try:
                return open_raw(local)  # opened (file kept open by netCDF-C) inside the lock
            except SourceError as exc:
                raise SourceError(str(exc).replace(local, url)) from None
    try:
        # the file object stays referenced by h5py for the life of the dataset
        return _open_dataset(f, "h5netcdf")
    except Exception as exc:
        f.close()
        raise SourceError(f"{url}: cannot be opened as NetCDF (h5netcdf: {exc}); {_REDOWNLOAD}") from None


def _calendar(ds: xr.Dataset, time_name: str) -> str:
    t = ds[time_name]
    cal = t.encoding.get("calendar") or t.attrs.get("calendar") or "standard"
    return str(cal).lower()


def convert_times(values: np.ndarray, calendar: str, path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(datetime64[ns] times, index of kept steps or None when all are kept)."""
    values = np.asarray(values)
    if values.dtype.kind == "M":
        return to_datetime64ns(values), None
    if values.dtype.kind != "O":
        raise SourceError(f"{path}: time values could not be decoded (dtype {values.dtype}); "
                          "check the time units attribute")
    n = len(values)
    idx = xr.DataArray(np.arange(n), dims="time", coords={"time": values})
    align = "year" if calendar == "360_day" else "date"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            conv = idx.convert_calendar("proleptic_gregorian", align_on=align, use_cftime=False)
    except Exception as exc:
        raise SourceError(f"{path}: cannot convert calendar {calendar!r} to datetime64 ({exc})") from None
    keep = np.asarray(conv.values)
    times = to_datetime64ns(conv["time"].values)
    return times, (None if len(keep) == n and np.array_equal(keep, np.arange(n)) else keep)


def _level_hpa(coord: xr.DataArray, name: str) -> np.ndarray:
    units = str(coord.attrs.get("units", "")).strip().lower()
    values = np.asarray(coord.values, dtype=np.float64)
    if units == "pa" or (not units and name == "plev"):
        return values / 100.0
    if units in ("", "hpa", "millibars", "millibar", "mbar", "mb"):
        return values
    raise SourceError(f"pressure coordinate {name!r} has units {units!r}; expected Pa or hPa")


def find(names, available) -> str | None:
    return next((n for n in names if n in available), None)


def _is_bounds(ds: xr.Dataset, name: str) -> bool:
    if name.endswith(("_bnds", "_bounds")):
        return True
    return any(v.attrs.get("bounds") == name for v in ds.variables.values())


def candidates(ds: xr.Dataset, path: str, *, base_for=None, assume_units=None) -> tuple[list[Candidate], str]:
    """Candidates for every data variable on a lat/lon grid, and the calendar.

    ``base_for(name, has_level) -> base | None`` overrides the producer-name mapping.
    """
    base_for = base_for or V.netcdf_base
    cands: list[Candidate] = []
    calendar = "proleptic_gregorian"
    time_cache: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for name, da in ds.data_vars.items():
        if _is_bounds(ds, name):
            continue
        lat_n = find(LAT_NAMES, da.coords) or find(LAT_NAMES, da.dims)
        lon_n = find(LON_NAMES, da.coords) or find(LON_NAMES, da.dims)
        if lat_n is None or lon_n is None:
            continue
        lev_n = find(LEVEL_NAMES, da.dims) or find(LEVEL_NAMES, da.coords)
        base = base_for(str(name), lev_n is not None)
        if base is None:
            continue
        error = None
        if da[lat_n].ndim != 1 or da[lon_n].ndim != 1 or lat_n not in da.dims or lon_n not in da.dims:
            error = ("it is on a curvilinear or unstructured grid (2-D or missing 1-D lat/lon); "
                     "regrid to a regular lat-lon grid first (e.g. `cdo remapbil`)")
            cands.append(Candidate(base, da, str(name), error))
            continue
        step_n = find(STEP_NAMES, da.dims)
        if step_n is not None:
            if da.sizes[step_n] != 1:
                raise SourceError(
                    f"{path}: {name!r} has {da.sizes[step_n]} forecast steps ({step_n}) per base "
                    "time; NetCDF forecasts are read only with one step: give the GRIB file or a "
                    "file with one valid time axis"
                )
            da = da.isel({step_n: 0})
        # time: a dim named time/valid_time; prefer valid_time values when both exist
        time_dim = find(TIME_NAMES, da.dims)
        rename = {lat_n: "lat", lon_n: "lon"}
        drop = [c for c in da.coords if c not in da.dims and c not in (lev_n,)]
        if time_dim is not None:
            src_time = "valid_time" if "valid_time" in da.coords and da["valid_time"].dims == (time_dim,) else time_dim
            if src_time not in time_cache:
                cal = _calendar(ds, src_time) if src_time in ds.variables else "standard"
                time_cache[src_time] = (*convert_times(da[src_time].values, cal, path), cal)  # type: ignore[assignment]
            times, keep, cal = time_cache[src_time]  # type: ignore[misc]
            calendar = cal
            if keep is not None:
                da = da.isel({time_dim: keep})
            da = da.drop_vars(drop).assign_coords({time_dim: times})
            rename[time_dim] = "time"
        else:
            scalar_t = find(TIME_NAMES, da.coords)
            da = da.drop_vars([c for c in drop if c != scalar_t])
            if scalar_t is not None:
                t, _ = convert_times(np.atleast_1d(da[scalar_t].values), _calendar(ds, scalar_t), path)
                da = da.drop_vars(scalar_t).assign_coords(time=t[0])
        if lev_n is not None:
            da = da.assign_coords({lev_n: (da[lev_n].dims, _level_hpa(ds[lev_n], lev_n))})
            rename[lev_n] = "level"
        mem_n = find(MEMBER_NAMES, da.dims)
        if mem_n is not None and mem_n != "number":
            rename[mem_n] = "number"
        da = da.rename(rename)
        for c in ("lat", "lon"):
            da = da.assign_coords({c: np.asarray(da[c].values, dtype=np.float64)})
        cands.append(Candidate(base, da, str(name), error, assume_units=assume_units))
    return cands, calendar


class NetCDFSource:
    format = "netcdf"

    def open(self, path: str, *, variables: list[str] | None = None,
             member: int | None = None, storage_options: dict | None = None) -> xr.Dataset:
        path = str(path)
        ds = open_raw(path, storage_options)
        cands, calendar = candidates(ds, path)
        return assemble(path, cands, variables=variables, member=member, fmt="netcdf",
                        calendar=calendar)
