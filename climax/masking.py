"""Masked-field reconstruction, a pretraining objective beside ClimaX's forecasting (issue 9).

As masked autoencoders do for images (He et al., 2022, MAE), the model sees a sample at lead time
0 with most of it hidden and reconstructs what is hidden:

- **Variable dropping** (before the aggregation): for each sample, ``var_drop`` of its droppable
  variables (the time-varying inputs; constants such as the land-sea mask are always kept) are
  removed from the set that the cross-attention aggregation merges into one token per patch. This
  is an exact per-sample key-padding mask (``ClimaX.embed_and_aggregate(var_mask=...)``): a dropped
  variable's values are replaced by zeros and its attention scores by -inf, so the token of every
  patch is what the model would compute had the sample never had that variable (batches share one
  variable list, so dropping it from the list would drop it for the whole batch).
- **Patch masking** (after aggregation, position and lead-time embedding): ``mask_ratio`` of the
  tokens of each sample (default 0.75) are dropped before the transformer blocks, MAE-style (a
  per-sample random subset is gathered), so the encoder only runs on the kept quarter.
- **Decoder** (``MaskedDecoder``, attached to the encoder as ``mae_decoder``): a light transformer
  (MAE's design) takes the encoded kept tokens, puts a learned mask token at every dropped position,
  adds fixed sin-cos position embeddings and predicts every variable's p x p values of every patch.
- **Loss**: ``climax.metrics.lat_weighted_mse`` with a mask: the masked patches of every
  reconstructed variable plus the dropped variables everywhere; kept values never count.

- **Model**: ``MaskedAutoencoder`` (encoder + decoder) is what trains; the ClimaX encoder itself only
  forecasts. The decoder is registered on the encoder (``ClimaX.DECODER``), so the encoder's
  checkpoint carries its weights under ``mae_decoder.`` (a masked run continues, a finetuning run
  starts from it) and ``load_checkpoint`` reports them as "ignored (pretraining decoder)" when a plain
  ClimaX (finetuning, evaluation) loads the checkpoint.

Training-loop entry points: ``MaskedObjective`` (one call per training step, from
``climax.training.train_step``), ``validate_masked`` and ``step_generator`` (the forecast task,
``climax/tasks/forecast.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from climax.metrics import lat_weighted_mse
from climax.model import ClimaX, get_2d_sincos_pos_embed
from climax.training import autocast, unwrap

__all__ = ["DECODER", "Mask", "MaskedAutoencoder", "MaskedDecoder", "MaskedObjective", "attach_decoder",
           "reconstruct", "sample_mask", "step_generator", "validate_masked"]

#: Attribute (and state-dict prefix) of the pretraining decoder on a ClimaX (declared by the model).
DECODER = ClimaX.DECODER


@dataclass(frozen=True)
class Mask:
    """What one batch hides. ``keep``: (B, n_keep) indices of the patches the encoder sees (sorted);
    ``masked``: (B, L) True where a patch is hidden; ``var_keep``: (B, V) False where a variable
    (of the batch's ``in_vars``) is dropped for that sample."""

    keep: torch.Tensor
    masked: torch.Tensor
    var_keep: torch.Tensor

    def to(self, device) -> Mask:
        return Mask(self.keep.to(device), self.masked.to(device), self.var_keep.to(device))

    def loss_points(self, grid: tuple[int, int], patch_size: int, var_index: Sequence[int]) -> torch.Tensor:
        """(B, len(var_index), H, W) bool: the points the loss counts for those variables (indices
        into ``in_vars``): every hidden patch, and a dropped variable everywhere."""
        B = self.masked.shape[0]
        hidden = self.masked.reshape(B, 1, *grid)
        hidden = hidden.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)
        dropped = ~self.var_keep[:, list(var_index)]
        return hidden | dropped[:, :, None, None]


