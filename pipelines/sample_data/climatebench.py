"""ClimateBench-like climate projection data (the projection task of ``jobs.finetune``), in
ClimateBench's own file layout, with responses that are a known function of the forcings.

Imports no torch and no ray.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipelines.sample_data.atmosphere import angular_distance
from pipelines.sample_data.writers import to_netcdf

#: ClimateBench's scenarios: the historical runs span 1850-2014, the SSPs 2015-2100.
CLIMATEBENCH_SCENARIOS = ("historical", "hist-GHG", "hist-aer", "ssp126", "ssp245", "ssp370", "ssp585")

# Aerosol source regions (lat, lon, radius in degrees) and, per scenario family, their emission
# amplitude (1 = the 2014 level) at a few anchor years, interpolated linearly in between.
_AEROSOL_REGIONS = {"north_atlantic": (48.0, 350.0, 22.0), "east_asia": (32.0, 112.0, 14.0),
                    "south_asia": (22.0, 80.0, 12.0)}
_AEROSOL_PATHS = {
    "historical": {"north_atlantic": ([1850, 1900, 1975, 2014], [0.05, 0.4, 2.2, 0.9]),
                   "east_asia": ([1850, 1950, 1990, 2014], [0.0, 0.1, 0.6, 1.0]),
                   "south_asia": ([1850, 1960, 2014], [0.0, 0.05, 1.0])},
    "ssp126": {"north_atlantic": ([2014, 2050, 2100], [0.9, 0.2, 0.05]),
               "east_asia": ([2014, 2040, 2100], [1.0, 0.2, 0.05]),
               "south_asia": ([2014, 2040, 2100], [1.0, 0.4, 0.05])},
    "ssp245": {"north_atlantic": ([2014, 2050, 2100], [0.9, 0.4, 0.2]),
               "east_asia": ([2014, 2050, 2100], [1.0, 0.4, 0.2]),
               "south_asia": ([2014, 2040, 2100], [1.0, 1.6, 1.3])},
    "ssp370": {"north_atlantic": ([2014, 2100], [0.9, 1.0]),
               "east_asia": ([2014, 2060, 2100], [1.0, 1.3, 1.1]),
               "south_asia": ([2014, 2060, 2100], [1.0, 2.6, 2.4])},
    "ssp585": {"north_atlantic": ([2014, 2050, 2100], [0.9, 0.3, 0.1]),
               "east_asia": ([2014, 2040, 2100], [1.0, 0.4, 0.1]),
               "south_asia": ([2014, 2040, 2100], [1.0, 0.9, 0.2])},
}
# Annual CO2 emissions (GtCO2/yr) and CH4 emissions (GtCH4/yr) at anchor years.
_CO2_EMISSIONS = {"ssp126": ([2014, 2030, 2070, 2100], [36.0, 28.0, -2.0, -6.0]),
                  "ssp245": ([2014, 2040, 2100], [36.0, 42.0, 10.0]),
                  "ssp370": ([2014, 2100], [36.0, 82.0]),
                  "ssp585": ([2014, 2080, 2100], [36.0, 120.0, 125.0])}
_CH4_EMISSIONS = {"historical": ([1850, 1950, 2014], [0.05, 0.15, 0.38]),
                  "ssp126": ([2014, 2100], [0.38, 0.15]), "ssp245": ([2014, 2100], [0.38, 0.25]),
                  "ssp370": ([2014, 2100], [0.38, 0.60]), "ssp585": ([2014, 2100], [0.38, 0.45])}
#: The responses of the generated data (truth for tests): K per GtCO2 of cumulative emissions, K per
#: GtCH4/yr, K of lag per GtCO2/yr of recent emissions, K of cooling per unit of aerosol emission
#: (scaled to 1 at a region's 2014 level), K of internal variability per ensemble member.
CLIMATEBENCH_RESPONSE = {"tcre": 0.00045, "ch4": 1.2, "lag": 0.012, "aerosol_local": 2.5,
                         "aerosol_global": 0.4, "noise_k": 0.2}
_SO2_PEAK = 2.0e-10  # kg m-2 s-1 at a region's centre at amplitude 1


def climatebench_grid(shape: tuple[int, int] = (96, 144)) -> tuple[np.ndarray, np.ndarray]:
    """ClimateBench's NorESM2 grid layout: latitudes from -90 to 90 inclusive, longitudes from 0."""
    nlat, nlon = shape
    return np.linspace(-90.0, 90.0, nlat), np.arange(nlon) * (360.0 / nlon)


