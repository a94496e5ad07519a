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

This module imports no torch and no ray.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

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
]

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

#: WeatherBench 2 / ARCO-ERA5 units attributes (as their stores write them).
_WB2_UNITS = {"geopotential": "m**2 s**-2", "temperature": "K", "u_component_of_wind": "m s**-1",
              "v_component_of_wind": "m s**-1", "specific_humidity": "kg kg**-1", "relative_humidity": "%",
              "2m_temperature": "K", "10m_u_component_of_wind": "m s**-1", "10m_v_component_of_wind": "m s**-1",
              "land_sea_mask": "(0 - 1)", "geopotential_at_surface": "m**2 s**-2"}

# Physical constants.
G = 9.80665  # m s-2
RD = 287.05  # J kg-1 K-1
GAMMA = 0.0065  # K m-1, tropospheric lapse rate
KL = RD * GAMMA / G  # exponent of T(p) = T0 (p/p0)**KL
OMEGA = 7.292e-5  # s-1
A_EARTH = 6.371e6  # m
YEAR_DAYS = 365.2425
TREND_K_PER_YEAR = 0.02

_EPOCH = np.datetime64("2000-01-01T00:00:00", "ns")
_NOISE_EPOCH = np.datetime64("1800-01-01T00:00:00", "ns")  # hour counter >= 0 for any sane date
_BLEND_HOURS = 72.0  # half-width of the cross-fade between consecutive years' wave sets

# Noise standard deviations (canonical units).
_NOISE = {
    "geopotential": 5.0,
    "temperature": 0.05,
    "u_component_of_wind": 0.15,
    "v_component_of_wind": 0.15,
    "relative_humidity": 0.8,
    "2m_temperature": 0.1,
    "10m_u_component_of_wind": 0.15,
    "10m_v_component_of_wind": 0.15,
}


# --------------------------------------------------------------------------------------------------
# names and grids


def _parse(name: str) -> tuple[str, int | None]:
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


def _as_times(times) -> np.ndarray:
    t = np.asarray(times)
    if t.ndim == 0:
        t = t[None]
    return t.astype("datetime64[ns]")


# --------------------------------------------------------------------------------------------------
# geography

# (lat, lon, radius in degrees) of the continent blobs: an Earth-like planet, the same for all seeds.
_CONTINENTS = (
    (52, 255, 20), (62, 225, 12), (38, 262, 14), (28, 255, 9), (72, 318, 9),  # North America, Greenland
    (-8, 298, 16), (-30, 293, 10), (-45, 290, 6),  # South America
    (53, 30, 16), (55, 75, 22), (60, 115, 20), (40, 95, 18), (28, 78, 11), (25, 45, 10),  # Eurasia
    (15, 15, 17), (5, 25, 14), (-15, 28, 12), (-28, 25, 7),  # Africa
    (-25, 134, 11),  # Australia
)
# (lat, lon, radius, height in m) of mountain ranges.
_MOUNTAINS = (
    (42, 250, 8, 2400), (60, 222, 6, 1500),  # Rockies, Alaska
    (-15, 290, 6, 3000), (-35, 290, 5, 2500),  # Andes
    (33, 88, 9, 3000), (45, 95, 8, 1800), (45, 10, 4, 1500),  # Tibet, Mongolia, Alps
    (0, 35, 7, 1500), (-25, 28, 6, 1200), (72, 318, 7, 2200),  # East Africa, South Africa, Greenland
    (-85, 0, 14, 2800),  # Antarctica
)


