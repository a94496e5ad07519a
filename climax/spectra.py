"""Zonal energy spectra of forecasts and truth: WeatherBench 2's ``ZonalEnergySpectrum`` on a lat-lon grid.

WeatherBench 2 (``weatherbench2.derived_variables.ZonalEnergySpectrum``) takes, along each circle of
latitude with L points and circumference C = 2 pi R cos(lat) (R = ``EARTH_RADIUS_M``, WB2's mean of
the equatorial and polar radii), the forward-normalised DFT F[k] = (1/L) sum_l f[l] exp(-2 pi i k l/L)
for k = 0 .. L//2 and sets S[0] = C |F[0]|^2, S[k] = 2 C |F[k]|^2 for k > 0 (every k > 0 doubled,
the Nyquist bin included, as WB2 does). Then sum_k S[k] = (C/L) sum_l f[l]^2 (Parseval). A field in
units u gives S in m u^2.

Averaging, as WB2's evaluation does with its spectra: the mean over initial times, then a cos(lat)
weighted mean over the latitude rows of a band (|lat| in ``band``, both hemispheres; 30-60 degrees by
default, the mid-latitudes where the spectra of WB2's paper are shown). We average per zonal
wavenumber k, not per physical wavelength: on one band the wavelengths of one k differ only by the
cos(lat) of the rows (WB2's ``interpolate_spectral_frequencies`` interpolates to common frequencies
first; per wavenumber is what ``spectra.csv`` reports).

numpy only (no torch, Ray or pipelines).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["EARTH_RADIUS_M", "DEFAULT_BAND", "zonal_energy_spectrum", "band_mean", "spectra_table"]

#: WeatherBench 2's Earth radius (``schema.EARTH_RADIUS_M``): the mean of the equatorial and polar radii, m.
EARTH_RADIUS_M = 1000 * (6357 + 6378) / 2
#: Latitude band (|lat|, degrees) whose rows are averaged.
DEFAULT_BAND = (30.0, 60.0)


def _check_lon(lon: np.ndarray) -> None:
    lon = np.asarray(lon, dtype=np.float64)
    d = np.diff(lon)
    if len(lon) < 2 or np.max(np.abs(d - d[0])) > 1e-3:
        raise ValueError("zonal spectra need uniformly spaced longitudes (a full circle of latitude); "
                         f"got {len(lon)} longitudes {lon[:3]}...")


def zonal_energy_spectrum(fields: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """(..., H, W) fields -> (..., H, W // 2 + 1) energy per zonal wavenumber and latitude row (float64)."""
    _check_lon(lon)
    f = np.asarray(fields, dtype=np.float64)
    f_k = np.fft.rfft(f, axis=-1, norm="forward")
    twice = np.concatenate([[1.0], np.full(f_k.shape[-1] - 1, 2.0)])
    power = (f_k.real ** 2 + f_k.imag ** 2) * twice
    circumference = 2 * np.pi * EARTH_RADIUS_M * np.cos(np.deg2rad(np.asarray(lat, dtype=np.float64)))
    return power * circumference[:, None]


def band_mean(spectrum: np.ndarray, lat: np.ndarray, band: Sequence[float] = DEFAULT_BAND) -> np.ndarray:
    """(..., H, K) -> (..., K): cos(lat)-weighted mean over the rows with band[0] <= |lat| <= band[1]."""
    lat = np.asarray(lat, dtype=np.float64)
    lo, hi = float(band[0]), float(band[1])
    rows = (np.abs(lat) >= lo) & (np.abs(lat) <= hi)
    if not rows.any():
        raise ValueError(f"no latitude row of the grid ({lat.min():g} .. {lat.max():g}) lies in the spectra band "
                         f"|lat| {lo:g} .. {hi:g}; choose spectra_band inside the grid")
    w = np.cos(np.deg2rad(lat[rows]))
    return np.tensordot(np.asarray(spectrum)[..., rows, :], w / w.sum(), axes=([-2], [0]))


def spectra_table(forecast: Mapping[float, np.ndarray], truth: Mapping[float, np.ndarray], variables: Sequence[str],
                  lat: np.ndarray, lon: np.ndarray, band: Sequence[float] = DEFAULT_BAND,
                  units: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per (variable, lead, zonal wavenumber): the forecast's and the truth's energy, each the
    mean over samples of the band-averaged spectrum. ``forecast``/``truth``: {lead hours: (N, V, H, W)}."""
    records = []
    units = dict(units or {})
    for lead in sorted(forecast):
        fc = band_mean(zonal_energy_spectrum(forecast[lead], lat, lon), lat, band).mean(axis=0)  # (V, K)
        tr = band_mean(zonal_energy_spectrum(truth[lead], lat, lon), lat, band).mean(axis=0)
        for j, v in enumerate(variables):
            u = units.get(v, "")
            for k in range(fc.shape[-1]):
                records.append(dict(variable=v, lead_hours=float(lead), wavenumber=k, forecast=float(fc[j, k]),
                                    truth=float(tr[j, k]), units=f"m ({u})**2" if u else "m"))
    df = pd.DataFrame.from_records(records, columns=["variable", "lead_hours", "wavenumber", "forecast", "truth",
                                                     "units"])
    df.attrs["band"] = [float(band[0]), float(band[1])]
    return df
