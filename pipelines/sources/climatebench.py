"""ClimateBench layout (Watson-Parris et al. 2022): one scenario = ``inputs_<scenario>.nc`` (forcings)
plus ``outputs_<scenario>.nc`` (NorESM2 responses) in one folder.

* ``inputs_<s>.nc``: ``CO2`` (cumulative emissions, GtCO2) and ``CH4`` (GtCH4/yr) are global, dims
  ``(time,)``; ``SO2`` and ``BC`` (kg m-2 s-1) are emission fields ``(time, latitude, longitude)``.
* ``outputs_<s>.nc``: ``tas``, ``diurnal_temperature_range`` (K), ``pr``, ``pr90`` (kg m-2 s-1),
  dims ``([member,] time, lat, lon)``; ensemble members are averaged (as ClimateBench's scripts do)
  and precipitation is converted to mm/day.
* ``time`` holds years (integers, or dates of which the year is taken).

The source path is the inputs file; the outputs file beside it is read too (when present). A
scenario that continues the historical run (``ssp*``) gets ``historical`` prepended when its files
are in the same folder, so that a 10-year window of forcings ending in 2015 exists (ClimateBench
and ClimaX train on the concatenation). Global forcings are broadcast over the grid, so every
variable is a (time, lat, lon) field that the pipeline regrids and shards like any other.

Yearly means are stamped on 1 January 00:00 of their year and the Dataset's ``calendar`` attribute
is ``yearly``: the build then takes the time steps the files hold (as for model calendars) instead
of a fixed step. The data are small (a scenario is ~100 MB at 96 x 144), so files are read eagerly.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import xarray as xr

from pipelines import names as V
from pipelines.sources.base import Candidate, SourceError, assemble
from pipelines.sources.netcdf import open_raw

__all__ = ["ClimateBenchSource", "open_climatebench", "scenario_of", "INPUTS", "OUTPUTS", "CALENDAR"]

INPUTS = ("CO2", "CH4", "SO2", "BC")
OUTPUTS = ("tas", "diurnal_temperature_range", "pr", "pr90")
CALENDAR = "yearly"
_NAME = re.compile(r"^(inputs|outputs)_(?P<scenario>.+)\.nc$")


def scenario_of(path: str | Path) -> str:
    m = _NAME.match(Path(path).name)
    if not m:
        raise SourceError(f"{path}: not a ClimateBench file; expected inputs_<scenario>.nc (with "
                          "outputs_<scenario>.nc beside it)")
    return m.group("scenario")


def _years(ds: xr.Dataset, path: Path) -> np.ndarray:
    if "time" not in ds.coords and "time" not in ds.dims:
        raise SourceError(f"{path}: no time axis; ClimateBench files have one value per year along `time`")
    t = np.asarray(ds["time"].values)
    if t.dtype.kind in "iuf":
        years = np.round(t).astype(np.int64)
    elif t.dtype.kind == "M":
        years = t.astype("datetime64[Y]").astype(np.int64) + 1970
    else:  # cftime objects
        years = np.array([int(x.year) for x in t], dtype=np.int64)
    if len(np.unique(years)) != len(years):
        raise SourceError(f"{path}: a year appears twice on `time` ({years[:3]}...); ClimateBench files hold "
                          "one value per year")
    return years


def _grid_names(ds: xr.Dataset, path: Path) -> tuple[str, str]:
    lat = next((n for n in ("latitude", "lat") if n in ds.dims), None)
    lon = next((n for n in ("longitude", "lon") if n in ds.dims), None)
    if lat is None or lon is None:
        raise SourceError(f"{path}: no latitude/longitude dimensions (found {list(ds.dims)})")
    return lat, lon


def _read_pair(folder: Path, scenario: str) -> xr.Dataset:
    """The scenario's inputs (and outputs when present) as one eager Dataset on (time, lat, lon)."""
    ipath = folder / f"inputs_{scenario}.nc"
    if not ipath.is_file():
        raise SourceError(f"{ipath}: no such file; a ClimateBench scenario needs inputs_{scenario}.nc")
    raw = open_raw(str(ipath))
    lat_n, lon_n = _grid_names(raw, ipath)
    lat, lon = raw[lat_n].values.astype(np.float64), raw[lon_n].values.astype(np.float64)
    years = _years(raw, ipath)
    out: dict[str, xr.DataArray] = {}
    for v in INPUTS:
        if v not in raw:
            continue
        da = raw[v].load()
        dims = set(da.dims)
        if dims == {"time"}:  # global scalar per year: broadcast over the grid
            values = np.broadcast_to(da.values.astype(np.float32)[:, None, None], (len(years), len(lat), len(lon)))
        elif dims == {"time", lat_n, lon_n}:
            values = da.transpose("time", lat_n, lon_n).values.astype(np.float32)
        else:
            raise SourceError(f"{ipath}: variable {v!r} has dims {da.dims}; expected (time,) for a global "
                              f"forcing or (time, {lat_n}, {lon_n}) for a field")
        out[v] = xr.DataArray(np.array(values), dims=("time", "lat", "lon"), attrs=dict(da.attrs))
    raw.close()
    opath = folder / f"outputs_{scenario}.nc"
    if opath.is_file():
        raw = open_raw(str(opath))
        o_lat, o_lon = _grid_names(raw, opath)
        o_years = _years(raw, opath)
        if not np.array_equal(o_years, years):
            raise SourceError(f"{opath}: years {o_years[0]}..{o_years[-1]} ({len(o_years)}) differ from "
                              f"{ipath.name}'s {years[0]}..{years[-1]} ({len(years)}); use the pair as published")
        if len(raw[o_lat]) != len(lat) or len(raw[o_lon]) != len(lon) or \
                not np.allclose(raw[o_lat].values, lat) or not np.allclose(raw[o_lon].values, lon):
            raise SourceError(f"{opath}: its grid differs from {ipath.name}'s; use the pair as published")
        for v in OUTPUTS:
            if v not in raw:
                continue
            da = raw[v].load()
            if "member" in da.dims:  # the ensemble mean, as ClimateBench's own scripts
                da = da.mean("member", keep_attrs=True)
            extra = [d for d in da.dims if d not in ("time", o_lat, o_lon)]
            if any(da.sizes[d] != 1 for d in extra):
                raise SourceError(f"{opath}: variable {v!r} has an extra dimension {extra} of size > 1; "
                                  "select one value before preprocessing")
            da = da.isel({d: 0 for d in extra}, drop=True) if extra else da
            values = da.transpose("time", o_lat, o_lon).values.astype(np.float32)
            out[v] = xr.DataArray(values, dims=("time", "lat", "lon"), attrs=dict(da.attrs))
        raw.close()
    if not out:
        raise SourceError(f"{ipath}: none of the ClimateBench variables {INPUTS + OUTPUTS} found")
    coords = {"time": years, "lat": lat, "lon": lon}
    return xr.Dataset({k: v.assign_coords(coords) for k, v in out.items()})


