"""Scores against WeatherBench 2's own formulas, re-implemented here in numpy from
google-research/weatherbench2 ``weatherbench2/metrics.py`` (``_latitude_cell_bounds``,
``_cell_area_from_latitude``, ``get_lat_weights``, ``_spatial_average``, ``MSE``, ``Bias``,
``RMSESqrtBeforeTimeAvg``) and ``scripts/evaluate.py`` (``predefined_regions``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from climax.evaluation import evaluate_model
from climax.wb2 import WB2_REGIONS, ScoreSums, accumulate, area_weights, region_mask, region_weight_matrix
from tests.test_evaluation import IN, LAT, LON, OUT, MemoryDataset


# ---------------------------------------------------------------- WB2's formulas, independently
def wb2_lat_weights(lat_deg):
    """metrics.get_lat_weights on increasing latitude: cell areas from _latitude_cell_bounds."""
    x = np.deg2rad(np.asarray(lat_deg, dtype=np.float64))
    bounds = np.concatenate([[-np.pi / 2], (x[:-1] + x[1:]) / 2, [np.pi / 2]])
    w = np.sin(bounds[1:]) - np.sin(bounds[:-1])
    return w / np.mean(w)


def wb2_spatial_average(field, lat, lon, lat_slices=(slice(None, None),), lon_slices=(slice(None, None),)):
    """metrics._spatial_average with a SliceRegion: select the points (label slices, inclusive) and
    take the weighted mean with the full grid's latitude weights (xarray's weighted().mean())."""
    w = wb2_lat_weights(lat)

    def sel(values, slices):
        keep = np.zeros(len(values), dtype=bool)
        for s in slices:
            lo = -np.inf if s.start is None else s.start
            hi = np.inf if s.stop is None else s.stop
            keep |= (values >= lo) & (values <= hi)
        return np.flatnonzero(keep)

    rows, cols = sel(lat, lat_slices), sel(lon, lon_slices)
    sub = field[..., rows[:, None], cols[None, :]]
    ww = np.broadcast_to(w[rows][:, None], sub.shape[-2:])
    return (sub * ww).sum(axis=(-2, -1)) / ww.sum()


def wb2_rmse(fc, truth, lat, lon, **region):
    """sqrt of MSE().compute() (mean over time of the spatial MSE): WB2's headline RMSE."""
    return np.sqrt(wb2_spatial_average((fc - truth) ** 2, lat, lon, **region).mean(axis=0))


def wb2_rmse_sqrt_before_time_avg(fc, truth, lat, lon, **region):
    return np.sqrt(wb2_spatial_average((fc - truth) ** 2, lat, lon, **region)).mean(axis=0)


def wb2_bias(fc, truth, lat, lon, **region):
    return wb2_spatial_average(fc - truth, lat, lon, **region).mean(axis=0)


