"""The ClimaX architecture (Nguyen et al., 2023, arXiv 2301.10343), checkpoint-compatible.

One file, in the spirit of timm's ``vision_transformer.py``: the model, its initialisation and its
embedding tables live here; checkpoint loading and filtering live beside it in ``checkpoint.py``.

Data flow for ``model(x, lead_times, in_vars, out_vars)`` with x of shape (B, V, H, W):

1. every variable is cut into p x p patches and embedded on its own (one 1-channel conv per
   default variable, kernel = stride = p)                                   -> (B, V, L, D)
2. the learned embedding of each variable is added                          -> (B, V, L, D)
3. variable aggregation: one learned query cross-attends over the V tokens of each patch
                                                                            -> (B, L, D)
4. position embedding + lead-time embedding (Linear(1, D) of hours / 100), dropout
5. ``depth`` pre-norm transformer blocks (timm ``Block``, fused SDPA attention), final LayerNorm
6. head: ``decoder_depth`` x (Linear(D, D), GELU), Linear(D, V * p * p); unpatchify to
   (B, V_default, H, W) and select the output variables.

State-dict names equal those of the released ClimaX checkpoints (``token_embeds.{i}.proj``,
``var_embed``, ``var_query``, ``var_agg``, ``pos_embed``, ``lead_time_embed``, ``blocks``, ``norm``,
``head``), so the original weights load without renaming.

Exact fast variable aggregation
-------------------------------
``var_agg`` is a ``torch.nn.MultiheadAttention`` whose query is one learned vector q shared by
every patch. For head h with projections W_q, W_k, W_v (rows of ``in_proj_weight``) the score of
token x_v is ``(W_q q + b_q)_h . (W_k,h x_v + b_k,h) / sqrt(d) = u_h . x_v + c_h``, where
``u_h = W_k,h^T (W_q q + b_q)_h / sqrt(d)`` and c_h does not depend on v (so it cancels in the
softmax). The value projection is linear and the attention weights sum to one, hence
``sum_v a_hv (W_v,h x_v + b_v,h) = W_v,h (sum_v a_hv x_v) + b_v,h``. We therefore compute one
D-vector u_h per head, the scores u_h . x_v, the attention-weighted sum of the *raw* tokens per
head, and apply the value and output projections once per patch. That replaces the 2 V D^2 FLOPs
per patch of projecting every key and value by about 2 H V D + D^2, and never materialises the
projected keys and values (``aggregate_variables``).

The forward pass goes one step further (``embed_and_aggregate``): the patch embedding is linear
too, x_v = P_v p_v + c_v with p_v the p*p pixels of the patch and c_v the conv bias plus the
variable embedding. So the scores are ``(P_v^T u_h) . p_v + u_h . c_v`` and the per-head output is
``sum_v a_hv (W_v,h P_v) p_v + sum_v a_hv W_v,h c_v + b_v,h``; the small products P_v^T u_h and
W_v,h P_v are formed once per step from the weights. The (B, V, L, D) token tensor, the largest
activation of the original model, is never built. ``fast_var_agg=False`` runs the straightforward
``nn.MultiheadAttention`` call on the embedded tokens; the tests keep it as the reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block, PatchEmbed
from torch import nn

from climax.config import ModelConfig
from climax.neck import TimeNeck
from climax.pos_embed import get_1d_sincos_embed, get_2d_sincos_pos_embed
from climax.regions import Region
from climax.sampling import check_history

__all__ = ["ClimaX", "check_history", "get_1d_sincos_embed", "get_2d_sincos_pos_embed"]


class ClimaX(nn.Module):
    """ClimaX: a vision transformer over a variable set, forecasting at a given lead time.

    The model declares its own parameter groups, as timm models do: ``no_weight_decay()`` (the
    embedding tables AdamW must not shrink; ``climax.optim``), ``backbone_names()`` (what
    ``freeze_backbone`` freezes; ``climax.training``) and ``DECODER`` (the attribute and
    state-dict prefix of a masked-pretraining decoder; ``climax.masking``, ``climax.checkpoint``).

    Args:
        default_vars: names of every variable the model knows, in embedding order. Inputs may be
            any subset in any order; outputs are selected by name.
        img_size: (H, W) of the lat/lon grid, e.g. (32, 64) at 5.625 deg, (128, 256) at 1.40625 deg.
        patch_size: side p of the square patches; H and W must be multiples of p.
        embed_dim: token width D.
        depth: number of transformer blocks.
        decoder_depth: number of (Linear(D, D), GELU) pairs in the head before the output layer.
        num_heads: attention heads in the blocks and in the variable aggregation.
        mlp_ratio: hidden width of the block MLPs relative to D.
        drop_path: stochastic-depth rate of the last block (rising linearly from 0 in the first).
        drop_rate: dropout after the embeddings and inside the blocks (projection and MLP).
        fast_var_agg: use the exact factorised variable aggregation (see module docstring).
        history_hours: input times relative to the initial time, oldest first, ending at 0 (default
            [0]: one input time, no neck). With several, ``x`` is (B, T, V, H, W) and a
            ``climax.neck.TimeNeck`` (``neck``) merges the T steps' aggregated tokens before the position
            and lead-time embeddings; it starts as the identity on the current step.
    """

    #: Top-level parameters without weight decay (ClimaX applies none to its embedding tables).
    NO_WEIGHT_DECAY = ("var_embed", "var_query", "pos_embed", "lead_time_embed", "neck.embed", "neck.query")
    #: The backbone frozen by ``freeze_backbone``: the variable aggregation, position and lead-time
    #: embeddings and the transformer. Patch and variable embeddings (new variables must learn
    #: theirs) and the head stay trainable.
    BACKBONE = ("var_query", "var_agg", "pos_embed", "lead_time_embed", "blocks", "norm")
    #: Attribute (and state-dict prefix) of a masked-pretraining decoder (``climax.masking``).
    DECODER = "mae_decoder"

    def __init__(
        self,
        default_vars: Sequence[str],
        img_size: Sequence[int] = (32, 64),
        patch_size: int = 2,
        embed_dim: int = 1024,
        depth: int = 8,
        decoder_depth: int = 2,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.1,
        drop_rate: float = 0.1,
        *,
        fast_var_agg: bool = True,
        history_hours: Sequence[float] | None = None,
    ):
        super().__init__()
        if len(set(default_vars)) != len(default_vars):
            raise ValueError(f"default_vars has duplicates: {list(default_vars)}")
        h, w = (int(s) for s in img_size)
        if h % patch_size or w % patch_size:
            raise ValueError(f"img_size {(h, w)} is not a multiple of patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.default_vars = list(default_vars)
        self.var_map = {v: i for i, v in enumerate(self.default_vars)}
        self.img_size = (h, w)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.fast_var_agg = fast_var_agg
        # Recorded so that checkpoints can rebuild the model (see checkpoint.save_checkpoint).
        self.config = dict(
            default_vars=self.default_vars, img_size=[h, w], patch_size=patch_size,
            embed_dim=embed_dim, depth=depth, decoder_depth=decoder_depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, drop_path=drop_path, drop_rate=drop_rate,
        )
        self.history_hours = check_history(history_hours)
        if len(self.history_hours) > 1:  # recorded only then: one-step checkpoints stay as they were
            self.config["history_hours"] = list(self.history_hours)

        V = len(self.default_vars)
        self.token_embeds = nn.ModuleList(
            [PatchEmbed(self.img_size, patch_size, 1, embed_dim) for _ in range(V)]
        )
        self.grid_size = (h // patch_size, w // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.var_embed = nn.Parameter(torch.zeros(1, V, embed_dim))
        self.var_query = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.var_agg = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        self.lead_time_embed = nn.Linear(1, embed_dim)
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path, depth)]
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[i],
                      norm_layer=nn.LayerNorm, proj_drop=drop_rate)
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim)
        head: list[nn.Module] = []
        for _ in range(decoder_depth):
            head += [nn.Linear(embed_dim, embed_dim), nn.GELU()]
        head.append(nn.Linear(embed_dim, V * patch_size**2))
        self.head = nn.Sequential(*head)
        self.initialize_weights()
        # after the initialisation above (which would overwrite its zero output projection), and
        # created last so that a one-step model draws the same random numbers as before
        self.neck = TimeNeck(embed_dim, num_heads, len(self.history_hours), residual=True) \
            if len(self.history_hours) > 1 else None

    @classmethod
    def from_config(cls, config: ModelConfig) -> ClimaX:
        """The model of a validated ``climax.config.ModelConfig`` (``default_vars`` given)."""
        if config.default_vars is None:
            raise ValueError("the model configuration names no default_vars; set them (the training job takes "
                             "the data's)")
        return cls(**config.model_dump())

    # ------------------------------------------------------------------ initialisation
    def initialize_weights(self) -> None:
        """All initialisation in one place (ClimaX/MAE conventions)."""
        pos = get_2d_sincos_pos_embed(self.embed_dim, *self.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        var = get_1d_sincos_embed(self.embed_dim, np.arange(len(self.default_vars)))
        self.var_embed.data.copy_(torch.from_numpy(var).float().unsqueeze(0))
        self.var_query.data.zero_()
        for emb in self.token_embeds:
            w = emb.proj.weight.data
            trunc_normal_(w.view(w.shape[0], -1), std=0.02)
            nn.init.zeros_(emb.proj.bias)
        self.apply(self._init_module)

    @staticmethod
    def _init_module(m: nn.Module) -> None:
        # var_agg's in_proj is a bare Parameter, not a Linear: it keeps torch's xavier-uniform
        # init (zero bias), as in the original; its out_proj is a Linear and is covered here.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ parameter groups
    def no_weight_decay(self) -> set[str]:
        """Names of the parameters AdamW must not decay (timm's hook): the embedding tables."""
        return {n for n, _ in self.named_parameters() if n.split(".")[0] in self.NO_WEIGHT_DECAY
                or n in self.NO_WEIGHT_DECAY}

    def backbone_names(self) -> set[str]:
        """Names of the backbone's parameters (frozen when finetuning with ``freeze_backbone``)."""
        return {n for n, _ in self.named_parameters() if n.split(".")[0] in self.BACKBONE}

    # ------------------------------------------------------------------ helpers
    def var_ids(self, variables: Sequence[str]) -> list[int]:
        """Indices of ``variables`` in ``default_vars``; unknown names raise with the known list."""
        unknown = [v for v in variables if v not in self.var_map]
        if unknown:
            raise KeyError(
                f"unknown variable(s) {unknown}; this model knows {self.default_vars}. Use names "
                "from that list, or finetune with the new variables added to default_vars."
            )
        return [self.var_map[v] for v in variables]

    def embed_tokens(self, x: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """Per-variable patch embedding, (B, V, H, W) -> (B, V, L, D).

        Kernel = stride = p, so each conv is a matmul over flattened patches; we gather the
        selected variables' conv weights and do all of them in one batched einsum instead of V
        separate convolutions (same parameters, same result).
        """
        B, V, H, W = x.shape
        p = self.patch_size
        patches = x.reshape(B, V, H // p, p, W // p, p).permute(0, 1, 2, 4, 3, 5)
        patches = patches.reshape(B, V, (H // p) * (W // p), p * p)
        weight = torch.stack([self.token_embeds[i].proj.weight.reshape(self.embed_dim, p * p) for i in ids])
        bias = torch.stack([self.token_embeds[i].proj.bias for i in ids])
        return torch.einsum("bvlk,vdk->bvld", patches, weight) + bias[None, :, None, :]

    def aggregate_variables(self, x: torch.Tensor) -> torch.Tensor:
        """Cross-attention of the learned query over the V tokens of each patch: (B,V,L,D)->(B,L,D)."""
        if not self.fast_var_agg:
            return self._aggregate_reference(x)
        B, V, L, D = x.shape
        H, dh = self.num_heads, D // self.num_heads
        w_q, w_k, w_v = self.var_agg.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.var_agg.in_proj_bias.chunk(3)
        q = F.linear(self.var_query.reshape(1, D), w_q, b_q).reshape(H, dh)  # projected query
        u = torch.einsum("he,hed->hd", q, w_k.reshape(H, dh, D)) / math.sqrt(dh)  # (H, D)
        attn = torch.einsum("bvld,hd->blhv", x, u).softmax(dim=-1)  # key bias cancels in softmax
        mixed = torch.einsum("blhv,bvld->blhd", attn, x)  # weighted sum of raw tokens, per head
        out = torch.einsum("blhd,hed->blhe", mixed, w_v.reshape(H, dh, D)) + b_v.reshape(H, dh)
        return self.var_agg.out_proj(out.reshape(B, L, D))

    def embed_and_aggregate(self, x: torch.Tensor, ids: list[int],
                            var_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding, variable embedding and aggregation fused: (B, V, H, W) -> (B, L, D).

        Exactly ``aggregate_variables(embed_tokens(x, ids) + var_embed)`` (see the module
        docstring), without materialising the (B, V, L, D) tokens. H and W may be those of a
        regional crop (multiples of p); L is then the crop's number of patches.
        ``var_mask`` (B, V) bool, False = variable absent from that sample (masked pretraining):
        its values are replaced by zeros and its attention scores by -inf, an exact key-padding mask.
        """
        B, V, Hh, Ww = x.shape
        p, D, nh = self.patch_size, self.embed_dim, self.num_heads
        dh, k, L = D // nh, p * p, (Hh // p) * (Ww // p)
        if var_mask is not None:
            x = torch.where(var_mask[:, :, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        patches = x.reshape(B, V, Hh // p, p, Ww // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B * L, V, k)
        w_p = torch.stack([self.token_embeds[i].proj.weight.reshape(D, k) for i in ids])  # (V, D, k)
        c = torch.stack([self.token_embeds[i].proj.bias for i in ids]) + self.var_embed[0, ids]  # (V, D)
        w_q, w_k, w_v = self.var_agg.in_proj_weight.chunk(3)
        b_q, _, b_v = self.var_agg.in_proj_bias.chunk(3)  # the key bias cancels in the softmax
        q = F.linear(self.var_query.reshape(1, D), w_q, b_q).reshape(nh, dh)
        u = torch.einsum("he,hed->hd", q, w_k.reshape(nh, dh, D)) / math.sqrt(dh)  # (nh, D)
        scores = torch.einsum("nvk,vkh->nhv", patches, torch.einsum("vdk,hd->vkh", w_p, u))
        scores = scores + torch.einsum("vd,hd->hv", c, u)
        if var_mask is not None:
            absent = (~var_mask)[:, None, None, :].expand(B, L, 1, V).reshape(B * L, 1, V)
            scores = scores.masked_fill(absent, float("-inf"))
        attn = scores.softmax(dim=-1)  # (N, nh, V)
        w_vh = w_v.reshape(nh, dh, D)
        m = torch.einsum("hed,vdk->hvke", w_vh, w_p).reshape(nh, V * k, dh)  # value proj of pixels
        mixed = (attn.unsqueeze(-1) * patches.unsqueeze(1)).reshape(B * L, nh, V * k)
        out = torch.einsum("nhj,hje->nhe", mixed, m)
        out = out + torch.einsum("nhv,hve->nhe", attn, torch.einsum("hed,vd->hve", w_vh, c)) + b_v.reshape(nh, dh)
        return self.var_agg.out_proj(out.reshape(B, L, D))

    def _aggregate_reference(self, x: torch.Tensor, var_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The straightforward formulation of the original code (projects all V x L tokens)."""
        B, V, L, D = x.shape
        x = x.permute(0, 2, 1, 3).reshape(B * L, V, D)
        query = self.var_query.expand(B * L, -1, -1)
        pad = None if var_mask is None else (~var_mask)[:, None, :].expand(B, L, V).reshape(B * L, V)
        out, _ = self.var_agg(query, x, x, key_padding_mask=pad, need_weights=False)
        return out.reshape(B, L, D)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, L, p*p*V) -> (B, V, H, W); channel order (p, q, c) as in the original head.

        ``grid``: the (rows, cols) of patches, default the whole grid (a region's ``patch_grid``).
        """
        p, c = self.patch_size, len(self.default_vars)
        h, w = grid if grid is not None else self.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    # ------------------------------------------------------------------ forward
    def check_grid(self, x: torch.Tensor, region: Region | None) -> None:
        expect = self.img_size if region is None else region.shape
        if tuple(x.shape[-2:]) != tuple(expect):
            where = "the model's img_size" if region is None else f"region {region.name!r}"
            raise ValueError(f"input grid {tuple(x.shape[-2:])} does not match {where} {tuple(expect)}")
        if region is not None and (tuple(region.grid_shape) != self.img_size or region.patch_size != self.patch_size):
            raise ValueError(f"region {region.name!r} was cut from a {region.grid_shape} grid with patch "
                             f"{region.patch_size}; this model has {self.img_size}, patch {self.patch_size}")

    def forward_encoder(self, x: torch.Tensor, lead_times: torch.Tensor, in_vars: Sequence[str],
                        region: Region | None = None, extra_embed: torch.Tensor | None = None,
                        var_mask: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens after the final norm, (B, L, D); L is the region's patch count when given.

        ``x``: (B, V, H, W), or (B, T, V, H, W) for a model with ``history_hours`` of T steps (oldest
        first; T = 1 is accepted by a one-step model).
        ``extra_embed`` (B, 1 or L, D): added with the position and lead-time embeddings (the
        projection task's time-in-window embedding, ``climax.projection``).
        Masked pretraining (``climax/masking.py``): ``var_mask`` (B, V) bool drops variables per sample
        before the aggregation; ``keep`` (B, L_keep) patch indices keeps only those tokens (MAE).
        """
        T, steps = len(self.history_hours), None
        if x.ndim == 5:  # (B, T, V, H, W): one field per history step, oldest first
            if x.shape[1] != T:
                raise ValueError(f"x holds {x.shape[1]} input times; this model takes {T} (history_hours "
                                 f"{self.history_hours})")
            steps = x.shape[:2]
            x = x.flatten(0, 1)
            if var_mask is not None:
                var_mask = var_mask.repeat_interleave(T, dim=0)
        elif T > 1:
            raise ValueError(f"this model takes {T} input times (history_hours {self.history_hours}): x must be "
                             f"(batch, {T}, variables, lat, lon), got {tuple(x.shape)}")
        if x.shape[1] != len(in_vars):
            raise ValueError(f"x has {x.shape[1]} channels but {len(in_vars)} variable names were given")
        self.check_grid(x, region)
        ids = self.var_ids(in_vars)
        if self.fast_var_agg:
            tokens = self.embed_and_aggregate(x, ids, var_mask)
        else:
            tokens = self._aggregate_reference(self.embed_tokens(x, ids) + self.var_embed[:, ids].unsqueeze(2),
                                               var_mask)
        if steps is not None:  # history: the steps' tokens merged into one set (climax.neck)
            tokens = tokens.unflatten(0, steps)
            tokens = self.neck.merge(tokens) if self.neck is not None else tokens[:, 0]
        if region is None:
            tokens = tokens + self.pos_embed
        else:  # only the box's patches, with their own position embeddings
            tokens = tokens + self.pos_embed[:, torch.as_tensor(region.patch_ids(), device=tokens.device)]
        lead = lead_times.to(tokens.dtype).reshape(-1, 1) / 100.0  # hours / 100, as the original
        tokens = tokens + self.lead_time_embed(lead).unsqueeze(1)
        if extra_embed is not None:
            tokens = tokens + extra_embed
        if keep is not None:  # only the kept tokens enter the blocks
            tokens = tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        tokens = self.pos_drop(tokens)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)

    def forward(
        self,
        x: torch.Tensor,
        lead_times: torch.Tensor,
        in_vars: Sequence[str],
        out_vars: Sequence[str] | None = None,
        region: Region | None = None,
        mask: object = None,
    ) -> torch.Tensor:
        """Predict ``out_vars`` (default: all default variables) at ``lead_times`` hours ahead.

        x: (B, len(in_vars), H, W) normalised fields, or the crop of a ``region`` (then H, W are
        the region's and only its patches and position embeddings are used); lead_times: (B,) in
        hours. Returns (B, len(out_vars), H, W).
        ``mask``: refused; masked-field reconstruction is ``climax.masking.MaskedAutoencoder``
        (this encoder plus a decoder from ``attach_decoder``), not a mode of the forecaster.
        """
        if mask is not None:
            raise ValueError("ClimaX forecasts and takes no mask: reconstruct with climax.masking.MaskedAutoencoder"
                             "(model), after climax.masking.attach_decoder(model)")
        out_ids = self.var_ids(out_vars) if out_vars is not None else None
        tokens = self.forward_encoder(x, lead_times, in_vars, region)
        preds = self.unpatchify(self.head(tokens), None if region is None else region.patch_grid)
        return preds if out_ids is None else preds[:, out_ids]
