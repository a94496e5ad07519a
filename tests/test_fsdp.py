"""FSDP2 vs DDP on CPU (gloo, 2 spawned ranks, no Ray): same losses, exact resume, our checkpoint
format; activation checkpointing changes nothing but memory (climax/parallel.py)."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch

VARS = ["2m_temperature", "geopotential_500", "temperature_850", "u_component_of_wind_850"]
# climax-tiny.yaml's layout on a small grid (fast on 2 cores)
TINY = dict(img_size=[16, 32], patch_size=4, embed_dim=192, depth=2, decoder_depth=1, num_heads=4,
            mlp_ratio=2.0, drop_path=0.0, drop_rate=0.0)
STEPS, WORLD, BATCH = 5, 2, 2
LAT = np.linspace(-80, 80, 16)


@pytest.fixture(scope="module")
def dataset(forecast_shards):
    """The session's generated, preprocessed forecast data (tests/conftest.py)."""
    return forecast_shards


def _model():
    from climax.model import ClimaX

    torch.manual_seed(0)
    return ClimaX(VARS, **TINY)


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)  # different per rank, equal across strategies
    x = torch.randn(BATCH, len(VARS), 16, 32, generator=g)
    y = torch.randn(BATCH, len(VARS), 16, 32, generator=g)
    return SimpleNamespace(x=x, y=y, lead_hours=torch.full((BATCH,), 6.0), in_vars=VARS, out_vars=VARS,
                           dataset="synthetic", input_time=[])


def _run(strategy: str, rank: int, steps: range, ac: bool = False, resume: str | None = None,
         save_at: int | None = None, save_dir: str | None = None):
    from climax.parallel import load_sharded_train_state, save_sharded_train_state, shard_model
    from climax.training import TrainState, train_step

    model = shard_model(_model(), strategy, activation_checkpointing=ac)
    if strategy == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    from climax.optim import build_optimizer, warmup_cosine

    opt = build_optimizer(model, 1e-3, 1e-2)  # after sharding: the optimiser holds the sharded parameters
    state = TrainState()
    if resume:  # as jobs/train.py's start_or_resume: weights and optimiser first, then the schedule
        state = load_sharded_train_state(resume, model, opt)
    sched = warmup_cosine(opt, 2, STEPS, start_step=state.step)
    losses = []
    for step in steps:
        losses.append(train_step(model, _batch(rank, step), opt, sched, LAT, torch.device("cpu"), 1.0, bf16=False))
        state.step += 1
        if save_at is not None and state.step == save_at:
            save_sharded_train_state(save_dir, model, opt, sched, state, in_vars=VARS, out_vars=VARS)
    return losses, model, opt


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from climax.parallel import full_optimizer_state_dict, full_state_dict

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        res = {}
        res["ddp"], ddp, ddp_opt = _run("ddp", rank, range(STEPS))
        ddp_sd = full_state_dict(ddp)
        res["ddp_keys"] = sorted(ddp_sd)
        res["fsdp"], fsdp, fsdp_opt = _run("fsdp", rank, range(STEPS), save_at=3, save_dir=os.path.join(out, "ckpt"))
        fsdp_sd = full_state_dict(fsdp)
        res["fsdp_sd"] = fsdp_sd
        res["ddp_sd"] = ddp_sd
        fsdp_osd = full_optimizer_state_dict(fsdp, fsdp_opt)  # the full copies are rank 0's only
        res["fsdp_opt_keys"] = sorted(fsdp_osd.get("state", {}))
        res["fsdp_ac"], fsdp_ac, _ = _run("fsdp", rank, range(STEPS), ac=True)
        res["fsdp_ac_sd"] = full_state_dict(fsdp_ac)
        dist.barrier()  # rank 0 wrote the step-3 checkpoint
        res["resumed"], resumed, _ = _run("fsdp", rank, range(3, STEPS), resume=os.path.join(out, "ckpt"))
        res["resumed_sd"] = full_state_dict(resumed)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_fsdp_matches_ddp_loss_trajectory(runs):
    _, res = runs
    for r in res:
        assert len(r["fsdp"]) == STEPS
        np.testing.assert_allclose(r["fsdp"], r["ddp"], rtol=0, atol=1e-5)
        assert r["ddp"][0] != r["ddp"][-1]  # it trained
    for k, v in res[0]["ddp_sd"].items():
        torch.testing.assert_close(res[0]["fsdp_sd"][k], v, rtol=0, atol=1e-5)


