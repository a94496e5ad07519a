"""The loss and the metrics, all latitude-weighted (one home for both).

Latitude weights are cos(lat) / mean(cos(lat)) over the grid's latitudes, so they sum to the number
of latitudes and an unweighted mean over the grid of ``w * f`` is the area-weighted mean of ``f``.
Shapes: fields are (B, V, H, W); ``lat`` is (H,) in degrees, in the same order as the rows.
"""

from __future__ import annotations

import torch

__all__ = ["lat_weights", "lat_weighted_mse", "lat_weighted_rmse", "lat_weighted_acc", "lat_weighted_bias",
           "lat_weighted_pearson"]


def lat_weights(lat: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(H,) weights cos(lat) / mean(cos(lat))."""
    w = torch.cos(torch.deg2rad(torch.as_tensor(lat, dtype=torch.float64)))
    return (w / w.mean()).to(dtype)


def _w(lat: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return lat_weights(lat).to(device=ref.device, dtype=ref.dtype).reshape(-1, 1)  # (H, 1)


def lat_weighted_mse(pred: torch.Tensor, target: torch.Tensor, lat: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss: latitude-weighted MSE over every sample, variable and grid point.

    ``mask`` (broadcastable to pred, 1 where counted) restricts the mean to those points.
    """
    err = (pred - target) ** 2 * _w(lat, pred)
    if mask is None:
        return err.mean()
    mask = mask.to(err.dtype).expand_as(err)
    return (err * mask).sum() / mask.sum().clamp_min(1)


def lat_weighted_rmse(pred: torch.Tensor, target: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
    """(V,) RMSE per variable: per sample over the grid, then averaged over the batch.

    This is the ClimaX paper's / WeatherBench 1's convention (WeatherBench 2 calls it
    ``RMSESqrtBeforeTimeAvg``); WeatherBench 2's headline RMSE takes the square root after the
    time-mean (``climax.wb2``). Pass physical (de-normalised) values to get physical units.
    """
    mse = ((pred - target) ** 2 * _w(lat, pred)).mean(dim=(-2, -1))  # (B, V)
    return mse.sqrt().mean(dim=0)


def lat_weighted_acc(pred: torch.Tensor, target: torch.Tensor, climatology: torch.Tensor,
                     lat: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(V,) anomaly correlation coefficient per variable, averaged over the batch.

    Anomalies are taken against ``climatology`` (broadcastable to pred, for example the
    day-of-year and hour climatology of each sample's valid time), not against the batch mean.
    A forecast equal to the climatology has no anomaly and scores 0.
    """
    w = _w(lat, pred)
    fa, oa = pred - climatology, target - climatology
    num = (w * fa * oa).sum(dim=(-2, -1))
    den = ((w * fa**2).sum(dim=(-2, -1)) * (w * oa**2).sum(dim=(-2, -1))).sqrt()
    return (num / den.clamp_min(eps)).mean(dim=0)


def lat_weighted_bias(pred: torch.Tensor, target: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
    """(V,) mean bias per variable: the area-weighted mean of ``pred - target`` over the grid,
    averaged over the batch (positive: the prediction is too high)."""
    return ((pred - target) * _w(lat, pred)).mean(dim=(-2, -1)).mean(dim=0)


def lat_weighted_pearson(pred: torch.Tensor, target: torch.Tensor, lat: torch.Tensor,
                         eps: float = 1e-12) -> torch.Tensor:
    """(V,) Pearson correlation per variable: the area-weighted spatial correlation of each map
    with its target (each about its own weighted mean), averaged over the batch."""
    w = _w(lat, pred)
    pa = pred - (pred * w).mean(dim=(-2, -1), keepdim=True)
    ta = target - (target * w).mean(dim=(-2, -1), keepdim=True)
    num = (w * pa * ta).sum(dim=(-2, -1))
    den = ((w * pa**2).sum(dim=(-2, -1)) * (w * ta**2).sum(dim=(-2, -1))).sqrt()
    return (num / den.clamp_min(eps)).mean(dim=0)
