"""What the sample data holds: ClimaX variable names, pressure levels, GRIB codes and units of
each variable, the output formats, and the grids (WeatherBench's cell-centred equiangular ones).

Imports no torch and no ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ClimaX variable names, canonical units.
SAMPLE_VARS: tuple[str, ...] = (
    "land_sea_mask",
    "orography",
    "2m_temperature",
    "10m_u_component_of_wind",
    "10m_v_component_of_wind",
    "geopotential_500",
    "geopotential_850",
    "temperature_500",
    "temperature_850",
    "u_component_of_wind_500",
    "v_component_of_wind_500",
    "u_component_of_wind_850",
    "v_component_of_wind_850",
    "specific_humidity_850",
    "relative_humidity_850",
)

# Standard (WeatherBench / ERA5) pressure levels, hPa.
LEVELS: tuple[int, ...] = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)


@dataclass(frozen=True)
class _PlBase:
    short_name: str  # GRIB shortName, also the cfgrib and WeatherBench variable name
    param_id: int
    units: str
    long_name: str


@dataclass(frozen=True)
class _SfcVar:
    short_name: str  # GRIB shortName
    param_id: int
    type_of_level: str
    level: int
    data_var: str  # cfgrib / WeatherBench variable name
    units: str  # units of the ClimaX variable (orography: m; its GRIB field is m2 s-2)
    long_name: str


PL_BASES: dict[str, _PlBase] = {
    "geopotential": _PlBase("z", 129, "m2 s-2", "Geopotential"),
    "temperature": _PlBase("t", 130, "K", "Temperature"),
    "u_component_of_wind": _PlBase("u", 131, "m s-1", "U component of wind"),
    "v_component_of_wind": _PlBase("v", 132, "m s-1", "V component of wind"),
    "specific_humidity": _PlBase("q", 133, "kg kg-1", "Specific humidity"),
    "relative_humidity": _PlBase("r", 157, "%", "Relative humidity"),
}

SFC_VARS: dict[str, _SfcVar] = {
    "2m_temperature": _SfcVar("2t", 167, "heightAboveGround", 2, "t2m", "K", "2 metre temperature"),
    "10m_u_component_of_wind": _SfcVar(
        "10u", 165, "heightAboveGround", 10, "u10", "m s-1", "10 metre U wind component"
    ),
    "10m_v_component_of_wind": _SfcVar(
        "10v", 166, "heightAboveGround", 10, "v10", "m s-1", "10 metre V wind component"
    ),
}

# Time-invariant fields. In GRIB they go into the surface file at every time step (as ERA5 delivers
# them); orography is written as surface geopotential `z` in m2 s-2, as in ERA5.
CONSTANT_VARS: dict[str, _SfcVar] = {
    "land_sea_mask": _SfcVar("lsm", 172, "surface", 0, "lsm", "1", "Land-sea mask"),
    "orography": _SfcVar("z", 129, "surface", 0, "orography", "m", "Orography"),
}

FORMATS = ("grib", "weatherbench", "zarr")
#: What ``generate`` writes when no formats are given (Zarr only on request).
DEFAULT_FORMATS = ("grib", "weatherbench")


def parse_name(name: str) -> tuple[str, int | None]:
    """``"temperature_850"`` -> ``("temperature", 850)``; single-level names -> ``(name, None)``."""
    if name in SFC_VARS or name in CONSTANT_VARS:
        return name, None
    base, sep, level = name.rpartition("_")
    if sep and base in PL_BASES and level.isdigit():
        lev = int(level)
        if lev not in LEVELS:
            raise ValueError(f"{name}: level {lev} hPa is not one of the standard levels {LEVELS}")
        return base, lev
    raise ValueError(
        f"unknown variable {name!r}: expected one of {sorted(SFC_VARS) + sorted(CONSTANT_VARS)} "
        f"or <base>_<level> with base in {sorted(PL_BASES)} and level in {LEVELS}"
    )


def resolution_tag(resolution: float) -> str:
    """WeatherBench's resolution tag: 5.625 -> ``"5.625deg"``, 1.40625 -> ``"1.40625deg"``."""
    return np.format_float_positional(float(resolution), trim="-") + "deg"


def grid(resolution: float = 5.625) -> tuple[np.ndarray, np.ndarray]:
    """Cell-centred equiangular grid: lat ascending (south to north), lon from 0 eastward."""
    r = float(resolution)
    nlat, nlon = 180.0 / r, 360.0 / r
    if r <= 0 or abs(nlat - round(nlat)) > 1e-9 or abs(nlon - round(nlon)) > 1e-9:
        raise ValueError(f"resolution {resolution} must divide 180 degrees evenly")
    lat = -90.0 + r / 2 + r * np.arange(int(round(nlat)))
    lon = r * np.arange(int(round(nlon)))
    return lat, lon
