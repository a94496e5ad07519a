"""The time neck: several input times merged into one, before (forecast) or after (projection) the backbone.

One module for both users (``docs/design.md``, "History input"):

* forecasting with history (``ClimaX(history_hours=[-12, -6, 0])``): each history step is embedded and
  aggregated over variables on its own, giving (B, T, L, D) tokens; ``TimeNeck.merge`` adds the learned
  time embedding of each step and lets one learned query attend across the T steps of each token,
  giving (B, L, D) for the backbone. ``residual=True``: the result is the current step's tokens plus
  the attention's output projection, which starts at zero, so a fresh neck passes the current step
  through unchanged (exactly: a pretrained checkpoint without a neck forecasts as before, and a neck
  of one step is the identity) and learns what the earlier steps add.
* climate projection (``climax.projection.ProjectionModel``, ClimaX's ClimateBench model): the time
  embedding (``embed``, sin-cos initialised) is added to each year's tokens inside the backbone, and
  ``pool`` (the same one-query attention, no residual) merges the space-averaged year vectors after it.

State-dict names: ``embed`` (1, T, D), ``query`` (1, 1, D), ``attn`` (an ``nn.MultiheadAttention``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from climax.pos_embed import get_1d_sincos_embed

__all__ = ["TimeNeck"]


class TimeNeck(nn.Module):
    """A learned embedding per time step and one learned query attending across the steps.

    Args:
        dim, num_heads: token width and attention heads.
        steps: time steps T (oldest first, the current one last).
        residual: ``merge`` returns the last step plus the attention output (whose output
            projection starts at zero, and the time embedding at zero): exactly the last step at
            initialisation. False: the attention output alone, torch's initialisation, the time
            embedding sin-cos initialised (the projection model's, as the original ClimaX).
    """

    def __init__(self, dim: int, num_heads: int, steps: int, residual: bool = False):
        super().__init__()
        if steps < 1:
            raise ValueError(f"a time neck needs at least 1 step, got {steps}")
        self.steps, self.residual = int(steps), bool(residual)
        # creation order (embed, query, attn) fixes the random initialisation: the projection model's
        # parameters are drawn exactly as before they lived here
        self.embed = nn.Parameter(torch.zeros(1, self.steps, dim))
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        if residual:  # zero time embedding, zero output projection: the last step passes unchanged
            nn.init.zeros_(self.attn.out_proj.weight)
            nn.init.zeros_(self.attn.out_proj.bias)
        else:
            self.embed.data.copy_(torch.from_numpy(get_1d_sincos_embed(dim, np.arange(self.steps))).float()[None])

    def pool(self, seq: torch.Tensor) -> torch.Tensor:
        """(N, T, D) -> (N, D): the query attends over the T steps of each row (no residual, no embedding:
        the projection model adds the embedding inside its backbone)."""
        if seq.shape[1] != self.steps:
            raise ValueError(f"the time neck has {self.steps} steps, the input {seq.shape[1]}")
        out, _ = self.attn(self.query.expand(seq.shape[0], -1, -1), seq, seq, need_weights=False)
        return out[:, 0]

    def merge(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, L, D) tokens of T steps -> (B, L, D): time embedding, then ``pool`` per token."""
        B, T, L, D = tokens.shape
        if T != self.steps:
            raise ValueError(f"the time neck has {self.steps} steps, the input {T}")
        seq = (tokens + self.embed[:, :, None, :]).transpose(1, 2).reshape(B * L, T, D)
        if self.residual:  # the residual is the current step as it came, without its time embedding
            return tokens[:, -1] + self.pool(seq).reshape(B, L, D)
        return self.pool(seq).reshape(B, L, D)
