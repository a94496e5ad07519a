"""Forecast files other tools read: CF-1.8 NetCDF, WeatherBench 2's Zarr layout, and initial
conditions held in memory.

* :func:`forecast_dataset` wraps forecasts (n_init, n_lead, V, lat, lon) as a CF-1.8
  ``xarray.Dataset`` (one variable per ClimaX name, ``history`` from :func:`history_line`) and
  :func:`write_netcdf` writes one atomically (local or object storage).

* :func:`wb2_dataset` lays forecasts (n_init, n_lead, V, lat, lon) out as WeatherBench 2 forecast
  datasets are (``weatherbench2.schema.mock_forecast_data`` and its published forecasts): dims
  ``time`` (the initial time), ``prediction_timedelta`` (timedelta64), ``level`` (hPa, int) for
  pressure-level variables, ``latitude`` (ascending, as WB2's ``get_lat_weights`` requires) and
  ``longitude`` (ascending, 0..360); variables under their WB2/ERA5 long names, ``temperature_850``
  and ``temperature_500`` merged into ``temperature(level)`` (``climax.variables.split_level``). A
  level one base has and another lacks is NaN for the latter. WB2's evaluation selects by name
  (``sel(time=..., prediction_timedelta=..., level=...)``), so the dimension order is free; ours is
  (time, prediction_timedelta, [level,] latitude, longitude).
* :func:`write_zarr` writes it with xarray's ``to_zarr`` (no dask: chunks come from the encoding),
  Zarr format 2 with consolidated metadata (what WB2's xarray-beam readers open), atomically: a
  local store is written under a temporary name beside the target and renamed; a remote one
  (``s3://``, ``gs://``) is written locally and uploaded file by file with ``.zmetadata`` last
  (``climax.storage.upload_folder``), so a consolidated reader sees the old store or the whole new one.
* :class:`FieldDataset` holds initial conditions already on the model's grid (a raw analysis read
  and regridded by ``jobs.forecast``) behind the dataset interface ``climax.evaluation`` forecasts
  from, normalised with given statistics.

No Ray, no ``pipelines``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from climax.sampling import TimeAxis
from climax.storage import atomic_path, filesystem, is_remote, local_path, upload_folder
from climax.variables import split_level

__all__ = ["wb2_dataset", "write_zarr", "FieldDataset", "INIT_SPLIT", "forecast_dataset", "write_netcdf", "cf_units",
           "history_line"]

_HOUR_NS = 3_600_000_000_000
#: the one "split" of a FieldDataset
INIT_SPLIT = "init"


def wb2_dataset(
    fields: np.ndarray,
    init_times: Sequence | np.ndarray,
    leads: Sequence[float],
    variables: Sequence[str],
    lat: np.ndarray,
    lon: np.ndarray,
    units: Mapping[str, str] | None = None,
    attrs: Mapping[str, str] | None = None,
):
    """An ``xarray.Dataset`` of forecasts in WeatherBench 2's layout (see the module doc)."""
    import xarray as xr

    fields = np.asarray(fields, dtype=np.float32)
    init = np.asarray(init_times, dtype="datetime64[ns]")
    lead = (np.asarray(leads, dtype=np.float64) * _HOUR_NS).round().astype("timedelta64[ns]")
    lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64) % 360.0
    expect = (len(init), len(lead), len(variables), len(lat), len(lon))
    if fields.shape != expect:
        raise ValueError(f"fields have shape {fields.shape}; (init, lead, variable, lat, lon) = {expect} expected")
    ilat, ilon = np.argsort(lat, kind="stable"), np.argsort(lon, kind="stable")
    fields = fields[..., ilat, :][..., ilon]
    units = dict(units or {})

    groups: dict[str, dict[int | None, int]] = {}
    for j, v in enumerate(variables):
        name, level = split_level(v)
        if level in groups.setdefault(name, {}):
            raise ValueError(f"variable {v!r} is given twice")
        groups[name][level] = j
    levels = sorted({lv for g in groups.values() for lv in g if lv is not None})
    single_and_level = [n for n, g in groups.items() if None in g and len(g) > 1]
    if single_and_level:
        raise ValueError(f"{single_and_level} are both single-level and pressure-level variables")

    n_i, n_l, _, h, w = fields.shape
    data_vars = {}
    for name, g in groups.items():
        j0 = next(iter(g.values()))
        var_attrs = {"long_name": name.replace("_", " "), "units": units.get(variables[j0], "")}
        if None in g:
            data_vars[name] = (("time", "prediction_timedelta", "latitude", "longitude"), fields[:, :, j0], var_attrs)
            continue
        block = np.full((n_i, n_l, len(levels), h, w), np.nan, dtype=np.float32)
        for level, j in g.items():
            block[:, :, levels.index(level)] = fields[:, :, j]
        data_vars[name] = (("time", "prediction_timedelta", "level", "latitude", "longitude"), block, var_attrs)
    coords = {
        "time": ("time", init, {"long_name": "forecast initial time"}),
        "prediction_timedelta": ("prediction_timedelta", lead, {"long_name": "forecast lead time"}),
        "latitude": ("latitude", lat[ilat], {"units": "degrees_north", "long_name": "latitude"}),
        "longitude": ("longitude", lon[ilon], {"units": "degrees_east", "long_name": "longitude"}),
    }
    if levels:
        coords["level"] = ("level", np.asarray(levels, dtype=np.int64), {"units": "hPa", "long_name": "pressure level"})
    ds = xr.Dataset(data_vars, coords=coords)
    ds.attrs = {"title": "ClimaX forecasts (WeatherBench 2 layout)", **dict(attrs or {})}
    for da in ds.data_vars.values():
        chunks = tuple(1 if d == "time" else ds.sizes[d] for d in da.dims)
        da.encoding.update(chunks=chunks, dtype="float32", _FillValue=np.float32(np.nan))
    return ds


