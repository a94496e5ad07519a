"""History input for forecasting (issue 19): several input times merged by a time neck before the backbone.

Generated data where one snapshot cannot tell the answer: waves travelling east in odd months and west
in even months, the same amplitude everywhere, so a snapshot looks alike in both seasons while its next
state does not. With the input 6 h earlier the next state is a fixed linear function of the two
(x(t+1) = 2 cos(d) x(t) - x(t-1) for a wave moving d radians a step either way).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from climax import shards as S
from climax.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from climax.data import ForecastLoader, ShardDataset
from climax.evaluation import evaluate_model, forecast_fields
from climax.model import ClimaX
from climax.neck import TimeNeck
from climax.projection import ProjectionModel
from climax.sampling import ForecastSampler, check_history

H, W, STEP = 8, 16, 6
DELTA = 2 * np.pi * 2 / W  # wavenumber 2, one grid cell per 6 h step
TINY = dict(patch_size=2, embed_dim=64, depth=2, decoder_depth=1, num_heads=4, drop_path=0.0, drop_rate=0.0)


def wave_fields(times: np.ndarray) -> np.ndarray:
    """(n, H, W): 280 K + 10 K sin(k x - phase(t) + row phase); the phase moves by +DELTA a step in
    odd months and -DELTA in even months (continuous across the switch)."""
    months = times.astype("datetime64[M]").astype(int) % 12 + 1
    direction = np.where(months % 2 == 1, 1.0, -1.0)
    phase = np.cumsum(direction) * DELTA
    x = 2 * np.pi * 2 * np.arange(W) / W
    rows = 0.7 * np.arange(H)
    return (280 + 10 * np.sin(x[None, None, :] - phase[:, None, None] + rows[None, :, None])).astype(np.float32)


def write_dataset(root: Path, splits: dict[str, list[tuple[str, str]]]) -> Path:
    """A shard dataset of one variable ``wave``: each split a list of (start, end) shards, 6-hourly
    (a gap between shards is a gap of the time axis). Written directly, without the preprocessing."""
    root.mkdir(parents=True, exist_ok=True)
    step = np.timedelta64(STEP, "h")
    first = min(np.datetime64(a, "ns") for parts in splits.values() for a, _ in parts)
    manifest_splits = {}
    for split, parts in splits.items():
        shards = []
        for k, (a, b) in enumerate(parts):
            times = np.arange(np.datetime64(a, "ns"), np.datetime64(b, "ns") + step, step)
            # the phase counts from the dataset's first step, so every split continues the same waves
            all_times = np.arange(first, times[-1] + step, step)
            fields = wave_fields(all_times)[-len(times):]
            rel = f"{split}/{k}.parquet"
            (root / split).mkdir(exist_ok=True)
            pq.write_table(S.table_from_arrays(times, {"wave": fields}), root / rel, row_group_size=8)
            shards.append({"path": rel, "rows": len(times), "start": str(times[0]), "end": str(times[-1])})
        manifest_splits[split] = {"shards": shards, "rows": sum(s["rows"] for s in shards)}
    lat = np.linspace(-78.75, 78.75, H)
    manifest = {"format": S.FORMAT, "grid": {"lat": lat.tolist(), "lon": (np.arange(W) * 360 / W).tolist(),
                                             "lat_order": "south_to_north", "resolution": 22.5},
                "time": {"step_seconds": STEP * 3600}, "variables": {"wave": {"units": "K"}},
                "splits": manifest_splits, "statistics": {"wave": {"mean": 280.0, "std": 10 / np.sqrt(2)}}}
    (root / S.MANIFEST).write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def waves(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("waves"), {
        "train": [("2000-01-01", "2000-04-30T18:00")],
        "val": [("2001-01-01", "2001-02-28T18:00")],
    })


def train_config(root: Path, history: list[float], steps: int, tmp: Path) -> object:
    from jobs.train import TrainConfig

    return TrainConfig.model_validate({
        "name": "waves", "storage_path": str(tmp), "model": dict(TINY),
        "data": {"datasets": [{"root": str(root)}], "batch_size": 16, "history_hours": history,
                 "leads": {"random": False, "hours": [6]}, "max_val_batches": 8, "prefetch": 2},
        "optim": {"lr": 2e-3, "warmup_steps": 10, "weight_decay": 0.0},
        "train": {"epochs": 1, "steps_per_epoch": steps, "seed": 0},
        "observability": {"tensorboard": False}})


class Keep:
    """A loop reporter keeping the metrics and a copy of the checkpoint."""

    def __init__(self, folder: Path):
        self.folder, self.metrics = folder, []

    def report(self, metrics, checkpoint_dir):
        import shutil

        self.metrics.append(metrics)
        if checkpoint_dir:
            shutil.copytree(checkpoint_dir, self.folder, dirs_exist_ok=True)


def run(root: Path, history: list[float], steps: int, tmp: Path) -> tuple[dict, Path]:
    from climax.loop import Worker, train
    from climax.tasks.forecast import ForecastTask

    torch.manual_seed(0)
    keep = Keep(tmp / f"ckpt{len(history)}")
    train(ForecastTask(train_config(root, history, steps, tmp), Worker(log=lambda *a, **k: None)), keep)
    return keep.metrics[-1], keep.folder


@pytest.fixture(scope="module")
def trained(waves, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("runs")
    return {len(h): run(waves, h, 300, tmp) for h in ([0.0], [-6.0, 0.0])}


def test_history_lowers_the_validation_rmse_where_one_snapshot_cannot_tell(trained):
    one, two = trained[1][0]["val_rmse"], trained[2][0]["val_rmse"]
    # one snapshot: at best the mean of both directions, about sin(DELTA) / sqrt(2) * sqrt(2) = 0.71 std
    assert one > 0.5
    assert two < 0.75 * one, (one, two)


def test_history_checkpoint_records_the_neck_and_evaluates(trained, waves):
    _, folder = trained[2]
    model, report = load_model(folder / "model.pt")
    assert report.exact and model.history_hours == [-6.0, 0.0] and model.neck is not None
    ds = ShardDataset(str(waves))
    # the hand-written dataset has no climatology files: the mean field stands in (ACC is not checked)
    ds.climatology = lambda variables, times: np.full((len(times), len(variables), H, W), 280, np.float32)
    df = evaluate_model(model, ds, "val", ["wave"], ["wave"], [6, 12], rollout_step=6, batch_size=16,
                        max_samples=32, progress=False, regions=["global"])
    direct = df[(df.method == "direct") & (df.lead_hours == 6)].rmse.item()
    persistence = df[(df.method == "persistence") & (df.lead_hours == 6)].rmse.item()
    rollout = df[(df.method == "rollout") & (df.lead_hours == 12)].rmse.item()
    assert direct < persistence and np.isfinite(rollout)
    # the first initial time of the split has no input 6 h before it: never scored, refused when asked
    assert df.attrs["init_times"][0] != str(ds.axis("val").times[0])
    with pytest.raises(ValueError, match="lack a history step"):
        forecast_fields(model, ds, "val", [0], [6], ["wave"], ["wave"], progress=False)
    with pytest.raises(ValueError, match="rollout_step to the history's spacing"):
        forecast_fields(model, ds, "val", [4], [12], ["wave"], ["wave"], rollout_step=12, progress=False)
    fc = forecast_fields(model, ds, "val", [4, 5], [6, 12], ["wave"], ["wave"], rollout_step=6, progress=False)
    assert fc.shape == (2, 2, 1, H, W) and np.isfinite(fc).all()


def test_one_step_neck_is_the_identity_and_one_step_models_have_none():
    neck = TimeNeck(32, 4, 1, residual=True)
    tokens = torch.randn(3, 1, 10, 32)
    assert torch.equal(neck.merge(tokens), tokens[:, 0])
    torch.manual_seed(0)
    plain = ClimaX(["a", "b"], img_size=(H, W), **TINY)
    torch.manual_seed(0)
    same = ClimaX(["a", "b"], img_size=(H, W), **TINY, history_hours=[0])
    assert same.neck is None and "history_hours" not in same.config
    assert not any(k.startswith("neck.") for k in same.state_dict())
    for k, v in plain.state_dict().items():  # same random draws: the default is bit-identical
        assert torch.equal(v, same.state_dict()[k]), k
    # a fresh neck on pretrained weights: exactly the one-step model on the current input
    hist = ClimaX(["a", "b"], img_size=(H, W), **TINY, history_hours=[-12, -6, 0])
    report = load_checkpoint(hist, {"format": "climax-ray/1", "model_config": plain.config,
                                    "state_dict": plain.state_dict()})
    assert all(k.startswith("neck.") for k in report.initialised) and len(report.initialised) == 6
    plain.eval(), hist.eval()
    x, lead = torch.randn(2, 3, 2, H, W), torch.tensor([6.0, 24.0])
    assert torch.equal(hist(x, lead, ["a", "b"]), plain(x[:, -1], lead, ["a", "b"]))
    with pytest.raises(ValueError, match="takes 3 input times"):
        hist(x[:, -1], lead, ["a", "b"])


def test_old_checkpoints_load_strictly_and_history_checkpoints_rebuild(tmp_path):
    plain = ClimaX(["a", "b"], img_size=(H, W), **TINY)
    path = save_checkpoint(plain, tmp_path / "old.pt")
    assert load_checkpoint(ClimaX(["a", "b"], img_size=(H, W), **TINY), path, strict=True).exact
    with pytest.raises(CheckpointError, match="strict load"):
        load_checkpoint(ClimaX(["a", "b"], img_size=(H, W), **TINY, history_hours=[-6, 0]), path, strict=True)
    hist = ClimaX(["a", "b"], img_size=(H, W), **TINY, history_hours=[-6, 0])
    again, report = load_model(save_checkpoint(hist, tmp_path / "hist.pt"))
    assert report.exact and again.history_hours == [-6.0, 0.0]
    for k, v in hist.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


def test_projection_uses_the_shared_neck_and_loads_its_old_names():
    torch.manual_seed(0)
    model = ProjectionModel(ClimaX(["CO2", "SO2"], img_size=(H, W), **TINY), ["tas"], history=4)
    assert isinstance(model.neck, TimeNeck) and not model.neck.residual
    old = {}
    for k, v in model.state_dict().items():  # the names before the neck was shared
        k = (k.replace("neck.embed", "time_pos_embed").replace("neck.query", "time_query")
             .replace("neck.attn.", "time_agg."))
        old[k] = v.clone() + 1
    fresh = ProjectionModel(ClimaX(["CO2", "SO2"], img_size=(H, W), **TINY), ["tas"], history=4)
    fresh.load_state_dict(old, strict=True)
    assert torch.equal(fresh.neck.embed, model.neck.embed + 1)
    assert torch.equal(fresh.neck.attn.in_proj_weight, model.neck.attn.in_proj_weight + 1)


def test_pairs_need_every_history_step_and_the_target(tmp_path):
    root = write_dataset(tmp_path / "gappy", {"train": [("2000-01-01", "2000-01-03T18:00"),
                                                        ("2000-01-05", "2000-01-07T18:00")]})
    ds = ShardDataset(str(root))
    axis = ds.axis("train")
    s1 = ForecastSampler(axis, [6], random_lead=False)
    s3 = ForecastSampler(axis, [6], random_lead=False, history=[-12, -6, 0])
    inputs = s3.all_pairs()[:, 0].astype(int)
    t = axis.times
    for i in inputs:  # every history step and the target are on the axis
        for h in (-12, -6, 6):
            assert t[i] + np.timedelta64(h, "h") in set(t)
    # per 12-step shard: 11 pairs without history, 9 with two earlier steps; the gap removes the rest
    assert (len(s1.all_pairs()), len(inputs)) == (22, 18)
    # the span holds 28 regular steps: 27 pairs at 6 h, 25 with the two earlier steps (the first two inputs
    # have none); the gap removes the others
    assert (s1.skipped, s3.skipped) == (27 - 22, 25 - 18)
    loader = ForecastLoader(ds, "train", ["wave"], ["wave"], [6], random_lead=False, batch_size=4, shuffle=False,
                            drop_last=False, history=[-12, -6, 0])
    batches = list(loader)
    assert sum(len(b) for b in batches) == 18
    b = batches[0]
    assert tuple(b.x.shape) == (4, 3, 1, H, W)
    mean, std = ds.normalizer(["wave"])
    for k in range(4):
        i = int(np.searchsorted(t, b.input_time[k]))
        want = (ds.read("train", [i - 2, i - 1, i, i + 1], ["wave"])[:, 0] - mean[0]) / std[0]
        np.testing.assert_allclose(b.x[k, :, 0].numpy(), want[:3], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(b.y[k, 0].numpy(), want[3], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("hours", [[0, -6], [-6], [-6, -6, 0], [6, 0], []])
def test_history_config_errors(hours, tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValueError, match="sorted oldest first"):
        check_history(hours)
    with pytest.raises(ValidationError, match="data.history_hours"):
        train_config(tmp_path, hours, 1, tmp_path)


def test_history_errors_name_the_step_and_the_objective(waves, tmp_path):
    from pydantic import ValidationError

    ds = ShardDataset(str(waves))
    with pytest.raises(ValueError, match=r"\[-3.0\] h are not multiples of the data's 6 h time step"):
        ForecastLoader(ds, "train", ["wave"], ["wave"], [6], random_lead=False, batch_size=4, history=[-3, 0])
    cfg = train_config(waves, [-6, 0], 1, tmp_path).model_dump()
    cfg["objective"] = {"kind": "masked"}
    from jobs.train import TrainConfig

    with pytest.raises(ValidationError, match="objective.kind=masked reconstructs one input time"):
        TrainConfig.model_validate(cfg)
