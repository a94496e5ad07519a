"""Checkpoint I/O: round trip, original Lightning files, other grids, other variable lists."""

import pytest
import torch

from climax import load_checkpoint, load_model, save_checkpoint
from climax.checkpoint import CheckpointError, read_checkpoint
from tests.helpers import tiny_model

VARS = ["land_sea_mask", "orography", "2m_temperature", "geopotential_500", "temperature_850"]


def _randomise(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_is_exact(tmp_path):
    src = _randomise(tiny_model(VARS))
    path = save_checkpoint(src, tmp_path / "ck" / "model.pt", step=7)
    dst = tiny_model(VARS)
    report = load_checkpoint(dst, path, strict=True)
    assert report.exact and _same(src, dst)
    rebuilt, _ = load_model(path)
    assert _same(src, rebuilt)
    assert read_checkpoint(path)[1]["step"] == 7
    assert not list((tmp_path / "ck").glob("*.tmp"))  # written under a temporary name, renamed


def _lightning(model, old_names=False):
    state = {}
    for k, v in model.state_dict().items():
        if old_names:
            k = (k.replace("var_embed", "channel_embed").replace("var_query", "channel_query")
                 .replace("var_agg", "channel_agg"))
        state["net." + k] = v
    state["climatology_buffer"] = torch.zeros(3)  # a non-net entry, as Lightning modules carry
    return {"state_dict": state, "epoch": 3, "global_step": 100, "pytorch-lightning_version": "1.9.0",
            "hyper_parameters": {"lr": 5e-4}}


@pytest.mark.parametrize("old_names", [False, True])
def test_lightning_dict_with_net_prefix_loads(tmp_path, old_names):
    src = _randomise(tiny_model(VARS))
    torch.save(_lightning(src, old_names), tmp_path / "climax.ckpt")
    dst = tiny_model(VARS)
    report = load_checkpoint(dst, tmp_path / "climax.ckpt")
    assert _same(src, dst)
    assert report.ignored == ["net.climatology_buffer".removeprefix("net.")]
    assert not report.initialised
    with pytest.raises(CheckpointError, match="strict"):
        load_checkpoint(tiny_model(VARS), tmp_path / "climax.ckpt", strict=True)


def test_other_grid_interpolates_pos_embed(tmp_path):
    src = _randomise(tiny_model(VARS, img_size=(16, 32)))
    torch.save(_lightning(src), tmp_path / "c.ckpt")  # no grid recorded: inferred as 8 x 16 patches
    dst = tiny_model(VARS, img_size=(32, 64))
    report = load_checkpoint(dst, tmp_path / "c.ckpt")
    assert any("8x16 -> 16x32" in s for s in report.interpolated)
    assert dst.pos_embed.shape == (1, 16 * 32, 64)
    # bicubic interpolation of a smooth table stays close to it: compare corners
    src_grid = src.pos_embed.reshape(8, 16, 64)
    dst_grid = dst.pos_embed.reshape(16, 32, 64)
    assert torch.allclose(dst_grid.mean(), src_grid.mean(), atol=0.1)
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_non_square_aspect_ratio(tmp_path):
    src = _randomise(tiny_model(VARS, img_size=(16, 32)))
    path = save_checkpoint(src, tmp_path / "m.pt")  # grid recorded
    dst = tiny_model(VARS, img_size=(8, 32))  # a regional box: 4 x 16 patches
    report = load_checkpoint(dst, path)
    assert any("8x16 -> 4x16" in s for s in report.interpolated)


def test_other_variable_list_maps_by_name(tmp_path):
    src = _randomise(tiny_model(VARS))
    path = save_checkpoint(src, tmp_path / "m.pt")
    new_vars = ["temperature_850", "2m_temperature", "specific_humidity_850", "orography"]
    dst = tiny_model(new_vars)
    fresh = tiny_model(new_vars).state_dict()
    dst.load_state_dict(fresh)
    report = load_checkpoint(dst, path)
    text = str(report)
    assert "specific_humidity_850" in text and "mapped" in text
    assert any("geopotential_500" in n or "land_sea_mask" in n for n in report.notes)
    # token embeddings follow the names
    assert torch.equal(dst.token_embeds[0].proj.weight, src.token_embeds[4].proj.weight)
    assert torch.equal(dst.token_embeds[3].proj.weight, src.token_embeds[1].proj.weight)
    assert torch.equal(dst.token_embeds[2].proj.weight, fresh["token_embeds.2.proj.weight"])
    assert torch.equal(dst.var_embed[0, 1], src.var_embed[0, 2])
    # head rows follow the names: predictions of a shared variable are identical
    p2 = 4
    src_rows = src.head[-1].weight.reshape(p2, len(VARS), -1)
    dst_rows = dst.head[-1].weight.reshape(p2, len(new_vars), -1)
    assert torch.equal(dst_rows[:, 0], src_rows[:, 4]) and torch.equal(dst_rows[:, 3], src_rows[:, 1])
    # and the blocks are the checkpoint's
    assert torch.equal(dst.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)
    x = torch.randn(1, 2, 16, 32)
    src.eval(), dst.eval()
    a = src(x, torch.ones(1) * 6, ["orography", "temperature_850"], ["2m_temperature"])
    b = dst(x, torch.ones(1) * 6, ["orography", "temperature_850"], ["2m_temperature"])
    torch.testing.assert_close(a, b)


def test_truncated_file_gives_a_clear_error(tmp_path):
    path = save_checkpoint(_randomise(tiny_model(VARS)), tmp_path / "m.pt")
    data = path.read_bytes()
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.ckpt.*truncated or corrupt"):
        load_checkpoint(tiny_model(VARS), bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tiny_model(VARS), tmp_path / "nope.ckpt")


def test_unnamed_variables_need_ckpt_vars(tmp_path):
    src = _randomise(tiny_model(VARS))
    torch.save({k: v for k, v in src.state_dict().items()}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="ckpt_vars"):
        load_checkpoint(tiny_model(VARS[:3]), tmp_path / "bare.pt")
    report = load_checkpoint(tiny_model(VARS[:3]), tmp_path / "bare.pt", ckpt_vars=VARS)
    assert any("token_embeds" in s for s in report.ignored)  # the two unused variables are reported