def _scenario_years(scenario: str, hist_start: int, ssp_end: int) -> np.ndarray:
    return np.arange(hist_start, 2015) if scenario.startswith("hist") else np.arange(2015, ssp_end + 1)


def _climatebench_forcings(scenario: str, years: np.ndarray, lat: np.ndarray, lon: np.ndarray):
    """(CO2 cumulative (T,), CH4 (T,), SO2 (T, H, W), BC (T, H, W)) of one scenario."""
    hist_years = np.arange(1850, 2015)
    hist_co2 = np.cumsum(36.0 * np.exp((hist_years - 2014) / 45.0))
    family = "historical" if scenario.startswith("hist") else scenario
    if family == "historical":
        co2 = np.interp(years, hist_years, hist_co2)
        ch4 = np.interp(years, *_CH4_EMISSIONS["historical"])
    else:
        emis = np.interp(np.arange(2015, 2101), *_CO2_EMISSIONS[family])
        co2 = np.interp(years, np.arange(2015, 2101), hist_co2[-1] + np.cumsum(emis))
        ch4 = np.interp(years, *_CH4_EMISSIONS[family])
    lat2d, lon2d = np.meshgrid(lat, lon, indexing="ij")
    so2 = np.zeros((len(years), len(lat), len(lon)))
    bc = np.zeros_like(so2)
    for name, (la, lo, r) in _AEROSOL_REGIONS.items():
        blob = np.exp(-(angular_distance(lat2d, lon2d, la, lo) / r) ** 2)
        amp = np.interp(years, *_AEROSOL_PATHS[family][name])
        so2 += amp[:, None, None] * blob * _SO2_PEAK
        bc += amp[:, None, None] * blob * _SO2_PEAK * 0.1
    if scenario == "hist-GHG":  # greenhouse gases only: aerosols at their 1850 level
        _, _, so2_1850, bc_1850 = _climatebench_forcings("historical", np.array([1850]), lat, lon)
        so2[:], bc[:] = so2_1850, bc_1850
    if scenario == "hist-aer":  # aerosols only: greenhouse gases at their 1850 level
        co2 = np.full_like(co2, hist_co2[0])
        ch4 = np.full_like(ch4, _CH4_EMISSIONS["historical"][1][0])
    return co2, ch4, so2, bc


def climatebench_response(co2, ch4, so2, lat, lon, noise=None):
    """The generated responses as anomalies from a pre-industrial control (as ClimateBench's
    outputs): tas and diurnal_temperature_range in K, pr and pr90 in mm/day, a known function of the
    forcings. Warming is proportional to cumulative CO2 and to CH4 emissions, amplified towards the
    poles; aerosols cool where they are emitted (spread ~20 degrees downwind of each source region,
    so the response depends on *where* they are, not only on how much) and a little globally.
    ``noise``: (T, H, W) in K added to tas (internal variability), or None."""
    r = CLIMATEBENCH_RESPONSE
    lat2d, lon2d = np.meshgrid(lat, lon, indexing="ij")
    amplification = 1.0 + 1.2 * (np.abs(lat2d) / 90.0) ** 2
    land = 0.5 + 0.5 * np.sin(np.deg2rad(lon2d) * 2.0 + 0.5) * np.cos(np.deg2rad(lat2d))
    weights = np.cos(np.deg2rad(lat))[:, None] * np.ones_like(lon2d)
    aer = so2 / _SO2_PEAK
    aer_global = (aer * weights).sum(axis=(-2, -1)) / weights.sum()
    spread = np.zeros_like(aer)
    for (la, lo, rad) in _AEROSOL_REGIONS.values():  # the local effect: aerosols spread downwind
        kernel = np.exp(-(angular_distance(lat2d, lon2d, la, (lo + 15.0) % 360.0) / (rad + 10.0)) ** 2)
        blob = np.exp(-(angular_distance(lat2d, lon2d, la, lo) / rad) ** 2)
        amp = (aer * blob).sum(axis=(-2, -1)) / blob.sum()
        spread += amp[:, None, None] * kernel
    # the climate lags the forcing: warming not yet realised grows with the recent emission rate
    # (GtCO2/yr over the last 10 years), so the same cumulative CO2 is cooler in a fast-rising scenario
    co2 = np.asarray(co2, np.float64)
    rate = np.array([(co2[t] - co2[max(t - 9, 0)]) / max(min(t, 9), 1) for t in range(len(co2))])
    if len(co2) > 1:
        rate[0] = co2[1] - co2[0]
    forcing = r["tcre"] * co2 + r["ch4"] * np.asarray(ch4) - r["lag"] * rate
    dt = forcing[:, None, None] * amplification
    dt = dt - r["aerosol_local"] * spread - r["aerosol_global"] * aer_global[:, None, None]
    tas = dt + (0.0 if noise is None else noise)
    dtr = -0.05 * dt * (1.0 + land) - 0.3 * spread
    pr_clim = 1.0 + 5.0 * np.exp(-(lat2d / 12.0) ** 2) + 1.5 * np.exp(-((np.abs(lat2d) - 50) / 12.0) ** 2)
    pr = pr_clim * 0.025 * dt - 0.15 * spread
    return {"tas": tas, "diurnal_temperature_range": dtr, "pr": pr, "pr90": 2.5 * pr}


