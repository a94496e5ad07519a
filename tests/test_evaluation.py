"""Evaluation and forecasts: known forecasts score as they must; CF NetCDF round trip; the jobs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from climax.evaluation import (
    evaluate_model,
    evaluation_inits,
    forecast_dataset,
    forecast_fields,
    write_netcdf,
)
from climax.metrics import lat_weighted_acc, lat_weighted_rmse
from climax.regions import Region
from climax.sampling import TimeAxis
from tests.helpers import tiny_model

H, W = 8, 16
LAT = np.linspace(-78.75, 78.75, H)
LON = np.arange(W) * 22.5
UNITS = {"2m_temperature": "K", "geopotential_500": "m**2 s**-2", "land_sea_mask": "(0 - 1)"}


class _Manifest:
    def __init__(self, raw):
        self.raw = raw


class MemoryDataset:
    """ShardDataset's interface on in-memory fields: truth = climatology(t) + weather."""

    def __init__(self, steps=40, step_hours=6, seed=0):
        rng = np.random.default_rng(seed)
        self.lat, self.lon, self.step_hours = LAT, LON, step_hours
        self.variables = ["2m_temperature", "geopotential_500"]
        self.constants = ["land_sea_mask"]
        self.times = np.datetime64("2017-01-01T00", "ns") + np.arange(steps) * np.timedelta64(step_hours, "h")
        clim = self.climatology(self.variables, self.times)
        weather = np.cumsum(rng.normal(size=clim.shape), axis=0).astype(np.float32)  # persistent anomalies
        self.fields = clim + weather * np.array([1.0, 50.0], dtype=np.float32)[None, :, None, None]
        self.lsm = (rng.random((H, W)) > 0.6).astype(np.float32)
        self.manifest = _Manifest({"splits": {"test": {}, "val": {}},
                                   "variables": {v: {"units": u, "constant": v in self.constants}
                                                 for v, u in UNITS.items()}})

    def axis(self, split):
        n = len(self.times)
        return TimeAxis(self.times, np.zeros(n, dtype=int), np.arange(n))

    def read(self, split, idx, variables):
        idx = np.asarray(idx)
        out = [np.broadcast_to(self.lsm, (len(idx), H, W)) if v == "land_sea_mask"
               else self.fields[idx, self.variables.index(v)] for v in variables]
        return np.stack(out, axis=1).astype(np.float32)

    def normalizer(self, variables):
        stats = {"2m_temperature": (280.0, 10.0), "geopotential_500": (55000.0, 3000.0), "land_sea_mask": (0.3, 0.45)}
        return (np.array([stats[v][0] for v in variables], dtype=np.float32),
                np.array([stats[v][1] for v in variables], dtype=np.float32))

    def climatology(self, variables, times):
        t = np.asarray(times, dtype="datetime64[ns]")
        doy = (t - t.astype("datetime64[Y]")).astype("timedelta64[h]").astype(float) / 24
        base = {"2m_temperature": (280.0, 15.0), "geopotential_500": (55000.0, 2000.0)}
        out = []
        for v in variables:
            mean, amp = base[v]
            wave = np.cos(np.deg2rad(LAT))[:, None] * np.sin(np.deg2rad(LON) + doy[:, None, None] / 5)
            out.append(mean + amp * wave)
        return np.stack(out, axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def mem():
    return MemoryDataset()


OUT = ["2m_temperature", "geopotential_500"]
IN = ["land_sea_mask", *OUT]


def _truth_fn(ds):
    return lambda r: ds.read(r.split, r.valid_index, r.out_vars)


def _clim_fn(ds):
    return lambda r: ds.climatology(r.out_vars, r.valid_time)


# ---------------------------------------------------------------------------------- acceptance
def test_truth_scores_rmse_0_acc_1_and_climatology_acc_0(mem):
    """The acceptance test: evaluation of known forecasts."""
    leads = [6, 12, 36]
    truth = evaluate_model(None, mem, "test", IN, OUT, leads, forecast_fn=_truth_fn(mem), batch_size=7,
                           progress=False, regions=["global"])
    direct = truth[truth.method == "direct"]
    assert len(direct) == len(OUT) * len(leads)
    np.testing.assert_array_equal(direct.rmse, 0.0)
    np.testing.assert_array_equal(direct.rmse_sample_mean, 0.0)
    np.testing.assert_array_equal(direct.bias, 0.0)
    np.testing.assert_allclose(direct.acc, 1.0, rtol=0, atol=1e-9)

    clim = evaluate_model(None, mem, "test", IN, OUT, leads, forecast_fn=_clim_fn(mem), progress=False)
    direct = clim[clim.method == "direct"]
    np.testing.assert_array_equal(direct.acc, 0.0)
    assert np.isfinite(direct.rmse).all() and (direct.rmse > 0).all()
    # the climatology baseline is the same forecast, so it scores the same
    base = clim[clim.method == "climatology"].reset_index(drop=True)
    pd.testing.assert_frame_equal(base.drop(columns="method"), direct.reset_index(drop=True).drop(columns="method"))


def test_table_layout_units_samples_and_baselines_by_hand(mem):
    leads = [6, 24]
    df = evaluate_model(None, mem, "test", IN, OUT, leads, forecast_fn=_truth_fn(mem), batch_size=5,
                        progress=False, regions=["global"])
    assert list(df.columns) == ["variable", "lead_hours", "method", "region", "rmse", "rmse_sample_mean", "bias",
                                "acc", "units", "samples"]
    assert set(df.method) == {"direct", "persistence", "climatology"}
    inits = evaluation_inits(mem.times, leads)
    assert len(inits) == len(mem.times) - 4 and (df.samples == len(inits)).all()
    assert dict(zip(df.variable, df.units)) == {v: UNITS[v] for v in OUT}
    # persistence at 24 h by hand, in physical units, float64
    lat = torch.as_tensor(LAT)
    x = torch.from_numpy(mem.read("test", inits, OUT)).double()
    y = torch.from_numpy(mem.read("test", inits + 4, OUT)).double()
    c = torch.from_numpy(mem.climatology(OUT, mem.times[inits + 4])).double()
    row = df[(df.method == "persistence") & (df.lead_hours == 24)]
    # 1e-7: lat_weighted_rmse divides by H*W assuming float32 weights of mean exactly 1; the
    # evaluation divides by their sum (the mergeable form)
    np.testing.assert_allclose(row.rmse_sample_mean, lat_weighted_rmse(x, y, lat).numpy(), rtol=1e-7)
    np.testing.assert_allclose(row.acc, lat_weighted_acc(x, y, c, lat).numpy(), rtol=1e-9)
    assert (row.rmse >= row.rmse_sample_mean).all()
    assert (row.acc > 0.3).all()  # anomalies persist in this data
    np.testing.assert_array_equal(df[df.method == "climatology"].acc, 0.0)


def test_max_samples_spreads_over_the_split(mem):
    rows = evaluation_inits(mem.times, [12], max_samples=5)
    assert len(rows) == 5 and rows[0] == 0 and rows[-1] == len(mem.times) - 3
    df = evaluate_model(None, mem, "test", IN, OUT, [12], forecast_fn=_truth_fn(mem), max_samples=5,
                        progress=False)
    assert (df.samples == 5).all()
    assert df.attrs["init_times"][0] == str(mem.times[0])


def test_region_crops_fields_latitudes_and_climatology(mem):
    region = Region.from_box(LAT, LON, 0, 80, 300, 60, patch_size=2, name="wrap")
    assert region.cols[0] > region.cols[-1]  # crosses 0 deg
    df = evaluate_model(None, mem, "test", IN, OUT, [12], forecast_fn=lambda r: region.crop(
        mem.read(r.split, r.init_index, r.out_vars)), region=region, baselines=False, progress=False)
    inits = evaluation_inits(mem.times, [12])
    lat = torch.as_tensor(region.lat(LAT))
    x = torch.from_numpy(region.crop(mem.read("test", inits, OUT))).double()
    y = torch.from_numpy(region.crop(mem.read("test", inits + 2, OUT))).double()
    c = torch.from_numpy(region.crop(mem.climatology(OUT, mem.times[inits + 2]))).double()
    assert set(df.region) == {"wrap"}  # a model's box replaces WB2's regions
    np.testing.assert_allclose(df.rmse_sample_mean, lat_weighted_rmse(x, y, lat).numpy(), rtol=1e-7)
    np.testing.assert_allclose(df.acc, lat_weighted_acc(x, y, c, lat).numpy(), rtol=1e-9)


# ---------------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model(IN, img_size=(H, W), patch_size=2, embed_dim=32, depth=1, num_heads=2).eval()


def _denorm(ds, pred, variables):
    mean, std = ds.normalizer(variables)
    return pred * torch.from_numpy(std).reshape(1, -1, 1, 1) + torch.from_numpy(mean).reshape(1, -1, 1, 1)


def test_direct_and_rollout_match_the_model_by_hand(mem, model):
    leads = [6, 12, 18]
    df = evaluate_model(model, mem, "test", IN, OUT, leads, rollout_step=6, batch_size=4, device="cpu",
                        max_samples=9, progress=False, regions=["global"])
    assert set(df.method) == {"direct", "rollout", "persistence", "climatology"}
    inits = evaluation_inits(mem.times, leads, 9)
    mean, std = (torch.from_numpy(a).reshape(1, -1, 1, 1) for a in mem.normalizer(IN))
    x = (torch.from_numpy(mem.read("test", inits, IN)) - mean) / std
    lat = torch.as_tensor(LAT)
    with torch.no_grad():
        state = x.clone()
        for k in (1, 2, 3):
            pred = model(state, torch.full((len(x),), 6.0), IN, OUT)
            state[:, 1:] = pred  # constants stay, outputs fed back
            y = torch.from_numpy(mem.read("test", inits + k, OUT)).double()
            row = df[(df.method == "rollout") & (df.lead_hours == 6 * k)]
            np.testing.assert_allclose(row.rmse_sample_mean,
                                       lat_weighted_rmse(_denorm(mem, pred, OUT).double(), y, lat), rtol=1e-4)
            direct = model(x, torch.full((len(x),), 6.0 * k), IN, OUT)
            row = df[(df.method == "direct") & (df.lead_hours == 6 * k)]
            np.testing.assert_allclose(row.rmse_sample_mean,
                                       lat_weighted_rmse(_denorm(mem, direct, OUT).double(), y, lat), rtol=1e-4)
    one = df[df.lead_hours == 6].set_index(["method", "variable"])
    np.testing.assert_allclose(one.loc["direct"].rmse, one.loc["rollout"].rmse, rtol=1e-6)
    assert model.training is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scores_like_cpu(mem, model):
    kw = dict(rollout_step=6, batch_size=4, max_samples=8, progress=False)
    cpu = evaluate_model(model, mem, "test", IN, OUT, [6, 12], device="cpu", **kw)
    gpu = evaluate_model(model, mem, "test", IN, OUT, [6, 12], device="cuda", **kw)
    np.testing.assert_allclose(gpu.rmse, cpu.rmse, rtol=1e-3)
    np.testing.assert_allclose(gpu.acc, cpu.acc, rtol=1e-3, atol=1e-4)
    model.to("cpu")


def test_model_keeps_its_training_mode(mem, model):
    model.train()
    try:
        evaluate_model(model, mem, "test", IN, OUT, [6], batch_size=8, max_samples=3, progress=False)
        assert model.training
    finally:
        model.eval()


def test_rollout_skipped_when_an_input_is_not_an_output(mem, model, caplog):
    df = evaluate_model(model, mem, "test", IN, ["2m_temperature"], [6, 12], rollout_step=6, max_samples=3,
                        progress=False)
    assert "rollout" not in set(df.method)
    assert any("geopotential_500" in n and "rollout skipped" in n for n in df.attrs["notes"])
    assert "rollout skipped" in caplog.text


def test_forecast_fields_direct_and_rollout(mem, model):
    rows = np.array([0, 3, 7])
    direct = forecast_fields(model, mem, "test", rows, [6, 12], IN, OUT, batch_size=2, progress=False)
    roll = forecast_fields(model, mem, "test", rows, [6, 12], IN, OUT, rollout_step=6, batch_size=2, progress=False)
    assert direct.shape == roll.shape == (3, 2, 2, H, W) and direct.dtype == np.float32
    np.testing.assert_allclose(direct[:, 0], roll[:, 0], rtol=1e-6)
    mean, std = (torch.from_numpy(a).reshape(1, -1, 1, 1) for a in mem.normalizer(IN))
    x = (torch.from_numpy(mem.read("test", rows, IN)) - mean) / std
    with torch.no_grad():
        expect = _denorm(mem, model(x, torch.full((3,), 12.0), IN, OUT), OUT).numpy()
        x2 = x.clone()
        x2[:, 1:] = model(x, torch.full((3,), 6.0), IN, OUT)
        expect_roll = _denorm(mem, model(x2, torch.full((3,), 6.0), IN, OUT), OUT).numpy()
    np.testing.assert_allclose(direct[:, 1], expect, rtol=1e-6)
    np.testing.assert_allclose(roll[:, 1], expect_roll, rtol=1e-6)
    assert np.abs(direct[:, 1] - roll[:, 1]).max() > 1e-3


@pytest.mark.parametrize("kwargs, message", [
    (dict(split="train"), "no split 'train'"),
    (dict(in_vars=["relative_humidity_850", *IN]), "not in the dataset"),
    (dict(out_vars=["land_sea_mask"]), "constants"),
    (dict(leads=[9]), "multiples of the dataset's 6 h"),
    (dict(leads=[6, 600]), "use shorter lead times"),
    (dict(rollout_step=5), "rollout_step"),
])
def test_errors_say_what_to_do(mem, model, kwargs, message):
    args = dict(split="test", in_vars=IN, out_vars=OUT, leads=[6]) | kwargs
    with pytest.raises(ValueError, match=message):
        evaluate_model(model, mem, args.pop("split"), args.pop("in_vars"), args.pop("out_vars"), args.pop("leads"),
                       progress=False, **args)


def test_model_unknown_variable_and_wrong_grid(mem):
    small = tiny_model(["2m_temperature", "geopotential_500"], img_size=(H, W), embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="does not know variable"):
        evaluate_model(small, mem, "test", IN, OUT, [6], progress=False)
    other = tiny_model(IN, img_size=(4, 8), embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="model's grid"):
        evaluate_model(other, mem, "test", IN, OUT, [6], progress=False)


# ---------------------------------------------------------------------------------- NetCDF
def test_cf_netcdf_round_trip(tmp_path):
    import xarray as xr

    rng = np.random.default_rng(1)
    fields = rng.normal(size=(2, 3, 2, H, W)).astype(np.float32) + 280
    init = np.array(["2017-01-01T00", "2017-01-01T12"], dtype="datetime64[ns]")
    ds = forecast_dataset(fields, init, [6, 12, 120], OUT, LAT, LON, UNITS,
                          attrs={"source": "ClimaX test", "history": "test"})
    path = write_netcdf(ds, tmp_path / "fc.nc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fc.nc"]  # no temporary left behind
    with xr.open_dataset(path) as back:
        assert back.attrs["Conventions"] == "CF-1.8" and back.attrs["source"] == "ClimaX test"
        assert back["geopotential_500"].dims == ("init_time", "lead_time", "lat", "lon")
        np.testing.assert_array_equal(back["2m_temperature"].values, fields[:, :, 0])
        np.testing.assert_array_equal(back["geopotential_500"].values, fields[:, :, 1])
        np.testing.assert_array_equal(back.init_time.values, init)
        np.testing.assert_array_equal(back.lead_time.values, np.array([6, 12, 120], dtype="timedelta64[h]"))
        np.testing.assert_array_equal(back.valid_time.values[1, 2], np.datetime64("2017-01-06T12", "ns"))
        np.testing.assert_array_equal(back.lat.values, LAT)
        assert back["geopotential_500"].attrs["units"] == "m2 s-2"
        assert back.lat.attrs == {"standard_name": "latitude", "long_name": "latitude",
                                  "units": "degrees_north", "axis": "Y"}
        assert back.lon.attrs["units"] == "degrees_east" and back.lon.attrs["axis"] == "X"
        assert back.init_time.attrs["standard_name"] == "forecast_reference_time"
        assert back.lead_time.attrs["standard_name"] == "forecast_period"
        assert back.valid_time.attrs["standard_name"] == "time"
    with xr.open_dataset(path, decode_times=False, decode_timedelta=False) as raw:
        assert raw.lead_time.attrs["units"] == "hours"
        np.testing.assert_array_equal(raw.lead_time.values, [6, 12, 120])
        assert raw.init_time.attrs["units"].startswith("hours since 1970-01-01")
        assert "_FillValue" not in raw.lat.attrs


# ---------------------------------------------------------------------------------- plots
def test_plots_write_pngs(mem, tmp_path):
    from climax.plots import plot_maps, plot_metric_vs_lead

    df = evaluate_model(None, mem, "test", IN, OUT, [6, 12, 24], forecast_fn=_clim_fn(mem), progress=False)
    for metric in ("rmse", "acc"):
        path = plot_metric_vs_lead(df, metric, tmp_path / f"{metric}.png", title="test")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    truth = mem.read("test", [4], OUT)[0, 0]
    path = plot_maps(truth + 1, truth, LAT, LON, tmp_path / "maps.png", "2m_temperature", "K")
    assert path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="differ"):
        plot_maps(truth[:2], truth, LAT, LON, tmp_path / "bad.png", "2m_temperature")