def _angular_distance(lat2d, lon2d, lat0, lon0) -> np.ndarray:
    """Great-circle distance in degrees."""
    p1, p2 = np.radians(lat2d), np.radians(lat0)
    dl = np.radians(lon2d - lon0)
    c = np.sin(p1) * np.sin(p2) + np.cos(p1) * np.cos(p2) * np.cos(dl)
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _geography(lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lat2d, lon2d = np.meshgrid(lat, lon, indexing="ij")
    blobs = np.zeros_like(lat2d)
    for la, lo, rad in _CONTINENTS:
        blobs = np.maximum(blobs, np.exp(-((_angular_distance(lat2d, lon2d, la, lo) / rad) ** 2)))
    blobs = np.maximum(blobs, _smoothstep((-lat2d - 64.0) / 6.0))  # Antarctica
    lsm = _smoothstep((blobs - 0.35) / 0.3)
    relief = 150.0 * blobs
    for la, lo, rad, h in _MOUNTAINS:
        relief = relief + h * np.exp(-((_angular_distance(lat2d, lon2d, la, lo) / rad) ** 2))
    orog = np.clip(relief, 0.0, 3000.0) * lsm
    return lsm, orog


# --------------------------------------------------------------------------------------------------
# waves


@dataclass(frozen=True)
class _Waves:
    k: np.ndarray  # zonal wavenumber
    amp: np.ndarray  # dimensionless amplitude
    omega: np.ndarray  # angular phase speed, rad per hour (eastward > 0)
    phase: np.ndarray
    mod_depth: np.ndarray
    mod_period_h: np.ndarray
    mod_phase: np.ndarray
    hemi: np.ndarray  # +1 north, -1 south, 0 tropical
    lat_c: np.ndarray  # centre latitude of the envelope (degrees, absolute)
    width: np.ndarray  # envelope width (degrees)


@functools.lru_cache(maxsize=256)
def _waves(seed: int, year: int) -> _Waves:
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(year) + 10_000, 0xC11A])
    rows = []
    for hemi in (1, -1):
        for k in range(3, 8):
            c = rng.uniform(9.0, 14.0) - 60.0 / k**2  # m/s: eastward, longer waves slower
            rows.append((
                k, rng.uniform(0.35, 0.65) * (5.0 / k) ** 0.7, c, rng.uniform(0, 2 * np.pi),
                rng.uniform(0.2, 0.5), rng.uniform(6.0, 20.0) * 24.0, rng.uniform(0, 2 * np.pi),
                hemi, rng.uniform(42.0, 56.0), 16.0,
            ))
    for k in (1, 2):  # weak eastward tropical (Kelvin/MJO-like) waves
        c = rng.uniform(5.0, 12.0)
        rows.append((
            k, 0.15, c, rng.uniform(0, 2 * np.pi), 0.3, rng.uniform(20.0, 50.0) * 24.0,
            rng.uniform(0, 2 * np.pi), 0, 0.0, 14.0,
        ))
    a = np.array(rows, dtype=np.float64)
    omega = a[:, 2] * 3600.0 / (A_EARTH * np.cos(np.radians(45.0)))  # rad/h at 45 degrees
    return _Waves(
        k=a[:, 0], amp=a[:, 1], omega=omega, phase=a[:, 3], mod_depth=a[:, 4],
        mod_period_h=a[:, 5], mod_phase=a[:, 6], hemi=a[:, 7], lat_c=a[:, 8], width=a[:, 9],
    )


def _ramp(x):
    """0 for x < -B, 1 for x > B, smooth in between (B = _BLEND_HOURS)."""
    y = np.clip((x + _BLEND_HOURS) / (2 * _BLEND_HOURS), 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * y)


def _year_start_hours(year: int) -> float:
    return float((np.datetime64(f"{year:04d}-01-01", "ns") - _EPOCH) / np.timedelta64(1, "h"))


# --------------------------------------------------------------------------------------------------
# noise: counter-based, so any subset of times / variables reproduces the same values