def test_activation_checkpointing_same_losses(runs):
    _, res = runs
    for r in res:
        np.testing.assert_allclose(r["fsdp_ac"], r["fsdp"], rtol=0, atol=1e-6)
    for k, v in res[0]["fsdp_sd"].items():
        torch.testing.assert_close(res[0]["fsdp_ac_sd"][k], v, rtol=0, atol=1e-6)


def test_fsdp_resume_is_exact(runs):
    _, res = runs
    for r in res:
        assert r["resumed"] == r["fsdp"][3:]  # bit-exact steps 4-5
    for k, v in res[0]["fsdp_sd"].items():
        assert torch.equal(res[0]["resumed_sd"][k], v), k


def test_fsdp_checkpoint_is_our_format(runs):
    from climax.checkpoint import load_checkpoint
    from climax.model import ClimaX
    from climax.training import read_train_state

    out, res = runs
    assert res[0]["fsdp_sd"].keys() == res[0]["ddp_sd"].keys()
    assert res[0]["ddp_keys"] == sorted(_model().state_dict())  # bare names, no module./FSDP prefixes
    assert res[0]["fsdp_opt_keys"] == sorted(n for n, _ in _model().named_parameters())
    plain = ClimaX(VARS, **TINY)
    load_checkpoint(plain, out / "ckpt", strict=True)
    assert sorted(plain.state_dict()) == res[0]["ddp_keys"]
    for v in plain.state_dict().values():
        assert type(v) is torch.Tensor and v.device.type == "cpu"  # not DTensors
    assert read_train_state(out / "ckpt")["state"]["step"] == 3


def test_activation_checkpointing_same_gradients():
    from climax.parallel import shard_model

    x = _batch(0, 0)
    grads = []
    for ac in (False, True):
        model = shard_model(_model(), "ddp", activation_checkpointing=ac)
        model(x.x, x.lead_hours, VARS, VARS).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=0, atol=1e-6)
    with torch.no_grad():  # evaluation runs the blocks plainly
        assert model(x.x, x.lead_hours, VARS, VARS).shape == x.y.shape


def test_unknown_strategy_names_the_choices():
    from climax.parallel import shard_model

    with pytest.raises(ValueError, match="ddp.*fsdp"):
        shard_model(_model(), "zero3")


@pytest.mark.slow
def test_training_job_with_fsdp_resumes_and_loads(dataset, tmp_path):
    """The job's own path: 2 Ray Train workers (gloo), scaling.strategy=fsdp with activation
    checkpointing, a relaunch that resumes from the FSDP checkpoint, and the checkpoint loads with
    ``climax.load_model`` (our format)."""
    from climax.checkpoint import load_model
    from jobs.train import TrainConfig, fit
    from tests.test_train import config

    cfg = config(dataset, tmp_path / "runs", **{"name": "fsdp", "train.epochs": 1, "train.steps_per_epoch": 3,
                                             "scaling.num_workers": 2, "scaling.strategy": "fsdp",
                                             "train.activation_checkpointing": True})
    first = fit(TrainConfig.model_validate(cfg))
    assert first.metrics["step"] == 3 and np.isfinite(first.metrics["val_loss"])
    cfg["train"]["epochs"] = 2
    second = fit(TrainConfig.model_validate(cfg))
    assert second.metrics["step"] == 6 and second.metrics["restarts"] == 1
    model, report = load_model(second.checkpoint.path)
    assert sum(p.numel() for p in model.parameters()) > 0 and not report.initialised and not report.ignored