def sample_mask(batch_size: int, num_patches: int, droppable: Sequence[bool], mask_ratio: float = 0.75,
                var_drop: float = 0.25, generator: torch.Generator | None = None) -> Mask:
    """Draw a ``Mask``: per sample, ``round(mask_ratio * num_patches)`` hidden patches (at least one
    is kept) and ``round(var_drop * n)`` of the ``n`` droppable variables dropped (at least one
    variable is kept). ``droppable``: one flag per input variable. Same generator state, same mask."""
    if not 0 <= mask_ratio < 1 or not 0 <= var_drop <= 1:
        raise ValueError(f"need 0 <= mask_ratio < 1 and 0 <= var_drop <= 1, got {mask_ratio}, {var_drop}")
    L, V = int(num_patches), len(droppable)
    n_keep = min(L, max(1, L - round(mask_ratio * L)))
    order = torch.rand(batch_size, L, generator=generator).argsort(dim=1)
    keep = order[:, :n_keep].sort(dim=1).values
    masked = torch.ones(batch_size, L, dtype=torch.bool).scatter_(1, keep, False)
    cand = torch.as_tensor([i for i, d in enumerate(droppable) if d], dtype=torch.long)
    n_drop = min(round(var_drop * len(cand)), len(cand), V - 1)
    var_keep = torch.ones(batch_size, V, dtype=torch.bool)
    if n_drop > 0:
        pick = torch.rand(batch_size, len(cand), generator=generator).argsort(dim=1)[:, :n_drop]
        var_keep.scatter_(1, cand[pick], False)
    return Mask(keep, masked, var_keep)


def step_generator(seed: int, step: int, rank: int = 0, stream: int = 0) -> torch.Generator:
    """The mask generator of one training step on one rank (``stream`` 1: validation batch ``step``):
    a resumed run draws the same masks."""
    entropy = [int(seed), int(stream), int(rank), int(step)]
    return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))


