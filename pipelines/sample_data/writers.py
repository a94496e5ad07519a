"""The sample atmosphere written in the real formats: GRIB 2 through ecCodes, WeatherBench NetCDF,
WeatherBench 2 Zarr (:func:`generate`) and CMIP6 model output in a model calendar
(:func:`write_cmip6`). Every file is written to a temporary name, then renamed.

Imports no torch and no ray.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from climax.storage import atomic_path, replace_dir
from pipelines.sample_data.atmosphere import Atmosphere, G
from pipelines.sample_data.catalog import (
    CONSTANT_VARS,
    DEFAULT_FORMATS,
    FORMATS,
    PL_BASES,
    SAMPLE_VARS,
    SFC_VARS,
    grid,
    parse_name,
    resolution_tag,
)

#: WeatherBench 2 / ARCO-ERA5 units attributes (as their stores write them).
_WB2_UNITS = {"geopotential": "m**2 s**-2", "temperature": "K", "u_component_of_wind": "m s**-1",
              "v_component_of_wind": "m s**-1", "specific_humidity": "kg kg**-1", "relative_humidity": "%",
              "2m_temperature": "K", "10m_u_component_of_wind": "m s**-1", "10m_v_component_of_wind": "m s**-1",
              "land_sea_mask": "(0 - 1)", "geopotential_at_surface": "m**2 s**-2"}


def _year_times(year: int, step_hours: int, max_days: float | None) -> np.ndarray:
    start = np.datetime64(f"{year:04d}-01-01T00:00:00", "ns")
    end = np.datetime64(f"{year + 1:04d}-01-01T00:00:00", "ns")
    if max_days is not None:
        end = min(end, start + np.timedelta64(int(round(float(max_days) * 24 * 3600)), "s").astype("timedelta64[ns]"))
    return np.arange(start, end, np.timedelta64(int(step_hours), "h").astype("timedelta64[ns]"))


class _GribWriter:
    """One GRIB 2 file, written through the ecCodes API to a temporary name, renamed on close.

    Packing: grid_simple with bitsPerValue 16, as ERA5 itself: the error is at most
    (max - min) / 2**17 of each field, about 1e-5 relative to its range (e.g. 0.08 m2 s-2 for z500,
    0.001 K for 2 m temperature), while a message stays 2 bytes a point, half of grid_ieee.
    """

    BITS = 16

    def __init__(self, path: Path, lat: np.ndarray, lon: np.ndarray, sample: str):
        import eccodes

        self._ec = eccodes
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.lat, self.lon, self.sample = lat, lon, sample
        self._templates: dict = {}
        self._f = open(self.tmp, "wb")

    def _template(self, param_id: int, type_of_level: str, level: int):
        key = (param_id, type_of_level, level)
        h = self._templates.get(key)
        if h is None:
            ec = self._ec
            h = ec.codes_grib_new_from_samples(self.sample)
            lat, lon = self.lat, self.lon
            res_i = float(lon[1] - lon[0]) if lon.size > 1 else 360.0
            res_j = float(lat[1] - lat[0]) if lat.size > 1 else 180.0
            for k, v in (
                ("Ni", lon.size),
                ("Nj", lat.size),
                # ERA5 order: north first (j scans negatively), west to east
                ("iScansNegatively", 0),
                ("jScansPositively", 0),
                ("latitudeOfFirstGridPointInDegrees", float(lat[-1])),
                ("longitudeOfFirstGridPointInDegrees", float(lon[0])),
                ("latitudeOfLastGridPointInDegrees", float(lat[0])),
                ("longitudeOfLastGridPointInDegrees", float(lon[-1])),
                ("iDirectionIncrementInDegrees", res_i),
                ("jDirectionIncrementInDegrees", res_j),
                ("paramId", param_id),
                ("typeOfLevel", type_of_level),
                ("level", level),
                ("stepType", "instant"),
                ("forecastTime", 0),
                ("packingType", "grid_simple"),
                ("bitsPerValue", self.BITS),
            ):
                ec.codes_set(h, k, v)
            self._templates[key] = h
        return h

    def write(self, time: np.datetime64, param_id: int, type_of_level: str, level: int, values: np.ndarray):
        ec = self._ec
        h = self._template(param_id, type_of_level, level)
        t = np.datetime64(time, "m").astype(object)  # datetime.datetime
        ec.codes_set(h, "dataDate", t.year * 10000 + t.month * 100 + t.day)
        ec.codes_set(h, "dataTime", t.hour * 100 + t.minute)
        # our arrays are south-first; GRIB (as ERA5) stores north-first rows
        ec.codes_set_values(h, np.ascontiguousarray(values[::-1], dtype=np.float64).ravel())
        ec.codes_write(h, self._f)

    def close(self, *, commit: bool = True):
        for h in self._templates.values():
            self._ec.codes_release(h)
        self._templates.clear()
        self._f.close()
        if commit:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def to_netcdf(ds, path: Path) -> None:
    # uncompressed and contiguous, as WeatherBench's published 5.625/1.40625 deg files are (a year of
    # one single-level field at 5.625 deg is ~72 MB there too): readers and benchmarks then see the
    # layout users hold, not h5py's default tiny chunks
    encoding = {name: {"dtype": "float32"} for name in ds.data_vars}
    with atomic_path(path) as tmp:
        ds.to_netcdf(tmp, engine="h5netcdf", encoding=encoding)


def _coords(lat, lon):
    return {
        "lat": ("lat", lat, {"units": "degrees_north", "long_name": "latitude"}),
        "lon": ("lon", lon, {"units": "degrees_east", "long_name": "longitude"}),
    }


def _write_constants(wb_dir: Path, model: Atmosphere, tag: str, seed: int) -> Path:
    import xarray as xr

    lat2d, lon2d = np.meshgrid(model.lat, model.lon, indexing="ij")
    ds = xr.Dataset(
        {
            "lsm": (("lat", "lon"), model.lsm.astype(np.float32), {"units": "1", "long_name": "Land-sea mask"}),
            "orography": (("lat", "lon"), model.orog.astype(np.float32), {"units": "m", "long_name": "Orography"}),
            "lat2d": (("lat", "lon"), lat2d.astype(np.float32), {"units": "degrees_north", "long_name": "latitude"}),
            "lon2d": (("lat", "lon"), lon2d.astype(np.float32), {"units": "degrees_east", "long_name": "longitude"}),
        },
        coords=_coords(model.lat, model.lon),
        attrs=_global_attrs(seed),
    )
    path = wb_dir / "constants" / f"constants_{tag}.nc"
    to_netcdf(ds, path)
    return path


def _global_attrs(seed: int) -> dict:
    return {
        "title": "Synthetic ERA5-like sample data",
        "source": "pipelines.sample_data (analytic model, not observations)",
        "seed": int(seed),
    }


def _attrs(info) -> dict:
    return {"units": info.units, "long_name": info.long_name}


def _write_weatherbench_year(wb_dir: Path, year: int, times, lat, lon, data: dict, parsed: dict, tag: str, seed: int):
    import xarray as xr

    coords = {"time": ("time", times.astype("datetime64[ns]")), **_coords(lat, lon)}
    for name, info in SFC_VARS.items():
        if name in data:
            ds = xr.Dataset(
                {info.data_var: (("time", "lat", "lon"), data[name], _attrs(info))},
                coords=coords,
                attrs=_global_attrs(seed),
            )
            to_netcdf(ds, wb_dir / name / f"{name}_{year}_{tag}.nc")
    for base, info in PL_BASES.items():
        levels = sorted(lev for (b, lev) in parsed.values() if b == base)
        if not levels:
            continue
        arr = np.stack([data[f"{base}_{lev}"] for lev in levels], axis=1)
        ds = xr.Dataset(
            {info.short_name: (("time", "level", "lat", "lon"), arr, _attrs(info))},
            coords={
                **coords,
                "level": ("level", np.array(levels, dtype=np.int32), {"units": "hPa", "long_name": "pressure_level"}),
            },
            attrs=_global_attrs(seed),
        )
        to_netcdf(ds, wb_dir / base / f"{base}_{year}_{tag}.nc")


def _wb2_dataset(times, lat, lon, data: dict, parsed: dict, model, seed: int, *, constants: bool):
    """One year in the WeatherBench 2 layout: long names, ``level`` in hPa, latitude north to south,
    ``geopotential_at_surface`` (m2 s-2) for orography, constants without a time dim."""
    import xarray as xr

    flip = slice(None, None, -1)  # WB2's 0.25 deg ERA5 (and ARCO-ERA5) run from 90 N to 90 S
    dims = ("time", "latitude", "longitude")
    out = {}
    for name in SFC_VARS:
        if name in data:
            out[name] = (dims, data[name][:, flip], {"units": _WB2_UNITS[name], "long_name": name})
    for base in PL_BASES:
        levels = sorted(lev for (b, lev) in parsed.values() if b == base)
        if levels:
            arr = np.stack([data[f"{base}_{lev}"][:, flip] for lev in levels], axis=1)
            out[base] = (("time", "level", "latitude", "longitude"), arr,
                         {"units": _WB2_UNITS[base], "long_name": base})
    if constants:
        if "land_sea_mask" in parsed:
            out["land_sea_mask"] = (dims[1:], model.lsm[flip].astype(np.float32), {"units": "(0 - 1)"})
        if "orography" in parsed:
            z = (model.orog[flip].astype(np.float64) * G).astype(np.float32)
            out["geopotential_at_surface"] = (dims[1:], z, {"units": "m**2 s**-2"})
    levels = sorted({lev for (b, lev) in parsed.values() if lev is not None})
    coords = {"time": ("time", times.astype("datetime64[ns]")),
              "latitude": ("latitude", lat[flip], {"units": "degrees_north"}),
              "longitude": ("longitude", lon, {"units": "degrees_east"})}
    if levels:
        coords["level"] = ("level", np.array(levels, dtype=np.int64), {"units": "millibar"})
    return xr.Dataset(out, coords=coords, attrs=_global_attrs(seed))


def _write_zarr_year(tmp: Path, ds, *, first: bool, time_chunk: int) -> None:
    """Append one year to the store (created by the first year). xarray writes without dask when
    the chunks are given as encoding; Zarr v2 with consolidated metadata, as WeatherBench 2's."""
    encoding = {}
    for name, v in ds.data_vars.items():
        chunks = tuple({"time": time_chunk, "level": 1}.get(d, ds.sizes[d]) for d in v.dims)
        encoding[name] = {"chunks": chunks, "dtype": "float32"}
    if first:
        ds.to_zarr(tmp, mode="w", zarr_format=2, consolidated=True, encoding=encoding)
    else:
        ds = ds.drop_vars([n for n, v in ds.variables.items() if "time" not in v.dims])
        ds.to_zarr(tmp, mode="a", append_dim="time", zarr_format=2, consolidated=True)


