"""Climate projection (ClimateBench): the layout reader, the metrics, the model, and the task end to end.

Generated ClimateBench-like data (``pipelines.sample_data.write_climatebench``: the real file layout
on a 16 x 32 grid, responses a known function of cumulative CO2 and aerosols plus noise) are
preprocessed by the pipeline (one build per scenario), a tiny ClimaX is finetuned on Ray Train from
a "pretrained" checkpoint with its blocks frozen, and the evaluation scores ssp245 2080-2100
against the linear baseline on global-mean forcings.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import ROOT

TINY = {"patch_size": 4, "embed_dim": 64, "depth": 2, "decoder_depth": 1, "num_heads": 4, "mlp_ratio": 2.0,
        "drop_path": 0.0, "drop_rate": 0.0}
TRAIN = ["historical", "hist-GHG", "hist-aer", "ssp126", "ssp370", "ssp585"]  # ClimateBench's training set
VARS = ["CO2", "CH4", "SO2", "BC", "tas", "diurnal_temperature_range", "pr", "pr90"]


def test_reader_gives_the_layout_as_contract_fields(tmp_path):
    import xarray as xr

    from pipelines.sample_data import write_climatebench
    from pipelines.sources import open_source

    files = write_climatebench(tmp_path, scenarios=["historical", "ssp126"], shape=(16, 32), hist_start=2000,
                               ssp_end=2030)
    raw_in, raw_out = xr.open_dataset(files["ssp126"][0]), xr.open_dataset(files["ssp126"][1])
    assert raw_in["CO2"].dims == ("time",) and raw_in["SO2"].dims == ("time", "latitude", "longitude")
    assert raw_out["tas"].dims == ("member", "time", "lat", "lon") and raw_out["pr"].attrs["units"] == "kg m-2 s-1"

    ds = open_source(str(files["ssp126"][0]))  # format auto: the inputs_/outputs_ pair is recognised
    assert sorted(ds.data_vars) == sorted(VARS)
    assert all(ds[v].dims == ("time", "lat", "lon") for v in VARS)
    years = ds["time"].values.astype("datetime64[Y]").astype(int) + 1970
    assert years[0] == 2000 and years[-1] == 2030 and len(years) == 31  # historical prepended
    assert (ds["time"].values.astype("datetime64[D]") == ds["time"].values.astype("datetime64[Y]")).all()
    # global CO2 broadcast over the grid; the ssp part equals the file's values
    co2 = ds["CO2"].values
    assert np.allclose(co2[-1], float(raw_in["CO2"][-1])) and co2[-1].std() == 0
    # ensemble mean, precipitation converted to mm/day
    pr = ds["pr"].values[-1]
    expect = raw_out["pr"].isel(time=-1).mean("member").values * 86400
    assert np.allclose(ds["lat"].values, raw_out["lat"].values)  # the file's order, south to north
    assert np.allclose(pr, expect, rtol=1e-5)
    assert ds["pr"].attrs["units"] == "mm day**-1" and ds["tas"].attrs["units"] == "K"
    assert ds.attrs["calendar"] == "yearly" and ds.attrs["scenario"] == "ssp126"


def test_reader_errors_name_the_file(tmp_path):
    from pipelines.sources import SourceError, open_source

    bad = tmp_path / "forcings.nc"
    bad.write_bytes(b"CDF\x01" + b"\0" * 60)
    with pytest.raises(SourceError, match="forcings.nc: not a ClimateBench file"):
        open_source(str(bad), "climatebench")


def test_nrmse_matches_climatebench_definitions():
    from climax.projection import climatebench_nrmse, global_mean

    rng = np.random.default_rng(0)
    lat = np.linspace(-80, 80, 8)
    truth = 280 + rng.normal(size=(5, 8, 16))
    # a constant offset c: every term is c (spatial and global), normalised by |<mean truth>|
    m = climatebench_nrmse(truth + 2.0, truth, lat)
    norm = abs(global_mean(truth.mean(0), lat))
    assert m["nrmse_s"] == pytest.approx(2.0 / norm) and m["nrmse_g"] == pytest.approx(2.0 / norm)
    assert m["nrmse"] == pytest.approx(6 * 2.0 / norm) and m["rmse"] == pytest.approx(2.0)
    # an error that averages out in time: no spatial term, and a global term from the yearly means
    flip = np.where(np.arange(5)[:, None, None] % 2 == 0, 1.0, -1.0) * np.ones_like(truth)
    m = climatebench_nrmse(truth[:4] + flip[:4], truth[:4], lat)
    assert m["nrmse_s"] == pytest.approx(0.0, abs=1e-12)
    assert m["nrmse_g"] == pytest.approx(1.0 / abs(global_mean(truth[:4].mean(0), lat)))


def test_model_shapes_and_frozen_blocks():
    from climax import ClimaX
    from climax.projection import ProjectionModel, freeze_projection

    model = ProjectionModel(ClimaX(["CO2", "CH4", "SO2", "BC"], img_size=(16, 32), **TINY), ["tas", "pr"], history=10)
    x = torch.randn(3, 10, 4, 16, 32)
    assert model(x, ["CO2", "CH4", "SO2", "BC"]).shape == (3, 2, 16, 32)
    frozen = freeze_projection(model)
    assert frozen and all("norm" not in n for n in frozen)
    norms = [n for n, p in model.backbone.blocks.named_parameters() if "norm" in n]
    assert norms and all(p.requires_grad for n, p in model.backbone.blocks.named_parameters() if "norm" in n)
    with pytest.raises(ValueError, match="10 years"):
        model(torch.randn(2, 5, 4, 16, 32), ["CO2", "CH4", "SO2", "BC"])


@pytest.fixture(scope="module")
def climatebench(tmp_path_factory, ray_local):
    """Generated ClimateBench-like files, preprocessed into one dataset per scenario (16 x 32)."""
    from pipelines.build import build
    from pipelines.recipe import Recipe
    from pipelines.sample_data import write_climatebench

    raw = tmp_path_factory.mktemp("climatebench")
    write_climatebench(raw, scenarios=TRAIN + ["ssp245"], shape=(16, 32), hist_start=2000, seed=1)
    out = tmp_path_factory.mktemp("cb_shards")
    for s in TRAIN + ["ssp245"]:
        build(Recipe.model_validate({
            "sources": [{"path": str(raw / f"inputs_{s}.nc"), "format": "climatebench"}], "variables": VARS,
            "grid": {"resolution": 11.25, "method": "conservative"},
            "time": {"start": "1850-01-01", "end": "2100-12-31", "step": "365D"},
            "splits": {"train": [1850, 2100]}, "output": str(out / s), "shard_bytes": 50_000_000}))
    return out


def test_projection_trains_and_beats_the_linear_baseline(climatebench, tmp_path, ray_local):
    from climax import ClimaX
    from climax.checkpoint import save_checkpoint
    from climax.data import ShardDataset
    from jobs.train import TrainConfig, fit

    ds = ShardDataset(str(climatebench / "ssp245"))
    assert ds.shape == (16, 32) and set(VARS) <= set(ds.variables)
    # a stand-in for a pretrained forecast checkpoint (other variables, its own head)
    pre = ClimaX(["2m_temperature", "geopotential_500"], img_size=(16, 32), **TINY)
    save_checkpoint(pre, tmp_path / "pretrained.pt")
    out_vars = ["tas", "pr"]
    cfg = TrainConfig.model_validate({
        "name": "proj", "storage_path": str(tmp_path / "runs"), "task": "projection",
        "model": dict(TINY), "init_checkpoint": str(tmp_path / "pretrained.pt"),
        "data": {"datasets": [{"root": str(climatebench / s)} for s in TRAIN], "out_vars": out_vars,
                 "batch_size": 8},
        "projection": {"test": str(climatebench / "ssp245"), "output": str(tmp_path / "eval")},
        "optim": {"lr": 2e-3, "warmup_steps": 20, "weight_decay": 0.0},
        "train": {"epochs": 2, "steps_per_epoch": 80, "seed": 0},
        "checkpoint": {"num_to_keep": 1},
    })
    first = fit(cfg)
    assert first.error is None and first.metrics["step"] == 160 and first.metrics["restarts"] == 0
    assert {"val_rmse/tas", "val_baseline_rmse/tas", "val_loss"} <= set(first.metrics)
    cfg.train.epochs = 3  # a relaunch with the same name resumes: step counter, schedule, weights
    result = fit(cfg)
    assert result.error is None and result.metrics["step"] == 240 and result.metrics["restarts"] == 1
    from climax.tasks.projection import after_fit, load_projection

    table = after_fit(cfg, result)
    # the frozen block weights are bit-identical to the pretrained ones; their norms trained
    model, in_vars, outs, _, _ = load_projection(result.checkpoint.path)
    assert in_vars == ["CO2", "CH4", "SO2", "BC"] and outs == out_vars
    pre_blocks = {k.removeprefix("blocks."): v for k, v in pre.state_dict().items() if k.startswith("blocks.")}
    changed_norm = False
    for name, p in model.backbone.blocks.state_dict().items():
        if "norm" in name:
            changed_norm |= not torch.equal(p, pre_blocks[name])
        else:
            assert torch.equal(p, pre_blocks[name]), name
    assert changed_norm
    # outputs: the table, predictions of the right shapes and names, the maps
    df = pd.read_csv(tmp_path / "eval" / "metrics.csv")
    assert set(df["variable"]) == set(out_vars) and set(df["method"]) == {"climax", "linear_baseline"}
    assert {"nrmse_s", "nrmse_g", "nrmse", "rmse"} <= set(df.columns) and (df["years"] == "2080-2100").all()
    pred = np.load(tmp_path / "eval" / "predictions.npz")
    assert pred["prediction"].shape == (21, 2, 16, 32) == pred["truth"].shape
    assert list(pred["variables"]) == out_vars and list(pred["years"]) == list(range(2080, 2101))
    assert all((tmp_path / "eval" / f"maps_{v}.png").stat().st_size > 10_000 for v in out_vars)
    # jobs.evaluate recognises the checkpoint and writes the same table
    from jobs.evaluate import main as evaluate_main

    again = evaluate_main([str(ROOT / "configs/evaluate.yaml"), f"checkpoint={result.checkpoint.path}",
                           f"data={climatebench / 'ssp245'}", f"output={tmp_path / 'eval2'}"])
    assert np.allclose(again["nrmse"], table["nrmse"]) and (tmp_path / "eval2" / "maps_tas.png").exists()
    # held-out ssp245: ClimaX beats the linear regression on global-mean forcings for tas
    t = table.set_index(["method", "variable"])
    assert t.loc[("climax", "tas"), "nrmse"] < t.loc[("linear_baseline", "tas"), "nrmse"], table
    assert t.loc[("climax", "tas"), "rmse"] < t.loc[("linear_baseline", "tas"), "rmse"], table
