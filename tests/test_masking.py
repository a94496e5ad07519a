"""Masked-field reconstruction (climax/masking.py): mask counts, no leakage into the encoder, the
loss on masked points only, checkpoints with a decoder, and a short masked run on local Ray that
lowers the reconstruction loss and then finetunes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import tiny_model
from tests.test_train import VARS, checkpoints, config, dataset  # noqa: F401  (dataset: the shared fixture)

IN_VARS = ["land_sea_mask", "orography", "t2m", "u10", "z500", "t850", "q850", "r850"]
CONSTANTS = {"land_sea_mask", "orography"}
LAT = torch.linspace(-84.375, 84.375, 16)


def _model(seed: int = 0, **kw):
    from climax.masking import attach_decoder

    torch.manual_seed(seed)
    model = tiny_model(IN_VARS, **kw)  # 16 x 32 grid, patch 2: 128 tokens
    attach_decoder(model, dim=32, depth=1, num_heads=4)
    return model.eval()


def test_mask_counts_follow_the_config():
    from climax.masking import sample_mask

    droppable = [v not in CONSTANTS for v in IN_VARS]  # 6 droppable
    g = torch.Generator().manual_seed(0)
    m = sample_mask(5, 128, droppable, mask_ratio=0.75, var_drop=0.5, generator=g)
    assert m.keep.shape == (5, 32) and m.masked.shape == (5, 128) and m.var_keep.shape == (5, 8)
    assert (m.masked.sum(dim=1) == 96).all()  # 0.75 of 128 tokens hidden in every sample
    assert (torch.diff(m.keep, dim=1) > 0).all()  # distinct, sorted
    assert not m.masked.gather(1, m.keep).any()  # the kept ones are exactly the unmasked ones
    assert (m.var_keep[:, :2]).all()  # constants are never dropped
    assert ((~m.var_keep).sum(dim=1) == 3).all()  # 0.5 of the 6 time-varying variables
    assert len({tuple(r.tolist()) for r in m.keep}) == 5  # a different subset per sample
    again = sample_mask(5, 128, droppable, 0.75, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(again.keep, m.keep) and torch.equal(again.var_keep, m.var_keep)
    none = sample_mask(2, 128, droppable, mask_ratio=0.0, var_drop=0.0)
    assert not none.masked.any() and none.var_keep.all() and none.keep.shape == (2, 128)
    most = sample_mask(2, 10, [True] * 3, mask_ratio=0.99, var_drop=1.0)
    assert (most.keep.shape == (2, 1)) and ((~most.var_keep).sum(dim=1) == 2).all()  # one token, one variable left
    with pytest.raises(ValueError, match="mask_ratio"):
        sample_mask(2, 10, [True], mask_ratio=1.0)


def test_dropped_variables_are_exactly_absent():
    """The per-sample key-padding mask gives the aggregation of the sample without that variable,
    in the fast factorised path and in the reference nn.MultiheadAttention path."""
    model = _model()
    x = torch.randn(2, len(IN_VARS), 16, 32)
    ids = model.var_ids(IN_VARS)
    var_mask = torch.ones(2, len(IN_VARS), dtype=torch.bool)
    var_mask[0, 3] = var_mask[1, 5] = var_mask[1, 6] = False
    with torch.no_grad():
        fast = model.embed_and_aggregate(x, ids, var_mask)
        ref = model._aggregate_reference(model.embed_tokens(x, ids) + model.var_embed[:, ids].unsqueeze(2), var_mask)
        for b in range(2):
            kept = [i for i in range(len(IN_VARS)) if var_mask[b, i]]
            alone = model.embed_and_aggregate(x[b:b + 1, kept], [ids[i] for i in kept])
            torch.testing.assert_close(fast[b:b + 1], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


def test_no_leakage_of_masked_values_into_the_encoder():
    """Values under hidden patches and of dropped variables can be anything: the encoder output
    is bit-identical. A visible value does change it (the check is not vacuous)."""
    from climax.masking import sample_mask

    model = _model()
    x = torch.randn(3, len(IN_VARS), 16, 32)
    m = sample_mask(3, model.num_patches, [v not in CONSTANTS for v in IN_VARS], 0.75, 0.34,
                    torch.Generator().manual_seed(1))
    lead = torch.zeros(3)

    def encode(inp):
        with torch.no_grad():
            return model.forward_encoder(inp, lead, IN_VARS, var_mask=m.var_keep, keep=m.keep)

    out = encode(x)
    assert out.shape == (3, 32, model.embed_dim)
    hidden = m.loss_points(model.grid_size, model.patch_size, range(len(IN_VARS)))  # every hidden value
    assert hidden[:, :2].sum() == 3 * 96 * 4 * 2  # constants: hidden patches only
    noisy = torch.where(hidden, 1e3 * torch.randn_like(x), x)
    assert not torch.equal(noisy, x)
    assert torch.equal(encode(noisy), out)
    visible = x.clone()
    b, v = 0, int(torch.nonzero(m.var_keep[0])[-1])
    row, col = divmod(int(m.keep[0, 0]), model.grid_size[1])
    visible[b, v, row * 2, col * 2] += 1.0
    assert not torch.equal(encode(visible), out)


def test_loss_counts_only_masked_points():
    from climax.masking import MaskedObjective
    from climax.metrics import lat_weighted_mse, lat_weights

    model = _model()
    out_vars = [v for v in IN_VARS if v not in CONSTANTS]
    x = torch.randn(2, len(IN_VARS), 16, 32)
    objective = MaskedObjective(mask_ratio=0.5, var_drop=0.34)
    with torch.no_grad():
        pred, target, points, m = objective(model, x, IN_VARS, out_vars, torch.Generator().manual_seed(3),
                                            return_mask=True)
    assert pred.shape == target.shape == points.shape == (2, 6, 16, 32)
    torch.testing.assert_close(target, x[:, 2:])
    # hidden patches of every reconstructed variable, plus the dropped variables everywhere
    dropped = (~m.var_keep[:, 2:]).sum(dim=1)  # 2 of 6 per sample
    assert (dropped == 2).all()
    expect = 64 * 4 * (6 - 2) + 2 * 16 * 32
    assert (points.sum(dim=(1, 2, 3)) == expect).all()
    loss = lat_weighted_mse(pred, target, LAT, points)
    w = lat_weights(LAT).reshape(1, 1, -1, 1)
    manual = (((pred - target) ** 2 * w)[points]).sum() / points.sum()
    torch.testing.assert_close(loss, manual)
    # a prediction at visible points changes nothing
    other = torch.where(points, pred, pred + 5.0)
    assert torch.equal(lat_weighted_mse(other, target, LAT, points), loss)
    assert lat_weighted_mse(torch.where(points, pred + 5.0, pred), target, LAT, points) > loss
    with pytest.raises(ValueError, match="time-varying"):
        objective(model, x[:, :2], IN_VARS[:2], ["t2m"])


def test_checkpoint_with_decoder_loads_and_reports_it(tmp_path):
    from climax import ClimaX, load_checkpoint, load_model
    from climax.checkpoint import save_checkpoint

    model = _model()
    path = save_checkpoint(model, tmp_path / "model.pt")
    assert any(k.startswith("mae_decoder.") for k in torch.load(path, weights_only=True)["state_dict"])
    plain, report = load_model(path)
    assert not hasattr(plain, "mae_decoder") and report.decoder and not report.ignored
    assert report.exact and "ignored (pretraining decoder)" in str(report)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    load_checkpoint(ClimaX(**model.config), path, strict=True)  # the decoder does not break a strict load
    resumed = _model(seed=1)  # a model with its own decoder loads the saved one
    report = load_checkpoint(resumed, path, strict=True)
    assert not report.decoder and torch.equal(resumed.mae_decoder.pred.weight, model.mae_decoder.pred.weight)
    with pytest.raises(ValueError, match="attach_decoder"):
        from climax.masking import sample_mask

        plain(torch.zeros(1, 8, 16, 32), torch.zeros(1), IN_VARS,
              mask=sample_mask(1, plain.num_patches, [True] * 8))


def test_objective_config():
    from jobs.config import ConfigError, validate
    from jobs.objective import ObjectiveSpec

    assert not any(ObjectiveSpec().masked_at(s) for s in range(10))  # forecast is the default
    sched = ObjectiveSpec(kind="schedule", masked_steps=3)
    assert [sched.masked_at(s) for s in range(5)] == [True, True, True, False, False]
    mix = ObjectiveSpec(kind="mix", mix=0.3)
    share = np.mean([mix.masked_at(s, seed=0) for s in range(2000)])
    assert 0.25 < share < 0.35 and mix.masked_at(17, 0) == mix.masked_at(17, 0)
    with pytest.raises(ConfigError, match="masked_steps"):
        validate(ObjectiveSpec, {"kind": "schedule"})
    with pytest.raises(ConfigError, match="unknown key 'ratio'"):
        validate(ObjectiveSpec, {"kind": "masked", "ratio": 0.5})
    from jobs.train import TrainConfig

    with pytest.raises(ConfigError, match="pretrains the forecast task"):
        validate(TrainConfig, {"task": "downscaling",
                               "downscaling": {"coarse": {"root": "c"}, "fine": {"root": "f"}},
                               "objective": {"kind": "masked"}})


def test_masked_run_lowers_reconstruction_loss_then_finetunes(dataset, tmp_path, ray_local):  # noqa: F811
    """Masked steps then forecast steps (objective.kind=schedule) on the local Ray cluster: the
    validation reconstruction loss falls over the masked epochs; the checkpoint finetunes."""
    from climax import load_model
    from jobs.train import TrainConfig, fit

    cfg = config(dataset, tmp_path / "runs", **{
        "name": "masked", "train.epochs": 4, "train.steps_per_epoch": 15, "checkpoint.num_to_keep": None,
        "objective": {"kind": "schedule", "masked_steps": 45, "mask_ratio": 0.75, "var_drop": 0.25,
                      "decoder": {"dim": 32, "depth": 1, "num_heads": 4}}})
    result = fit(TrainConfig.model_validate(cfg))
    assert result.error is None and result.metrics["step"] == 60
    run = tmp_path / "runs" / "masked"
    per_epoch = sorted((torch.load(p / "model.pt", weights_only=True)["metrics"] for p in checkpoints(run)),
                       key=lambda m: m["epoch"])
    assert [m["epoch"] for m in per_epoch] == [1, 2, 3, 4]
    mask_loss = [m["val_mask_loss"] for m in per_epoch]
    assert mask_loss[2] < 0.8 * mask_loss[0], mask_loss
    assert "train_mask_loss" in per_epoch[2] and "train_mask_loss" not in per_epoch[3]  # epoch 4 forecasts
    _, report = load_model(checkpoints(run)[-1])
    assert report.decoder and all(k.startswith("mae_decoder.") for k in report.decoder)

    fine = config(dataset, tmp_path / "runs", **{
        "name": "finetuned", "init_checkpoint": str(checkpoints(run)[-1]),
        "data.leads": {"random": False, "hours": [6]}, "train.epochs": 1, "train.steps_per_epoch": 3})
    result = fit(TrainConfig.model_validate(fine))
    assert result.error is None and result.metrics["step"] == 3
    assert np.isfinite(result.metrics["val_rmse/2m_temperature@6h"])
    model, report = load_model(checkpoints(tmp_path / "runs" / "finetuned")[-1])
    assert not hasattr(model, "mae_decoder") and report.exact
