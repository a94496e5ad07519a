"""Rollout finetuning (issue 19, item 2): ``train.rollout_steps`` k trains on k autoregressive steps at
one fixed lead, each prediction fed back as the next input (evaluation's convention), the loss the
mean of the per-step latitude-weighted MSEs, gradients through the chain or truncated.

The sampler and the loader (targets at L, 2L, ..., kL; pairs only where all exist), the loss against
a hand computation and against ``climax.evaluation``'s rollout, gradients, truncation, config errors,
and a tiny finetune through the real job on the session's generated data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import FORECAST_VARS, tiny_model

VARS = ["land_sea_mask", "2m_temperature", "geopotential_500"]  # a constant, then two fed-back fields
OUT = ["2m_temperature", "geopotential_500"]
LAT = np.linspace(-80, 80, 16)


def _batch(k: int, seed: int = 0):
    from climax.data import Batch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, len(VARS), 16, 32, generator=g)
    ys = torch.randn(3, k, len(OUT), 16, 32, generator=g)
    return Batch(x, ys[:, 0].clone(), torch.full((3,), 6.0), VARS, OUT,
                 np.full(3, np.datetime64("2020-01-01", "ns")), "toy", ys[:, 1:].clone() if k > 1 else None)


def _model():
    torch.manual_seed(0)
    return tiny_model(VARS)


def _mse(pred, target):
    from climax.metrics import lat_weighted_mse

    return lat_weighted_mse(pred, target, torch.as_tensor(LAT, dtype=torch.float32))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------ sampler and loader
def test_sampler_keeps_inputs_whose_k_targets_all_exist():
    from climax.sampling import ForecastSampler, TimeAxis

    step = np.timedelta64(6, "h").astype("timedelta64[ns]")
    times = np.datetime64("2020-01-01", "ns") + step * np.r_[0:10, 11:16]  # step 10 missing
    axis = TimeAxis(times, np.zeros(len(times), int), np.arange(len(times)), step)
    one = ForecastSampler(axis, [6.0], random_lead=False)
    three = ForecastSampler(axis, [6.0], random_lead=False, rollout_steps=3)
    # k = 1 is today's sampler; k = 3 needs t+6, t+12, t+18 h: not across the gap nor past the end
    assert np.array_equal(one.valid[:, 0], np.r_[[True] * 9, False, [True] * 4, False])
    assert np.array_equal(three.valid[:, 0], np.r_[[True] * 7, [False] * 3, True, True, [False] * 3])
    pairs = three.all_pairs()
    steps = three.rollout_targets(pairs)
    assert steps.shape == (9, 3) and np.array_equal(steps[:, 0], pairs[:, 1])
    got = times[steps] - times[pairs[:, 0].astype(int)][:, None]
    assert (got == step * np.arange(1, 4)).all()
    assert three.halo_steps == 3


@pytest.mark.parametrize("cache_mb", [1024.0, 0.0])  # rows kept (resident) or decoded per super-batch
def test_loader_serves_the_targets_of_every_step(forecast_shards, cache_mb):
    from climax.data import ForecastLoader, ShardDataset

    ds = ShardDataset(str(forecast_shards))
    in_vars, out_vars = FORECAST_VARS, [v for v in FORECAST_VARS if v in ds.variables]
    kw = dict(random_lead=False, batch_size=4, shuffle=True, cache_mb=cache_mb, max_batches=3)
    one = ForecastLoader(ds, "val", in_vars, out_vars, [6], **kw)
    three = ForecastLoader(ds, "val", in_vars, out_vars, [6], rollout_steps=3, **kw)
    assert len(three.sampler.all_pairs()) == len(one.sampler.all_pairs()) - 2  # the last two inputs lack t+18 h
    b1 = next(iter(one))
    assert b1.y_steps is None
    mean, std = ds.normalizer(out_vars)
    axis = ds.axis("val")
    pos = {t: i for i, t in enumerate(axis.times.astype(np.int64))}
    for batch in three:
        assert batch.y_steps.shape == (4, 2, len(out_vars), *ds.shape)
        for s, hours in enumerate((6, 12, 18)):
            target = batch.input_time + np.timedelta64(hours, "h")
            raw = ds.read("val", np.array([pos[t] for t in target.astype(np.int64)]), out_vars)
            want = (raw - mean[None, :, None, None]) / std[None, :, None, None]
            got = batch.y if s == 0 else batch.y_steps[:, s - 1]
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_loader_refuses_rollout_with_several_or_random_leads(forecast_shards):
    from climax.data import ForecastLoader, ShardDataset

    ds = ShardDataset(str(forecast_shards))
    out = [v for v in FORECAST_VARS if v in ds.variables]
    for leads, random_lead in (([6, 12], False), ([6], True)):
        with pytest.raises(ValueError, match="rollout_steps=2 needs one fixed lead"):
            ForecastLoader(ds, "val", FORECAST_VARS, out, leads, random_lead=random_lead, batch_size=2,
                           rollout_steps=2)


# ------------------------------------------------------------------------------ the loss
def test_one_step_is_todays_loss_exactly():
    from climax.training import forecast_loss, rollout_loss

    batch = _batch(1)
    a = forecast_loss(_model(), batch, LAT, torch.device("cpu"), bf16=False)
    b = rollout_loss(_model(), batch, LAT, torch.device("cpu"), bf16=False)
    assert torch.equal(a, b)


def test_task_loss_with_rollout_steps_1_is_forecast_loss(forecast_shards):
    """The forecast task's hook with the default config takes today's path (bit-identical)."""
    from climax.loop import Worker
    from climax.tasks.forecast import ForecastTask
    from climax.training import forecast_loss
    from jobs.train import TrainConfig

    cfg = TrainConfig.model_validate({
        "model": {"patch_size": 2, "embed_dim": 32, "depth": 1, "decoder_depth": 1, "num_heads": 2,
                  "drop_path": 0.0, "drop_rate": 0.0},
        "data": {"datasets": [{"root": str(forecast_shards)}], "batch_size": 2, "train_split": "val",
                 "max_val_batches": 1, "leads": {"random": False, "hours": [6]}},
        "train": {"bf16": False}})
    assert cfg.train.rollout_steps == 1 and cfg.train.rollout_truncate == 0
    task = ForecastTask(cfg, Worker(log=lambda *a, **k: None))
    torch.manual_seed(0)
    model = task.build_model()
    loaders = task.make_loaders(model)
    batch = next(iter(loaders.train))
    assert batch.y_steps is None
    loss, tag = task.loss(model, batch, 0)
    assert tag is None and torch.equal(loss, forecast_loss(model, batch, task.lat, torch.device("cpu"), bf16=False))


def test_two_steps_are_the_mean_of_the_hand_computed_step_losses():
    from climax.forecasting import ModelRunner
    from climax.training import rollout_loss

    batch, model = _batch(2), _model()
    loss = rollout_loss(model, batch, LAT, torch.device("cpu"), bf16=False)
    with torch.no_grad():
        p1 = model(batch.x, batch.lead_hours, VARS, OUT)
        x2 = batch.x.clone()
        x2[:, 1:] = p1  # the constant stays, the two fields are the prediction
        p2 = model(x2, batch.lead_hours, VARS, OUT)
        want = (_mse(p1, batch.y) + _mse(p2, batch.y_steps[:, 0])) / 2
        # the same chain as evaluation's rollout
        preds = dict(ModelRunner(model, VARS, OUT, None, torch.device("cpu")).rollout(batch.x, 6.0, 2))
    torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(preds[1], p1, rtol=0, atol=0)
    torch.testing.assert_close(preds[2], p2, rtol=1e-6, atol=1e-6)


def test_gradients_flow_through_the_chain_and_truncation_cuts_it():
    from climax.training import rollout_loss

    cpu = torch.device("cpu")

    def grads_of(k, truncate):
        model = _model()
        rollout_loss(model, _batch(k), LAT, cpu, bf16=False, truncate=truncate).backward()
        return _grads(model)

    def by_hand(k, cut_after):
        """Mean of k step losses, the fed-back input detached after the steps in ``cut_after``."""
        model, batch = _model(), _batch(k)
        targets = [batch.y, *batch.y_steps.unbind(1)]
        state, losses = batch.x, []
        for i, y in enumerate(targets):
            pred = model(state, batch.lead_hours, VARS, OUT)
            losses.append(_mse(pred, y))
            state = torch.cat([state[:, :1], pred], dim=1)
            if i + 1 in cut_after:
                state = state.detach()
        torch.stack(losses).mean().backward()
        return _grads(model)

    def same(a, b):
        return a.keys() == b.keys() and all(torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-7) for n in a)

    full, detached = grads_of(3, 0), grads_of(3, 1)
    assert not same(full, detached)  # the chain carries gradient
    assert same(full, by_hand(3, ()))
    assert same(detached, by_hand(3, (1, 2)))
    assert same(grads_of(3, 2), by_hand(3, (2,)))
    assert not same(grads_of(3, 2), full) and not same(grads_of(3, 2), detached)


# ------------------------------------------------------------------------------ configuration
def _validate(**over):
    from jobs.config import validate
    from jobs.train import TrainConfig

    cfg = {"data": {"datasets": [{"root": "unused"}], "leads": {"random": False, "hours": [6]}}}
    for key, value in over.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return validate(TrainConfig, cfg)


def test_config_errors_name_the_key_and_the_fix():
    from jobs.config import ConfigError

    assert _validate(**{"train.rollout_steps": 3, "train.rollout_truncate": 1}).train.rollout_steps == 3
    with pytest.raises(ConfigError) as e:
        _validate(**{"train.rollout_steps": 2, "data.leads.hours": [6, 24]})
    msg = str(e.value)
    assert "\n" not in msg and "train.rollout_steps=2" in msg and "data.leads.hours=[6.0, 24.0]" in msg
    assert "a single lead" in msg
    with pytest.raises(ConfigError, match=r"train.rollout_steps=2 .*data.leads.random=false"):
        _validate(**{"train.rollout_steps": 2, "data.leads.random": True})
    with pytest.raises(ConfigError, match=r"train.rollout_steps"):
        _validate(**{"train.rollout_steps": 0})
    with pytest.raises(ConfigError, match=r"train.rollout_truncate"):
        _validate(**{"train.rollout_steps": 2, "train.rollout_truncate": -1})


def test_the_finetune_command_line_prints_one_error_line(capsys):
    from jobs.config import parse_args
    from jobs.train import TrainConfig
    from tests.helpers import ROOT

    with pytest.raises(SystemExit) as e:
        parse_args(TrainConfig, "", [str(ROOT / "configs/finetune/global.yaml"), "train.rollout_steps=3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "train.rollout_steps=3" in lines[0] and "data.leads.hours=[6.0, 24.0, 72.0, 120.0]" in lines[0]
    assert "set data.leads.random=false and data.leads.hours to a single lead" in lines[0]


def test_rollout_needs_every_time_varying_input_among_outputs(forecast_shards):
    from climax.loop import Worker
    from climax.tasks.forecast import ForecastTask
    from jobs.train import TrainConfig

    cfg = TrainConfig.model_validate({
        "model": {"patch_size": 2, "embed_dim": 32, "depth": 1, "decoder_depth": 1, "num_heads": 2,
                  "drop_path": 0.0, "drop_rate": 0.0},
        "data": {"datasets": [{"root": str(forecast_shards)}], "out_vars": ["2m_temperature"],
                 "leads": {"random": False, "hours": [6]}},
        "train": {"rollout_steps": 2}})
    task = ForecastTask(cfg, Worker(log=lambda *a, **k: None))
    model = task.build_model()
    with pytest.raises(ValueError, match=r"train.rollout_steps=2 feeds .* not outputs: add them to data.out_vars"):
        task.make_loaders(model)


# ------------------------------------------------------------------------------ end to end
def test_rollout_finetune_through_the_job(forecast_shards, tmp_path):
    """``jobs.finetune`` with ``train.rollout_steps=2`` from a checkpoint on two DDP workers (the chain's
    forward passes before one backward), then scored by evaluation's rollout."""
    from climax.checkpoint import load_model, save_checkpoint
    from climax.data import ShardDataset
    from climax.evaluation import evaluate_model
    from tests.test_train import TINY, checkpoints, config, last_metrics, run_job

    torch.manual_seed(0)  # the checkpoint it starts from: a tiny model of the data's variables and grid
    init = save_checkpoint(tiny_model(FORECAST_VARS, img_size=(16, 32), **{k: v for k, v in TINY.items()
                                                                           if k != "patch_size"}),
                           tmp_path / "init" / "model.pt")
    cfg = config(forecast_shards, tmp_path / "runs", **{
        "name": "rollout", "init_checkpoint": str(init), "train.epochs": 1, "train.steps_per_epoch": 3,
        "train.rollout_steps": 2, "data.leads": {"random": False, "hours": [6]}, "data.max_val_batches": 2,
        "scaling.num_workers": 2, "data.batch_size": 4,
        "observability.tensorboard": False})
    out = run_job("jobs.finetune", cfg, tmp_path)
    assert "rollout finetuning: 2 steps at 6 h" in out and "2 worker(s)" in out, out
    m = last_metrics(tmp_path / "runs" / "rollout")
    assert m["step"] == 3 and np.isfinite(m["train_loss"]) and np.isfinite(m["val_loss"])
    ckpt = checkpoints(tmp_path / "runs" / "rollout")[-1]
    model, _ = load_model(ckpt / "model.pt")
    ds = ShardDataset(str(forecast_shards))
    out_vars = [v for v in FORECAST_VARS if v in ds.variables]
    df = evaluate_model(model, ds, "test", FORECAST_VARS, out_vars, [6, 12], rollout_step=6, max_samples=4,
                        batch_size=4, progress=False)
    roll = df[df["method"] == "rollout"]
    assert set(roll["lead_hours"]) == {6, 12} and np.isfinite(roll["rmse"]).all()