def open_climatebench(path: str | Path, variables: list[str] | None = None, *,
                      member: int | None = None, with_historical: bool = True) -> xr.Dataset:
    """The contract Dataset (see ``pipelines.sources``) of one ClimateBench scenario."""
    path = Path(path)
    if path.is_dir():
        raise SourceError(f"{path}: give one scenario's inputs file (e.g. {path}/inputs_ssp126.nc), not the folder")
    scenario = scenario_of(path)
    ds = _read_pair(path.parent, scenario)
    hist = path.parent / "inputs_historical.nc"
    if with_historical and scenario.startswith("ssp") and hist.is_file():
        h = _read_pair(path.parent, "historical")
        common = [v for v in ds.data_vars if v in h.data_vars]
        if int(h["time"][-1]) >= int(ds["time"][0]):
            raise SourceError(f"{hist}: historical years reach {int(h['time'][-1])}, scenario {scenario} starts "
                              f"{int(ds['time'][0])}; they must not overlap")
        ds = xr.concat([h[common], ds[common]], dim="time")
    times = (ds["time"].values.astype(np.int64) - 1970).astype("datetime64[Y]").astype("datetime64[ns]")
    candidates = []
    for v in ds.data_vars:
        da = ds[v].assign_coords(time=times)
        candidates.append(Candidate(str(v), da, str(v), assume_units=V.parse_variable(str(v)).units))
    out = assemble(str(path), candidates, variables=variables, member=member, fmt="climatebench",
                   calendar=CALENDAR)
    out.attrs["scenario"] = scenario
    return out


class ClimateBenchSource:
    format = "climatebench"

    def open(self, path: str, *, variables: list[str] | None = None,
             member: int | None = None) -> xr.Dataset:
        return open_climatebench(path, variables, member=member)