# ---------------------------------------------------------------------------------- on real shards
SHARD_VARS = ["land_sea_mask", "orography", "latitude", "2m_temperature", "geopotential_500", "temperature_850"]
SHARD_OUT = ["2m_temperature", "geopotential_500", "temperature_850"]


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory):
    """Two generated years (2015 train, 2016 test), 6-hourly at 11.25 deg, through jobs.preprocess."""
    pytest.importorskip("climax.data")
    import yaml

    from jobs import preprocess
    from pipelines.sample_data import generate

    root = tmp_path_factory.mktemp("eval_data")
    generate(root / "sample", years=(2015, 2016), resolution=11.25, step_hours=6, formats=("weatherbench",),
             variables=["land_sea_mask", "orography", *SHARD_OUT], progress=False)
    recipe = {"sources": [{"path": str(root / "sample" / "weatherbench")}], "variables": SHARD_VARS,
              "grid": {"resolution": 11.25, "method": "bilinear"},
              "time": {"start": "2015-01-01", "end": "2016-12-31T18:00", "step": "6h"},
              "splits": {"train": [2015, 2015], "test": [2016, 2016]}, "output": str(root / "shards")}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    preprocess.main([str(root / "recipe.yaml")])
    return root / "shards"


@pytest.fixture(scope="module")
def dataset(shards):
    from climax.data import ShardDataset

    return ShardDataset(str(shards))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from climax import save_checkpoint

    torch.manual_seed(0)
    model = tiny_model(SHARD_VARS, img_size=(16, 32), patch_size=2, embed_dim=32, depth=1, num_heads=2)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_000001"
    save_checkpoint(model, path / "model.pt", in_vars=SHARD_VARS, out_vars=SHARD_OUT)
    return path


