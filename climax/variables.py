"""The variables of the released ClimaX checkpoints (torch-free: ``pipelines`` imports it too)."""

from __future__ import annotations

#: ClimaX pretraining levels (hPa).
DEFAULT_LEVELS: tuple[int, ...] = (50, 250, 500, 600, 700, 850, 925)

#: The 48 ClimaX pretraining variables in the order of the original ``configs/pretrain_climax.yaml``,
#: which is the embedding order of the released checkpoints (with ``latitude`` for the original's
#: ``lattitude``).
ORIGINAL_DEFAULT_VARS: tuple[str, ...] = (
    "land_sea_mask", "orography", "latitude", "2m_temperature",
    "10m_u_component_of_wind", "10m_v_component_of_wind",
    *(f"{base}_{level}" for base in ("geopotential", "u_component_of_wind", "v_component_of_wind",
                                     "temperature", "relative_humidity", "specific_humidity")
      for level in DEFAULT_LEVELS),
)

#: Spellings accepted for historical reasons, normalised on the way in.
NAME_ALIASES: dict[str, str] = {"lattitude": "latitude"}

#: Pressure-level bases (a variable is named ``<base>_<hPa>``) and their canonical units. These
#: bases are also WeatherBench 2's / ERA5's long names; ``pipelines.names`` takes them from here.
PRESSURE_LEVEL_UNITS: dict[str, str] = {
    "geopotential": "m**2 s**-2",
    "temperature": "K",
    "u_component_of_wind": "m s**-1",
    "v_component_of_wind": "m s**-1",
    "specific_humidity": "kg kg**-1",
    "relative_humidity": "%",
    "vertical_velocity": "Pa s**-1",
}


def split_level(name: str) -> tuple[str, int | None]:
    """(WeatherBench 2 / ERA5 long name, pressure level in hPa or None) of a ClimaX variable:
    ``temperature_850`` -> ("temperature", 850); ``2m_temperature`` -> ("2m_temperature", None).
    Single-level ClimaX names already are the long names."""
    base, sep, level = name.rpartition("_")
    if sep and base in PRESSURE_LEVEL_UNITS and level.isdigit():
        return base, int(level)
    return name, None
