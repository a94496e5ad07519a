"""ClimaX architecture: shapes, gradients, permutation invariance, the exact fast aggregation."""

import pytest
import torch
import yaml

from climax import ClimaX
from tests.helpers import ROOT, tiny_model

VARS = ["land_sea_mask", "orography", "2m_temperature", "geopotential_500", "temperature_850"]


def test_output_shapes_and_selection():
    model = tiny_model(VARS).eval()
    x = torch.randn(3, 4, 16, 32)
    in_vars = ["2m_temperature", "land_sea_mask", "temperature_850", "orography"]
    out = model(x, torch.tensor([6.0, 24.0, 72.0]), in_vars, ["temperature_850", "2m_temperature"])
    assert out.shape == (3, 2, 16, 32)
    assert model(x, torch.full((3,), 6.0), in_vars).shape == (3, len(VARS), 16, 32)


def test_unknown_variable_lists_the_known_ones():
    model = tiny_model(VARS)
    with pytest.raises(KeyError, match="geopotential_500"):
        model(torch.randn(1, 1, 16, 32), torch.ones(1), ["no_such_var"])


def test_gradient_reaches_every_parameter():
    model = tiny_model(VARS)
    x = torch.randn(2, len(VARS), 16, 32)
    model(x, torch.tensor([6.0, 12.0]), VARS).pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # var_query starts at zero, so its gradient can only be zero when the query bias is zero too;
    # give the attention a non-trivial start to check the path exists.
    assert missing in ([], ["var_query"]), missing
    with torch.no_grad():
        model.var_agg.in_proj_bias.normal_()
    model.zero_grad()
    model(x, torch.tensor([6.0, 12.0]), VARS).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_permuting_inputs_with_their_names_leaves_output_unchanged():
    model = tiny_model(VARS).eval()
    x = torch.randn(2, len(VARS), 16, 32)
    lead = torch.tensor([6.0, 48.0])
    perm = [3, 0, 4, 2, 1]
    a = model(x, lead, VARS, VARS)
    b = model(x[:, perm], lead, [VARS[i] for i in perm], VARS)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_heads", [1, 4])
def test_fast_aggregation_equals_reference(num_heads):
    torch.manual_seed(0)
    model = tiny_model(VARS, num_heads=num_heads).eval()
    with torch.no_grad():  # random weights everywhere, query and biases included
        for p in model.var_agg.parameters():
            p.normal_(0, 0.1)
        model.var_query.normal_()
    tokens = torch.randn(2, len(VARS), model.num_patches, model.embed_dim, dtype=torch.float32)
    fast = model.aggregate_variables(tokens)
    model.fast_var_agg = False
    ref = model.aggregate_variables(tokens)
    assert fast.shape == ref.shape == (2, model.num_patches, model.embed_dim)
    assert (fast - ref).abs().max().item() < 1e-4
    # the fused embedding + aggregation equals embedding then the reference aggregation
    x = torch.randn(2, 3, 16, 32)
    ids = model.var_ids(VARS[:3])
    fused = model.embed_and_aggregate(x, ids)
    staged = model._aggregate_reference(model.embed_tokens(x, ids) + model.var_embed[:, ids].unsqueeze(2))
    assert (fused - staged).abs().max().item() < 1e-4
    # ... and through the whole model
    x = torch.randn(2, 3, 16, 32)
    out_ref = model(x, torch.tensor([6.0, 6.0]), VARS[:3])
    model.fast_var_agg = True
    out_fast = model(x, torch.tensor([6.0, 6.0]), VARS[:3])
    assert (out_fast - out_ref).abs().max().item() < 1e-4


def test_patch_embedding_equals_the_convolutions():
    model = tiny_model(VARS)
    x = torch.randn(2, 2, 16, 32)
    ids = model.var_ids(["temperature_850", "orography"])
    fast = model.embed_tokens(x, ids)
    ref = torch.stack([model.token_embeds[i](x[:, k : k + 1]) for k, i in enumerate(ids)], dim=1)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


def test_default_config_has_the_published_size():
    cfg = yaml.safe_load((ROOT / "configs/model/climax-5.625.yaml").read_text())
    model = ClimaX(**cfg)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 108.1
    assert model.blocks[0].attn.fused_attn  # timm blocks run scaled_dot_product_attention


def test_initialisation():
    model = tiny_model(VARS)
    assert torch.all(model.var_query == 0)
    assert torch.all(model.blocks[0].norm1.weight == 1) and torch.all(model.blocks[0].norm1.bias == 0)
    assert torch.all(model.head[0].bias == 0)
    assert model.head[0].weight.std().item() == pytest.approx(0.02, rel=0.2)
    # var_embed and pos_embed start as sin-cos tables: first row of var_embed is sin(0)=0, cos(0)=1
    d = model.embed_dim
    assert torch.allclose(model.var_embed[0, 0, : d // 2], torch.zeros(d // 2))
    assert torch.allclose(model.var_embed[0, 0, d // 2 :], torch.ones(d // 2))


def test_fast_path_gradients_equal_reference():
    torch.manual_seed(0)
    model = tiny_model(VARS).train()
    with torch.no_grad():
        model.var_query.normal_()
        model.var_agg.in_proj_bias.normal_(0, 0.1)
    x, lead = torch.randn(2, len(VARS), 16, 32), torch.tensor([6.0, 24.0])
    grads = []
    for fast in (True, False):
        model.fast_var_agg = fast
        model.zero_grad()
        torch.manual_seed(1)  # same dropout masks (none here) and same everything else
        model(x, lead, VARS).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        ref = grads[1][name]
        assert (g - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item()), name


def test_model_config_mirrors_the_constructor_and_names_bad_keys():
    """climax.config.ModelConfig has one field per ClimaX argument with ClimaX's defaults; every shipped
    model YAML validates, records which keys it set, and builds the same model as ClimaX(**yaml)."""
    import inspect

    from climax.config import ModelConfig, resolve_model_config, run_model_config

    params = inspect.signature(ClimaX.__init__).parameters
    assert list(ModelConfig.model_fields) == [p for p in params if p != "self"]
    for name, field in ModelConfig.model_fields.items():
        if params[name].default is not inspect.Parameter.empty:
            assert field.default == params[name].default, name
    for path in sorted((ROOT / "configs/model").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        assert resolve_model_config(str(path)).model_fields_set == set(raw)
    cfg = resolve_model_config("configs/model/climax-5.625.yaml")
    torch.manual_seed(0)
    a = ClimaX.from_config(cfg)
    torch.manual_seed(0)
    b = ClimaX(**yaml.safe_load((ROOT / "configs/model/climax-5.625.yaml").read_text()))
    assert a.config == b.config
    with pytest.raises(ValueError, match="unknown key 'embed_dimm'; allowed keys: default_vars"):
        resolve_model_config({"embed_dimm": 8})
    with pytest.raises(FileNotFoundError, match="model configuration nope.yaml does not exist"):
        resolve_model_config("nope.yaml")
    # a run from a checkpoint: the recorded configuration, the keys the user set on top (not default_vars)
    recorded = dict(tiny_model(VARS).config)
    merged = run_model_config({"depth": 3, "default_vars": ["x"]}, user_set=True, recorded=recorded)
    assert merged.depth == 3 and merged.default_vars == VARS and merged.embed_dim == recorded["embed_dim"]
    assert run_model_config("configs/model/climax-5.625.yaml", user_set=False, recorded=recorded).embed_dim == \
        recorded["embed_dim"]
