"""Units: what a file's fields are in, converted to the canonical units of their ClimaX variable
(:mod:`pipelines.names`).

:func:`to_canonical` converts a DataArray to canonical units, lazily, as float32, and refuses
anything ambiguous with an error naming the file, variable and units; :func:`conversion` gives the
(scale, offset) for a units string; :func:`lazy_affine` keeps cfgrib / netCDF backends lazy.

This module imports neither torch nor ray.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import xarray as xr
from xarray.backends import BackendArray
from xarray.core import indexing

from pipelines.names import CLIMATEBENCH, G, parse_variable


class UnitsError(ValueError):
    """Units that are missing, unknown, or not convertible without guessing."""


_FRACTION = {"(0 - 1)", "0-1", "(0-1)", "fraction", "proportion", "1", "dimensionless", "~"}
_PERCENT = {"%", "percent", "pct"}


def _unit_terms(units: str) -> dict[str, int] | None:
    """Parse 'm**2 s**-2', 'm2 s-2', 'm^2/s^2', 'kg kg-1', 'J m**-2' into {symbol: exponent}.

    Returns None for strings that are not simple products of powers.
    """
    s = units.strip().replace("**", "^").replace("·", " ").replace("*", " ")
    if not s:
        return None
    terms: dict[str, int] = {}
    parts = s.split("/")
    for i, part in enumerate(parts):
        sign = 1 if i == 0 else -1
        for tok in part.split():
            m = re.fullmatch(r"([A-Za-z]+)\^?(-?\d+)?", tok)
            if m is None:
                if re.fullmatch(r"\d+", tok) and int(tok) == 1:
                    continue
                return None
            sym, exp = m.group(1), int(m.group(2) or 1)
            terms[sym] = terms.get(sym, 0) + sign * exp
    return {k: v for k, v in terms.items() if v != 0}


def _same_units(a: str, b: str) -> bool:
    if a.strip() == b.strip():
        return True
    ta, tb = _unit_terms(a), _unit_terms(b)
    return ta is not None and ta == tb


def _is_any(found: str, *candidates: str) -> bool:
    return any(_same_units(found, c) for c in candidates)


def conversion(found: str | None, climax_name: str) -> tuple[float, float]:
    """(scale, offset) with canonical = value * scale + offset, or UnitsError when ambiguous.

    The error message here names units only; :func:`to_canonical` adds file and variable.
    """
    spec = parse_variable(climax_name)
    base, canonical = spec.base, spec.units
    if base in ("soil_type", "latitude"):
        return 1.0, 0.0  # categorical / computed: no physical units to check
    if found is None or str(found).strip() == "":
        raise UnitsError("no units attribute")
    f = str(found).strip()
    low = f.lower()

    if base in CLIMATEBENCH:
        if _same_units(f, canonical) or (base in ("tas", "diurnal_temperature_range") and _is_any(f, "K")):
            return 1.0, 0.0
        if base in ("pr", "pr90") and _is_any(f, "kg m**-2 s**-1", "mm s**-1"):
            return 86400.0, 0.0  # a water flux of 1 kg m-2 s-1 is 1 mm s-1 = 86400 mm/day
        raise UnitsError(f"units {f!r} are not {canonical!r} (ClimateBench's) and no conversion is known")

    if base in ("temperature", "2m_temperature"):
        if _is_any(f, "K", "kelvin", "degK", "deg_K"):
            return 1.0, 0.0
        if low in {"degc", "deg_c", "°c", "c", "celsius", "degrees_celsius", "degree_celsius", "deg c"}:
            return 1.0, 273.15
    elif base == "geopotential":
        if _is_any(f, "m**2 s**-2", "J kg**-1"):
            return 1.0, 0.0
        if low in {"gpm", "m", "metre", "meter", "metres", "meters"}:
            return G, 0.0  # geopotential height -> geopotential
    elif base == "orography":
        if low in {"m", "metre", "meter", "metres", "meters", "gpm"}:
            return 1.0, 0.0
        if _is_any(f, "m**2 s**-2", "J kg**-1"):
            return 1.0 / G, 0.0  # surface geopotential -> height (WeatherBench convention)
    elif base in ("u_component_of_wind", "v_component_of_wind", "10m_u_component_of_wind",
                  "10m_v_component_of_wind"):
        if _is_any(f, "m s**-1"):
            return 1.0, 0.0
    elif base in ("mean_sea_level_pressure", "surface_pressure"):
        if _is_any(f, "Pa"):
            return 1.0, 0.0
        if low in {"hpa", "mbar", "mb", "millibar", "millibars"}:
            return 100.0, 0.0
    elif base == "vertical_velocity":
        if _is_any(f, "Pa s**-1"):
            return 1.0, 0.0
        if _is_any(f, "hPa s**-1"):
            return 100.0, 0.0
    elif base == "specific_humidity":
        if low in _FRACTION or _is_any(f, "kg kg**-1"):
            return 1.0, 0.0
        if _is_any(f, "g kg**-1"):
            return 1e-3, 0.0
    elif base == "relative_humidity":
        if low in _PERCENT:
            return 1.0, 0.0
    elif base in ("land_sea_mask", "total_cloud_cover"):
        if low in _FRACTION:
            return 1.0, 0.0
        if low in _PERCENT:
            return 0.01, 0.0
    elif base == "total_precipitation":
        if low in {"m", "metre", "meter", "metres", "meters", "m of water equivalent"}:
            return 1.0, 0.0
        if low == "mm":
            return 1e-3, 0.0
        if _is_any(f, "kg m**-2"):
            return 1e-3, 0.0  # 1 kg m-2 of water = 1 mm
        if _is_any(f, "kg m**-2 s**-1", "m s**-1", "mm s**-1", "mm h**-1", "mm/day"):
            raise UnitsError(
                f"units {f!r} are a precipitation rate; total_precipitation is an accumulation "
                "in m and converting needs the accumulation period: accumulate the rate first "
                "(e.g. times 3600 s for hourly totals) and write units 'm'"
            )
    elif base == "toa_incident_solar_radiation":
        if _is_any(f, "J m**-2"):
            return 1.0, 0.0
        if _is_any(f, "W m**-2"):
            raise UnitsError(
                f"units {f!r} are a flux; toa_incident_solar_radiation is an accumulation in "
                "J m**-2 and converting needs the accumulation period"
            )
    raise UnitsError(f"units {f!r} are not {canonical!r} and no unambiguous conversion is known")


# ----------------------------------------------------------------------------------------------
# Lazy element-wise conversion (keeps cfgrib / netCDF backends lazy; no dask)
# ----------------------------------------------------------------------------------------------


class _LazyAffine(BackendArray):
    """``source * scale + offset`` as float32, transposed, computed only for the indexed part."""

    def __init__(self, source: xr.Variable, perm: tuple[int, ...], scale: float, offset: float,
                 source_file: str | None = None):
        self._source = source
        self._source_file = source_file
        self._perm = perm  # output axis i is source axis perm[i]
        self._scale = float(scale)
        self._offset = float(offset)
        self.shape = tuple(source.shape[p] for p in perm)
        self.dtype = np.dtype("float32")

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.OUTER, self._raw_getitem
        )

    def _raw_getitem(self, key: tuple) -> np.ndarray:
        out_key: list[Any] = []
        squeeze: list[int] = []
        for i, k in enumerate(key):
            if isinstance(k, (int, np.integer)):
                out_key.append(slice(int(k), int(k) + 1))
                squeeze.append(i)
            else:
                out_key.append(k)
        src_key: list[Any] = [slice(None)] * len(out_key)
        for i, p in enumerate(self._perm):
            src_key[p] = out_key[i]
        try:
            arr = np.asarray(self._source[tuple(src_key)].values)
        except (OSError, RuntimeError) as exc:
            where = self._source_file or "the source file"
            raise OSError(f"{where}: reading data failed ({type(exc).__name__}: {exc}); the file "
                          "may be truncated or corrupt; re-download it") from exc
        arr = arr.transpose(self._perm)
        if squeeze:
            arr = arr.squeeze(axis=tuple(squeeze))
        if self._scale != 1.0 or self._offset != 0.0:
            arr = arr.astype(np.float64) * self._scale + self._offset
        return arr.astype(np.float32)


def _canonical_dim_order(dims: tuple[str, ...]) -> tuple[str, ...]:
    tail = [d for d in ("time", "lat", "lon") if d in dims]
    return tuple(d for d in dims if d not in tail) + tuple(tail)


def lazy_affine(da: xr.DataArray, scale: float = 1.0, offset: float = 0.0,
                dims: tuple[str, ...] | None = None, source_file: str | None = None) -> xr.DataArray:
    """``da * scale + offset`` as float32 in dim order ``dims``, without reading any data.

    In-memory inputs are computed directly; backend (lazily indexed) inputs stay lazy, so
    ``result.isel(time=slice(a, b)).load()`` reads only those steps.
    """
    dims = tuple(dims) if dims is not None else da.dims
    if sorted(dims) != sorted(da.dims):
        raise ValueError(f"dims {dims} are not a permutation of {da.dims}")
    perm = tuple(da.dims.index(d) for d in dims)
    var = da.variable
    if isinstance(var._data, np.ndarray):
        values = np.asarray(var.values).transpose(perm)
        if scale != 1.0 or offset != 0.0:
            values = values.astype(np.float64) * scale + offset
        data: Any = values.astype(np.float32)
    else:
        data = indexing.LazilyIndexedArray(_LazyAffine(var, perm, scale, offset, source_file))
    coords = {k: v for k, v in da.coords.items() if set(v.dims) <= set(dims)}
    return xr.DataArray(xr.Variable(dims, data), coords=coords, name=da.name, attrs=dict(da.attrs))


def found_units(da: xr.DataArray) -> str | None:
    """The units a producer wrote: CF ``units`` or cfgrib's ``GRIB_units``."""
    for key in ("units", "GRIB_units"):
        u = da.attrs.get(key)
        if u is not None and str(u).strip() not in ("", "unknown"):
            return str(u)
    return None