# ---------------------------------------------------------------- the tests
def _cases(seed=0, n=12, v=2):
    """Forecasts whose error size changes a lot from sample to sample."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(n, v, len(LAT), len(LON))) * 5 + 280
    scale = np.exp(rng.normal(size=(n, 1, 1, 1)) * 0.8)
    fc = truth + scale * rng.normal(size=truth.shape) + 0.3
    return fc, truth


def test_area_weights_are_wb2s_and_equal_cos_on_offset_grids():
    lat = np.linspace(-90, 90, 33)  # WB2's 64x33 grid with pole rows
    np.testing.assert_allclose(area_weights(lat), wb2_lat_weights(lat), rtol=1e-12)
    np.testing.assert_allclose(area_weights(lat[::-1]), wb2_lat_weights(lat)[::-1], rtol=1e-12)
    offset = np.linspace(-87.1875, 87.1875, 32)  # ClimaX's 5.625 deg grid: cell areas are cos(lat)
    cos = np.cos(np.deg2rad(offset))
    np.testing.assert_allclose(area_weights(offset), cos / cos.mean(), rtol=1e-12)


@pytest.mark.parametrize("name,lat_slices,lon_slices", [
    ("global", [slice(None, None)], [slice(None, None)]),
    ("tropics", [slice(-20, 20)], [slice(None, None)]),
    ("extra-tropics", [slice(None, -20), slice(20, None)], [slice(None, None)]),
    ("europe", [slice(35, 75)], [slice(360 - 12.5, None), slice(0, 42.5)]),
    ("north-america", [slice(25, 60)], [slice(360 - 120, 360 - 75)]),
])
def test_scores_match_wb2_formulas_per_region(name, lat_slices, lon_slices):
    lat = np.linspace(-88.59375, 88.59375, 64)  # 2.8125 deg, fine enough for every box
    lon = np.arange(128) * 2.8125
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(10, 2, 64, 128)) + 280
    scale = np.exp(rng.normal(size=(10, 1, 1, 1)))
    fc = truth + scale * rng.normal(size=truth.shape) + 0.2
    clim = truth.mean(0, keepdims=True).repeat(10, 0)
    mask = region_mask(name, lat, lon)
    area = torch.as_tensor(region_weight_matrix(area_weights(lat), [mask]))
    cos = torch.as_tensor(region_weight_matrix(np.cos(np.deg2rad(lat)), [mask]))
    sums = ScoreSums.zeros(2, 1)
    t = lambda a: torch.as_tensor(a)  # noqa: E731
    accumulate(sums, t(fc[:4]), t(truth[:4]), t(clim[:4]), area, cos)  # two partial passes ...
    rest = ScoreSums.zeros(2, 1)
    accumulate(rest, t(fc[4:]), t(truth[4:]), t(clim[4:]), area, cos)
    s = sums.merge(rest).scores()  # ... merged: exactly one pass
    region = dict(lat_slices=lat_slices, lon_slices=lon_slices)
    np.testing.assert_allclose(s["rmse"][:, 0], wb2_rmse(fc, truth, lat, lon, **region), rtol=1e-6)
    np.testing.assert_allclose(s["rmse_sample_mean"][:, 0],
                               wb2_rmse_sqrt_before_time_avg(fc, truth, lat, lon, **region), rtol=1e-6)
    np.testing.assert_allclose(s["bias"][:, 0], wb2_bias(fc, truth, lat, lon, **region), rtol=1e-6, atol=1e-9)
    assert (s["rmse"] >= s["rmse_sample_mean"]).all()


def test_region_boxes_are_wb2s():
    assert list(WB2_REGIONS)[:7] == ["global", "tropics", "extra-tropics", "northern-hemisphere",
                                     "southern-hemisphere", "europe", "north-america"]
    lat = np.array([-60.0, -20.0, -19.9, 0.0, 20.0, 35.0, 75.0, 75.1])
    lon = np.array([0.0, 42.5, 42.6, 240.0, 285.0, 347.4, 347.5, 359.9])
    eu = region_mask("europe", lat, lon)
    assert eu[:, 0].tolist() == [False] * 5 + [True, True, False]
    assert eu[5].tolist() == [True, True, False, False, False, False, True, True]
    na = region_mask("north-america", lat, lon)
    assert na[5].tolist() == [False, False, False, True, True, False, False, False]
    assert region_mask("tropics", lat, lon)[:, 0].tolist() == [False, True, True, True, True, False, False, False]
    xt = region_mask("extra-tropics", lat, lon)[:, 0]
    assert xt.tolist() == [True, True, False, False, True, True, True, True]
    # longitudes -180..180 are the same points as 0..360
    np.testing.assert_array_equal(region_mask("europe", lat, lon - 360), eu)
    with pytest.raises(ValueError, match="unknown region 'mars'"):
        region_mask("mars", lat, lon)


def test_evaluate_model_rmse_is_wb2s_and_at_least_the_sample_mean():
    mem = MemoryDataset(seed=3)
    fc_scale = {}

    def forecast(r):
        truth = mem.read(r.split, r.valid_index, r.out_vars).astype(np.float64)
        rng = np.random.default_rng(int(r.init_index[0]))
        scale = np.exp(rng.normal(size=(len(truth), 1, 1, 1)))
        fc_scale[int(r.init_index[0])] = scale
        return truth + scale * rng.normal(size=truth.shape) + 0.5

    df = evaluate_model(None, mem, "test", IN, OUT, [6], forecast_fn=forecast, batch_size=1, baselines=False,
                        progress=False)
    assert set(df.region) == {"global", "tropics", "extra-tropics", "northern-hemisphere",
                              "southern-hemisphere", "arctic", "antarctic", "europe", "north-america",
                              "north-atlantic", "north-pacific", "east-asia", "ausnz"} - set(
        n for n in WB2_REGIONS if not region_mask(n, LAT, LON).any())
    assert (df.rmse >= df.rmse_sample_mean).all()
    # recompute the same forecasts and score them with WB2's formulas
    from climax.evaluation import evaluation_inits

    inits = evaluation_inits(mem.times, [6])
    fc = np.concatenate([forecast(type("R", (), dict(split="test", valid_index=np.array([i + 1]), out_vars=OUT,
                                                     init_index=np.array([i])))) for i in inits])
    truth = mem.read("test", inits + 1, OUT).astype(np.float64)
    g = df[df.region == "global"]
    np.testing.assert_allclose(g.rmse, wb2_rmse(fc, truth, LAT, LON), rtol=1e-6)
    np.testing.assert_allclose(g.rmse_sample_mean, wb2_rmse_sqrt_before_time_avg(fc, truth, LAT, LON), rtol=1e-6)
    np.testing.assert_allclose(g.bias, wb2_bias(fc, truth, LAT, LON), rtol=1e-6)
    assert (g.rmse > g.rmse_sample_mean * 1.01).all()  # errors vary between samples: the conventions differ
    t = df[df.region == "tropics"]
    np.testing.assert_allclose(t.rmse, wb2_rmse(fc, truth, LAT, LON, lat_slices=[slice(-20, 20)]), rtol=1e-6)
