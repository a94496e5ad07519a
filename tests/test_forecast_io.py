"""WeatherBench 2 forecast layout: xarray reads the Zarr store back, selects like WB2's evaluation, and a
metric computed from it independently (WB2's formulas, re-implemented here) equals ours."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from climax.forecast_io import FieldDataset, wb2_dataset, write_zarr
from climax.wb2 import ScoreSums, accumulate, area_weights, region_weight_matrix

H, W = 8, 16
LAT = np.linspace(78.75, -78.75, H)  # north first: the writer must sort it ascending, as WB2 requires
LON = np.arange(W) * 22.5
VARS = ["2m_temperature", "geopotential_500", "temperature_850", "temperature_500"]
UNITS = {"2m_temperature": "K", "geopotential_500": "m**2 s**-2", "temperature_850": "K", "temperature_500": "K"}
LEADS = [6.0, 12.0]


def _fields(seed=0):
    rng = np.random.default_rng(seed)
    base = np.array([280.0, 55000.0, 270.0, 250.0], dtype=np.float32)[None, None, :, None, None]
    scale = np.array([3.0, 300.0, 2.0, 2.0], dtype=np.float32)[None, None, :, None, None]
    return base + scale * rng.normal(size=(3, len(LEADS), len(VARS), H, W)).astype(np.float32)


INITS = np.array(["2017-01-01T00", "2017-01-01T12", "2017-01-02T00"], dtype="datetime64[ns]")


def _wb2_lat_weights(lat):
    """weatherbench2.metrics.get_lat_weights, re-implemented: cell areas from bounds between rows."""
    x = np.deg2rad(lat)
    bounds = np.concatenate([[-np.pi / 2], (x[:-1] + x[1:]) / 2, [np.pi / 2]])
    assert (np.diff(bounds) > 0).all()  # WB2 asserts increasing latitude
    w = np.sin(bounds[1:]) - np.sin(bounds[:-1])
    return w / w.mean()


def test_zarr_in_wb2_layout_scores_like_wb2(tmp_path):
    import xarray as xr

    fields = _fields()
    ds = wb2_dataset(fields, INITS, LEADS, VARS, LAT, LON, UNITS, {"source": "test"})
    path = write_zarr(ds, tmp_path / "forecast.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forecast.zarr"]  # no temporary left behind

    fc = xr.open_zarr(path, decode_timedelta=True)
    assert set(fc.data_vars) == {"2m_temperature", "geopotential", "temperature"}
    assert fc["temperature"].dims == ("time", "prediction_timedelta", "level", "latitude", "longitude")
    assert fc["2m_temperature"].dims == ("time", "prediction_timedelta", "latitude", "longitude")
    assert fc["level"].values.tolist() == [500, 850] and np.issubdtype(fc["level"].dtype, np.integer)
    assert np.issubdtype(fc["prediction_timedelta"].dtype, np.timedelta64)
    np.testing.assert_array_equal(fc["prediction_timedelta"].values, np.array([6, 12], dtype="timedelta64[h]"))
    np.testing.assert_array_equal(fc["time"].values, INITS)
    np.testing.assert_array_equal(fc["latitude"].values, LAT[::-1])
    assert fc["temperature"].attrs["units"] == "K" and fc.attrs["source"] == "test"
    # level merge: temperature_850 is temperature(level=850); geopotential has no 850 hPa field (NaN)
    np.testing.assert_array_equal(fc["temperature"].sel(level=850).values, fields[:, :, 2, ::-1])
    np.testing.assert_array_equal(fc["temperature"].sel(level=500).values, fields[:, :, 3, ::-1])
    assert np.isnan(fc["geopotential"].sel(level=850).values).all()

    # truth on valid times, in WB2's truth layout (time, latitude, longitude); select like WB2's
    # evaluation: one lead, time -> valid time = init + lead, then sel(time=valid) on the truth
    rng = np.random.default_rng(1)
    valid = np.unique((INITS[:, None] + np.array([6, 12], dtype="timedelta64[h]")[None, :]).ravel())
    truth_t850 = (270 + 2 * rng.normal(size=(len(valid), H, W))).astype(np.float32)
    truth = xr.Dataset({"temperature": (("time", "level", "latitude", "longitude"), truth_t850[:, None, ::-1])},
                       coords={"time": valid, "level": [850], "latitude": LAT[::-1], "longitude": LON})
    weights = xr.DataArray(_wb2_lat_weights(fc["latitude"].values), dims="latitude",
                           coords={"latitude": fc["latitude"]})
    lead = np.timedelta64(12, "h")
    f = fc["temperature"].sel(prediction_timedelta=lead, level=850)
    f = f.assign_coords(time=f["time"] + lead)  # WB2 by valid time
    t = truth["temperature"].sel(time=f["time"], level=850)
    # WB2's MSE per time
    mse = ((f.astype("float64") - t.astype("float64")) ** 2).weighted(weights).mean(["latitude", "longitude"])
    wb2_rmse = float(np.sqrt(mse.mean("time")))

    # ours: ScoreSums on the original (north-first) arrays
    rows = np.searchsorted(valid, INITS + lead)
    pred = torch.from_numpy(fields[:, 1, 2:3].astype(np.float64))
    tru = torch.from_numpy(truth_t850[rows][:, None].astype(np.float64))
    mask = [np.ones((H, W), dtype=bool)]
    area = torch.as_tensor(region_weight_matrix(area_weights(LAT), mask))
    sums = ScoreSums.zeros(1, 1)
    accumulate(sums, pred, tru, tru, area, area)
    np.testing.assert_allclose(sums.scores()["rmse"][0, 0], wb2_rmse, rtol=1e-10)


def test_zarr_rewrite_replaces_the_store(tmp_path):
    import xarray as xr

    target = tmp_path / "fc.zarr"
    write_zarr(wb2_dataset(_fields(0), INITS, LEADS, VARS, LAT, LON, UNITS), target)
    second = _fields(1)[:, :, :1]
    write_zarr(wb2_dataset(second, INITS, LEADS, VARS[:1], LAT, LON, UNITS), target)
    with xr.open_zarr(target) as ds:
        assert list(ds.data_vars) == ["2m_temperature"]
        np.testing.assert_array_equal(ds["2m_temperature"].values, second[:, :, 0, ::-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fc.zarr"]


def test_zarr_on_s3(tmp_path, moto_s3):
    import fsspec
    import xarray as xr

    fs = fsspec.filesystem("s3", **moto_s3)
    fs.mkdir("wb2-forecasts")
    fields = _fields()
    url = "s3://wb2-forecasts/run/forecast.zarr"
    assert write_zarr(wb2_dataset(fields, INITS, LEADS, VARS, LAT, LON, UNITS), url, moto_s3) == url
    with xr.open_zarr(url, storage_options=moto_s3) as ds:
        np.testing.assert_array_equal(ds["geopotential"].sel(level=500).values, fields[:, :, 1, ::-1])


def test_layout_refuses_bad_shapes():
    with pytest.raises(ValueError, match="expected"):
        wb2_dataset(_fields()[:, :1], INITS, LEADS, VARS, LAT, LON)


def test_field_dataset_interface():
    times = np.array(["2017-01-01T12", "2017-01-01T00"], dtype="datetime64[ns]")
    fields = np.arange(2 * 3 * H * W, dtype=np.float32).reshape(2, 3, H, W)
    ds = FieldDataset(fields, times, ["land_sea_mask", "2m_temperature", "temperature_850"], LAT, LON,
                      {"2m_temperature": (280.0, 10.0)}, constants=["land_sea_mask"])
    assert ds.variables == ["2m_temperature", "temperature_850"] and ds.constants == ["land_sea_mask"]
    np.testing.assert_array_equal(ds.axis("init").times, np.sort(times))  # sorted by time
    np.testing.assert_array_equal(ds.read("init", [0], ["temperature_850"])[0, 0], fields[1, 2])
    mean, std = ds.normalizer(["2m_temperature"])
    assert mean.tolist() == [280.0] and std.tolist() == [10.0]
    with pytest.raises(ValueError, match=r"no normalisation statistics for \['temperature_850'\].*ckpt_statistics"):
        ds.normalizer(["temperature_850"])
