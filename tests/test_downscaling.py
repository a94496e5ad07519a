"""Downscaling (issue 8) on generated data: a fine dataset (11.25 deg) and its coarse twin (22.5 deg,
the same fields averaged conservatively by the pipeline), paired by time.

The task trains through ``python -m jobs.finetune configs/finetune/downscaling.yaml`` on a local Ray,
is scored by ``jobs.evaluate`` on the held-out test split against bilinear interpolation, and
finetuning from its checkpoint with ``freeze_backbone`` leaves the frozen tensors bit-identical.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import ROOT

VARS = ["land_sea_mask", "orography", "2m_temperature", "geopotential_500", "temperature_850"]
OUT = ["2m_temperature", "geopotential_500", "temperature_850"]
TINY = {"patch_size": 2, "embed_dim": 64, "depth": 2, "decoder_depth": 1, "num_heads": 4, "mlp_ratio": 2.0,
        "drop_path": 0.0, "drop_rate": 0.0}


def run_cmd(args: list[str], ray, timeout: float = 600) -> str:
    """``python -m ARGS`` from the repository root, as a user runs it, on the tests' local Ray (through
    RAY_ADDRESS, as ``ray job submit`` does); returns the output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout
    return proc.stdout


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if (p / "model.pt").exists())


def latest(run_dir: Path) -> tuple[Path, dict]:
    """The newest checkpoint (by step) and its metrics."""
    found = [(p, torch.load(p / "model.pt", map_location="cpu", weights_only=True)["metrics"])
             for p in checkpoints(run_dir)]
    assert found, f"no checkpoint under {run_dir}"
    return max(found, key=lambda pm: pm[1]["step"])


@pytest.fixture(scope="module")
def pair(tmp_path_factory, ray_local) -> tuple[Path, Path]:
    """(coarse, fine) shard datasets: three years, daily; train 2014, val 2015, test 2016."""
    from pipelines.build import build
    from pipelines.recipe import Recipe
    from pipelines.sample_data import generate

    raw = tmp_path_factory.mktemp("raw")
    generate(raw, years=(2014, 2015, 2016), resolution=11.25, step_hours=24, variables=VARS,
             formats=("weatherbench",), progress=False)
    roots = []
    for res, method in ((22.5, "conservative"), (11.25, "bilinear")):
        out = tmp_path_factory.mktemp(f"shards-{res:g}")
        build(Recipe.model_validate({
            "sources": [{"path": str(raw / "weatherbench")}], "variables": VARS,
            "grid": {"resolution": res, "method": method},
            "time": {"start": "2014-01-01", "end": "2016-12-31", "step": "24h"},
            "splits": {"train": [2014, 2014], "val": [2015, 2015], "test": [2016, 2016]},
            "output": str(out)}))
        roots.append(out)
    return roots[0], roots[1]


# ----------------------------------------------------------------------------- pure parts
def test_upsampling_equals_the_pipeline_bilinear_regridding():
    """The model's torch upsampling and pipelines/regrid.py's bilinear method agree (same convention:
    cell-centred latitudes held at the poles, periodic longitude)."""
    from climax.downscaling import bilinear_matrix
    from pipelines.regrid import Regridder, target_grid

    rng = np.random.default_rng(0)
    for coarse_res, fine_res in ((22.5, 11.25), (5.625, 1.40625), (11.25, 5.625)):
        src, dst = target_grid(coarse_res), target_grid(fine_res)
        field = rng.standard_normal((3, *src.shape)).astype(np.float32)
        expected = Regridder(src, dst, "bilinear")(field)
        a_lat, a_lon = bilinear_matrix(src.lat, src.lon, dst.lat, dst.lon)
        got = torch.einsum("ih,vhw,jw->vij", a_lat, torch.from_numpy(field), a_lon).numpy()
        np.testing.assert_allclose(got, expected, atol=2e-5)
    # a field linear in longitude away from the seam is reproduced, and the seam is crossed smoothly
    src, dst = target_grid(22.5), target_grid(11.25)
    a_lat, a_lon = bilinear_matrix(src.lat, src.lon, dst.lat, dst.lon)
    assert torch.allclose(a_lat.sum(1), torch.ones(16)) and torch.allclose(a_lon.sum(1), torch.ones(32))
    assert a_lon[-1, -1] == 0.5 and a_lon[-1, 0] == 0.5  # 348.75 deg: halfway between 337.5 and 360 = 0


