"""Zonal energy spectra: our formula against WeatherBench 2's ZonalEnergySpectrum, re-implemented here
from weatherbench2/derived_variables.py with xarray, and against a field of known spectrum."""

from __future__ import annotations

import numpy as np
import pytest

from climax.spectra import EARTH_RADIUS_M, band_mean, spectra_table, zonal_energy_spectrum

LAT = np.linspace(-78.75, 78.75, 8)
LON = np.arange(32) * 11.25


def _wb2_spectrum(data: np.ndarray, lat, lon):
    """WB2's ZonalEnergySpectrum.compute on a Dataset with latitude/longitude dims (its code path:
    apply_ufunc of an rfft(norm='forward') power with weights 1, 2, 2, ..., times the circumference)."""
    import xarray as xr

    ds = xr.Dataset({"v": (("time", "latitude", "longitude"), data)},
                    coords={"latitude": lat, "longitude": lon})

    def simple_power(f_x):
        f_k = np.fft.rfft(f_x, axis=-1, norm="forward")
        one_and_many_twos = np.concatenate(([1], [2] * (f_k.shape[-1] - 1)))
        return np.real(f_k * np.conj(f_k)) * one_and_many_twos

    spectrum = xr.apply_ufunc(simple_power, ds, input_core_dims=[["longitude"]], output_core_dims=[["longitude"]],
                              exclude_dims={"longitude"}).rename_dims({"longitude": "zonal_wavenumber"})["v"]
    circumference = np.cos(ds.latitude * np.pi / 180) * 2 * np.pi * 6367500.0
    return spectrum * circumference


def test_single_sinusoid_has_its_known_spectrum():
    amp, mean, m = 3.0, 5.0, 4
    field = mean + amp * np.cos(np.deg2rad(LON) * m + 0.3)
    data = np.broadcast_to(field, (2, len(LAT), len(LON))).copy()
    s = zonal_energy_spectrum(data, LAT, LON)
    assert s.shape == (2, len(LAT), len(LON) // 2 + 1)
    c = 2 * np.pi * EARTH_RADIUS_M * np.cos(np.deg2rad(LAT))
    expect = np.zeros(len(LON) // 2 + 1)
    expect[0], expect[m] = mean ** 2, amp ** 2 / 2  # |F0|^2 and 2 |F_m|^2 = 2 (amp/2)^2
    np.testing.assert_allclose(s[1], c[:, None] * expect[None, :], rtol=1e-12, atol=1e-6)
    # Parseval: the spectrum sums to (C / L) sum_l f^2
    np.testing.assert_allclose(s.sum(-1), (c / len(LON))[None, :] * (data ** 2).sum(-1), rtol=1e-12)
    # band mean: cos(lat)-weighted over |lat| in 30..60 (rows +-33.75, +-56.25)
    rows = (np.abs(LAT) >= 30) & (np.abs(LAT) <= 60)
    w = np.cos(np.deg2rad(LAT[rows]))
    np.testing.assert_allclose(band_mean(s, LAT)[0], (s[0][rows] * w[:, None]).sum(0) / w.sum(), rtol=1e-12)


def test_equals_weatherbench2_on_random_fields():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(3, len(LAT), len(LON))) * 10 + 280
    ours = zonal_energy_spectrum(data, LAT, LON)
    np.testing.assert_allclose(ours, _wb2_spectrum(data, LAT, LON).values, rtol=1e-12)
    odd = np.arange(15) * 24.0  # an odd number of longitudes: no Nyquist bin
    data = rng.normal(size=(1, len(LAT), len(odd)))
    np.testing.assert_allclose(zonal_energy_spectrum(data, LAT, odd), _wb2_spectrum(data, LAT, odd).values, rtol=1e-12)


def test_table_and_errors():
    rng = np.random.default_rng(1)
    truth = {6.0: rng.normal(size=(4, 2, len(LAT), len(LON)))}
    blurred = {6.0: 0.5 * truth[6.0]}  # a forecast with half the amplitude: a quarter of the energy
    df = spectra_table(blurred, truth, ["2m_temperature", "temperature_850"], LAT, LON, units={"2m_temperature": "K"})
    assert len(df) == 2 * (len(LON) // 2 + 1) and list(df.columns[:5]) == ["variable", "lead_hours", "wavenumber",
                                                                             "forecast", "truth"]
    np.testing.assert_allclose(df.forecast, 0.25 * df.truth, rtol=1e-12)
    expect = band_mean(zonal_energy_spectrum(truth[6.0], LAT, LON), LAT).mean(0)[1]
    np.testing.assert_allclose(df[df.variable == "temperature_850"].truth, expect, rtol=1e-12)
    with pytest.raises(ValueError, match="spectra band"):
        band_mean(zonal_energy_spectrum(truth[6.0], LAT, LON), LAT, (80, 85))
    with pytest.raises(ValueError, match="uniformly spaced"):
        zonal_energy_spectrum(truth[6.0], LAT, np.r_[LON[:-1], 359.0])
