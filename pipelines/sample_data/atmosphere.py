"""The analytic "atmosphere" behind the sample data (see :mod:`pipelines.sample_data` for what it
models): geography, travelling waves, counter-based noise and :class:`Atmosphere`, whose
``compute`` gives every variable as a pure function of ``(time, lat, lon, variable, seed)``;
:func:`fields` is its public face, the truth that tests compare file contents against.

Imports no torch and no ray.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from pipelines.sample_data.catalog import CONSTANT_VARS, SAMPLE_VARS, parse_name

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


def angular_distance(lat2d, lon2d, lat0, lon0) -> np.ndarray:
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
        blobs = np.maximum(blobs, np.exp(-((angular_distance(lat2d, lon2d, la, lo) / rad) ** 2)))
    blobs = np.maximum(blobs, _smoothstep((-lat2d - 64.0) / 6.0))  # Antarctica
    lsm = _smoothstep((blobs - 0.35) / 0.3)
    relief = 150.0 * blobs
    for la, lo, rad, h in _MOUNTAINS:
        relief = relief + h * np.exp(-((angular_distance(lat2d, lon2d, la, lo) / rad) ** 2))
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


class Atmosphere:
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
        parsed = {v: parse_name(v) for v in variables}
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
    return Atmosphere(lat, lon, seed).compute(times, list(variables))