def write_climatebench(out_dir: str | Path, scenarios: Sequence[str] = CLIMATEBENCH_SCENARIOS,
                       shape: tuple[int, int] = (96, 144), hist_start: int = 1850, ssp_end: int = 2100,
                       members: int = 3, seed: int = 0) -> dict[str, tuple[Path, Path]]:
    """ClimateBench-like data in ClimateBench's layout: ``inputs_<s>.nc`` and ``outputs_<s>.nc`` per
    scenario under ``out_dir``; returns ``{scenario: (inputs, outputs)}``.

    Same names, dims, units and coordinates as the published files (inputs on ``latitude`` /
    ``longitude`` with global ``CO2``/``CH4`` on ``time`` only; outputs on ``lat``/``lon`` with a
    ``member`` axis; ``time`` in years; precipitation in kg m-2 s-1). The responses are
    ``climatebench_response`` of the forcings plus internal variability (independent per member),
    so tests know the truth. ``shape`` (96 x 144 as published; 16 x 32 is enough for tests) and
    ``hist_start`` (1850) shrink the data.
    """
    import xarray as xr

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lat, lon = climatebench_grid(shape)
    written = {}
    for scenario in scenarios:
        if scenario not in CLIMATEBENCH_SCENARIOS:
            raise ValueError(f"unknown ClimateBench scenario {scenario!r}; use some of {CLIMATEBENCH_SCENARIOS}")
        years = _scenario_years(scenario, hist_start, ssp_end)
        co2, ch4, so2, bc = _climatebench_forcings(scenario, years, lat, lon)
        rng = np.random.default_rng([seed, zlib.crc32(scenario.encode())])
        inputs = xr.Dataset(
            {"CO2": ("time", co2.astype(np.float32), {"units": "GtCO2", "long_name": "cumulative CO2 emissions"}),
             "CH4": ("time", ch4.astype(np.float32), {"units": "GtCH4 yr**-1", "long_name": "CH4 emissions"}),
             "SO2": (("time", "latitude", "longitude"), so2.astype(np.float32), {"units": "kg m**-2 s**-1"}),
             "BC": (("time", "latitude", "longitude"), bc.astype(np.float32), {"units": "kg m**-2 s**-1"})},
            coords={"time": years, "latitude": ("latitude", lat, {"units": "degrees_north"}),
                    "longitude": ("longitude", lon, {"units": "degrees_east"})},
            attrs={"title": f"Synthetic ClimateBench-like forcings, {scenario}", "source": "pipelines.sample_data"})
        resp = []
        for _ in range(members):
            noise = CLIMATEBENCH_RESPONSE["noise_k"] * rng.standard_normal((len(years), len(lat), len(lon)))
            resp.append(climatebench_response(co2, ch4, so2, lat, lon, noise=noise))
        units = {"tas": "K", "diurnal_temperature_range": "K", "pr": "kg m-2 s-1", "pr90": "kg m-2 s-1"}
        scale = {"tas": 1.0, "diurnal_temperature_range": 1.0, "pr": 1 / 86400.0, "pr90": 1 / 86400.0}
        outputs = xr.Dataset(
            {v: (("member", "time", "lat", "lon"), np.stack([r[v] for r in resp]).astype(np.float32) * scale[v],
                 {"units": units[v]}) for v in units},
            coords={"member": np.arange(members), "time": years,
                    "lat": ("lat", lat, {"units": "degrees_north"}), "lon": ("lon", lon, {"units": "degrees_east"})},
            attrs={"title": f"Synthetic ClimateBench-like responses, {scenario}", "source": "pipelines.sample_data"})
        ipath, opath = out / f"inputs_{scenario}.nc", out / f"outputs_{scenario}.nc"
        to_netcdf(inputs, ipath)
        to_netcdf(outputs, opath)
        written[scenario] = (ipath, opath)
    return written
