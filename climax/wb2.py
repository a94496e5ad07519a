"""WeatherBench 2 conventions for the scores: area weights, regions and mergeable sums.

WeatherBench 2 (Rasp et al. 2024; github.com/google-research/weatherbench2) defines its headline
RMSE as the square root of the time-mean of the area-weighted spatial MSE
(``weatherbench2.metrics.MSE`` averaged over time, square root taken after the evaluation), and its
bias as the time-mean of the area-weighted mean of forecast - truth (``metrics.Bias``). Area weights
are the cell areas of the latitude rows (``metrics.get_lat_weights``: sin of the upper cell bound
minus sin of the lower one, the bounds half way between rows and at the poles). On ClimaX's grids,
whose rows sit half a spacing off the poles, these are exactly proportional to cos(lat); on grids
with pole rows they are not, so they are computed here rather than taken from ``climax.metrics``.

The per-sample mean of RMSEs (WB2's ``RMSESqrtBeforeTimeAvg``, the ClimaX paper's and WeatherBench
1's convention) is kept beside it as ``rmse_sample_mean``.

Regions are WB2's default ones (``scripts/evaluate.py``, ``predefined_regions``): latitude and
longitude boxes, bounds inclusive (xarray label slices on increasing latitude), longitudes in
0..360. A region is a 0/1 mask over the grid that multiplies the full grid's weights, which is what
WB2's ``SliceRegion`` amounts to (it selects points; the weights stay those of the whole grid).

Everything is kept as sums over samples (:class:`ScoreSums`), so partial sums from separate
workers add up to exactly the same scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["WB2_REGIONS", "area_weights", "region_mask", "region_weight_matrix", "ScoreSums", "accumulate"]

_Box = tuple[float | None, float | None]
#: WeatherBench 2's default regions: name -> (latitude ranges, longitude ranges), inclusive, degrees
#: north and degrees east in 0..360; None: unbounded. From weatherbench2 scripts/evaluate.py.
WB2_REGIONS: dict[str, tuple[list[_Box], list[_Box]]] = {
    "global": ([(None, None)], [(None, None)]),
    "tropics": ([(-20, 20)], [(None, None)]),
    "extra-tropics": ([(None, -20), (20, None)], [(None, None)]),
    "northern-hemisphere": ([(20, None)], [(None, None)]),
    "southern-hemisphere": ([(None, -20)], [(None, None)]),
    "europe": ([(35, 75)], [(360 - 12.5, None), (0, 42.5)]),
    "north-america": ([(25, 60)], [(360 - 120, 360 - 75)]),
    "north-atlantic": ([(25, 65)], [(360 - 70, 360 - 10)]),
    "north-pacific": ([(25, 60)], [(145, 360 - 130)]),
    "east-asia": ([(25, 60)], [(102.5, 150)]),
    "ausnz": ([(-45, -12.5)], [(120, 175)]),
    "arctic": ([(60, 90)], [(None, None)]),
    "antarctic": ([(-90, -60)], [(None, None)]),
}


def area_weights(lat: np.ndarray) -> np.ndarray:
    """(H,) WB2's latitude weights (``metrics.get_lat_weights``), mean 1, in the order of ``lat``.

    Cell bounds are computed on increasing latitude (as WB2 sorts it) and mapped back.
    """
    lat = np.asarray(lat, dtype=np.float64)
    order = np.argsort(lat)
    x = np.deg2rad(lat[order])
    bounds = np.concatenate([[-np.pi / 2], (x[:-1] + x[1:]) / 2, [np.pi / 2]])
    if not (np.diff(bounds) > 0).all():
        raise ValueError("latitudes must be distinct and inside -90..90 to compute area weights")
    w = np.sin(bounds[1:]) - np.sin(bounds[:-1])
    out = np.empty_like(w)
    out[order] = w / w.mean()
    return out


def _in(values: np.ndarray, ranges: list[_Box]) -> np.ndarray:
    keep = np.zeros(values.shape, dtype=bool)
    for lo, hi in ranges:
        keep |= (values >= (-np.inf if lo is None else lo)) & (values <= (np.inf if hi is None else hi))
    return keep


def region_mask(name: str, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """(H, W) boolean: the grid points inside WB2 region ``name``."""
    if name not in WB2_REGIONS:
        raise ValueError(f"unknown region {name!r}; WeatherBench 2's regions are {list(WB2_REGIONS)}")
    lats, lons = WB2_REGIONS[name]
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64) % 360
    return _in(lat, lats)[:, None] & _in(lon, lons)[None, :]


def region_weight_matrix(weights: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    """(H*W, R): column r is the (H,) latitude weights spread over the grid, times mask r."""
    w = np.asarray(weights, dtype=np.float64)[:, None]
    return np.stack([(w * m).reshape(-1) for m in masks], axis=1)


@dataclass
class ScoreSums:
    """Sums over samples for one (method, lead): each (V, R) for V variables and R regions.

    ``sq_err``/``err``: area-weighted sums of (forecast - truth)**2 and forecast - truth over the
    region and the samples; ``weight``: the sum of the area weights over the region and the
    samples; ``rmse_samples``/``acc_samples``: sums of the per-sample RMSE and ACC (cos-latitude
    weights, as ``climax.metrics``); ``count``: samples. ``merge`` adds another's sums, so scores of
    merged partials equal those of one pass.
    """

    sq_err: torch.Tensor
    err: torch.Tensor
    weight: torch.Tensor
    rmse_samples: torch.Tensor
    acc_samples: torch.Tensor
    count: int = 0

    @classmethod
    def zeros(cls, n_vars: int, n_regions: int, device=None) -> ScoreSums:
        z = lambda: torch.zeros(n_vars, n_regions, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(), z(), z(), z(), z(), 0)

    def merge(self, other: ScoreSums) -> ScoreSums:
        return ScoreSums(self.sq_err + other.sq_err.to(self.sq_err.device), self.err + other.err.to(self.err.device),
                         self.weight + other.weight.to(self.weight.device),
                         self.rmse_samples + other.rmse_samples.to(self.rmse_samples.device),
                         self.acc_samples + other.acc_samples.to(self.acc_samples.device), self.count + other.count)

    def to(self, device) -> ScoreSums:
        return ScoreSums(self.sq_err.to(device), self.err.to(device), self.weight.to(device),
                         self.rmse_samples.to(device), self.acc_samples.to(device), self.count)

    def scores(self) -> dict[str, np.ndarray]:
        """(V, R) arrays: rmse (WB2), rmse_sample_mean, bias (WB2), acc."""
        n = max(self.count, 1)
        return {"rmse": (self.sq_err / self.weight).sqrt().cpu().numpy(),
                "rmse_sample_mean": (self.rmse_samples / n).cpu().numpy(),
                "bias": (self.err / self.weight).cpu().numpy(),
                "acc": (self.acc_samples / n).cpu().numpy()}


def accumulate(sums: ScoreSums, pred: torch.Tensor, truth: torch.Tensor, clim: torch.Tensor,
               area: torch.Tensor, cos: torch.Tensor, eps: float = 1e-12) -> None:
    """Add a batch (B, V, H, W) of float64 fields to ``sums`` in place.

    ``area``/``cos``: (H*W, R) region weight matrices (:func:`region_weight_matrix`) with WB2's
    area weights and with cos(lat) weights. One matrix product scores every region at once.
    """
    b, v = truth.shape[:2]
    err = (pred - truth).reshape(b, v, -1)
    sq = err * err
    sums.sq_err += (sq @ area).sum(0)
    sums.err += (err @ area).sum(0)
    sums.weight += area.sum(0)[None, :] * b
    # per sample, cos-latitude weighted (the ClimaX paper's RMSE and ACC, as climax.metrics)
    csum = cos.sum(0)
    sums.rmse_samples += ((sq @ cos) / csum).sqrt().sum(0)
    fa, oa = (pred - clim).reshape(b, v, -1), (truth - clim).reshape(b, v, -1)
    num = (fa * oa) @ cos
    den = ((fa * fa) @ cos * ((oa * oa) @ cos)).sqrt()
    sums.acc_samples += (num / den.clamp_min(eps)).sum(0)
    sums.count += b
