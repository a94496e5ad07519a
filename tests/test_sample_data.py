"""The synthetic ERA5-like sample data: physics, determinism and the GRIB / WeatherBench files."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

from pipelines import sample_data as sd

YEARS = (2015, 2016)
MAX_DAYS = 2
LAT, LON = sd.grid(5.625)
G = sd.G

PL_NAMES = {"geopotential": "z", "temperature": "t", "u_component_of_wind": "u",
            "v_component_of_wind": "v", "specific_humidity": "q", "relative_humidity": "r"}
SFC_NAMES = {"2m_temperature": "t2m", "10m_u_component_of_wind": "u10", "10m_v_component_of_wind": "v10"}


def _times(start, days, step_hours=6):
    t0 = np.datetime64(start, "ns")
    return np.arange(t0, t0 + np.timedelta64(days * 24, "h"), np.timedelta64(step_hours, "h")).astype(
        "datetime64[ns]"
    )


def _year_times(year):
    return _times(f"{year}-01-01", MAX_DAYS)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    paths = sd.generate(out, years=YEARS, max_days=MAX_DAYS, progress=False)
    return out, paths


@pytest.fixture(scope="module")
def year_fields():
    """One year of 2015 every 30 hours (all hours of the day, all seasons)."""
    times = _times("2015-01-01", 365, step_hours=30)
    return times, sd.fields(times, LAT, LON, sd.SAMPLE_VARS, seed=0)


def _open_grib(path):
    import cfgrib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [ds.load() for ds in cfgrib.open_datasets(str(path), indexpath="")]


def _find(datasets, name, **coords):
    for ds in datasets:
        if name in ds.data_vars and all(k in ds.coords and float(ds[k]) == v for k, v in coords.items()
                                        if ds[k].ndim == 0):
            return ds
    raise AssertionError(f"{name} {coords} not found in {[list(d.data_vars) for d in datasets]}")


# ------------------------------------------------------------------------------------------------ API


def test_grid_and_tags():
    assert LAT.shape == (32,) and LON.shape == (64,)
    assert LAT[0] == -87.1875 and LAT[-1] == 87.1875 and np.all(np.diff(LAT) > 0)
    assert LON[0] == 0.0 and LON[-1] == 354.375
    assert sd.resolution_tag(5.625) == "5.625deg"
    assert sd.resolution_tag(1.40625) == "1.40625deg"
    assert sd.resolution_tag(2.8125) == "2.8125deg"
    with pytest.raises(ValueError):
        sd.grid(7.0)


def test_fields_shapes_dtypes_and_names():
    times = _times("2015-06-01", 1)
    f = sd.fields(times, LAT, LON, sd.SAMPLE_VARS)
    assert list(f) == list(sd.SAMPLE_VARS)
    for name, x in f.items():
        assert x.dtype == np.float32
        want = (32, 64) if name in ("land_sea_mask", "orography") else (4, 32, 64)
        assert x.shape == want, name
        assert np.isfinite(x).all(), name
    with pytest.raises(ValueError):
        sd.fields(times, LAT, LON, ["sea_surface_temperature"])
    with pytest.raises(ValueError):
        sd.fields(times, LAT, LON, ["temperature_123"])


def test_any_standard_level():
    times = _times("2015-01-10", 1)
    names = [f"{b}_{lev}" for b in sd.PL_BASES for lev in sd.LEVELS]
    f = sd.fields(times, LAT, LON, names)
    z = np.stack([f[f"geopotential_{lev}"].mean() for lev in sd.LEVELS])
    assert np.all(np.diff(z) < 0), "geopotential must decrease with pressure"
    t = {lev: f[f"temperature_{lev}"] for lev in sd.LEVELS}
    assert t[1000].mean() > t[850].mean() > t[500].mean() > t[250].mean()
    for lev in sd.LEVELS:
        assert 170 < t[lev].min() and t[lev].max() < 320, lev
        assert f[f"specific_humidity_{lev}"].min() > 0, lev
        rh = f[f"relative_humidity_{lev}"]
        assert rh.min() >= 0 and rh.max() <= 100, lev
        for c in ("u", "v"):
            assert np.abs(f[f"{c}_component_of_wind_{lev}"]).max() < 120, lev
    z500 = f["geopotential_500"] / G
    assert 4800 < z500.min() and z500.max() < 6000


# ------------------------------------------------------------------------------------------------ physics


def test_physical_ranges(year_fields):
    _, f = year_fields
    assert 200 < f["2m_temperature"].min() and f["2m_temperature"].max() < 330
    z500 = f["geopotential_500"] / G
    assert 4800 < z500.min() and z500.max() < 6000
    assert 5400 < z500.mean() < 5650
    z850 = f["geopotential_850"] / G
    assert 1000 < z850.min() and z850.max() < 1800
    lsm, oro = f["land_sea_mask"], f["orography"]
    assert lsm.min() == 0.0 and lsm.max() == 1.0 and 0.15 < lsm.mean() < 0.45
    assert oro.min() >= 0 and 1500 < oro.max() <= 3000
    assert np.all(oro[lsm == 0] == 0), "orography only over land"
    for name in ("10m_u_component_of_wind", "10m_v_component_of_wind", "u_component_of_wind_500",
                 "v_component_of_wind_500", "u_component_of_wind_850", "v_component_of_wind_850"):
        assert np.abs(f[name]).max() < 80, name
        assert f[name].std() > 0.5, name
    assert f["specific_humidity_850"].min() > 0 and f["specific_humidity_850"].max() < 0.03
    rh = f["relative_humidity_850"]
    assert rh.min() >= 0 and rh.max() <= 100 and 50 < rh.mean() < 85
    # temperature falls with latitude and height
    t2m_zm = f["2m_temperature"].mean(axis=(0, 2))
    eq, pole = np.abs(LAT) < 15, np.abs(LAT) > 70
    assert t2m_zm[eq].mean() - t2m_zm[pole].mean() > 25
    assert 283 < np.average(t2m_zm, weights=np.cos(np.radians(LAT))) < 292
    assert 250 < f["temperature_500"].mean() + 5 < 262
    assert np.all(f["temperature_850"].mean(0) > f["temperature_500"].mean(0))


def test_seasonal_cycle_opposite_in_hemispheres():
    jan = sd.fields(_times("2015-01-15", 1), LAT, LON, ["2m_temperature", "temperature_850"])
    jul = sd.fields(_times("2015-07-15", 1), LAT, LON, ["2m_temperature", "temperature_850"])
    nh, sh = (LAT > 30) & (LAT < 70), (LAT < -30) & (LAT > -70)
    for name in jan:
        d = (jul[name] - jan[name]).mean(axis=(0, 2))  # daily mean removes the diurnal cycle
        assert d[nh].mean() > 5, name
        assert d[sh].mean() < -2, name
    # larger over land
    lsm = sd.fields(_times("2015-01-01", 1), LAT, LON, ["land_sea_mask"])["land_sea_mask"]
    d = (jul["2m_temperature"] - jan["2m_temperature"]).mean(axis=0)
    band = nh[:, None] & np.ones_like(lsm, bool)
    assert d[band & (lsm > 0.9)].mean() > d[band & (lsm < 0.1)].mean() + 5


def test_diurnal_cycle_follows_local_solar_time():
    times = _times("2015-04-01", 10, step_hours=1)
    t2m = sd.fields(times, LAT, LON, ["2m_temperature"])["2m_temperature"]
    lsm = sd.fields(times[:1], LAT, LON, ["land_sea_mask"])["land_sea_mask"]
    hours = (times - times[0]) / np.timedelta64(1, "h") % 24
    hourly = np.stack([t2m[hours == h].mean(0) for h in range(24)])  # (24, lat, lon) composite
    warmest_utc = hourly.argmax(axis=0)
    local = (warmest_utc + LON[None, :] / 15.0) % 24
    land = lsm > 0.9
    assert np.all((local[land] > 11) & (local[land] < 17)), "afternoon maximum over land"
    amp = hourly.max(0) - hourly.min(0)
    tropics = (np.abs(LAT) < 40)[:, None]
    assert amp[land & tropics].mean() > 2 * amp[(lsm < 0.1) & tropics].mean()


def test_geopotential_consistent_with_temperature_and_winds(year_fields):
    _, f = year_fields
    mid = (np.abs(LAT) > 35) & (np.abs(LAT) < 65)
    za = f["geopotential_500"] - f["geopotential_500"].mean(axis=(0, 2), keepdims=True)
    ta = f["temperature_500"] - f["temperature_500"].mean(axis=(0, 2), keepdims=True)
    r = np.corrcoef(za[:, mid].ravel(), ta[:, mid].ravel())[0, 1]
    assert r > 0.6, "z500 high where the column is warm"
    # westerlies in mid-latitudes of both hemispheres, stronger aloft
    u500 = f["u_component_of_wind_500"].mean(axis=(0, 2))
    u850 = f["u_component_of_wind_850"].mean(axis=(0, 2))
    for band in ((LAT > 35) & (LAT < 60), (LAT < -35) & (LAT > -60)):
        assert u500[band].mean() > 5 and u500[band].mean() > u850[band].mean()
    # geostrophic v: v ~ (1/f a cos(lat)) dZ/dlon
    z = f["geopotential_500"][:, mid]
    dz = (np.roll(z, -1, -1) - np.roll(z, 1, -1)) / (2 * np.radians(5.625))
    fc = 2 * 7.292e-5 * np.sin(np.radians(LAT[mid]))[:, None]
    vg = dz / (fc * 6.371e6 * np.cos(np.radians(LAT[mid]))[:, None])
    assert np.corrcoef(vg.ravel(), f["v_component_of_wind_500"][:, mid].ravel())[0, 1] > 0.95
    # humidity from temperature (Clausius-Clapeyron) and relative humidity
    q, rh, t = f["specific_humidity_850"], f["relative_humidity_850"], f["temperature_850"]
    es = 611.2 * np.exp(17.67 * (t - 273.15) / (t - 29.65))
    qs = 0.622 * es / (85000 - 0.378 * es)
    np.testing.assert_allclose(q, rh / 100 * qs, rtol=1e-4)
    assert np.corrcoef(q.mean(axis=(0, 2)), t.mean(axis=(0, 2)))[0, 1] > 0.9


def test_forecastable_at_6h():
    times = _times("2015-02-01", 60)
    names = ["geopotential_500", "temperature_850", "u_component_of_wind_500", "2m_temperature"]
    f = sd.fields(times, LAT, LON, names)
    rmse = lambda a, b: float(np.sqrt(np.mean((a - b) ** 2)))  # noqa: E731
    for name in names[:3]:
        x = f[name]
        p6, p24 = rmse(x[1:], x[:-1]), rmse(x[4:], x[:-4])
        assert p6 < 0.6 * p24, name
        # smooth evolution: linear extrapolation beats persistence
        assert rmse(2 * x[1:-1] - x[:-2], x[2:]) < p6, name
    # 2 m temperature: the diurnal cycle dominates 6 h changes, but it repeats: persistence plus
    # yesterday's change over the same 6 hours is far better than persistence
    x = f["2m_temperature"]
    p6 = rmse(x[5:], x[4:-1])
    assert rmse(x[4:-1] + (x[1:-4] - x[:-5]), x[5:]) < 0.5 * p6


def test_waves_travel_eastward():
    times = _times("2015-03-01", 20)
    z = sd.fields(times, LAT, LON, ["geopotential_500"])["geopotential_500"]
    band = (np.abs(LAT) > 40) & (np.abs(LAT) < 60)
    za = z[:, band] - z[:, band].mean(axis=-1, keepdims=True)
    shifts = range(-5, 6)
    score = [np.mean(za[4:] * np.roll(za[:-4], s, axis=-1)) for s in shifts]  # 24 h apart
    best = list(shifts)[int(np.argmax(score))]
    assert best > 0, f"eastward motion expected, got shift {best} cells/day"


def test_years_differ_and_continuous_across_new_year():
    a = sd.fields(_times("2015-03-01", 5), LAT, LON, ["geopotential_500", "2m_temperature"])
    b = sd.fields(_times("2016-03-01", 5), LAT, LON, ["geopotential_500", "2m_temperature"])
    za = a["geopotential_500"] - a["geopotential_500"].mean(axis=(0, 2), keepdims=True)
    zb = b["geopotential_500"] - b["geopotential_500"].mean(axis=(0, 2), keepdims=True)
    assert abs(np.corrcoef(za.ravel(), zb.ravel())[0, 1]) < 0.5
    assert np.abs(a["2m_temperature"] - b["2m_temperature"]).mean() > 0.5
    # waves cross-fade between years: no jump at 1 January
    x = sd.fields(_times("2015-12-25", 14), LAT, LON, ["geopotential_500"])["geopotential_500"]
    steps = np.sqrt(np.mean(np.diff(x, axis=0) ** 2, axis=(1, 2)))
    assert steps.max() < 2.0 * np.median(steps)
    # warming trend
    lo = sd.fields(_times("2000-07-01", 1), LAT, LON, ["temperature_850"])["temperature_850"].mean()
    hi = sd.fields(_times("2100-07-01", 1), LAT, LON, ["temperature_850"])["temperature_850"].mean()
    assert 1.0 < hi - lo < 3.0


def test_deterministic_and_pointwise_in_time():
    times = _times("2015-05-01", 3)
    a = sd.fields(times, LAT, LON, sd.SAMPLE_VARS, seed=3)
    b = sd.fields(times, LAT, LON, sd.SAMPLE_VARS, seed=3)
    c = sd.fields(times, LAT, LON, sd.SAMPLE_VARS, seed=4)
    part = sd.fields(times[5:7], LAT, LON, ["temperature_850", "relative_humidity_850"], seed=3)
    for name in sd.SAMPLE_VARS:
        np.testing.assert_array_equal(a[name], b[name])
        if name not in ("land_sea_mask", "orography"):  # geography is the same planet for all seeds
            assert not np.array_equal(a[name], c[name]), name
    for name, x in part.items():
        np.testing.assert_array_equal(x, a[name][5:7])


# ------------------------------------------------------------------------------------------------ files


def test_layout(small):
    out, paths = small
    assert paths == {"grib": out / "grib", "weatherbench": out / "weatherbench"}
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    want = [f"grib/era5_{kind}_{y}.grib" for kind in ("pl", "sfc") for y in YEARS]
    want += ["weatherbench/constants/constants_5.625deg.nc"]
    for var in list(SFC_NAMES) + list(PL_NAMES):
        want += [f"weatherbench/{var}/{var}_{y}_5.625deg.nc" for y in YEARS]
    assert names == sorted(want)


@pytest.mark.parametrize("year", YEARS)
def test_grib_reads_back_north_first(small, year):
    out, _ = small
    times = _year_times(year)
    truth = sd.fields(times, LAT, LON, sd.SAMPLE_VARS)

    def check(got, want, name):
        assert got.shape == want.shape, name
        tol = (want.max() - want.min()) * 2.0**-15 + 1e-12  # 16-bit simple packing
        np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=name)

    pl = _open_grib(out / "grib" / f"era5_pl_{year}.grib")
    for name in sd.SAMPLE_VARS:
        base, _, lev = name.rpartition("_")
        if base not in PL_NAMES:
            continue
        short = PL_NAMES[base]
        ds = _find(pl, short)
        da = ds[short]
        if "isobaricInhPa" in da.dims:
            da = da.sel(isobaricInhPa=float(lev))
        else:
            assert float(ds["isobaricInhPa"]) == float(lev)
        assert da.attrs["GRIB_units"] == {"z": "m**2 s**-2", "t": "K", "u": "m s**-1", "v": "m s**-1",
                                          "q": "kg kg**-1", "r": "%"}[short]
        np.testing.assert_array_equal(ds.time.values, times)
        assert ds.latitude.values[0] == 87.1875 and np.all(np.diff(ds.latitude.values) < 0), "north first"
        np.testing.assert_array_equal(ds.longitude.values, LON)
        check(da.values[:, ::-1], truth[name], name)

    sfc = _open_grib(out / "grib" / f"era5_sfc_{year}.grib")
    for name, short in SFC_NAMES.items():
        ds = _find(sfc, short)
        assert float(ds["heightAboveGround"]) == (2.0 if short == "t2m" else 10.0)
        assert ds.latitude.values[0] == 87.1875
        check(ds[short].values[:, ::-1], truth[name], name)
    const = _find(sfc, "lsm")
    assert "surface" in const.coords and const.sizes["time"] == times.size  # at every time step
    for it in range(times.size):
        check(const["lsm"].values[it, ::-1], truth["land_sea_mask"], "lsm")
        check(const["z"].values[it, ::-1] / G, truth["orography"], "surface z / g")


def test_grib_keys(small):
    import eccodes

    out, _ = small
    n_steps = _year_times(2015).size
    expect = {"pl": ({"z", "t", "u", "v", "q", "r"}, 10), "sfc": ({"2t", "10u", "10v", "lsm", "z"}, 5)}
    for kind, (shorts, per_step) in expect.items():
        seen, count = set(), 0
        with open(out / "grib" / f"era5_{kind}_2015.grib", "rb") as fh:
            while (h := eccodes.codes_grib_new_from_file(fh)) is not None:
                try:
                    g = lambda k: eccodes.codes_get(h, k)  # noqa: E731
                    if count == 0:
                        assert g("dataDate") == 20150101 and g("dataTime") == 0
                    assert g("edition") == 2
                    assert g("jScansPositively") == 0 and g("iScansNegatively") == 0
                    assert g("latitudeOfFirstGridPointInDegrees") == 87.1875
                    assert g("latitudeOfLastGridPointInDegrees") == -87.1875
                    assert g("longitudeOfFirstGridPointInDegrees") == 0.0
                    assert g("longitudeOfLastGridPointInDegrees") == 354.375
                    assert g("iDirectionIncrementInDegrees") == 5.625
                    assert g("jDirectionIncrementInDegrees") == 5.625
                    assert (g("Ni"), g("Nj")) == (64, 32)
                    assert g("packingType") == "grid_simple" and g("bitsPerValue") == 16
                    tol = g("typeOfLevel")
                    if kind == "pl":
                        assert tol == "isobaricInhPa" and g("level") in (500, 850)
                    elif g("shortName") in ("2t", "10u", "10v"):
                        assert tol == "heightAboveGround" and g("level") == (2 if g("shortName") == "2t" else 10)
                    else:
                        assert tol == "surface"
                    seen.add(g("shortName"))
                    count += 1
                finally:
                    eccodes.codes_release(h)
        assert seen == shorts
        assert count == n_steps * per_step


@pytest.mark.parametrize("year", YEARS)
def test_weatherbench_reads_back(small, year):
    import xarray as xr

    out, _ = small
    wb = out / "weatherbench"
    times = _year_times(year)
    truth = sd.fields(times, LAT, LON, sd.SAMPLE_VARS)
    units = {"t2m": "K", "u10": "m s-1", "v10": "m s-1", "z": "m2 s-2", "t": "K", "u": "m s-1",
             "v": "m s-1", "q": "kg kg-1", "r": "%"}
    for var, short in SFC_NAMES.items():
        with xr.open_dataset(wb / var / f"{var}_{year}_5.625deg.nc") as ds:
            assert ds[short].dims == ("time", "lat", "lon")
            assert ds[short].attrs["units"] == units[short]
            assert ds.time.dtype == np.dtype("datetime64[ns]")
            np.testing.assert_array_equal(ds.time.values, times)
            np.testing.assert_array_equal(ds.lat.values, LAT)
            np.testing.assert_array_equal(ds.lon.values, LON)
            np.testing.assert_array_equal(ds[short].values, truth[var])
    for base, short in PL_NAMES.items():
        levels = sorted(int(n.rpartition("_")[2]) for n in sd.SAMPLE_VARS if n.rpartition("_")[0] == base)
        with xr.open_dataset(wb / base / f"{base}_{year}_5.625deg.nc") as ds:
            assert ds[short].dims == ("time", "level", "lat", "lon")
            assert ds[short].attrs["units"] == units[short]
            assert ds.level.values.tolist() == levels
            assert ds.time.dtype == np.dtype("datetime64[ns]")
            for lev in levels:
                np.testing.assert_array_equal(ds[short].sel(level=lev).values, truth[f"{base}_{lev}"])
    with xr.open_dataset(wb / "constants" / "constants_5.625deg.nc") as ds:
        assert set(ds.data_vars) == {"lsm", "orography", "lat2d", "lon2d"}
        assert ds.orography.attrs["units"] == "m"
        np.testing.assert_array_equal(ds.lsm.values, truth["land_sea_mask"])
        np.testing.assert_array_equal(ds.orography.values, truth["orography"])
        np.testing.assert_array_equal(ds.lat2d.values[:, 0], LAT.astype(np.float32))
        np.testing.assert_array_equal(ds.lon2d.values[0], LON.astype(np.float32))


def test_files_differ_between_years(small):
    import xarray as xr

    out, _ = small
    wb = out / "weatherbench" / "geopotential"
    with xr.open_dataset(wb / "geopotential_2015_5.625deg.nc") as a, \
            xr.open_dataset(wb / "geopotential_2016_5.625deg.nc") as b:
        assert not np.allclose(a.z.values, b.z.values, atol=G * 5)


def test_generate_is_deterministic(tmp_path):
    kw = dict(years=(2017,), max_days=1, progress=False, variables=["2m_temperature", "temperature_850"])
    sd.generate(tmp_path / "a", **kw)
    sd.generate(tmp_path / "b", **kw)
    for f in ("era5_pl_2017.grib", "era5_sfc_2017.grib"):
        assert (tmp_path / "a" / "grib" / f).read_bytes() == (tmp_path / "b" / "grib" / f).read_bytes()
    import xarray as xr

    rel = "weatherbench/temperature/temperature_2017_5.625deg.nc"
    with xr.open_dataset(tmp_path / "a" / rel) as a, xr.open_dataset(tmp_path / "b" / rel) as b:
        xr.testing.assert_identical(a, b)
    assert not list(tmp_path.rglob("*.tmp"))


def test_cli_other_resolution(tmp_path, capsys):
    import xarray as xr

    rc = sd.main([str(tmp_path), "--years", "2016", "--resolution", "11.25", "--step-hours", "12",
                  "--max-days", "1", "--formats", "weatherbench", "--quiet"])
    assert rc == 0
    assert "weatherbench" in capsys.readouterr().out
    assert not (tmp_path / "grib").exists()
    path = tmp_path / "weatherbench" / "2m_temperature" / "2m_temperature_2016_11.25deg.nc"
    with xr.open_dataset(path) as ds:
        assert ds.t2m.shape == (2, 16, 32)
        assert ds.lat.values[0] == -84.375
    assert (tmp_path / "weatherbench" / "constants" / "constants_11.25deg.nc").is_file()


def test_module_imports_no_torch_or_ray():
    code = ("import sys, pipelines.sample_data; "
            "bad = [m for m in ('torch', 'ray') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_generate_in_time_chunks_matches_fields(tmp_path):
    # at 0.703125 degrees a compute chunk holds 7 steps: 3 days at 6 h span two chunks
    import xarray as xr

    sd.generate(tmp_path, years=(2016,), resolution=0.703125, max_days=3, progress=False,
                variables=["2m_temperature"], formats=("weatherbench",))
    lat, lon = sd.grid(0.703125)
    path = tmp_path / "weatherbench" / "2m_temperature" / "2m_temperature_2016_0.703125deg.nc"
    with xr.open_dataset(path) as ds:
        want = sd.fields(ds.time.values, lat, lon, ["2m_temperature"])["2m_temperature"]
        assert ds.t2m.shape == (12, 256, 512)
        np.testing.assert_array_equal(ds.t2m.values, want)
