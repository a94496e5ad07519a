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