def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _noise(seed: int, key: str, hours_idx: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Unit-variance noise (T, *shape), a pure function of (seed, key, hour, grid point).

    One 64-bit hash per value, split into four 16-bit uniforms whose sum (Irwin-Hall) is close to
    Gaussian: cheap integer work instead of Box-Muller.
    """
    base = _splitmix64(np.array([(int(seed) & 0xFFFFFFFF) << 32 | zlib.crc32(key.encode())], np.uint64))
    npts = shape[0] * shape[1]
    idx = (hours_idx.astype(np.uint64)[:, None] << np.uint64(24)) + np.arange(npts, dtype=np.uint64)[None]
    z = _splitmix64(idx ^ base[0])
    m = np.uint64(0xFFFF)
    acc = (z & m).astype(np.int32)
    for sh in (16, 32, 48):
        acc += ((z >> np.uint64(sh)) & m).astype(np.int32)
    # sum of four U{0..65535}: mean 2 * 65535, variance 4 * (65536**2 - 1) / 12
    n = (acc.astype(np.float32) - np.float32(2 * 65535)) * np.float32(np.sqrt(3.0) / 65536.0)
    return n.reshape((len(hours_idx),) + tuple(shape))


# --------------------------------------------------------------------------------------------------
# the model


class _Model:
    def __init__(self, lat, lon, seed: int):
        self.lat = np.asarray(lat, dtype=np.float64)
        self.lon = np.asarray(lon, dtype=np.float64)
        self.seed = int(seed)
        self.shape = (self.lat.size, self.lon.size)
        self.phi = np.radians(self.lat)[:, None]  # (lat, 1)
        self.lam = np.radians(self.lon)[None, :]  # (1, lon)
        self.sin = np.sin(self.phi)
        self.cos = np.cos(self.phi)
        self.lsm, self.orog = _geography(self.lat, self.lon)
        self.lsm_zm = self.lsm.mean(axis=1, keepdims=True)
        # hemispheric seasonal weight: +north, -south, 0 at the equator
        self.hemis = np.sign(self.sin) * np.abs(self.sin) ** 0.8
        alat = np.abs(self.lat)[:, None]
        self.alat = alat
        # zonal-mean 1000 hPa height (m): subtropical highs, subpolar lows
        self.z1000_zm = 110.0 + 45.0 * np.exp(-(((alat - 32.0) / 12.0) ** 2)) - 55.0 * np.exp(
            -(((alat - 62.0) / 10.0) ** 2)
        )
        # Coriolis parameter floored near the equator, and a taper of geostrophic winds there
        f = 2 * OMEGA * self.sin
        fmin = 2 * OMEGA * np.sin(np.radians(10.0))
        self.f = np.where(self.sin >= 0, 1.0, -1.0) * np.maximum(np.abs(f), fmin)
        self.taper = 1.0 - np.exp(-((self.lat[:, None] / 10.0) ** 2))
        dlon = np.diff(self.lon)
        self.periodic = (
            self.lon.size > 2
            and np.allclose(dlon, dlon[0])
            and abs(dlon[0] * self.lon.size - 360.0) < 1e-6
        )

    # ---------------------------------------------------------------- derivatives
    def _d_dphi(self, x):
        if self.lat.size < 2:
            return np.zeros_like(x)
        return np.gradient(x, np.radians(self.lat), axis=-2)

    def _d_dlam(self, x):
        if self.periodic:
            dl = np.radians(self.lon[1] - self.lon[0])
            return (np.roll(x, -1, axis=-1) - np.roll(x, 1, axis=-1)) / (2 * dl)
        if self.lon.size < 2:
            return np.zeros_like(x)
        return np.gradient(x, np.radians(self.lon), axis=-1)

    def _geostrophic(self, phi_geo):
        u = -self._d_dphi(phi_geo) / (self.f * A_EARTH)
        v = self._d_dlam(phi_geo) / (self.f * A_EARTH * self.cos)
        return u * self.taper, v * self.taper

    # ---------------------------------------------------------------- time-dependent state
    def _state(self, times: np.ndarray) -> dict:
        hours = (times - _EPOCH) / np.timedelta64(1, "h")  # float64
        days = hours / 24.0
        tt = lambda a: np.asarray(a, dtype=np.float64)[:, None, None]  # noqa: E731
        ang = 2 * np.pi / YEAR_DAYS
        st = {
            "hours": hours,
            "s_land": tt(-np.cos(ang * (days - 20.0))),  # -1 around 20 Jan: northern winter
            "s_ocean": tt(-np.cos(ang * (days - 50.0))),
            "s_upper": tt(-np.cos(ang * (days - 30.0))),
            "trend": tt(TREND_K_PER_YEAR * days / YEAR_DAYS),
        }
        st["W"], st["Wq"] = self._wave_field(hours)
        st["noise_idx"] = np.round((times - _NOISE_EPOCH) / np.timedelta64(1, "h")).astype(np.int64)
        return st

    def _wave_field(self, hours: np.ndarray):
        T = hours.size
        W = np.zeros((T,) + self.shape)
        Wq = np.zeros((T,) + self.shape)
        years = (hours / 24.0 / YEAR_DAYS + 2000.0).astype(np.int64) if T else np.array([], np.int64)
        if T == 0:
            return W, Wq
        for year in range(int(years.min()) - 1, int(years.max()) + 2):
            w = _ramp(hours - _year_start_hours(year)) - _ramp(hours - _year_start_hours(year + 1))
            if not np.any(w > 0):
                continue
            wv = _waves(self.seed, year)
            # time coefficients (T, K)
            theta = (wv.k * wv.omega)[None] * hours[:, None] - wv.phase[None]  # cos(k (lam - omega t) + phase)
            mod = np.sin(2 * np.pi * hours[:, None] / wv.mod_period_h[None] + wv.mod_phase[None])
            amp = wv.amp[None] * (1.0 + wv.mod_depth[None] * mod)
            amp = amp * w[:, None]
            ca, sa = amp * np.cos(theta), amp * np.sin(theta)
            # latitude envelopes (K, lat): cos(lat) factor keeps winds regular at the poles
            lat = self.lat[None, :]
            cosl = np.cos(np.radians(lat))
            same = np.where(wv.hemi[:, None] == 0, 1.0, (np.sign(lat) == wv.hemi[:, None]).astype(float))
            env = same * np.exp(-(((np.abs(lat) - wv.lat_c[:, None]) / wv.width[:, None]) ** 2)) * cosl / np.cos(
                np.radians(50.0)
            )
            ck = np.cos(wv.k[:, None] * self.lam)  # (K, lon)
            sk = np.sin(wv.k[:, None] * self.lam)
            bc = (env[:, :, None] * ck[:, None, :]).reshape(len(wv.k), -1)  # (K, lat*lon)
            bs = (env[:, :, None] * sk[:, None, :]).reshape(len(wv.k), -1)
            # cos(k lam - theta) = cos k lam cos theta + sin k lam sin theta
            W += (ca @ bc + sa @ bs).reshape(W.shape)
            # sin(k lam - theta) = sin k lam cos theta - cos k lam sin theta
            Wq += (ca @ bs - sa @ bc).reshape(W.shape)
        return W, Wq

    # ---------------------------------------------------------------- columns
    def _column(self, st, cache):
        if "T0" not in cache:
            W = st["W"]
            tcz = 300.0 - 34.0 * self.sin**2
            season = self.hemis * (3.0 + 9.0 * self.lsm_zm) * st["s_upper"]
            cache["T0"] = tcz + season + st["trend"] + 4.0 * W  # 1000 hPa column temperature
            cache["Tstrat"] = 212.0 + 10.0 * self.sin**2 + 10.0 * self.hemis * st["s_upper"] + 1.0 * W
            cache["Z1000"] = G * (self.z1000_zm + 55.0 * W)
        return cache["T0"], cache["Tstrat"], cache["Z1000"]

    def _level(self, p: int, st, cache):
        """Noise-free temperature and geopotential at pressure level p (hPa)."""
        key = ("TZ", p)
        if key not in cache:
            T0, Ts, Z1000 = self._column(st, cache)
            # constant lapse rate T = T0 (p/1000)**KL up to the tropopause (where it reaches Ts),
            # isothermal Ts above; geopotential by the hypsometric equation from 1000 hPa
            Tc = T0 * (p / 1000.0) ** KL
            trop = Tc >= Ts
            T = np.where(trop, Tc, Ts)
            # above the tropopause: ln(p_trop / p) = ln(Ts / T0) / KL + ln(1000 / p), p_trop <= 1000
            ln_pt_p = np.minimum(np.log(Ts / T0) / KL, 0.0) + np.log(1000.0 / p)
            Z = Z1000 + np.where(
                trop,
                (G / GAMMA) * (T0 - Tc),
                (G / GAMMA) * np.maximum(T0 - Ts, 0.0) + RD * Ts * ln_pt_p,
            )
            cache[key] = (T, Z)
        return cache[key]

    def _winds(self, p: int, st, cache):
        key = ("UV", p)
        if key not in cache:
            _, Z = self._level(p, st, cache)
            u, v = self._geostrophic(Z)
            jet_strength = 12.0 - 4.0 * np.sign(self.sin) * st["s_upper"]  # stronger in winter
            jet = jet_strength * np.exp(-(((self.alat - 32.0) / 7.0) ** 2)) * np.exp(-((np.log(p / 250.0) / 0.8) ** 2))
            cache[key] = (u + jet, v)
        return cache[key]

    def _rh(self, p: int, st, cache):
        key = ("RH", p)
        if key not in cache:
            pr = p / 1000.0
            zm = 78.0 - 22.0 * np.exp(-(((self.alat - 25.0) / 9.0) ** 2)) + 5.0 * np.exp(-((self.alat / 10.0) ** 2))
            rh = zm * pr**0.6 + (4.0 + 10.0 * pr) * st["Wq"] + 5.0 * self.lsm * (pr - 0.7)
            cache[key] = rh + _NOISE["relative_humidity"] * self._noise(f"relative_humidity_{p}", st)
        return cache[key]

    def _noise(self, key, st):
        return _noise(self.seed, key, st["noise_idx"], self.shape)

    # ---------------------------------------------------------------- variables
    def _temperature(self, p, st, cache):
        key = ("Tn", p)
        if key not in cache:
            T, _ = self._level(p, st, cache)
            cache[key] = T + _NOISE["temperature"] * self._noise(f"temperature_{p}", st)
        return cache[key]

    def compute(self, times, variables: Sequence[str]) -> dict[str, np.ndarray]:
        times = _as_times(times)
        parsed = {v: _parse(v) for v in variables}
        out: dict[str, np.ndarray] = {}
        if any(base not in CONSTANT_VARS for base, _ in parsed.values()):
            st = self._state(times)
        cache: dict = {}
        for name, (base, lev) in parsed.items():
            if base == "land_sea_mask":
                x = self.lsm
            elif base == "orography":
                x = self.orog
            elif base == "2m_temperature":
                x = self._t2m(st)
            elif base in ("10m_u_component_of_wind", "10m_v_component_of_wind"):
                u10, v10 = self._wind10(st, cache)
                x = u10 if base.startswith("10m_u") else v10
                x = x + _NOISE[base] * self._noise(base, st)
            elif base == "geopotential":
                _, Z = self._level(lev, st, cache)
                x = Z + _NOISE["geopotential"] * self._noise(name, st)
            elif base == "temperature":
                x = self._temperature(lev, st, cache)
            elif base in ("u_component_of_wind", "v_component_of_wind"):
                u, v = self._winds(lev, st, cache)
                x = (u if base.startswith("u") else v) + _NOISE[base] * self._noise(name, st)
            elif base == "relative_humidity":
                x = np.clip(self._rh(lev, st, cache), 1.0, 100.0)
            elif base == "specific_humidity":
                rh = np.clip(self._rh(lev, st, cache), 1.0, 100.0)
                x = rh / 100.0 * _qsat(self._temperature(lev, st, cache), lev * 100.0)
            else:  # pragma: no cover - _parse rejects everything else
                raise ValueError(name)
            out[name] = np.ascontiguousarray(x, dtype=np.float32)
        return out

    def _t2m(self, st):
        W = st["W"]
        tsz = 301.0 - 42.0 * self.sin**2
        season = self.hemis * (14.0 * self.lsm * st["s_land"] + 3.0 * (1.0 - self.lsm) * st["s_ocean"])
        hour_utc = np.mod(st["hours"], 24.0)[:, None, None]
        local = np.mod(hour_utc + self.lon[None, None, :] / 15.0, 24.0)
        damp = (0.8 + 5.0 * self.lsm) * (0.4 + 0.6 * self.cos) * (1.0 + 0.3 * self.hemis * st["s_land"])
        diurnal = damp * np.cos(2 * np.pi * (local - 14.0) / 24.0)
        t = tsz + season + st["trend"] + 3.2 * W + diurnal - GAMMA * self.orog
        return t + _NOISE["2m_temperature"] * self._noise("2m_temperature", st)

    def _wind10(self, st, cache):
        if "UV10" not in cache:
            _, _, Z1000 = self._column(st, cache)
            ug, vg = self._geostrophic(Z1000)
            # friction: slower (more over land) and turned towards low pressure
            alpha = np.radians(20.0) * np.where(self.sin >= 0, 1.0, -1.0)
            fac = 0.8 - 0.3 * self.lsm
            u = fac * (ug * np.cos(alpha) - vg * np.sin(alpha))
            v = fac * (ug * np.sin(alpha) + vg * np.cos(alpha))
            cache["UV10"] = (u, v)
        return cache["UV10"]


def _qsat(T, p_pa):
    """Saturation specific humidity (kg/kg) over water, Bolton's formula."""
    es = 611.2 * np.exp(17.67 * (T - 273.15) / (T - 29.65))
    es = np.minimum(es, 0.5 * p_pa)
    return 0.622 * es / (p_pa - 0.378 * es)


def fields(times, lat, lon, variables: Iterable[str] = SAMPLE_VARS, seed: int = 0) -> dict[str, np.ndarray]:
    """The true values of ``variables`` at ``times`` on the grid ``lat`` x ``lon`` (degrees).

    Returns float32 arrays: (T, lat, lon) for time-varying variables, (lat, lon) for the constants
    (``land_sea_mask``, ``orography``). Values are pointwise in time: any subset of ``times`` gives the
    same values as the full set. ``lat``/``lon`` may be any grid; the files use ``grid(resolution)``.
    """
    return _Model(lat, lon, seed).compute(times, list(variables))


# --------------------------------------------------------------------------------------------------
# writers


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

    def close(self, commit: bool = True):
        for h in self._templates.values():
            self._ec.codes_release(h)
        self._templates.clear()
        self._f.close()
        if commit:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _to_netcdf(ds, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # uncompressed and contiguous, as WeatherBench's published 5.625/1.40625 deg files are (a year of
    # one single-level field at 5.625 deg is ~72 MB there too): readers and benchmarks then see the
    # layout users hold, not h5py's default tiny chunks
    encoding = {name: {"dtype": "float32"} for name in ds.data_vars}
    ds.to_netcdf(tmp, engine="h5netcdf", encoding=encoding)
    os.replace(tmp, path)


def _coords(lat, lon):
    return {
        "lat": ("lat", lat, {"units": "degrees_north", "long_name": "latitude"}),
        "lon": ("lon", lon, {"units": "degrees_east", "long_name": "longitude"}),
    }


def _write_constants(wb_dir: Path, model: _Model, tag: str, seed: int) -> Path:
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
    _to_netcdf(ds, path)
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
            _to_netcdf(ds, wb_dir / name / f"{name}_{year}_{tag}.nc")
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
        _to_netcdf(ds, wb_dir / base / f"{base}_{year}_{tag}.nc")


def _wb2_dataset(times, lat, lon, data: dict, parsed: dict, model, seed: int, constants: bool):
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
            out[base] = (("time", "level", "latitude", "longitude"), arr, {"units": _WB2_UNITS[base], "long_name": base})
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


def _write_zarr_year(tmp: Path, ds, first: bool, time_chunk: int) -> None:
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
    parsed = {v: _parse(v) for v in variables}
    lat, lon = grid(resolution)
    tag = resolution_tag(resolution)
    model = _Model(lat, lon, seed)
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
                _write_zarr_year(zarr_tmp, ds, year == years[0], zarr_time_chunk)
            del year_data
    finally:
        bar.close()
    if "zarr" in formats:
        import shutil

        shutil.rmtree(zarr_path, ignore_errors=True)
        os.replace(zarr_tmp, zarr_path)  # the store appears whole or not at all
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
    model = _Model(lat, lon, seed)
    parsed = {v: _parse(v) for v in dict.fromkeys(variables)}
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
        _to_netcdf(ds, out / f"{name}_fx_{tail}.nc")
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
            tmp = path.with_name(path.name + ".tmp")
            enc = {name: {"dtype": "float32", "zlib": True, "complevel": 1, "shuffle": True},
                   "time": {"units": "hours since 1850-01-01 00:00:00", "calendar": calendar, "dtype": "float64"}}
            ds.to_netcdf(tmp, engine="h5netcdf", encoding=enc)
            os.replace(tmp, path)
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


# --------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------
# ClimateBench-like climate projection data (the projection task of jobs.finetune)
# ----------------------------------------------------------------------------------------------

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
        blob = np.exp(-(_angular_distance(lat2d, lon2d, la, lo) / r) ** 2)
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
        kernel = np.exp(-(_angular_distance(lat2d, lon2d, la, (lo + 15.0) % 360.0) / (rad + 10.0)) ** 2)
        blob = np.exp(-(_angular_distance(lat2d, lon2d, la, lo) / rad) ** 2)
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
        _to_netcdf(inputs, ipath)
        _to_netcdf(outputs, opath)
        written[scenario] = (ipath, opath)
    return written


# CLI


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


if __name__ == "__main__":
    sys.exit(main())