class MaskedDecoder(nn.Module):
    """MAE's light decoder: Linear(D, dim), mask tokens at the hidden positions, fixed 2-D sin-cos
    position embeddings, ``depth`` timm blocks, LayerNorm, Linear(dim, V * p * p) (the forecast
    head's layout, so ``ClimaX.unpatchify`` applies)."""

    def __init__(self, num_vars: int, grid_size: Sequence[int], patch_size: int, embed_dim: int,
                 dim: int = 128, depth: int = 2, num_heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads or dim % 4:
            raise ValueError(f"decoder dim {dim} must be a multiple of 4 and of num_heads {num_heads}")
        self.config = dict(dim=dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        pos = torch.from_numpy(get_2d_sincos_pos_embed(dim, *grid_size)).float().unsqueeze(0)
        self.register_buffer("pos_embed", pos, persistent=False)  # fixed: not in the state dict
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, num_vars * patch_size**2)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(B, n_keep, D) encoded tokens at patch indices ``keep`` -> (B, L, V * p * p)."""
        z = self.embed(tokens)
        B, _, d = z.shape
        full = self.mask_token.to(z.dtype).expand(B, self.pos_embed.shape[1], d)
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, d), z) + self.pos_embed.to(z.dtype)
        for blk in self.blocks:
            full = blk(full)
        return self.pred(self.norm(full))


def attach_decoder(model: ClimaX, dim: int = 128, depth: int = 2, num_heads: int = 4,
                   mlp_ratio: float = 4.0) -> MaskedDecoder:
    """Give ``model`` a pretraining decoder (``model.mae_decoder``; saved under ``mae_decoder.``)."""
    decoder = MaskedDecoder(len(model.default_vars), model.grid_size, model.patch_size, model.embed_dim,
                            dim, depth, num_heads, mlp_ratio)
    model.add_module(DECODER, decoder)
    return decoder


def reconstruct(model: ClimaX, x: torch.Tensor, lead_times: torch.Tensor, in_vars: Sequence[str],
                out_vars: Sequence[str] | None, mask: Mask) -> torch.Tensor:
    """The encoder on the kept tokens and kept variables, the decoder on every position;
    (B, len(out_vars or in_vars), H, W)."""
    decoder = getattr(model, DECODER, None)
    if decoder is None:
        raise ValueError("this ClimaX has no masked-pretraining decoder: call climax.masking.attach_decoder(model) "
                         "first (jobs: objective.kind=masked, schedule or mix)")
    tokens = model.forward_encoder(x, lead_times, in_vars, var_mask=mask.var_keep, keep=mask.keep)
    preds = model.unpatchify(decoder(tokens, mask.keep))
    return preds[:, model.var_ids(out_vars if out_vars is not None else in_vars)]


class MaskedAutoencoder(nn.Module):
    """Encoder (a ClimaX with a decoder from ``attach_decoder``) + its ``mae_decoder``: the module a
    masked run trains (and hands to DDP, so both paths synchronise their gradients).

    ``forward(..., mask=None)`` forecasts with the encoder (validation, forecast steps of a schedule);
    with a ``Mask`` it reconstructs (``reconstruct``). Checkpoints hold the encoder (``.encoder``),
    whose state dict carries the decoder under ``mae_decoder.``.
    """

    def __init__(self, encoder: ClimaX):
        super().__init__()
        if getattr(encoder, DECODER, None) is None:
            raise ValueError("this ClimaX has no masked-pretraining decoder: call climax.masking.attach_decoder(model) "
                             "first (jobs: objective.kind=masked, schedule or mix)")
        self.encoder = encoder

    @property
    def decoder(self) -> MaskedDecoder:
        return getattr(self.encoder, DECODER)

    def forward(self, x: torch.Tensor, lead_times: torch.Tensor, in_vars: Sequence[str],
                out_vars: Sequence[str] | None = None, region=None, mask: Mask | None = None) -> torch.Tensor:
        if mask is None:
            return self.encoder(x, lead_times, in_vars, out_vars, region=region)
        return reconstruct(self.encoder, x, lead_times, in_vars, out_vars, mask)


@dataclass(frozen=True)
class MaskedObjective:
    """One masked-reconstruction step's forward pass: ``(pred, target, loss_points)`` for
    ``lat_weighted_mse(pred, target, lat, loss_points)``.

    The reconstructed (and droppable) variables are the inputs that are also time-varying outputs
    of the batch; constants are always seen and never scored. Lead time 0.
    """

    mask_ratio: float = 0.75
    var_drop: float = 0.25

    def __call__(self, model: nn.Module, x: torch.Tensor, in_vars: Sequence[str], out_vars: Sequence[str],
                 generator: torch.Generator | None = None, *, return_mask: bool = False):
        net = unwrap(model)  # call the (DDP) wrapper, read the shapes from the model
        if isinstance(net, ClimaX):
            if net is not model:
                raise ValueError("wrap the ClimaX in climax.masking.MaskedAutoencoder before DDP / torch.compile")
            model = net = MaskedAutoencoder(net)
        net = net.encoder
        recon = [v for v in in_vars if v in set(out_vars)]
        if not recon:
            raise ValueError(f"masked pretraining reconstructs the time-varying inputs, but none of {list(in_vars)} "
                             f"is among the outputs {list(out_vars)}; check data.in_vars / data.out_vars")
        mask = sample_mask(x.shape[0], net.num_patches, [v in recon for v in in_vars], self.mask_ratio,
                           self.var_drop, generator).to(x.device)
        zero = torch.zeros(x.shape[0], device=x.device)
        pred = model(x, zero, in_vars, recon, mask=mask)
        index = [list(in_vars).index(v) for v in recon]
        points = mask.loss_points(net.grid_size, net.patch_size, index)
        out = (pred, x[:, index], points)
        return (*out, mask) if return_mask else out


@torch.no_grad()
def validate_masked(model: nn.Module, batches: Iterable, lat: np.ndarray, objective: MaskedObjective,
                    device: torch.device, *, bf16: bool = True, seed: int = 0) -> dict:
    """Reconstruction loss on ``batches`` with masks fixed by (seed, batch number): comparable across
    epochs. Sums are all-reduced when a process group is initialised."""
    model.eval()
    lat_t = torch.as_tensor(np.asarray(lat), dtype=torch.float32, device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for k, batch in enumerate(batches):
        x = batch.x.to(device)
        with autocast(device, bf16=bf16):
            pred, target, points = objective(model, x, batch.in_vars, batch.out_vars, step_generator(seed, k, stream=1))
        sums[0] += float(lat_weighted_mse(pred.float(), target, lat_t, points)) * x.shape[0]
        sums[1] += x.shape[0]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    return {"val_mask_loss": float(sums[0]) / max(float(sums[1]), 1.0)}


def decoder_parameters(state: dict) -> int:
    """Number of values of the pretraining decoder in a state dict (for reports)."""
    return sum(math.prod(v.shape) for k, v in state.items() if k.startswith(DECODER + "."))