def generate(
    out_dir,
    *,
    years: Sequence[int] = (2015, 2016, 2017),
    resolution: float = 5.625,
    step_hours: int = 6,
    variables: Sequence[str] = SAMPLE_VARS,
    formats: Sequence[str] = DEFAULT_FORMATS,
    seed: int = 0,
    progress: bool = True,
    max_days: float | None = None,
    zarr_time_chunk: int | None = None,
) -> dict[str, Path]:
    """Write synthetic ERA5-like data under ``out_dir``; returns ``{format: directory}``.

    ``grib``: ``<out>/grib/era5_pl_<year>.grib`` (pressure levels) and ``era5_sfc_<year>.grib``
    (2t, 10u, 10v and, at every time step, lsm and surface geopotential z), GRIB 2, north-first.
    ``weatherbench``: ``<out>/weatherbench/<variable>/<variable>_<year>_<res>deg.nc`` (one file per
    pressure-level base holding all its levels) and ``constants/constants_<res>deg.nc``.
    ``zarr``: ``<out>/zarr/era5_<res>deg.zarr``, one store in the WeatherBench 2 layout (see
    :func:`_wb2_dataset`), chunked by ``zarr_time_chunk`` time steps (default: one day) and one level.
    ``max_days`` keeps only the first days of each year (for tests). Memory: one year of the
    requested variables when writing WeatherBench files or Zarr (a time chunk otherwise).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    years = [int(y) for y in years]
    formats = tuple(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {formats}")
    if int(step_hours) <= 0 or 24 % int(step_hours) and int(step_hours) % 24:
        raise ValueError(f"step_hours must divide 24 or be a multiple of it, got {step_hours}")
    variables = list(dict.fromkeys(variables))
    parsed = {v: parse_name(v) for v in variables}
    lat, lon = grid(resolution)
    tag = resolution_tag(resolution)
    model = Atmosphere(lat, lon, seed)
    chunk = max(1, int(1_000_000 // (lat.size * lon.size)))  # time steps per compute chunk (~8 MB arrays)

    paths: dict[str, Path] = {}
    grib_dir = out_dir / "grib"
    wb_dir = out_dir / "weatherbench"
    if "grib" in formats:
        grib_dir.mkdir(parents=True, exist_ok=True)
        paths["grib"] = grib_dir
    if "weatherbench" in formats:
        wb_dir.mkdir(parents=True, exist_ok=True)
        paths["weatherbench"] = wb_dir
        _write_constants(wb_dir, model, tag, seed)
    zarr_path = out_dir / "zarr" / f"era5_{tag}.zarr"
    zarr_tmp = zarr_path.with_name(zarr_path.name + ".tmp")
    if "zarr" in formats:
        import shutil

        zarr_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(zarr_tmp, ignore_errors=True)
        zarr_time_chunk = int(zarr_time_chunk or max(1, 24 // int(step_hours)))

    pl_vars = [v for v, (b, lev) in parsed.items() if lev is not None]
    sfc_vars = [v for v in SFC_VARS if v in parsed] + [v for v in CONSTANT_VARS if v in parsed]
    time_vars = [v for v in variables if v not in CONSTANT_VARS]
    # Zarr (WB2) has one `level` axis for every pressure-level variable: each gets every level asked
    # of any of them (specific_humidity_850 and temperature_500 also give specific_humidity_500)
    zarr_parsed = dict(parsed)
    if "zarr" in formats:
        all_levels = sorted({lev for (_, lev) in parsed.values() if lev is not None})
        for base in dict.fromkeys(b for (b, lev) in parsed.values() if lev is not None):
            for lev in all_levels:
                zarr_parsed.setdefault(f"{base}_{lev}", (base, lev))
    zarr_extra = [v for v in zarr_parsed if v not in parsed]

    all_times = {y: _year_times(y, step_hours, max_days) for y in years}
    bar = tqdm(total=sum(t.size for t in all_times.values()), disable=not progress, unit="step", desc="sample data")
    try:
        for year in years:
            times = all_times[year]
            writers: dict[str, _GribWriter] = {}
            if "grib" in formats:
                if pl_vars:
                    writers["pl"] = _GribWriter(grib_dir / f"era5_pl_{year}.grib", lat, lon, "regular_ll_pl_grib2")
                if sfc_vars:
                    writers["sfc"] = _GribWriter(grib_dir / f"era5_sfc_{year}.grib", lat, lon, "regular_ll_sfc_grib2")
            year_data = (
                {v: np.empty((times.size,) + model.shape, np.float32) for v in time_vars + zarr_extra}
                if "weatherbench" in formats or "zarr" in formats
                else None
            )
            ok = False
            try:
                for i0 in range(0, times.size, chunk):
                    tc = times[i0 : i0 + chunk]
                    data = model.compute(tc, variables + zarr_extra)
                    if year_data is not None:
                        for v in time_vars + zarr_extra:
                            year_data[v][i0 : i0 + tc.size] = data[v]
                    if writers:
                        _write_grib_chunk(writers, tc, data, parsed, pl_vars, sfc_vars)
                    bar.update(tc.size)
                ok = True
            finally:
                for w in writers.values():
                    w.close(commit=ok)
            if year_data is not None and "weatherbench" in formats:
                _write_weatherbench_year(wb_dir, year, times, lat, lon, year_data, parsed, tag, seed)
            if year_data is not None and "zarr" in formats:
                ds = _wb2_dataset(times, lat, lon, year_data, zarr_parsed, model, seed, constants=year == years[0])
                _write_zarr_year(zarr_tmp, ds, first=year == years[0], time_chunk=zarr_time_chunk)
            del year_data
    finally:
        bar.close()
    if "zarr" in formats:
        replace_dir(zarr_tmp, zarr_path)  # the store appears whole or not at all
        paths["zarr"] = zarr_path
    return paths


#: ClimaX base -> (CMIP6 variable, units as CMIP6 writes them): 6-hourly instantaneous fields
#: (table 6hrPlevPt), pressure levels in Pa, geopotential as height (zg, m), masks in %.
CMIP6_NAMES: dict[str, tuple[str, str]] = {
    "2m_temperature": ("tas", "K"), "10m_u_component_of_wind": ("uas", "m s-1"),
    "10m_v_component_of_wind": ("vas", "m s-1"), "geopotential": ("zg", "m"), "temperature": ("ta", "K"),
    "u_component_of_wind": ("ua", "m s-1"), "v_component_of_wind": ("va", "m s-1"),
    "specific_humidity": ("hus", "1"), "relative_humidity": ("hur", "%"),
    "land_sea_mask": ("sftlf", "%"), "orography": ("orog", "m"),
}


def write_cmip6(
    out_dir,
    *,
    calendar: str = "noleap",
    years: Sequence[int] = (2015, 2016),
    resolution: float = 5.625,
    step_hours: int = 6,
    variables: Sequence[str] = ("land_sea_mask", "orography", "2m_temperature", "geopotential_500",
                                "temperature_850"),
    seed: int = 0,
    model_name: str = "SAMPLE-ESM",
    skip_days: Sequence[str] = (),
) -> Path:
    """Write the sample atmosphere as CMIP6 model output in ESGF's layout and a model calendar.

    ``<out>/cmip6/<var>_6hrPlevPt_<model>_historical_r1i1p1f1_gn_<start>-<end>.nc``, one file per
    variable and year (pressure-level variables hold every requested level on ``plev`` in Pa),
    time encoded as ``hours since 1850-01-01`` in ``calendar`` (noleap, 365_day, 360_day, all_leap,
    standard, ...); constants as ``sftlf``/``orog`` ``fx`` files without time. Each step holds the
    fields at the date the NetCDF reader converts it to (``align_on="year"`` for 360_day), so what a
    build reads back equals ``fields(converted times)``; a step with no standard date (all_leap's
    29 February of a common year) repeats the step before it. ``skip_days`` (ISO dates of the
    calendar) are left out of the files: a gap in the archive.
    """
    import xarray as xr

    from pipelines.sources.netcdf import convert_times

    out = Path(out_dir) / "cmip6"
    out.mkdir(parents=True, exist_ok=True)
    lat, lon = grid(resolution)
    model = Atmosphere(lat, lon, seed)
    parsed = {v: parse_name(v) for v in dict.fromkeys(variables)}
    skip = {str(d)[:10] for d in skip_days}
    tail = f"{model_name}_historical_r1i1p1f1_gn"
    for v, (base, _) in parsed.items():
        if base not in CMIP6_NAMES:
            raise ValueError(f"no CMIP6 name for {v}; known: {sorted(CMIP6_NAMES)}")
    for v in (v for v in parsed if v in CONSTANT_VARS):
        name, units = CMIP6_NAMES[v]
        field = model.lsm * 100.0 if v == "land_sea_mask" else model.orog
        ds = xr.Dataset({name: (("lat", "lon"), field.astype(np.float32), {"units": units})},
                        coords=_coords(lat, lon), attrs={**_global_attrs(seed), "source_id": model_name})
        to_netcdf(ds, out / f"{name}_fx_{tail}.nc")
    time_vars = [v for v in parsed if v not in CONSTANT_VARS]
    for year in years:
        cf = xr.date_range(f"{year:04d}-01-01", f"{year:04d}-12-{30 if calendar == '360_day' else 31}T23:59",
                           freq=f"{int(step_hours)}h", calendar=calendar, use_cftime=True)
        cf = np.array([t for t in cf if t.strftime("%Y-%m-%d") not in skip])
        std, keep = convert_times(cf, calendar, "sample")
        idx = np.arange(len(cf)) if keep is None else np.asarray(keep)
        at = np.searchsorted(idx, np.arange(len(cf)), side="right") - 1  # a dropped step repeats the one before
        data = model.compute(std, time_vars)
        time = ("time", cf, {"standard_name": "time", "axis": "T"})
        span = f"{cf[0].strftime('%Y%m%d%H%M')}-{cf[-1].strftime('%Y%m%d%H%M')}"
        for base in dict.fromkeys(b for v, (b, _) in parsed.items() if v in time_vars):
            name, units = CMIP6_NAMES[base]
            levels = sorted({lev for v, (b, lev) in parsed.items() if b == base and lev is not None}, reverse=True)
            if levels:
                arr = np.stack([data[f"{base}_{lev}"] for lev in levels], axis=1)[np.maximum(at, 0)]
                if base == "geopotential":
                    arr = arr / G
                ds = xr.Dataset({name: (("time", "plev", "lat", "lon"), arr.astype(np.float32), {"units": units})},
                                coords={"time": time, "plev": ("plev", np.array(levels, np.float64) * 100.0,
                                                               {"units": "Pa", "positive": "down"}),
                                        **_coords(lat, lon)})
            else:
                ds = xr.Dataset({name: (("time", "lat", "lon"), data[base][np.maximum(at, 0)], {"units": units})},
                                coords={"time": time, **_coords(lat, lon)})
            ds.attrs.update(_global_attrs(seed), source_id=model_name, frequency="6hrPt")
            path = out / f"{name}_6hrPlevPt_{tail}_{span}.nc"
            enc = {name: {"dtype": "float32", "zlib": True, "complevel": 1, "shuffle": True},
                   "time": {"units": "hours since 1850-01-01 00:00:00", "calendar": calendar, "dtype": "float64"}}
            with atomic_path(path) as tmp:
                ds.to_netcdf(tmp, engine="h5netcdf", encoding=enc)
    return out


def _write_grib_chunk(writers, times, data, parsed, pl_vars, sfc_vars):
    # ERA5 order within a file: time, then parameter, then level
    pl_order = [(b, v, lev) for b in PL_BASES for v, (bb, lev) in parsed.items() if bb == b and lev is not None]
    pl_order.sort(key=lambda x: (list(PL_BASES).index(x[0]), x[2]))
    for it, t in enumerate(times):
        if "pl" in writers:
            w = writers["pl"]
            for base, v, lev in pl_order:
                w.write(t, PL_BASES[base].param_id, "isobaricInhPa", lev, data[v][it])
        if "sfc" in writers:
            w = writers["sfc"]
            for v in sfc_vars:
                if v in SFC_VARS:
                    info = SFC_VARS[v]
                    w.write(t, info.param_id, info.type_of_level, info.level, data[v][it])
                else:
                    info = CONSTANT_VARS[v]
                    values = data[v] * G if v == "orography" else data[v]  # surface geopotential
                    w.write(t, info.param_id, info.type_of_level, info.level, values)
