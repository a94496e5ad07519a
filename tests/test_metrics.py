"""Metrics against hand-computed values; optimiser groups and the schedule."""

import math

import numpy as np
import pytest
import torch

from climax.metrics import lat_weighted_acc, lat_weighted_mse, lat_weighted_rmse, lat_weights
from climax.optim import build_optimizer, param_groups, warmup_cosine
from tests.helpers import tiny_model

LAT = torch.linspace(-87.1875, 87.1875, 32)


def test_weights_sum_to_number_of_latitudes():
    w = lat_weights(LAT)
    assert w.sum().item() == pytest.approx(32, rel=1e-6)
    expected = np.cos(np.deg2rad(LAT.double().numpy()))
    np.testing.assert_allclose(w.numpy(), expected / expected.mean(), rtol=1e-6)


def test_constant_error_gives_rmse_of_its_size():
    y = torch.randn(4, 3, 32, 64)
    e = torch.tensor([0.5, -2.0, 3.0]).reshape(1, 3, 1, 1)
    rmse = lat_weighted_rmse(y + e, y, LAT)
    torch.testing.assert_close(rmse, e.abs().reshape(3), rtol=1e-5, atol=1e-5)
    assert lat_weighted_mse(y + 2.0, y, LAT).item() == pytest.approx(4.0, rel=1e-5)


def test_rmse_is_per_sample_then_averaged():
    y = torch.zeros(2, 1, 32, 64)
    pred = torch.cat([torch.full((1, 1, 32, 64), 1.0), torch.full((1, 1, 32, 64), 3.0)])
    assert lat_weighted_rmse(pred, y, LAT).item() == pytest.approx(2.0, rel=1e-6)  # not sqrt(5)


def test_weighted_mse_by_hand():
    lat = torch.tensor([-60.0, 0.0, 60.0])
    pred, y = torch.zeros(1, 1, 3, 2), torch.tensor([1.0, 2.0, 3.0]).reshape(1, 1, 3, 1).expand(1, 1, 3, 2)
    w = np.cos(np.deg2rad([-60, 0, 60]))
    w = w / w.mean()
    assert lat_weighted_mse(pred, y, lat).item() == pytest.approx(float((w * [1, 4, 9]).mean()), rel=1e-6)
    mask = torch.tensor([1.0, 0.0, 0.0]).reshape(1, 1, 3, 1)
    assert lat_weighted_mse(pred, y, lat, mask=mask).item() == pytest.approx(w[0] * 1, rel=1e-6)


def test_acc_perfect_negated_and_climatology():
    torch.manual_seed(0)
    clim = torch.randn(1, 2, 32, 64) * 10 + 280
    truth = clim + torch.randn(3, 2, 32, 64)
    torch.testing.assert_close(lat_weighted_acc(truth, truth, clim, LAT), torch.ones(2))
    torch.testing.assert_close(lat_weighted_acc(2 * clim - truth, truth, clim, LAT), -torch.ones(2))
    torch.testing.assert_close(lat_weighted_acc(clim.expand_as(truth), truth, clim, LAT), torch.zeros(2))
    # anomalies are against the climatology, not the batch mean: a uniform shift of a perfect
    # anomaly field is no longer perfect
    assert lat_weighted_acc(truth + 1.0, truth, clim, LAT).max() < 0.99


def test_no_weight_decay_on_embeddings_biases_norms():
    model = tiny_model(["2m_temperature", "orography"])
    decay, no_decay = param_groups(model, 0.05)
    ids = {id(p) for p in no_decay["params"]}
    named = dict(model.named_parameters())
    for name in ("var_embed", "var_query", "pos_embed", "lead_time_embed.weight", "lead_time_embed.bias",
                 "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "norm.bias"):
        assert id(named[name]) in ids, name
    assert id(named["blocks.0.attn.qkv.weight"]) not in ids
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)


def test_warmup_cosine_schedule():
    model = tiny_model(["2m_temperature"])
    opt = build_optimizer(model, lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=10, total_steps=110, min_factor=0.1)
    lrs = []
    for _ in range(120):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    # resuming at step 60 continues the same curve
    opt2 = build_optimizer(model, lr=1.0)
    warmup_cosine(opt2, warmup_steps=10, total_steps=110, min_factor=0.1, start_step=60)
    assert opt2.param_groups[0]["lr"] == pytest.approx(lrs[60])
