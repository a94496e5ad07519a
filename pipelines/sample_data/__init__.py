"""Synthetic ERA5-like sample data, written in the real formats (GRIB 2, WeatherBench NetCDF and
WeatherBench 2 Zarr).

The project's demo and training tests need several years of global fields that look and behave like
ERA5 without downloading anything. This module makes them from a small analytic "atmosphere":

* geography: a fixed, Earth-like land-sea mask made of smooth continent blobs (exact 0 over open
  ocean, exact 1 inland, fractional coasts) and orography over land (0..3000 m);
* temperature: warm equator, cold poles, a constant lapse rate up to a tropopause and an isothermal
  stratosphere above it; a seasonal cycle of opposite sign in the two hemispheres, larger over land
  (and lagging over the ocean); a diurnal cycle of 2 m temperature following local solar time,
  larger over land; a warming trend of 0.02 K per year;
* travelling Rossby waves (zonal wavenumbers 3-7 in each hemisphere, moving eastward at a few m/s,
  amplitudes peaking in mid-latitudes and modulated over days) plus weak tropical waves, with phases,
  speeds and amplitudes drawn per year from ``(seed, year)``; consecutive years are cross-faded over a
  few days around 1 January so the data stay continuous across files;
* geopotential from temperature by the hypsometric equation (high where the column is warm);
* winds: geostrophic from the geopotential gradient (Coriolis parameter floored near the equator)
  plus a westerly jet; 10 m winds from the 1000 hPa geopotential, slowed and turned by friction;
* humidity: relative humidity from latitude, height and the waves; specific humidity from it and
  the temperature by Clausius-Clapeyron;
* small, deterministic noise (a counter-based hash of seed, variable, time and grid point, so that
  any subset of times or variables reproduces the same values).

Everything is a pure function of ``(time, lat, lon, variable, seed)``: ``fields`` gives the truth
that tests compare file contents against. The evolution is smooth at 6 h, so a small model can beat
persistence.

Public API: ``SAMPLE_VARS``, ``LEVELS``, ``fields``, ``generate``, ``grid``, ``resolution_tag`` and the
CLI ``python -m pipelines.sample_data OUT_DIR [--years ...] [--resolution ...] [--step-hours ...]
[--formats grib weatherbench zarr]``.

The code lives along its seams: ``catalog`` (names, levels, grids), ``atmosphere`` (the analytic
model, ``fields``), ``writers`` (GRIB / WeatherBench / Zarr / CMIP6 files, ``generate``) and
``climatebench`` (ClimateBench-like projection data); this package re-exports their public names.

This package imports no torch and no ray.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from pipelines.sample_data.atmosphere import A_EARTH, GAMMA, KL, OMEGA, RD, TREND_K_PER_YEAR, YEAR_DAYS, G, fields
from pipelines.sample_data.catalog import (
    CONSTANT_VARS,
    DEFAULT_FORMATS,
    FORMATS,
    LEVELS,
    PL_BASES,
    SAMPLE_VARS,
    SFC_VARS,
    grid,
    resolution_tag,
)
from pipelines.sample_data.climatebench import (
    CLIMATEBENCH_RESPONSE,
    CLIMATEBENCH_SCENARIOS,
    climatebench_grid,
    climatebench_response,
    write_climatebench,
)
from pipelines.sample_data.writers import CMIP6_NAMES, generate, write_cmip6

__all__ = [
    "SAMPLE_VARS",
    "LEVELS",
    "PL_BASES",
    "SFC_VARS",
    "CONSTANT_VARS",
    "fields",
    "generate",
    "grid",
    "resolution_tag",
    "main",
    "write_climatebench",
    "climatebench_response",
    "write_cmip6",
    "CLIMATEBENCH_SCENARIOS",
    # also public, as before the split: the physical constants, the formats, the names tables
    "G", "RD", "GAMMA", "KL", "OMEGA", "A_EARTH", "YEAR_DAYS", "TREND_K_PER_YEAR", "FORMATS", "DEFAULT_FORMATS",
    "CMIP6_NAMES", "CLIMATEBENCH_RESPONSE", "climatebench_grid",
]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.sample_data",
        description="Generate synthetic ERA5-like sample data as GRIB 2, WeatherBench NetCDF and "
                    "WeatherBench 2 Zarr.",
    )
    p.add_argument("out_dir", type=Path)
    p.add_argument("--years", type=int, nargs="+", default=[2015, 2016, 2017])
    p.add_argument("--resolution", type=float, default=5.625)
    p.add_argument("--step-hours", type=int, default=6)
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(DEFAULT_FORMATS))
    p.add_argument("--variables", nargs="+", default=list(SAMPLE_VARS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-days", type=float, default=None, help="keep only the first days of each year")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    paths = generate(
        a.out_dir,
        years=a.years,
        resolution=a.resolution,
        step_hours=a.step_hours,
        variables=a.variables,
        formats=a.formats,
        seed=a.seed,
        progress=not a.quiet,
        max_days=a.max_days,
    )
    for fmt, path in paths.items():
        print(f"{fmt}: {path}")
    return 0