def test_bias_and_pearson():
    from climax.metrics import lat_weighted_bias, lat_weighted_pearson

    lat = torch.linspace(-78.75, 78.75, 8)
    truth = torch.randn(4, 2, 8, 16, dtype=torch.float64)
    assert torch.allclose(lat_weighted_bias(truth + 1.5, truth, lat), torch.full((2,), 1.5, dtype=torch.float64))
    assert torch.allclose(lat_weighted_pearson(2 * truth + 3, truth, lat), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(lat_weighted_pearson(-truth, truth, lat), -torch.ones(2, dtype=torch.float64))
    noisy = truth + torch.randn_like(truth)
    r = lat_weighted_pearson(noisy, truth, lat)
    assert torch.all((r > 0.3) & (r < 0.95)), r


def test_pairs_must_overlap_in_time():
    from climax.downscaling import paired_indices

    def ds(root, start, n):
        times = np.datetime64(start, "ns") + np.arange(n) * np.timedelta64(6, "h")
        return SimpleNamespace(root=root, step_hours=6.0, axis=lambda split: SimpleNamespace(times=times))

    t, ic, jf = paired_indices(ds("c", "2015-01-01", 8), ds("f", "2015-01-01T12", 8), "train")
    assert len(t) == 6 and ic[0] == 2 and jf[0] == 0 and t[0] == np.datetime64("2015-01-01T12", "ns")
    with pytest.raises(ValueError, match=r"coarse dataset /data/cmip6.*fine dataset /data/era5.*share no time"):
        paired_indices(ds("/data/cmip6", "2015-01-01", 8), ds("/data/era5", "2016-01-01", 8), "val")


def test_downscaling_config():
    import yaml

    from jobs.config import ConfigError, validate
    from jobs.train import TrainConfig

    cfg = yaml.safe_load((ROOT / "configs/finetune/downscaling.yaml").read_text())
    parsed = validate(TrainConfig, cfg)
    assert parsed.task == "downscaling" and parsed.downscaling.residual and not parsed.data.datasets
    with pytest.raises(ConfigError, match="needs a 'downscaling' section"):
        validate(TrainConfig, {**cfg, "downscaling": None})
    with pytest.raises(ConfigError, match="regional downscaling is not supported"):
        validate(TrainConfig, {**cfg, "data": {"region": "Europe"}})
    with pytest.raises(ConfigError, match="unknown key 'downscaling.coarse_root'"):
        validate(TrainConfig, {**cfg, "downscaling": {**cfg["downscaling"], "coarse_root": "x"}})
    with pytest.raises(ConfigError, match="data.datasets needs at least one dataset"):
        validate(TrainConfig, {k: v for k, v in cfg.items() if k not in ("task", "downscaling")})


def test_loader_and_model_shapes(pair):
    from climax import ClimaX
    from climax.data import ShardDataset
    from climax.downscaling import DownscalingLoader, make_downscaler, resolve_variables

    coarse, fine = ShardDataset(str(pair[0])), ShardDataset(str(pair[1]))
    in_vars, constants, out_vars = resolve_variables(coarse, fine, None, None, OUT)
    assert in_vars == OUT and constants == ["land_sea_mask", "orography"]
    loader = DownscalingLoader(coarse, fine, "val", in_vars, out_vars, batch_size=8, shuffle=False, drop_last=False)
    assert len(loader.times) == 365 and len(loader) == 46
    batch = next(iter(loader))
    assert batch.x.shape == (8, 3, 8, 16) and batch.y.shape == (8, 3, 16, 32)
    assert batch.in_vars == in_vars and batch.out_vars == out_vars and torch.all(batch.lead_hours == 0)
    # normalised with each set's own statistics
    assert abs(float(batch.y[:, 0].mean())) < 2 and abs(float(batch.x[:, 0].mean())) < 2
    net = ClimaX(constants + in_vars, img_size=fine.shape, **TINY)
    model = make_downscaler(net, coarse, fine, in_vars, constants, out_vars)
    assert model(batch.x, batch.lead_hours, batch.in_vars, batch.out_vars).shape == (8, 3, 16, 32)
    # the bilinear baseline in physical units is close to the truth (smooth fields)
    truth = model.physical(batch.y)
    base = model.bilinear_physical(batch.x)
    assert base.shape == truth.shape and float((base - truth)[:, 0].abs().mean()) < 3.0  # K
    with pytest.raises(ValueError, match="fine dataset .* has no"):
        resolve_variables(coarse, fine, None, None, ["relative_humidity_850"])


# ----------------------------------------------------------------------------- on Ray Train
def test_downscaling_finetunes_beats_bilinear_and_freezes(pair, tmp_path, ray_local):
    import yaml

    from climax.training import BACKBONE
    from jobs.evaluate import main as evaluate

    coarse, fine = pair
    runs = tmp_path / "runs"
    common = [f"storage_path={runs}", f"downscaling.coarse.root={coarse}", f"downscaling.fine.root={fine}",
              f"downscaling.in_vars={OUT}", f"downscaling.out_vars={OUT}", f"model={TINY}",
              "data.batch_size=8", "data.max_val_batches=10", "optim.lr=2e-3", "optim.warmup_steps=10",
              "observability.tensorboard=false"]
    out = run_cmd(["jobs.finetune", "configs/finetune/downscaling.yaml", "name=ds", "train.epochs=2",
                   "train.steps_per_epoch=100", *common], ray_local)
    assert "epoch 2/2" in out and "(bilinear" in out, out
    ckpt, m = latest(runs / "ds")
    assert m["step"] == 200
    for v in OUT:  # validation split: better than bilinear already
        assert m[f"val_rmse/{v}"] < m[f"val_bilinear_rmse/{v}"], {k: x for k, x in m.items() if "rmse" in k}

    # held-out test split through jobs.evaluate (the task is read from the checkpoint)
    df = evaluate([str(ROOT / "configs/evaluate.yaml"), f"checkpoint={ckpt}", f"data={fine}",
                   f"output={tmp_path / 'eval'}", "split=test", "max_samples=32", "batch_size=32", "progress=false"])
    table = pd.read_csv(tmp_path / "eval" / "metrics.csv")
    assert list(table.columns) == ["variable", "method", "rmse", "bias", "pearson", "units", "samples"]
    assert set(table["variable"]) == set(OUT) and set(table["method"]) == {"downscaled", "bilinear"}
    assert (table["samples"] == 32).all()
    for v in OUT:
        row = table[table["variable"] == v].set_index("method")
        assert row.loc["downscaled", "rmse"] < 0.8 * row.loc["bilinear", "rmse"], table
        assert row.loc["downscaled", "pearson"] > 0.9
    assert len(df) == 6
    for v in OUT:
        assert (tmp_path / "eval" / f"maps_{v}.png").stat().st_size > 10_000

    # finetuning from that checkpoint with the backbone frozen, as the worker loop sets it up (model from
    # init_checkpoint, freeze, then the optimiser): the frozen tensors stay bit-identical
    from climax.data import ShardDataset
    from climax.downscaling import DownscalingLoader, make_downscaler
    from climax.optim import build_optimizer
    from climax.tasks.downscaling import build_net
    from climax.training import freeze_backbone, train_step
    from jobs.train import TrainConfig

    cfg = TrainConfig.model_validate({**yaml.safe_load((ROOT / "configs/finetune/downscaling.yaml").read_text()),
                                      "init_checkpoint": str(ckpt), "freeze_backbone": True})
    c, f = ShardDataset(str(coarse)), ShardDataset(str(fine))
    net = build_net(cfg, f, OUT, ["land_sea_mask", "orography"], OUT, log=lambda *a: None)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    frozen = set(freeze_backbone(net))
    model = make_downscaler(net, c, f, OUT, ["land_sea_mask", "orography"], OUT)
    optimizer = build_optimizer(net, 1e-2, weight_decay=0.1)
    for i, batch in enumerate(DownscalingLoader(c, f, "train", OUT, OUT, batch_size=4)):
        train_step(model, batch, optimizer, None, f.lat, torch.device("cpu"), bf16=False)
        if i == 3:
            break
    after = net.state_dict()
    assert frozen and {k.split(".")[0] for k in frozen} == set(BACKBONE)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in after if k.startswith("head") and k.endswith("weight"))