def test_known_forecasts_on_the_pipeline_climatology(dataset):
    """The acceptance test again, on real shards and the pipeline's day-of-year x hour climatology."""
    leads = [6, 24]
    truth = evaluate_model(None, dataset, "test", SHARD_VARS, SHARD_OUT, leads, forecast_fn=lambda r: dataset.read(
        r.split, r.valid_index, r.out_vars), max_samples=20, progress=False)
    direct = truth[truth.method == "direct"]
    np.testing.assert_array_equal(direct.rmse, 0.0)
    np.testing.assert_allclose(direct.acc, 1.0, atol=1e-9)
    clim = evaluate_model(None, dataset, "test", SHARD_VARS, SHARD_OUT, leads,
                          forecast_fn=lambda r: dataset.climatology(r.out_vars, r.valid_time), max_samples=20,
                          progress=False)
    direct = clim[clim.method == "direct"]
    np.testing.assert_array_equal(direct.acc, 0.0)
    assert (direct.rmse > 0).all() and np.isfinite(direct.rmse).all()
    assert dict(zip(direct.variable, direct.units)) == {"2m_temperature": "K", "geopotential_500": "m**2 s**-2",
                                                         "temperature_850": "K"}


def _write_yaml(path, doc):
    import yaml

    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_evaluate_job_writes_tables_and_plots(shards, dataset, checkpoint, tmp_path, capsys):
    import json

    from climax import load_model
    from jobs import evaluate

    out = tmp_path / "eval"
    cfg = _write_yaml(tmp_path / "evaluate.yaml", {"checkpoint": str(checkpoint), "data": str(shards)})
    df = evaluate.main([cfg, "leads=[6,12,24]", "rollout_step=6", "max_samples=12", "batch_size=5",
                        f"output={out}", "device=cpu", "progress=false"])
    printed = capsys.readouterr().out
    assert "RMSE (WeatherBench 2) (global):" in printed and "RMSE_SAMPLE_MEAN (ClimaX paper) (global):" in printed
    assert "ACC (global):" in printed and "rollout" in printed and "24h" in printed
    names = {p.name for p in out.iterdir()}
    assert {"metrics.csv", "metrics.json", "rmse_vs_lead.png", "acc_vs_lead.png"} <= names
    assert {f"maps_{v}.png" for v in SHARD_OUT} <= names
    assert {"spectra.csv", *(f"spectra_{v}.png" for v in SHARD_OUT)} <= names and "spectra.csv" in printed
    spectra = pd.read_csv(out / "spectra.csv")
    assert len(spectra) == len(SHARD_OUT) * 3 * (32 // 2 + 1) and (spectra.truth > 0).all()
    assert set(spectra.lead_hours) == {6, 12, 24} and np.isfinite(spectra.forecast).all()
    csv = pd.read_csv(out / "metrics.csv")
    n_regions = len(df.attrs["regions"])
    assert set(csv.region) == set(df.attrs["regions"]) and "global" in set(csv.region)
    assert (csv.rmse >= csv.rmse_sample_mean * (1 - 1e-12)).all()
    assert len(csv) == 4 * 3 * len(SHARD_OUT) * n_regions
    assert set(csv.method) == {"direct", "rollout", "persistence", "climatology"}
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["samples"] == 12 and len(doc["metrics"]) == len(csv) and doc["out_vars"] == SHARD_OUT
    np.testing.assert_allclose(csv.rmse, df.rmse)
    # the job scores what the in-process function scores
    model, _ = load_model(checkpoint)
    again = evaluate_model(model, dataset, "test", SHARD_VARS, SHARD_OUT, [6, 12, 24], 6, batch_size=12,
                           device="cpu", max_samples=12, progress=False)
    np.testing.assert_allclose(again.rmse, df.rmse, rtol=1e-5)
    np.testing.assert_allclose(again.acc, df.acc, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(df[df.method == "climatology"].acc, 0.0)


def test_distributed_evaluation_equals_one_process(shards, checkpoint, tmp_path, capsys):
    """workers=2: the initial times split over Ray tasks, their partial sums merged: the same table to 1e-6."""
    from jobs import evaluate

    cfg = _write_yaml(tmp_path / "evaluate.yaml", {"checkpoint": str(checkpoint), "data": str(shards)})
    args = [cfg, "leads=[6,12]", "rollout_step=6", "max_samples=10", "batch_size=2", "device=cpu", "progress=false"]
    one = evaluate.main([*args, "spectra_leads=[]", f"output={tmp_path / 'one'}"])
    many = evaluate.main([*args, "workers=2", "spectra_band=[85, 89]", f"output={tmp_path / 'many'}"])
    assert "spectra skipped: no latitude row" in capsys.readouterr().out
    assert len(many) == len(one) and list(many.columns) == list(one.columns)
    for col in ("variable", "lead_hours", "method", "region", "samples"):
        assert many[col].tolist() == one[col].tolist()
    for col in ("rmse", "rmse_sample_mean", "bias", "acc"):
        np.testing.assert_allclose(many[col], one[col], rtol=1e-6, atol=1e-9)
    assert many.attrs["init_times"] == one.attrs["init_times"] and many["samples"].max() == 10
    assert not (tmp_path / "one" / "spectra.csv").exists() and not (tmp_path / "many" / "spectra.csv").exists()


def test_evaluate_job_on_a_region(shards, checkpoint, tmp_path, capsys):
    from jobs import evaluate

    cfg = _write_yaml(tmp_path / "evaluate.yaml", {"checkpoint": str(checkpoint), "data": str(shards)})
    df = evaluate.main([cfg, "leads=[12]", "rollout_step=null", "max_samples=4", "region=Europe",
                        f"output={tmp_path / 'eu'}", "progress=false", "out_vars=[2m_temperature]"])
    assert set(df.method) == {"direct", "persistence", "climatology"}
    assert list(df.variable.unique()) == ["2m_temperature"]
    assert (tmp_path / "eu" / "maps_2m_temperature.png").is_file()


def test_forecast_job_writes_cf_netcdf(shards, dataset, checkpoint, tmp_path):
    import xarray as xr

    from climax import load_model
    from jobs import forecast

    out = tmp_path / "fc" / "forecast.nc"
    cfg = _write_yaml(tmp_path / "forecast.yaml", {
        "checkpoint": str(checkpoint / "model.pt"), "data": str(shards),
        "init_times": ["2015-12-31T12:00", "2016-01-01T00:00", "2016-03-01T06:00"],
        "leads": [6, 12, 24], "rollout_step": 6, "output": str(out), "progress": False, "device": "cpu"})
    assert forecast.main([cfg]) == str(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["forecast.nc"]
    model, _ = load_model(checkpoint)
    axis = dataset.axis("test")
    row = int(np.searchsorted(axis.times, np.datetime64("2016-03-01T06:00", "ns")))
    expect = forecast_fields(model, dataset, "test", [row], [6, 12, 24], SHARD_VARS, SHARD_OUT, rollout_step=6,
                             device="cpu", progress=False)[0]
    with xr.open_dataset(out) as ds:
        assert ds.attrs["Conventions"] == "CF-1.8" and "jobs.forecast" in ds.attrs["history"]
        assert "source" in ds.attrs
        assert list(ds.data_vars) == SHARD_OUT
        assert ds["2m_temperature"].dims == ("init_time", "lead_time", "lat", "lon")
        assert ds["2m_temperature"].attrs["units"] == "K" and ds["geopotential_500"].attrs["units"] == "m2 s-2"
        np.testing.assert_array_equal(ds.init_time.values, np.array(
            ["2015-12-31T12:00", "2016-01-01T00:00", "2016-03-01T06:00"], dtype="datetime64[ns]"))
        np.testing.assert_array_equal(ds.lead_time.values, np.array([6, 12, 24], dtype="timedelta64[h]"))
        np.testing.assert_array_equal(ds.lat.values, dataset.lat)
        for j, v in enumerate(SHARD_OUT):
            np.testing.assert_allclose(ds[v].values[2], expect[:, j], rtol=1e-6)
        assert np.isfinite(ds["temperature_850"].values).all()

    # a range, direct, written again over the first file
    forecast.main([cfg, "init_times=null", "init_range={start: 2016-02-01, end: '2016-02-02T00:00', step: 12h}",
                   "rollout_step=null", "leads=[48]", "out_vars=[temperature_850]"])
    with xr.open_dataset(out) as ds:
        assert ds.sizes["init_time"] == 3 and ds.sizes["lead_time"] == 1 and list(ds.data_vars) == ["temperature_850"]


def test_forecast_job_writes_wb2_zarr(shards, dataset, checkpoint, tmp_path):
    """format=zarr: WeatherBench 2's layout; selected like WB2's evaluation, it holds the model's forecasts
    and scores against the truth as climax.wb2 does."""
    import xarray as xr

    from climax import load_model
    from climax.wb2 import ScoreSums, accumulate, area_weights, region_weight_matrix
    from jobs import forecast

    out = tmp_path / "fc.zarr"
    inits = ["2016-01-01T00:00", "2016-03-01T06:00"]
    cfg = _write_yaml(tmp_path / "forecast.yaml", {
        "checkpoint": str(checkpoint), "data": str(shards), "init_times": inits, "leads": [6, 12],
        "format": "zarr", "output": str(out), "progress": False, "device": "cpu"})
    assert forecast.main([cfg]) == str(out)
    model, _ = load_model(checkpoint)
    axis = dataset.axis("test")
    rows = np.searchsorted(axis.times, np.array(inits, dtype="datetime64[ns]"))
    expect = forecast_fields(model, dataset, "test", rows, [6, 12], SHARD_VARS, SHARD_OUT, device="cpu", progress=False)
    with xr.open_zarr(out) as ds:
        assert set(ds.data_vars) == {"2m_temperature", "geopotential", "temperature"}
        assert ds["level"].values.tolist() == [500, 850] and (np.diff(ds["latitude"].values) > 0).all()
        lead = np.timedelta64(12, "h")
        fc = ds["temperature"].sel(time=np.array(inits, dtype="datetime64[ns]"), prediction_timedelta=lead, level=850)
        np.testing.assert_allclose(fc.values, expect[:, 1, 2], rtol=1e-6)  # the dataset's latitudes ascend already
        truth = dataset.read("test", np.searchsorted(axis.times, axis.times[rows] + lead), ["temperature_850"])[:, 0]
        w = xr.DataArray(area_weights(ds["latitude"].values), dims="latitude")
        mse = ((fc.astype("float64") - truth.astype("float64")) ** 2).weighted(w).mean(["latitude", "longitude"])
        rmse = float(np.sqrt(mse.mean("time")))
    sums = ScoreSums.zeros(1, 1)
    area = torch.as_tensor(region_weight_matrix(area_weights(dataset.lat), [np.ones((16, 32), dtype=bool)]))
    t = torch.from_numpy(truth[:, None].astype(np.float64))
    accumulate(sums, torch.from_numpy(expect[:, 1, 2:3].astype(np.float64)), t, t, area, area)
    np.testing.assert_allclose(sums.scores()["rmse"][0, 0], rmse, rtol=1e-6)


def test_jobs_fail_with_one_line(shards, checkpoint, tmp_path, capsys):
    from climax import load_model, save_checkpoint
    from jobs import evaluate, forecast

    base = {"checkpoint": str(checkpoint), "data": str(shards)}
    cfg = _write_yaml(tmp_path / "e.yaml", base)
    with pytest.raises(SystemExit) as e:
        evaluate.main([cfg, "leadz=[6]"])
    assert e.value.code == 2 and "unknown key 'leadz'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--help"])
    assert e.value.code == 0 and "rollout_step" in capsys.readouterr().out

    def one_error(job, args, *needles):
        with pytest.raises(SystemExit) as e:
            job.main(args)
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert e.value.code == 1 and len(err) == 1, err
        for needle in needles:
            assert needle in err[0]

    one_error(evaluate, [cfg, f"checkpoint={tmp_path / 'nope'}", "progress=false"], "does not exist")
    one_error(evaluate, [cfg, "split=val", "progress=false"], "no split 'val'", "'train'")
    one_error(evaluate, [cfg, "leads=[60000]", "progress=false"], "shorter lead times")
    if not torch.cuda.is_available():
        one_error(evaluate, [cfg, "device=cuda", "progress=false"], "no CUDA GPU")
    # a checkpoint trained with a variable the dataset lacks
    model, _ = load_model(checkpoint)
    other = tiny_model([*SHARD_VARS, "relative_humidity_850"], img_size=(16, 32), embed_dim=32, depth=1, num_heads=2)
    save_checkpoint(other, tmp_path / "rh" / "model.pt", in_vars=[*SHARD_VARS, "relative_humidity_850"])
    one_error(evaluate, [cfg, f"checkpoint={tmp_path / 'rh'}", "progress=false"], "relative_humidity_850",
              "in_vars=")
    fcfg = _write_yaml(tmp_path / "f.yaml", {**base, "init_times": ["2030-01-01T00:00"], "progress": False})
    one_error(forecast, [fcfg], "2030-01-01", "not a time step")
    one_error(forecast, [fcfg, "init_times=['2016-01-01T00:00']", "rollout_step=6", "out_vars=[2m_temperature]"],
              "cannot roll out")
