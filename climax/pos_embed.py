"""MAE's fixed sin-cos tables, the position and variable embeddings' starting values (``climax.model``)
and the projection neck's time embedding (``climax.neck``). Their own home so that the neck and the
model share them without an import circle."""

from __future__ import annotations

import numpy as np

__all__ = ["get_1d_sincos_embed", "get_2d_sincos_pos_embed"]


def get_1d_sincos_embed(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """MAE's 1-D sin-cos table: (len(positions), embed_dim), sin half then cos half, base 10000."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even for a sin-cos table, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", np.asarray(positions, dtype=np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """MAE's 2-D sin-cos table (grid_h * grid_w, embed_dim): half the channels per axis.

    Row-major over (h, w) like the patch order; the first half encodes the w coordinate and the
    second the h coordinate, exactly as MAE/ClimaX build it (``np.meshgrid(grid_w, grid_h)``).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for a 2-D sin-cos table, got {embed_dim}")
    gw, gh = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
    emb_w = get_1d_sincos_embed(embed_dim // 2, gw)
    emb_h = get_1d_sincos_embed(embed_dim // 2, gh)
    return np.concatenate([emb_w, emb_h], axis=1)