def to_canonical(da: xr.DataArray, climax_name: str, source_file: str,
                 *, assume_units: str | None = None) -> xr.DataArray:
    """Convert ``da`` to the canonical units of ``climax_name`` (lazily, float32).

    Dims are reordered to (..., time, lat, lon). Attrs: ``units`` (canonical) and
    ``source_units`` (what the file had). Refuses ambiguous units with a UnitsError naming the
    file, the variable and the units found and expected. ``assume_units`` is used only when the
    file has no units attribute (for formats with a documented convention, e.g. WeatherBench).
    """
    spec = parse_variable(climax_name)
    units = found_units(da) or assume_units
    try:
        scale, offset = conversion(units, spec.name)
    except UnitsError as exc:
        raise UnitsError(
            f"{source_file}: variable {da.name!r} (for ClimaX {spec.name!r}) has units "
            f"{units!r}; expected {spec.units!r}: {exc}. Fix the file's units attribute or "
            "convert the data before preprocessing."
        ) from None
    out = lazy_affine(da, scale, offset, _canonical_dim_order(tuple(da.dims)), str(source_file))
    keep = {k: v for k, v in da.attrs.items() if k in ("long_name", "standard_name")}
    out.attrs = {**keep, "units": spec.units, "source_units": units or ""}
    out.name = spec.name
    return out
