"""GPU-only checks (skipped without CUDA; CI has none): the bf16 training step, ``torch.compile``
and checkpoints of a compiled model. Run on a GPU machine with ``pytest tests/test_gpu.py``."""

import numpy as np
import pytest
import torch

from climax import ClimaX
from climax.optim import build_optimizer
from climax.training import TrainState, load_train_state, save_train_state, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VARS = ["2m_temperature", "geopotential_500", "temperature_850"]


class _Batch:
    def __init__(self, device, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(4, 3, 16, 32, generator=g)
        self.y = 0.8 * self.x + 0.2 * torch.randn(4, 3, 16, 32, generator=g)
        self.lead_hours = torch.full((4,), 24.0)
        self.in_vars = self.out_vars = VARS
        self.dataset, self.input_time = "random", ["-"]


def _model():
    torch.manual_seed(0)
    return ClimaX(VARS, img_size=(16, 32), patch_size=4, embed_dim=64, depth=2, num_heads=4,
                  drop_path=0.0, drop_rate=0.0)


@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_step_learns_and_checkpoint_keys_are_bare(tmp_path, compiled):
    device = torch.device("cuda")
    model = _model().to(device)
    step_model = torch.compile(model) if compiled else model
    opt = build_optimizer(model, lr=3e-3)
    lat = np.linspace(-84, 84, 16)
    batch = _Batch(device)
    losses = [train_step(step_model, batch, opt, None, lat, device, bf16=True) for _ in range(60)]
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0]
    save_train_state(tmp_path, step_model, opt, None, TrainState(step=60))
    fresh = _model().to(device)
    state = load_train_state(tmp_path, fresh, build_optimizer(fresh, lr=1e-3))
    assert state.step == 60
    for (k, a), (k2, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k


@pytest.mark.parametrize("compiled", [False, True])
def test_masked_pretraining_step_on_gpu(compiled):
    from climax.masking import MaskedObjective, attach_decoder

    device = torch.device("cuda")
    model = _model()
    attach_decoder(model, dim=32, depth=1, num_heads=4)
    model = model.to(device)
    step_model = torch.compile(model) if compiled else model
    opt = build_optimizer(model, lr=3e-3)
    lat = np.linspace(-84, 84, 16)
    batch, objective = _Batch(device), MaskedObjective(0.75, 0.25)
    # reconstruction needs structure: smooth fields, the variables scaled copies of one another
    g = torch.Generator().manual_seed(2)
    base = torch.nn.functional.interpolate(torch.randn(4, 1, 4, 8, generator=g), size=(16, 32), mode="bilinear")
    batch.x = batch.y = base * torch.tensor([1.0, -0.8, 0.6]).reshape(1, 3, 1, 1) / base.std()
    gen = torch.Generator().manual_seed(0)
    losses = [train_step(step_model, batch, opt, None, lat, device, bf16=True, masked=objective, generator=gen)
              for _ in range(100)]
    assert np.isfinite(losses).all() and np.mean(losses[-10:]) < 0.85 * np.mean(losses[:10])


def test_bf16_forward_close_to_fp32():
    device = torch.device("cuda")
    model = _model().to(device).eval()
    b = _Batch(device, seed=1)
    x, lead = b.x.to(device), b.lead_hours.to(device)
    with torch.no_grad():
        ref = model(x, lead, VARS).double()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, lead, VARS).double()
    assert float((out - ref).norm() / ref.norm()) < 2e-2