def _to_store(ds, path: str) -> None:
    ds.to_zarr(path, mode="w", zarr_format=2, consolidated=True)


def write_zarr(ds, path: str | os.PathLike, storage_options: dict | None = None) -> str:
    """Write ``ds`` as a Zarr store at ``path`` (local or remote) atomically; returns the path."""
    path = str(path)
    if is_remote(path):
        fs, remote = filesystem(path, storage_options, anonymous_gcs=False)
        with tempfile.TemporaryDirectory(prefix="climax-zarr-") as tmp:
            local = Path(tmp) / "store.zarr"
            _to_store(ds, str(local))
            if fs.exists(remote):  # an older store: its consolidated metadata goes first, then the rest
                fs.rm(remote, recursive=True)
            upload_folder(local, path, storage_options, last=(".zmetadata",))
        return path
    with atomic_path(path) as tmp:  # a folder: the old store is moved aside, then replaced
        _to_store(ds, str(tmp))
    return str(Path(local_path(path)))


class _Manifest:
    def __init__(self, raw: dict):
        self.raw = raw


class FieldDataset:
    """Initial conditions on the model's grid, in memory, behind the interface
    ``climax.evaluation.forecast_fields`` reads (one split, :data:`INIT_SPLIT`).

    ``fields``: float32 (T, V, H, W) physical values of ``variables`` at ``times``; ``constants``:
    names among ``variables`` that are time-invariant; ``statistics``: {variable: (mean, std)} to
    normalise with (the checkpoint's); ``units``: {variable: units}.
    """

    def __init__(self, fields: np.ndarray, times, variables: Sequence[str], lat, lon,
                 statistics: Mapping[str, tuple[float, float]], constants: Sequence[str] = (),
                 units: Mapping[str, str] | None = None, step_hours: float = 6.0):
        self.fields = np.asarray(fields, dtype=np.float32)
        self.times = np.asarray(times, dtype="datetime64[ns]")
        names = list(variables)
        if self.fields.shape[:2] != (len(self.times), len(names)):
            raise ValueError(f"fields have shape {self.fields.shape}; (time, variable, lat, lon) with "
                             f"{len(self.times)} times and {len(names)} variables expected")
        order = np.argsort(self.times, kind="stable")
        self.fields, self.times = self.fields[order], self.times[order]
        self.lat, self.lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
        self.constants = [v for v in names if v in set(constants)]
        self.variables = [v for v in names if v not in set(constants)]
        self._index = {v: j for j, v in enumerate(names)}
        self.statistics = dict(statistics)
        self.step_hours = float(step_hours)
        self.manifest = _Manifest({"splits": {INIT_SPLIT: {}},
                                   "variables": {v: {"units": (units or {}).get(v, "")} for v in names}})

    def axis(self, split: str) -> TimeAxis:
        n = len(self.times)
        return TimeAxis(self.times, np.zeros(n, dtype=np.int64), np.arange(n))

    def read(self, split: str, idx, variables: Sequence[str]) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        return self.fields[idx][:, [self._index[v] for v in variables]]

    def normalizer(self, variables: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        missing = [v for v in variables if v not in self.statistics]
        if missing:
            raise ValueError(f"no normalisation statistics for {missing}: the checkpoint records none for them; give "
                             "ckpt_statistics= (a folder with the release's normalize_mean.npz and normalize_std.npz)")
        return (np.array([self.statistics[v][0] for v in variables], dtype=np.float32),
                np.array([self.statistics[v][1] for v in variables], dtype=np.float32))


# ---------------------------------------------------------------------------------- CF NetCDF
def cf_units(units: str) -> str:
    """ECMWF-style units as UDUNITS strings (``m s**-1`` -> ``m s-1``, ``(0 - 1)`` -> ``1``)."""
    u = (units or "").strip()
    if u in ("(0 - 1)", "(0-1)", "", "~", "-", "dimensionless"):
        return "1"
    return u.replace("**", "")


def forecast_dataset(
    fields: np.ndarray,
    init_times: Sequence | np.ndarray,
    leads: Sequence[float],
    variables: Sequence[str],
    lat: np.ndarray,
    lon: np.ndarray,
    units: dict[str, str] | None = None,
    attrs: dict[str, str] | None = None,
):
    """A CF-1.8 ``xarray.Dataset`` of forecasts (n_init, n_lead, V, lat, lon).

    Dimensions ``init_time`` (forecast_reference_time), ``lead_time`` (forecast_period, timedelta
    written in hours), ``lat`` and ``lon``; a ``valid_time`` (standard_name time) coordinate on
    (init_time, lead_time); one float32 data variable per ClimaX variable with its units.
    """
    import xarray as xr

    fields = np.asarray(fields, dtype=np.float32)
    init = np.asarray(init_times, dtype="datetime64[ns]")
    lead = (np.asarray(leads, dtype=np.float64) * _HOUR_NS).round().astype("timedelta64[ns]")
    lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
    expect = (len(init), len(lead), len(variables), len(lat), len(lon))
    if fields.shape != expect:
        raise ValueError(f"fields have shape {fields.shape}; (init, lead, variable, lat, lon) = {expect} expected")
    units = units or {}
    dims = ("init_time", "lead_time", "lat", "lon")
    data_vars = {
        v: xr.Variable(dims, fields[:, :, j], {
            "long_name": v.replace("_", " "), "units": cf_units(units.get(v, ""))})
        for j, v in enumerate(variables)
    }
    coords = {
        "init_time": ("init_time", init, {"standard_name": "forecast_reference_time",
                                          "long_name": "forecast initial time", "axis": "T"}),
        "lead_time": ("lead_time", lead, {"standard_name": "forecast_period", "long_name": "forecast lead time"}),
        "lat": ("lat", lat, {"standard_name": "latitude", "long_name": "latitude", "units": "degrees_north",
                             "axis": "Y"}),
        "lon": ("lon", lon, {"standard_name": "longitude", "long_name": "longitude", "units": "degrees_east",
                             "axis": "X"}),
        "valid_time": (("init_time", "lead_time"), init[:, None] + lead[None, :],
                       {"standard_name": "time", "long_name": "valid time"}),
    }
    ds = xr.Dataset(data_vars, coords=coords)
    ds.attrs = {"Conventions": "CF-1.8", "title": "ClimaX forecasts", **(attrs or {})}
    ds["lead_time"].encoding.update(units="hours", dtype="float64")
    for name in ("init_time", "valid_time"):
        ds[name].encoding.update(units="hours since 1970-01-01 00:00:00", calendar="proleptic_gregorian",
                                 dtype="float64")
    for name in ("lat", "lon", "lead_time", "init_time", "valid_time"):
        ds[name].encoding["_FillValue"] = None
    for v in variables:
        ds[v].encoding.update(zlib=True, complevel=4, dtype="float32", _FillValue=np.float32(np.nan))
    return ds


def write_netcdf(ds, path: str | os.PathLike, storage_options: dict | None = None, engine: str = "netcdf4") -> str:
    """Write ``ds`` atomically: to a temporary file beside ``path``, then rename (or one S3 PUT)."""
    path = str(path)
    if is_remote(path):  # remote: write locally, then a single upload (atomic on S3)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(path).name
            ds.to_netcdf(local, engine=engine)
            fs, remote = filesystem(path, storage_options, anonymous_gcs=False)
            fs.put_file(str(local), remote)
        return path
    with atomic_path(path) as tmp:
        ds.to_netcdf(tmp, engine=engine)
    return str(Path(local_path(path)))


def history_line(argv: Sequence[str]) -> str:
    """A CF ``history`` entry: UTC time stamp and the command, credentials redacted (``climax.redact``)."""
    from climax.redact import redact_argv

    return f"{datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}: {' '.join(redact_argv(argv))}"
