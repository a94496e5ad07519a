"""ClimaX variable names, producer-name mapping and unit conversion (pipelines/names.py, pipelines/units.py)."""

import numpy as np
import pytest
import xarray as xr

from pipelines import names as V
from pipelines import units as U


def test_default_vars_match_climax_pretraining_config():
    assert len(V.DEFAULT_VARS) == 48
    assert len(set(V.DEFAULT_VARS)) == 48
    assert V.DEFAULT_VARS[:6] == [
        "land_sea_mask", "orography", "latitude", "2m_temperature",
        "10m_u_component_of_wind", "10m_v_component_of_wind",
    ]
    assert V.DEFAULT_VARS[6:13] == [f"geopotential_{lv}" for lv in (50, 250, 500, 600, 700, 850, 925)]
    # original order of the blocks: z, u, v, t, r, q
    blocks = [V.DEFAULT_VARS[6 + 7 * i].rsplit("_", 1)[0] for i in range(6)]
    assert blocks == ["geopotential", "u_component_of_wind", "v_component_of_wind",
                      "temperature", "relative_humidity", "specific_humidity"]
    assert V.DEFAULT_VARS[-1] == "specific_humidity_925"
    for name in V.DEFAULT_VARS:
        assert V.parse_variable(name).name == name


def test_parse_variable():
    s = V.parse_variable("geopotential_500")
    assert (s.base, s.level_hpa, s.units, s.is_constant) == ("geopotential", 500, "m**2 s**-2", False)
    s = V.parse_variable("specific_humidity_925")
    assert (s.base, s.level_hpa, s.units) == ("specific_humidity", 925, "kg kg**-1")
    s = V.parse_variable("2m_temperature")
    assert (s.base, s.level_hpa, s.units, s.is_constant) == ("2m_temperature", None, "K", False)
    s = V.parse_variable("orography")
    assert s.is_constant and s.units == "m" and s.level_hpa is None
    assert V.parse_variable("land_sea_mask").units == "(0 - 1)"
    assert V.parse_variable("total_cloud_cover").units == "(0 - 1)"
    assert V.parse_variable("toa_incident_solar_radiation").units == "J m**-2"
    assert V.parse_variable("relative_humidity_850").units == "%"
    assert V.parse_variable("mean_sea_level_pressure").units == "Pa"
    # the original ClimaX spelling is accepted and normalised
    assert V.ALIASES == {"lattitude": "latitude"}
    assert V.parse_variable("lattitude").name == "latitude"
    assert V.parse_variable("lattitude").is_constant


@pytest.mark.parametrize("bad", ["geopotential", "foo", "temperature_x", "2m_temperature_500",
                                 "potential_vorticity_500", "temperature_0"])
def test_parse_variable_unknown(bad):
    with pytest.raises(ValueError) as e:
        V.parse_variable(bad)
    msg = str(e.value)
    assert bad in msg
    if bad == "geopotential":
        assert "geopotential_500" in msg  # says how to name a level
    elif bad != "temperature_0":
        assert "2m_temperature" in msg and "specific_humidity" in msg  # lists the known bases


def test_grib_and_netcdf_names():
    g = V.grib_base
    assert g("z", "isobaricInhPa") == "geopotential"
    assert g("gh", "isobaricInhPa") == "geopotential"
    assert g("t", "isobaricInhPa") == "temperature"
    assert g("q", "isobaricInhPa") == "specific_humidity"
    assert g("r", "isobaricInhPa") == "relative_humidity"
    assert g("w", "isobaricInhPa") == "vertical_velocity"
    assert g("z", "surface") == "orography"
    assert g("orog", "surface") == "orography"
    assert g("t2m", "surface") == g("2t", "heightAboveGround", 2) == "2m_temperature"
    assert g("t", "heightAboveGround", 2) == "2m_temperature"
    assert g("t", "surface") is None  # skin temperature is not 2 m temperature
    assert g("u10", "heightAboveGround", 10) == g("10u", "surface") == "10m_u_component_of_wind"
    assert g("v10", "heightAboveGround", 10) == "10m_v_component_of_wind"
    assert g("msl", "surface") == g("prmsl", "meanSea") == "mean_sea_level_pressure"
    assert g("tcc", "atmosphereSingleLayer") == "total_cloud_cover"
    assert g("tcc", "lowCloudLayer") is None
    assert g("lsm", "surface") == "land_sea_mask"
    assert g("r", "sigma") is None
    n = V.netcdf_base
    assert n("zg", True) == "geopotential"
    assert n("ta", True) == "temperature"
    assert n("hus", True) == "specific_humidity"
    assert n("hur", True) == "relative_humidity"
    assert n("ua", True) == "u_component_of_wind" and n("va", True) == "v_component_of_wind"
    assert n("tas", False) == "2m_temperature"
    assert n("sftlf", False) == "land_sea_mask"
    assert n("orog", False) == "orography"
    assert n("z", False) == "orography" and n("z", True) == "geopotential"
    assert n("psl", False) == "mean_sea_level_pressure"


