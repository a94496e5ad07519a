"""One home for ClimaX variable names, producer names and physical ranges (their units are
converted by :mod:`pipelines.units`).

* :func:`parse_variable` understands ClimaX names (``2m_temperature``, ``geopotential_500``, ...)
  and gives each one's canonical units.
* :data:`DEFAULT_VARS` is the 48-variable ClimaX pretraining list, in the original order.
* :func:`physical_range` / :func:`check_range`: the range of decoded values that is physical.
* :func:`grib_base` / :func:`netcdf_base` map producer short names (ECMWF/GRIB, CDS NetCDF, CMIP6)
  to ClimaX base names.

This module imports neither torch nor ray.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from climax.variables import DEFAULT_LEVELS, NAME_ALIASES, ORIGINAL_DEFAULT_VARS, PRESSURE_LEVEL_UNITS

#: Standard gravity (m s-2), used for geopotential <-> geopotential height and orography.
G = 9.80665

# ----------------------------------------------------------------------------------------------
# ClimaX names and canonical units
# ----------------------------------------------------------------------------------------------

#: Single-level, time-varying variables and their canonical units.
SINGLE_LEVEL: dict[str, str] = {
    "2m_temperature": "K",
    "10m_u_component_of_wind": "m s**-1",
    "10m_v_component_of_wind": "m s**-1",
    "mean_sea_level_pressure": "Pa",
    "surface_pressure": "Pa",
    "total_precipitation": "m",
    "toa_incident_solar_radiation": "J m**-2",
    "total_cloud_cover": "(0 - 1)",
}

#: ClimateBench (Watson-Parris et al. 2022) forcings and responses, yearly, under their own names
#: (the climate-projection task). CO2 is cumulative emissions and CH4 a global emission rate (both
#: global scalars in the files, broadcast over the grid by the reader); SO2 and BC are emission
#: fields. Precipitation is stored in mm/day as ClimateBench's own scripts convert it.
CLIMATEBENCH: dict[str, str] = {
    "CO2": "GtCO2",
    "CH4": "GtCH4 yr**-1",
    "SO2": "kg m**-2 s**-1",
    "BC": "kg m**-2 s**-1",
    "tas": "K",
    "diurnal_temperature_range": "K",
    "pr": "mm day**-1",
    "pr90": "mm day**-1",
}
SINGLE_LEVEL.update(CLIMATEBENCH)

#: Constant (time-invariant) fields and their canonical units. ``latitude`` is computed from the
#: grid, never read from a file.
CONSTANTS: dict[str, str] = {
    "land_sea_mask": "(0 - 1)",
    "orography": "m",
    "latitude": "degrees_north",
    "soil_type": "1",
}

#: Pressure-level bases (variables are named ``<base>_<hPa>``) and their canonical units: one home,
#: ``climax.variables`` (the forecast writers split names into base and level too).
PRESSURE_LEVEL: dict[str, str] = dict(PRESSURE_LEVEL_UNITS)

#: Physical range [min, max] of each base in its canonical units above: decoded values outside it
#: are fill values without a ``_FillValue`` attribute (-9999, 9.999e20, 0 over a whole field) or a
#: units mix-up, and stop the build (``check_range``; a recipe's ``valid_range`` overrides it).
#: Wide enough for every real extreme: Vostok's 184 K, supersaturation above 100 % relative
#: humidity, ERA5's slightly negative specific humidity and precipitation (packing noise).
#: Geopotential depends on the level: ``GEOPOTENTIAL_HEIGHT_RANGE``. ClimateBench's emissions and
#: responses, ``latitude`` and ``soil_type`` are not checked.
RANGES: dict[str, tuple[float, float]] = {
    "2m_temperature": (170.0, 350.0),
    "temperature": (150.0, 350.0),
    "10m_u_component_of_wind": (-100.0, 100.0),
    "10m_v_component_of_wind": (-100.0, 100.0),
    "u_component_of_wind": (-200.0, 200.0),
    "v_component_of_wind": (-200.0, 200.0),
    "specific_humidity": (-1e-4, 0.05),
    "relative_humidity": (-5.0, 200.0),
    "mean_sea_level_pressure": (85_000.0, 110_000.0),
    "surface_pressure": (30_000.0, 110_000.0),
    "total_precipitation": (-1e-6, 2.0),
    "toa_incident_solar_radiation": (-1.0, 1.3e8),
    "total_cloud_cover": (-0.01, 1.01),
    "vertical_velocity": (-100.0, 100.0),
    "land_sea_mask": (-0.01, 1.01),
    "orography": (-1000.0, 9000.0),
}

#: Geopotential height range (m) at pressure levels (hPa); geopotential (m2 s-2) is g times it.
#: Other levels interpolate in log pressure; beyond 1000 or 50 hPa the nearest bound is widened.
GEOPOTENTIAL_HEIGHT_RANGE: dict[int, tuple[float, float]] = {
    1000: (-1000.0, 800.0), 925: (-300.0, 1500.0), 850: (400.0, 2000.0), 700: (1900.0, 3500.0),
    600: (3000.0, 4800.0), 500: (40_000.0 / 9.80665, 62_000.0 / 9.80665), 400: (5500.0, 7900.0),
    300: (7000.0, 10_000.0), 250: (8500.0, 11_200.0), 200: (10_000.0, 12_800.0), 150: (12_000.0, 14_800.0),
    100: (14_500.0, 17_500.0), 50: (18_500.0, 21_500.0),
}

#: Bases whose field can never be one value over the whole grid at a time step (a whole field of
#: 0 or of any other number is a fill); precipitation, cloud and masks can.
NEVER_UNIFORM = {"2m_temperature", "temperature", "geopotential", "mean_sea_level_pressure", "surface_pressure",
                 "10m_u_component_of_wind", "10m_v_component_of_wind", "u_component_of_wind",
                 "v_component_of_wind", "specific_humidity", "relative_humidity"}

#: Spellings accepted for historical reasons, normalised on the way in.
ALIASES: dict[str, str] = dict(NAME_ALIASES)

#: The 48 ClimaX pretraining variables, in the released checkpoints' order.
DEFAULT_VARS: list[str] = list(ORIGINAL_DEFAULT_VARS)


@dataclass(frozen=True)
class VariableSpec:
    """A parsed ClimaX variable name."""

    name: str
    base: str
    level_hpa: int | None
    units: str
    is_constant: bool

    @property
    def is_pressure_level(self) -> bool:
        return self.level_hpa is not None


def known_bases() -> list[str]:
    return [*SINGLE_LEVEL, *CONSTANTS, *PRESSURE_LEVEL]


def normalise_name(name: str) -> str:
    """Map accepted aliases (``lattitude``) to our canonical spelling."""
    return ALIASES.get(name, name)


def parse_variable(name: str) -> VariableSpec:
    """Parse a ClimaX variable name; an unknown name raises ValueError listing the known bases."""
    if not isinstance(name, str):
        raise ValueError(f"variable name must be a string, got {name!r}")
    name = normalise_name(name.strip())
    if name in SINGLE_LEVEL:
        return VariableSpec(name, name, None, SINGLE_LEVEL[name], False)
    if name in CONSTANTS:
        return VariableSpec(name, name, None, CONSTANTS[name], True)
    m = re.fullmatch(r"(?P<base>[a-z_]+?)_(?P<level>\d+)", name)
    if m and m.group("base") in PRESSURE_LEVEL:
        level = int(m.group("level"))
        if level <= 0:
            raise ValueError(f"variable {name!r}: pressure level must be a positive number of hPa")
        return VariableSpec(name, m.group("base"), level, PRESSURE_LEVEL[m.group("base")], False)
    if name in PRESSURE_LEVEL:
        raise ValueError(
            f"variable {name!r} is a pressure-level base: name a level in hPa, "
            f"e.g. {name}_500 (ClimaX levels: {', '.join(map(str, DEFAULT_LEVELS))})"
        )
    raise ValueError(
        f"unknown ClimaX variable {name!r}. Known single-level: {', '.join(SINGLE_LEVEL)}; "
        f"constants: {', '.join(CONSTANTS)}; pressure-level bases (name them <base>_<hPa>, "
        f"e.g. geopotential_500): {', '.join(PRESSURE_LEVEL)}"
    )


def physical_range(name: str) -> tuple[float, float] | None:
    """[min, max] of a ClimaX variable in canonical units (``RANGES``), or None when not checked."""
    spec = parse_variable(name)
    if spec.base == "geopotential" and spec.level_hpa is not None:
        levels = np.array(sorted(GEOPOTENTIAL_HEIGHT_RANGE), dtype=np.float64)
        lo = np.array([GEOPOTENTIAL_HEIGHT_RANGE[int(p)][0] for p in levels])
        hi = np.array([GEOPOTENTIAL_HEIGHT_RANGE[int(p)][1] for p in levels])
        x = np.log(float(spec.level_hpa))
        lo_h, hi_h = float(np.interp(x, np.log(levels), lo)), float(np.interp(x, np.log(levels), hi))
        if spec.level_hpa < levels[0]:  # above 50 hPa: no upper bound worth guessing
            hi_h = 60_000.0
        elif spec.level_hpa > levels[-1]:  # below 1000 hPa (e.g. 1013): deeper
            lo_h = -2000.0
        return lo_h * G, hi_h * G
    return RANGES.get(spec.base)


def check_range(values: np.ndarray, name: str, source: str, times: list[str] | None,
                valid: tuple[float, float] | None, override_hint: str = "valid_range") -> None:
    """Raise ValueError naming the file, variable and first time step whose decoded values (time,
    lat, lon) or (lat, lon) leave ``valid``, or (bases in ``NEVER_UNIFORM``) are one value over the
    whole field: fill values without a ``_FillValue`` attribute, or wrong units."""
    if valid is None:
        return
    a = values.reshape(1 if values.ndim == 2 else values.shape[0], -1)
    lo, hi = a.min(axis=1), a.max(axis=1)
    out = (lo < valid[0]) | (hi > valid[1])
    base = parse_variable(name).base
    uniform = (lo == hi) if base in NEVER_UNIFORM else np.zeros_like(out)
    bad = np.flatnonzero(out | uniform)
    if not len(bad):
        return
    k = int(bad[0])
    when = f" at {times[k]}" if times is not None else ""
    found = f"is {lo[k]:g} over the whole field" if uniform[k] else f"ranges {lo[k]:g} .. {hi[k]:g}"
    more = f" ({len(bad)} time steps in all)" if len(bad) > 1 else ""
    raise ValueError(
        f"{source}: variable {name}{when} {found}, outside its physical range {valid[0]:g} .. {valid[1]:g} "
        f"{parse_variable(name).units}{more}: fill values without a _FillValue attribute or wrong units; fix the "
        f"file, or for unusual data set {override_hint}: {{{name}: [min, max]}} (or null to skip the check) "
        "in the recipe")


def level_name(base: str, level_hpa: float) -> str:
    return f"{base}_{int(round(float(level_hpa)))}"


# ----------------------------------------------------------------------------------------------
# Producer names -> ClimaX bases
# ----------------------------------------------------------------------------------------------

#: GRIB shortName on ``isobaricInhPa`` -> pressure-level base. ``gh`` is geopotential height in
#: gpm and is converted (times g) by :func:`to_canonical` through its units.
GRIB_PRESSURE: dict[str, str] = {
    "z": "geopotential",
    "gh": "geopotential",
    "t": "temperature",
    "u": "u_component_of_wind",
    "v": "v_component_of_wind",
    "q": "specific_humidity",
    "r": "relative_humidity",
    "w": "vertical_velocity",
}

_SURFACE_LIKE = {"surface", "heightAboveGround", "meanSea", "sfc", "undef", "unknown"}
_WHOLE_ATMOSPHERE = {"surface", "atmosphere", "atmosphereSingleLayer", "entireAtmosphere"}

#: GRIB shortName -> (single-level or constant base, level types it is accepted on).
GRIB_SINGLE: dict[str, tuple[str, set[str]]] = {
    "t2m": ("2m_temperature", _SURFACE_LIKE),
    "2t": ("2m_temperature", _SURFACE_LIKE),
    "u10": ("10m_u_component_of_wind", _SURFACE_LIKE),
    "10u": ("10m_u_component_of_wind", _SURFACE_LIKE),
    "v10": ("10m_v_component_of_wind", _SURFACE_LIKE),
    "10v": ("10m_v_component_of_wind", _SURFACE_LIKE),
    "msl": ("mean_sea_level_pressure", {"surface", "meanSea"}),
    "prmsl": ("mean_sea_level_pressure", {"meanSea"}),
    "sp": ("surface_pressure", {"surface"}),
    "tp": ("total_precipitation", {"surface"}),
    "tisr": ("toa_incident_solar_radiation", {"surface", "nominalTop"}),
    "tcc": ("total_cloud_cover", _WHOLE_ATMOSPHERE),
    "lsm": ("land_sea_mask", {"surface"}),
    "orog": ("orography", {"surface"}),
    "slt": ("soil_type", {"surface"}),
    # surface geopotential (m2 s-2) -> orography in m: divided by g through its units
    "z": ("orography", {"surface"}),
}

#: Plain ``t``/``u``/``v`` on heightAboveGround at 2 m / 10 m (when not renamed by cfgrib).
GRIB_HEIGHT: dict[tuple[str, float], str] = {
    ("t", 2.0): "2m_temperature",
    ("u", 10.0): "10m_u_component_of_wind",
    ("v", 10.0): "10m_v_component_of_wind",
}


def grib_base(short_name: str, type_of_level: str | None, level: float | None = None) -> str | None:
    """ClimaX base for a GRIB field, or None when it is not a ClimaX variable.

    ``type_of_level`` is cfgrib's ``GRIB_typeOfLevel``; ``level`` its value (used for
    heightAboveGround 2 m / 10 m fields).
    """
    if type_of_level == "isobaricInhPa":
        return GRIB_PRESSURE.get(short_name)
    if type_of_level == "heightAboveGround" and level is not None:
        hit = GRIB_HEIGHT.get((short_name, float(level)))
        if hit:
            return hit
    entry = GRIB_SINGLE.get(short_name)
    if entry and (type_of_level is None or type_of_level in entry[1]):
        base, _ = entry
        if type_of_level == "heightAboveGround" and level is not None:
            expected = {"2m_temperature": 2.0}.get(base, 10.0 if base.startswith("10m_") else None)
            if expected is not None and float(level) != expected:
                return None
        return base
    return None


#: NetCDF names (CDS ERA5, WeatherBench, CMIP6) of pressure-level fields -> base.
NETCDF_PRESSURE: dict[str, str] = {
    **GRIB_PRESSURE,
    # CMIP6
    "zg": "geopotential",  # geopotential height in m: times g through its units
    "ta": "temperature",
    "ua": "u_component_of_wind",
    "va": "v_component_of_wind",
    "hus": "specific_humidity",
    "hur": "relative_humidity",
    "wap": "vertical_velocity",
}

#: NetCDF names of single-level fields and constants -> base.
NETCDF_SINGLE: dict[str, str] = {
    "t2m": "2m_temperature",
    "2t": "2m_temperature",
    "u10": "10m_u_component_of_wind",
    "v10": "10m_v_component_of_wind",
    "msl": "mean_sea_level_pressure",
    "sp": "surface_pressure",
    "tp": "total_precipitation",
    "tisr": "toa_incident_solar_radiation",
    "tcc": "total_cloud_cover",
    "lsm": "land_sea_mask",
    "orography": "orography",
    "orog": "orography",
    "slt": "soil_type",
    # CMIP6
    "tas": "2m_temperature",
    "uas": "10m_u_component_of_wind",
    "vas": "10m_v_component_of_wind",
    "psl": "mean_sea_level_pressure",
    "ps": "surface_pressure",
    "clt": "total_cloud_cover",
    "sftlf": "land_sea_mask",
    # Fluxes: mapped so that asking for them gives a clear refusal (a rate is not an accumulation).
    "pr": "total_precipitation",
    "rsdt": "toa_incident_solar_radiation",
}


#: WeatherBench 2 / ARCO-ERA5 (Zarr, or NetCDF exported from them) name fields by long names, which
#: are ClimaX's own bases; ``geopotential_at_surface`` (m2 s-2) is orography after dividing by g.
#: ClimateBench's names are left out: they mean something only in ClimateBench's files.
LONG_SINGLE: dict[str, str] = {
    **{n: n for n in SINGLE_LEVEL if n not in CLIMATEBENCH},
    **{n: n for n in CONSTANTS if n != "latitude"},
    "geopotential_at_surface": "orography",
}

#: Units a long-named field is taken to have when its file gives none (WeatherBench 2's).
LONG_UNITS: dict[str, str] = {"geopotential_at_surface": "m**2 s**-2"}


def netcdf_base(name: str, has_level: bool) -> str | None:
    """ClimaX base for a NetCDF or Zarr variable, or None. ``has_level``: it has a pressure-level
    axis. Producer short names first, then WeatherBench 2 long names (``temperature``,
    ``2m_temperature``, ``geopotential_at_surface``, ...).

    ERA5's ``z`` without a level axis is surface geopotential, i.e. orography (divided by g).

    ``has_level`` stays positional: this is the ``base_for(name, has_level)`` callback that
    ``pipelines.sources.netcdf.candidates`` calls (and readers override with lambdas).
    """
    if has_level:
        return NETCDF_PRESSURE.get(name) or (name if name in PRESSURE_LEVEL else None)
    if name == "z":
        return "orography"
    return NETCDF_SINGLE.get(name) or LONG_SINGLE.get(name)


def long_name_units(name: str, base: str) -> str | None:
    """The units a WeatherBench 2 long-named field has when its file omits them, else None."""
    if name in LONG_UNITS:
        return LONG_UNITS[name]
    if name == base:
        return PRESSURE_LEVEL.get(base) or parse_variable(base).units
    return None
