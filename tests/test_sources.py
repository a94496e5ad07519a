"""Source readers against the real sample files in ../shared/data, ecCodes-written GRIB,
synthetic NetCDF / WeatherBench layouts, truncated files and s3:// through a moto server."""

import logging
import shutil
import warnings

import numpy as np
import pytest
import xarray as xr

from pipelines import names as V
from pipelines import storage
from pipelines import units as U
from pipelines.sources import SourceError, detect_format, open_source
from pipelines.sources import weatherbench as wb

G = 9.80665
CMIP6_CALENDARS = {
    "TaiESM1": "365_day",
    "AWI-ESM-1-1-LR": "proleptic_gregorian",
    "MPI-ESM1-2-HR": "proleptic_gregorian",
    "MPI-ESM-1-2-HAM": "proleptic_gregorian",
    "CMCC-CM2-SR5": "365_day",
}


def raw_grib(path, **filter_by_keys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return xr.open_dataset(path, engine="cfgrib",
                               backend_kwargs={"indexpath": "", "filter_by_keys": filter_by_keys})


def check_contract(ds):
    for name, da in ds.data_vars.items():
        spec = V.parse_variable(name)
        assert da.dims == (("lat", "lon") if spec.is_constant else ("time", "lat", "lon")), name
        assert da.dtype == np.float32, name
        assert da.attrs["units"] == spec.units
        assert da.attrs["source_name"] and da.attrs["source_file"]
    assert ds["lat"].dtype == np.float64
    lon = ds["lon"].values
    assert lon.min() >= 0 and lon.max() < 360 and np.all(np.diff(lon) > 0)
    if "time" in ds.coords:
        assert ds["time"].dtype == np.dtype("datetime64[ns]")
        assert len(np.unique(ds["time"].values)) == ds.sizes["time"]
    assert "calendar" in ds.attrs


# ------------------------------------------------------------------------------------------
# Real files
# ------------------------------------------------------------------------------------------


def test_era5_members_grib_needs_a_member(shared_data):
    path = shared_data / "era5/era5-levels-members.grib"
    with pytest.raises(SourceError) as e:
        open_source(str(path))
    msg = str(e.value)
    assert str(path) in msg and "10 ensemble members (0..9)" in msg and "member: N" in msg
    with pytest.raises(SourceError, match="member 12 not found"):
        open_source(str(path), member=12)


def test_era5_members_grib_and_netcdf_agree(shared_data):
    grib = open_source(str(shared_data / "era5/era5-levels-members.grib"), member=3)
    nc = open_source(str(shared_data / "era5/era5-levels-members.nc"), member=3)
    check_contract(grib)
    check_contract(nc)
    names = {"geopotential_500", "geopotential_850", "temperature_500", "temperature_850"}
    assert set(grib.data_vars) == set(nc.data_vars) == names
    assert grib.sizes == nc.sizes == {"time": 4, "lat": 61, "lon": 120}
    np.testing.assert_array_equal(grib.time.values, nc.time.values)
    assert str(grib.time.values[1])[:19] == "2017-01-01T12:00:00"
    np.testing.assert_array_equal(grib.lat.values, nc.lat.values)
    assert grib.lat.values[0] == 90.0  # north-first as in the file
    for name in names:
        np.testing.assert_allclose(grib[name].values, nc[name].values, rtol=1e-6)
    raw = raw_grib(shared_data / "era5/era5-levels-members.grib")
    np.testing.assert_allclose(grib["temperature_500"].values,
                               raw.t.sel(number=3, isobaricInhPa=500).values, rtol=0)
    assert grib["geopotential_500"].attrs["source_name"] == "z"
    # another member differs
    other = open_source(str(shared_data / "era5/era5-levels-members.grib"), member=0,
                        variables=["temperature_500"])
    assert not np.allclose(other["temperature_500"].values, grib["temperature_500"].values)


def test_grib_is_lazy(shared_data, monkeypatch):
    from pipelines.sources import grib_index

    decoded = []
    real = grib_index.decode_message

    def counting(buf):
        decoded.append(1)
        return real(buf)

    monkeypatch.setattr(grib_index, "decode_message", counting)
    ds = open_source(str(shared_data / "era5/era5-levels-members.grib"), member=2)
    assert decoded == []  # opening reads headers only
    part = ds[["temperature_500"]].isel(time=slice(1, 3)).load()
    assert len(decoded) == 2  # one message per step of one variable
    assert part["temperature_500"].shape == (2, 61, 120)


def test_netcdf_is_lazy(shared_data, monkeypatch):
    seen = []
    real = U._LazyAffine._raw_getitem

    def spy(self, key):
        out = real(self, key)
        seen.append(out.shape)
        return out

    monkeypatch.setattr(U._LazyAffine, "_raw_getitem", spy)
    ds = open_source(str(shared_data / "era5/era5-levels-members.nc"), member=1)
    assert seen == []
    ds["geopotential_850"].isel(time=slice(2, 4)).load()
    assert seen == [(2, 61, 120)]


def test_ecmwf_grib2_forecasts_flatten_to_valid_times(shared_data):
    path = shared_data / "ecmwf/pl_regular_ll.grib"
    ds = open_source(str(path))
    check_contract(ds)
    assert ds.sizes == {"time": 8, "lat": 19, "lon": 36}
    expected = np.arange(np.datetime64("2024-06-03T00"), np.datetime64("2024-06-05T00"),
                         np.timedelta64(6, "h")).astype("datetime64[ns]")
    np.testing.assert_array_equal(ds.time.values, expected)
    levels = (1000, 850, 700, 500, 400, 300)
    for base in ("geopotential", "temperature", "u_component_of_wind", "v_component_of_wind",
                 "relative_humidity"):
        for lv in levels:
            assert f"{base}_{lv}" in ds
    raw = raw_grib(path)
    # 06 UTC is base time 00 + 6 h; 12 UTC is base time 12 + 0 h
    t = raw.t.sel(isobaricInhPa=850)
    np.testing.assert_array_equal(ds["temperature_850"].values[1], t.isel(time=0, step=1).values)
    np.testing.assert_array_equal(ds["temperature_850"].values[2], t.isel(time=1, step=0).values)
    np.testing.assert_array_equal(ds["relative_humidity_500"].values[7],
                                  raw.r.sel(isobaricInhPa=500).isel(time=3, step=1).values)


def test_ecmwf_grib1_steps(shared_data):
    ds = open_source(str(shared_data / "ecmwf/multi_param_on_multi_dims.grib"),
                     variables=["geopotential_500", "temperature_850", "u_component_of_wind_1000"])
    check_contract(ds)
    assert list(ds.data_vars) == ["geopotential_500", "temperature_850", "u_component_of_wind_1000"]
    assert ds.sizes["lat"] == 37 and ds.sizes["lon"] == 72
    assert ds.sizes["time"] == 4
    assert np.all(np.diff(ds.time.values) == np.timedelta64(12, "h"))
    z = ds["geopotential_500"].values
    assert 4.5e4 < z.mean() < 6.0e4  # m2 s-2, not gpm


@pytest.fixture(scope="module")
def gfs(shared_data):
    path = shared_data / "gfs/gfs.t12z.pgrbf120.2p5deg.grib2"
    return path, open_source(str(path))


def test_gfs_many_level_types(gfs):
    path, ds = gfs
    check_contract(ds)
    assert ds.sizes == {"time": 1, "lat": 73, "lon": 144}
    assert str(ds.time.values[0])[:19] == "2011-01-15T12:00:00"  # 2011-01-10 12z + 120 h
    for name in ("2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind",
                 "mean_sea_level_pressure", "surface_pressure", "land_sea_mask", "orography",
                 "total_cloud_cover", "geopotential_500", "temperature_850",
                 "relative_humidity_700", "u_component_of_wind_250", "vertical_velocity_500"):
        assert name in ds, name
    gh = raw_grib(path, typeOfLevel="isobaricInhPa", shortName="gh")
    np.testing.assert_allclose(ds["geopotential_500"].values[0],
                               gh.gh.sel(isobaricInhPa=500).values * G, rtol=1e-6)
    assert ds["geopotential_500"].attrs["source_name"] == "gh"
    assert ds["geopotential_500"].attrs["source_units"] == "gpm"
    t2 = raw_grib(path, typeOfLevel="heightAboveGround", shortName="2t")
    np.testing.assert_array_equal(ds["2m_temperature"].values[0], t2.t2m.values)
    assert 200 < float(ds["2m_temperature"].mean()) < 320
    tcc = ds["total_cloud_cover"].values
    assert tcc.min() >= 0 and tcc.max() <= 1.0  # % -> fraction
    assert ds["land_sea_mask"].dims == ("lat", "lon")


def test_gfs_missing_level_message(gfs):
    path, _ = gfs
    with pytest.raises(SourceError) as e:
        open_source(str(path), variables=["geopotential_123", "2m_temperature"])
    msg = str(e.value)
    assert str(path) in msg and "geopotential_123" in msg
    assert "geopotential at 1000, 975" in msg and "recipe" in msg


def test_regional_era5_t2m_lon_normalised(shared_data):
    path = shared_data / "era5/era5-single-level-scalar-time.grib"
    ds = open_source(str(path))
    check_contract(ds)
    assert list(ds.data_vars) == ["2m_temperature"]
    assert ds.sizes == {"time": 1, "lat": 121, "lon": 201}
    assert ds.lat.values[0] == 60.0 and ds.lat.values[-1] == 30.0
    raw = raw_grib(path)
    assert raw.longitude.values[0] == -10.0
    np.testing.assert_array_equal(ds["2m_temperature"].sel(lon=350.0).values[0],
                                  raw.t2m.sel(longitude=-10.0).values)
    np.testing.assert_array_equal(ds["2m_temperature"].sel(lon=20.0).values[0],
                                  raw.t2m.sel(longitude=20.0).values)


def test_cmip6_files(shared_data):
    files = sorted((shared_data / "cmip6").rglob("ta_day_*.nc"))
    assert len(files) >= 5
    models = set()
    for f in files:
        model = f.name.split("_")[2]
        models.add(model)
        ds = open_source(str(f))
        check_contract(ds)
        assert set(ds.data_vars) == {"temperature_1000", "temperature_850"}  # plev Pa -> hPa
        assert ds.attrs["calendar"] == CMIP6_CALENDARS[model]
        raw = xr.open_dataset(f, decode_times=False, engine="h5netcdf")
        assert raw.plev.attrs["units"] == "Pa"
        assert ds.sizes["time"] == raw.sizes["time"]
        order = np.argsort(np.mod(raw.lon.values, 360))
        np.testing.assert_allclose(ds["temperature_1000"].values,
                                   raw.ta.sel(plev=100000.0).values[:, :, order], rtol=1e-6)
        np.testing.assert_array_equal(ds.lat.values, raw.lat.values)
        times = ds.time.to_index()
        assert times[0].month == 1 and times[0].day == 1
        if ds.attrs["calendar"] == "365_day":
            assert not ((times.month == 2) & (times.day == 29)).any()
        sub = open_source(str(f), variables=["temperature_850"])
        assert list(sub.data_vars) == ["temperature_850"]
        with pytest.raises(SourceError, match="temperature at 1000, 850 hPa"):
            open_source(str(f), variables=["temperature_925"])
    assert models == set(CMIP6_CALENDARS)
    awi_2000 = [f for f in files if "AWI" in f.name and "20000101" in f.name][0]
    t = open_source(str(awi_2000)).time.to_index()
    assert len(t) == 366 and ((t.month == 2) & (t.day == 29)).sum() == 1


# ------------------------------------------------------------------------------------------
# GRIB written with ecCodes
# ------------------------------------------------------------------------------------------

GRID = dict(Ni=8, Nj=5, latitudeOfFirstGridPointInDegrees=80.0,
            longitudeOfFirstGridPointInDegrees=-180.0, latitudeOfLastGridPointInDegrees=-80.0,
            longitudeOfLastGridPointInDegrees=135.0, iDirectionIncrementInDegrees=45.0,
            jDirectionIncrementInDegrees=40.0)


def write_grib(path, fields, sample="regular_ll_pl_grib2"):
    import eccodes

    with open(path, "wb") as f:
        for keys, values in fields:
            h = eccodes.codes_grib_new_from_samples(sample)
            try:
                for k, v in keys.items():
                    eccodes.codes_set(h, k, v)
                if values is not None:
                    eccodes.codes_set_values(h, np.asarray(values, dtype=np.float64).ravel())
                eccodes.codes_write(h, f)
            finally:
                eccodes.codes_release(h)


def test_grib_written_with_eccodes_round_trips(tmp_path):
    path = tmp_path / "written.grib2"
    rng = np.random.default_rng(0)
    truth = {}
    fields = []
    for day in (1, 2, 3):
        for lev in (500, 850):
            t = 220 + 60 * rng.random((5, 8))
            gh = 1000 * lev / 100 + rng.random((5, 8))
            truth[("t", day, lev)], truth[("gh", day, lev)] = t, gh
            common = dict(GRID, typeOfLevel="isobaricInhPa", level=lev, dataDate=20200100 + day,
                          dataTime=0, stepRange="0")
            fields.append((dict(common, shortName="t"), t))
            fields.append((dict(common, shortName="gh"), gh))
    write_grib(path, fields)
    assert detect_format(str(path)) == "grib"
    ds = open_source(str(path))
    check_contract(ds)
    assert ds.sizes == {"time": 3, "lat": 5, "lon": 8}
    np.testing.assert_array_equal(ds.lon.values, np.arange(0, 360, 45.0))
    np.testing.assert_array_equal(ds.lat.values, [80, 40, 0, -40, -80])
    order = np.argsort(np.mod(np.arange(-180, 180, 45.0), 360))
    for i, day in enumerate((1, 2, 3)):
        for lev in (500, 850):
            np.testing.assert_allclose(ds[f"temperature_{lev}"].values[i],
                                       truth[("t", day, lev)][:, order], atol=1e-3)
            np.testing.assert_allclose(ds[f"geopotential_{lev}"].values[i],
                                       truth[("gh", day, lev)][:, order] * G, rtol=1e-5)


def test_grib_duplicate_valid_times_refused(tmp_path):
    path = tmp_path / "dup.grib2"
    fields = [(dict(GRID, shortName="t", typeOfLevel="isobaricInhPa", level=500, dataDate=20200101,
                    dataTime=dt, stepRange=step), np.full(40, 250.0))
              for dt, step in ((0, "12"), (1200, "0"))]
    write_grib(path, fields)
    with pytest.raises(SourceError) as e:
        open_source(str(path))
    msg = str(e.value)
    assert str(path) in msg and "duplicate valid time 20200101 1200" in msg


def test_grib_reduced_gaussian_refused(tmp_path):
    path = tmp_path / "rgg.grib2"
    write_grib(path, [({}, None)], sample="reduced_gg_pl_grib2")
    with pytest.raises(SourceError) as e:
        open_source(str(path))
    msg = str(e.value)
    assert str(path) in msg and "reduced_gg" in msg and "regular lat-lon" in msg


def test_grib_surface_geopotential_is_orography(tmp_path):
    path = tmp_path / "sfc.grib2"
    z = np.linspace(0, 9806.65 * 2, 40)
    write_grib(path, [(dict(GRID, shortName="z", typeOfLevel="surface", level=0,
                            dataDate=20200101, dataTime=0), z)], sample="regular_ll_sfc_grib2")
    ds = open_source(str(path), variables=["orography"])
    assert ds["orography"].dims == ("lat", "lon")
    np.testing.assert_allclose(np.sort(ds["orography"].values.ravel()), np.sort(z / G),
                               atol=0.05)


# ------------------------------------------------------------------------------------------
# NetCDF conventions and units
# ------------------------------------------------------------------------------------------


def _write_nc(path, data_vars, coords, engine="h5netcdf", encoding=None):
    xr.Dataset(data_vars, coords=coords).to_netcdf(path, engine=engine, encoding=encoding)


def test_netcdf_units_conversions_and_lon(tmp_path):
    path = tmp_path / "cds.nc"
    lat = np.array([-30.0, 0.0, 30.0])  # south-first: kept as is
    lon = np.array([-90.0, 0.0, 90.0, 180.0])
    times = np.array(["2020-01-01T00", "2020-01-01T06"], dtype="datetime64[ns]")
    shape = (2, 3, 4)
    base = np.arange(24.0).reshape(shape)
    _write_nc(path, {
        "t2m": (("valid_time", "latitude", "longitude"), base, {"units": "degC"}),
        "msl": (("valid_time", "latitude", "longitude"), 1000 + base, {"units": "hPa"}),
        "tcc": (("valid_time", "latitude", "longitude"), base, {"units": "%"}),
        "z": (("valid_time", "pressure_level", "latitude", "longitude"),
              np.stack([base, base + 1], axis=1), {"units": "m^2/s^2"}),
        "lsm": (("latitude", "longitude"), np.full((3, 4), 100.0), {"units": "%"}),
    }, {"valid_time": times, "latitude": lat, "longitude": lon,
        "pressure_level": ("pressure_level", [500.0, 850.0], {"units": "hPa"})})
    ds = open_source(str(path))
    check_contract(ds)
    assert set(ds.data_vars) == {"2m_temperature", "mean_sea_level_pressure", "total_cloud_cover",
                                 "geopotential_500", "geopotential_850", "land_sea_mask"}
    np.testing.assert_array_equal(ds.lat.values, lat)
    np.testing.assert_array_equal(ds.lon.values, [0.0, 90.0, 180.0, 270.0])
    order = [1, 2, 3, 0]
    np.testing.assert_allclose(ds["2m_temperature"].values, base[:, :, order] + 273.15, rtol=1e-6)
    np.testing.assert_allclose(ds["mean_sea_level_pressure"].values, (1000 + base[:, :, order]) * 100, rtol=1e-6)
    np.testing.assert_allclose(ds["total_cloud_cover"].values, base[:, :, order] / 100, rtol=1e-6)
    np.testing.assert_allclose(ds["geopotential_850"].values, base[:, :, order] + 1, rtol=1e-6)
    np.testing.assert_allclose(ds["land_sea_mask"].values, 1.0)
    assert ds["land_sea_mask"].dims == ("lat", "lon")
    np.testing.assert_array_equal(ds.time.values, times)


def test_netcdf_unit_refusal_names_file_variable_units(tmp_path):
    path = tmp_path / "bad.nc"
    _write_nc(path, {"t2m": (("time", "lat", "lon"), np.ones((1, 2, 2)), {"units": "degF"})},
              {"time": np.array(["2020-01-01"], dtype="datetime64[ns]"), "lat": [0.0, 1.0], "lon": [0.0, 1.0]})
    with pytest.raises(SourceError) as e:
        open_source(str(path))
    msg = str(e.value)
    assert str(path) in msg and "'t2m'" in msg and "'degF'" in msg and "'K'" in msg


def test_cmip6_style_conversions_360_day_and_pr(tmp_path):
    import cftime

    path = tmp_path / "zg_day_model_historical_r1i1p1f1_gn_20000101-20011230.nc"
    times = np.array([cftime.Datetime360Day(2000 + i // 360, 1 + (i % 360) // 30, 1 + i % 30, 12)
                      for i in range(720)])
    lat, lon = np.array([10.0, 20.0]), np.array([0.0, 180.0, 358.0])
    zg = np.broadcast_to(np.array([5500.0, 1500.0])[None, :, None, None], (720, 2, 2, 3)).copy()
    ds = xr.Dataset(
        {"zg": (("time", "plev", "lat", "lon"), zg, {"units": "m"}),
         "pr": (("time", "lat", "lon"), np.ones((720, 2, 3)), {"units": "kg m-2 s-1"}),
         "sftlf": (("lat", "lon"), np.full((2, 3), 25.0), {"units": "%"}),
         "time_bnds": (("time", "bnds"), np.zeros((720, 2)))},
        coords={"time": ("time", times, {"bounds": "time_bnds"}), "lat": lat, "lon": lon,
                "plev": ("plev", [50000.0, 85000.0], {"units": "Pa"})})
    ds.to_netcdf(path, engine="h5netcdf",
                 encoding={"time": {"units": "days since 2000-01-01", "calendar": "360_day"}})
    out = open_source(str(path))
    check_contract(out)
    assert out.attrs["calendar"] == "360_day"
    assert set(out.data_vars) == {"geopotential_500", "geopotential_850", "land_sea_mask"}
    assert "pr" in out.attrs["skipped_variables"]  # a rate: listed, not silently converted
    np.testing.assert_allclose(out["geopotential_500"].values, 5500 * G, rtol=1e-6)
    np.testing.assert_allclose(out["land_sea_mask"].values, 0.25)
    assert out.sizes["time"] == 720  # align_on="year" keeps every 360-day step
    t = out.time.to_index()
    assert t[0] == np.datetime64("2000-01-01T12") and t[-1].year == 2001 and t.is_monotonic_increasing
    with pytest.raises(SourceError, match="precipitation rate"):
        open_source(str(path), variables=["total_precipitation"])


def test_netcdf3_classic_opens(tmp_path):
    path = tmp_path / "classic.nc"
    _write_nc(path, {"t": (("time", "level", "lat", "lon"), np.full((2, 1, 2, 2), 250.0), {"units": "K"})},
              {"time": np.array(["2020-01-01", "2020-01-02"], dtype="datetime64[ns]"),
               "level": ("level", [500], {"units": "millibars"}), "lat": [0.0, 1.0], "lon": [0.0, 1.0]},
              engine="netcdf4", encoding=None)
    xr.open_dataset(path).to_netcdf(tmp_path / "c3.nc", format="NETCDF3_CLASSIC", engine="netcdf4")
    ds = open_source(str(tmp_path / "c3.nc"))
    np.testing.assert_allclose(ds["temperature_500"].values, 250.0)


# ------------------------------------------------------------------------------------------
# Corrupt and truncated files, format detection
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["era5/era5-levels-members.grib", "era5/era5-levels-members.nc"])
def test_truncated_files(shared_data, tmp_path, name, caplog):
    caplog.set_level(logging.CRITICAL)
    src = shared_data / name
    data = src.read_bytes()
    dst = tmp_path / src.name
    dst.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(SourceError) as e:
        open_source(str(dst), member=0)
    msg = str(e.value)
    assert str(dst) in msg and "truncated or corrupt" in msg and "re-download" in msg


def test_empty_and_garbage_files(tmp_path):
    for name, content in (("empty.grib", b""), ("junk.grib", b"not a grib file" * 10),
                          ("junk.nc", b"hello world" * 10)):
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(SourceError, match="corrupt"):
            open_source(str(p))
    p = tmp_path / "noext"
    p.write_bytes(b"something")
    with pytest.raises(SourceError, match="cannot tell the format"):
        open_source(str(p))


def test_detect_format_by_magic(shared_data, tmp_path):
    for src, fmt in (("era5/era5-levels-members.grib", "grib"), ("era5/era5-levels-members.nc", "netcdf")):
        dst = tmp_path / ("copy_" + fmt)
        shutil.copy(shared_data / src, dst)
        assert detect_format(str(dst)) == fmt
    assert detect_format(str(tmp_path)) == "weatherbench"
    assert detect_format("x.grb2") == "grib" and detect_format("x.nc4") == "netcdf"


def test_missing_file_and_unknown_variable(tmp_path, shared_data):
    with pytest.raises(SourceError, match="no such file"):
        open_source(str(tmp_path / "nope.grib"))
    with pytest.raises(SourceError, match="unknown ClimaX variable"):
        open_source(str(shared_data / "era5/era5-levels-members.nc"), variables=["foo"], member=0)


# ------------------------------------------------------------------------------------------
# WeatherBench layout
# ------------------------------------------------------------------------------------------


def make_weatherbench(root):
    lat = np.linspace(-87.1875, 87.1875, 4)
    lon = np.arange(0, 360, 45.0)
    for year in (2015, 2016):
        times = np.arange(np.datetime64(f"{year}-01-01T00"), np.datetime64(f"{year}-01-01T12"),
                          np.timedelta64(3, "h")).astype("datetime64[ns]")
        n = len(times)
        val = (year - 2015) * 100 + np.arange(n)[:, None, None] + np.zeros((n, 4, 8))
        folder = root / "2m_temperature"
        folder.mkdir(parents=True, exist_ok=True)
        _write_nc(folder / f"2m_temperature_{year}_5.625deg.nc",
                  {"t2m": (("time", "lat", "lon"), 250 + val, {"units": "K"})},
                  {"time": times, "lat": lat, "lon": lon})
        folder = root / "geopotential"
        folder.mkdir(exist_ok=True)
        _write_nc(folder / f"geopotential_{year}_5.625deg.nc",
                  {"z": (("time", "level", "lat", "lon"),
                         np.stack([50000 + val, 10000 + val], axis=1))},  # no units: WB convention
                  {"time": times, "lat": lat, "lon": lon, "level": [500, 850]})
        folder = root / "temperature_850"
        folder.mkdir(exist_ok=True)
        _write_nc(folder / f"temperature_850hPa_{year}_5.625deg.nc",
                  {"t": (("time", "lat", "lon"), 270 + val, {"units": "K"})},
                  {"time": times, "lat": lat, "lon": lon})
    (root / "vorticity").mkdir()
    (root / "constants").mkdir()
    lat2d = np.broadcast_to(lat[:, None], (4, 8))
    _write_nc(root / "constants/constants_5.625deg.nc",
              {"lsm": (("lat", "lon"), np.full((4, 8), 0.5)),
               "orography": (("lat", "lon"), np.full((4, 8), 100.0), {"units": "m"}),
               "lat2d": (("lat", "lon"), lat2d), "lon2d": (("lat", "lon"), lat2d * 0)},
              {"lat": lat, "lon": lon})
    return lat, lon


def test_weatherbench_root(tmp_path, monkeypatch):
    root = tmp_path / "wb"
    lat, lon = make_weatherbench(root)
    assert wb.years(root) == [2015, 2016]
    files = wb.list_files(root)
    assert set(files) == {"2m_temperature", "geopotential", "temperature_850", "constants"}
    assert [f.rsplit("_", 2)[-2] for f in files["2m_temperature"]] == ["2015", "2016"]

    seen = []
    real = wb._LazyConcat._raw_getitem
    monkeypatch.setattr(wb._LazyConcat, "_raw_getitem",
                        lambda self, key: seen.append(key) or real(self, key))
    ds = open_source(str(root))
    assert seen == []
    check_contract(ds)
    assert set(ds.data_vars) == {"2m_temperature", "geopotential_500", "geopotential_850",
                                 "temperature_850", "land_sea_mask", "orography"}
    assert ds.sizes == {"time": 8, "lat": 4, "lon": 8}
    assert str(ds.time.values[4])[:13] == "2016-01-01T00"
    part = ds["2m_temperature"].isel(time=slice(3, 5)).values  # across the year boundary
    np.testing.assert_allclose(part[:, 0, 0], [253.0, 350.0])
    np.testing.assert_allclose(ds["geopotential_850"].values[5, 0, 0], 10000 + 101)
    np.testing.assert_allclose(ds["orography"].values, 100.0)
    assert ds["land_sea_mask"].dims == ("lat", "lon")
    np.testing.assert_array_equal(ds.lat.values, lat)

    one = wb.open_weatherbench(root, ["2m_temperature", "latitude"], years=[2016])
    assert one.sizes["time"] == 4 and float(one["2m_temperature"][0, 0, 0]) == 350.0
    np.testing.assert_allclose(one["latitude"].values[:, 0], lat)
    single = open_source(str(root / "temperature_850/temperature_850hPa_2015_5.625deg.nc"))
    assert list(single.data_vars) == ["temperature_850"] and single.sizes["time"] == 4
    assert single.attrs["source_format"] == "weatherbench"
    with pytest.raises(SourceError, match="temperature_500"):
        open_source(str(root), "weatherbench", variables=["temperature_500"])


# ------------------------------------------------------------------------------------------
# s3:// through a moto server
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(moto_s3):
    fs, _ = storage.filesystem("s3://climax-test", moto_s3)
    fs.mkdir("climax-test")
    return moto_s3["client_kwargs"]["endpoint_url"], moto_s3


def test_s3_open_and_expand(s3, shared_data):
    endpoint, opts = s3
    fs, _ = storage.filesystem("s3://climax-test", opts)
    fs.put(str(shared_data / "era5/era5-levels-members.grib"), "climax-test/era5/members.grib")
    fs.put(str(shared_data / "era5/era5-levels-members.nc"), "climax-test/era5/members.nc")
    paths = storage.expand_paths("s3://climax-test/era5/*", opts)
    assert paths == ["s3://climax-test/era5/members.grib", "s3://climax-test/era5/members.nc"]
    remote = open_source("s3://climax-test/era5/members.grib", storage_options=opts, member=4,
                         variables=["temperature_850"])
    local = open_source(str(shared_data / "era5/era5-levels-members.grib"), member=4,
                        variables=["temperature_850"])
    np.testing.assert_array_equal(remote["temperature_850"].values, local["temperature_850"].values)
    assert remote.attrs["source_file"] == "s3://climax-test/era5/members.grib"
    nc = open_source("s3://climax-test/era5/members.nc", storage_options=opts, member=4,
                     variables=["temperature_850"])
    np.testing.assert_allclose(nc["temperature_850"].values, local["temperature_850"].values, rtol=1e-6)
    with storage.local_copy("s3://climax-test/era5/members.grib", opts) as p:
        assert p.endswith("members.grib")
        assert open(p, "rb").read(4) == b"GRIB"
    import os
    assert not os.path.exists(p)


def test_s3_endpoint_from_environment(s3, shared_data, monkeypatch):
    endpoint, opts = s3
    fs, _ = storage.filesystem("s3://climax-test", opts)
    fs.put(str(shared_data / "era5/era5-single-level-scalar-time.grib"), "climax-test/sl/t2m.grib")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    env_opts = {"key": "testing", "secret": "testing"}
    assert storage.expand_paths("s3://climax-test/sl/*.grib", env_opts) == ["s3://climax-test/sl/t2m.grib"]
    ds = open_source("s3://climax-test/sl/t2m.grib", storage_options=env_opts)
    assert ds.sizes == {"time": 1, "lat": 121, "lon": 201}


def test_s3_missing_bucket_and_key(s3):
    endpoint, opts = s3
    with pytest.raises(storage.PathNotFoundError) as e:
        storage.expand_paths("s3://no-such-bucket/*.grib", opts)
    msg = str(e.value)
    assert "bucket no-such-bucket does not exist" in msg and endpoint in msg
    assert "AWS_ACCESS_KEY_ID" in msg
    with pytest.raises(SourceError, match="bucket no-such-bucket does not exist"):
        open_source("s3://no-such-bucket/x.grib", storage_options=opts)
    with pytest.raises(storage.PathNotFoundError, match="no object matches"):
        storage.expand_paths("s3://climax-test/nothing/*.grib", opts)


def test_local_expand_paths(shared_data, tmp_path):
    found = storage.expand_paths(str(shared_data / "cmip6/**/ta_day_AWI*.nc"))
    assert len(found) == 3 and found == sorted(found)
    assert storage.expand_paths(str(tmp_path)) == [str(tmp_path)]
    with pytest.raises(storage.PathNotFoundError, match="no file matches"):
        storage.expand_paths(str(tmp_path / "*.grib"))
    with storage.local_copy(str(shared_data / "era5/era5-levels-members.nc")) as p:
        assert p == str(shared_data / "era5/era5-levels-members.nc")