@pytest.mark.parametrize("name,units,value,expected", [
    ("geopotential_500", "m**2 s**-2", 50000.0, 50000.0),
    ("geopotential_500", "m2 s-2", 50000.0, 50000.0),
    ("geopotential_500", "m^2/s^2", 50000.0, 50000.0),
    ("geopotential_500", "m2/s2", 50000.0, 50000.0),
    ("geopotential_500", "gpm", 5000.0, 5000.0 * 9.80665),
    ("geopotential_500", "m", 5000.0, 5000.0 * 9.80665),
    ("orography", "m**2 s**-2", 9806.65, 1000.0),
    ("orography", "m", 1000.0, 1000.0),
    ("temperature_850", "K", 280.0, 280.0),
    ("2m_temperature", "degC", 10.0, 283.15),
    ("2m_temperature", "Celsius", -273.15, 0.0),
    ("10m_u_component_of_wind", "m s**-1", 3.0, 3.0),
    ("u_component_of_wind_500", "m/s", 3.0, 3.0),
    ("v_component_of_wind_500", "m s-1", 3.0, 3.0),
    ("mean_sea_level_pressure", "hPa", 1013.25, 101325.0),
    ("surface_pressure", "Pa", 101325.0, 101325.0),
    ("land_sea_mask", "%", 50.0, 0.5),
    ("land_sea_mask", "(0 - 1)", 0.5, 0.5),
    ("land_sea_mask", "1", 0.5, 0.5),
    ("total_cloud_cover", "%", 80.0, 0.8),
    ("specific_humidity_850", "kg kg**-1", 0.01, 0.01),
    ("specific_humidity_850", "kg/kg", 0.01, 0.01),
    ("specific_humidity_850", "1", 0.01, 0.01),
    ("specific_humidity_850", "g kg-1", 10.0, 0.01),
    ("relative_humidity_850", "%", 70.0, 70.0),
    ("total_precipitation", "m", 0.002, 0.002),
    ("total_precipitation", "kg m**-2", 2.0, 0.002),
    ("toa_incident_solar_radiation", "J m**-2", 1e6, 1e6),
    ("vertical_velocity_500", "Pa s**-1", 0.1, 0.1),
])
def test_to_canonical_converts(name, units, value, expected):
    da = xr.DataArray(np.full((2, 3), value), dims=("lat", "lon"), name="x", attrs={"units": units})
    out = U.to_canonical(da, name, "in.nc")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.values, expected, rtol=1e-6)
    assert out.attrs["units"] == V.parse_variable(name).units
    assert out.attrs["source_units"] == units


@pytest.mark.parametrize("name,units", [
    ("2m_temperature", "degF"),
    ("geopotential_500", "km"),
    ("relative_humidity_500", "1"),  # % <-> fraction only for land-sea mask and cloud cover
    ("total_precipitation", "kg m-2 s-1"),  # a rate: needs the accumulation period
    ("toa_incident_solar_radiation", "W m**-2"),
    ("surface_pressure", "K"),
    ("temperature_850", None),
])
def test_to_canonical_refuses(name, units):
    attrs = {"units": units} if units else {}
    da = xr.DataArray(np.ones((2, 3)), dims=("lat", "lon"), name="tas", attrs=attrs)
    with pytest.raises(U.UnitsError) as e:
        U.to_canonical(da, name, "/data/file.nc")
    msg = str(e.value)
    assert "/data/file.nc" in msg and "'tas'" in msg and name in msg
    assert repr(units) in msg and V.parse_variable(name).units in msg


def test_to_canonical_grib_units_and_dim_order():
    da = xr.DataArray(np.arange(24.0).reshape(2, 3, 4), dims=("lon", "time", "lat"), name="gh",
                      attrs={"GRIB_units": "gpm"})
    out = U.to_canonical(da, "geopotential_500", "x.grib")
    assert out.dims == ("time", "lat", "lon")
    np.testing.assert_allclose(out.values, da.transpose("time", "lat", "lon").values * V.G, rtol=1e-6)


def test_to_canonical_stays_lazy_on_backend_arrays(tmp_path):
    path = tmp_path / "t.nc"
    xr.Dataset({"t2m": (("time", "lat", "lon"), np.arange(60.0).reshape(5, 3, 4), {"units": "degC"})},
               coords={"time": np.arange(5), "lat": [0.0, 1.0, 2.0], "lon": [0.0, 1, 2, 3]}
               ).to_netcdf(path, engine="h5netcdf")
    with xr.open_dataset(path, engine="h5netcdf", cache=False) as ds:
        out = U.to_canonical(ds.t2m, "2m_temperature", str(path))
        assert not isinstance(out.variable._data, np.ndarray)  # nothing read yet
        part = out.isel(time=slice(1, 3), lon=[3, 0])
        np.testing.assert_allclose(part.values, ds.t2m.values[1:3][:, :, [3, 0]] + 273.15, rtol=1e-6)
        assert part.dtype == np.float32
