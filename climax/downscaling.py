"""Downscaling (issue 8): coarse fields in, the same (or other) variables on a finer grid out.

As in the ClimaX paper, the coarse input (e.g. ERA5 or a CMIP6 model at 5.625 deg) is regridded
bilinearly onto the fine grid (e.g. 1.40625 deg) and fed to the ordinary ClimaX backbone at the fine
grid at lead time 0; the target is the fine dataset at the same time. Both sides are ordinary shard
datasets written by ``jobs.preprocess``.

* :func:`paired_indices`: the time steps a split of both datasets holds (the intersection of the
  two time axes), as row indices into each.
* :class:`DownscalingLoader`: ``climax.data.Batch`` objects whose ``x`` is the coarse input on the
  coarse grid, normalised with the coarse set's statistics, and whose ``y`` is the fine target,
  normalised with the fine set's; ``lead_hours`` is 0.
* :func:`bilinear_matrix` / :class:`Downscaler`: the upsampling (a torch op, per batch, on the
  model's device) and the model around ClimaX: upsampled coarse inputs plus the fine set's
  constants (orography, land-sea mask at the fine resolution) in, the fine variables out; with
  ``residual`` the network predicts the correction to the bilinear field.
* :class:`DownscalingScores` / :func:`evaluate_downscaling`: latitude-weighted RMSE, mean bias and
  Pearson correlation per variable, in physical units, for the model and the bilinear baseline.

Why the upsampling is not ``pipelines/regrid.py``: ``climax/`` may not import ``pipelines`` (no
Ray, no preprocessing stack in the model package), and the interpolation runs per batch on the
GPU inside the forward pass. The convention is the same as the pipeline's ``bilinear`` method (and
is tested against it): linear in latitude between row centres, the outermost rows held constant
towards the poles; linear and periodic in longitude across 0/360. ``F.interpolate`` is not used:
the shard grids put longitude centres at 0, r, 2r, ... (not at r/2), so neither of its
``align_corners`` conventions matches both axes of a coarse/fine pair, and it does not wrap in
longitude. The weights are two small dense matrices built from the grids' coordinates, applied as
one ``einsum``.

Imports neither Ray nor ``pipelines``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from climax.data import Batch
from climax.metrics import lat_weighted_bias, lat_weighted_mse, lat_weighted_pearson, lat_weighted_rmse
from climax.model import ClimaX
from climax.training import autocast, unwrap

__all__ = ["resolve_variables", "make_downscaler", "paired_indices", "DownscalingLoader", "bilinear_matrix",
           "Downscaler", "DownscalingScores", "evaluate_downscaling", "METHODS"]

_F32 = np.float32
METHODS = ("downscaled", "bilinear")


# ----------------------------------------------------------------------------- variables
def resolve_variables(coarse, fine, in_vars: Sequence[str] | None = None, constants: Sequence[str] | None = None,
                      out_vars: Sequence[str] | None = None) -> tuple[list[str], list[str], list[str]]:
    """(coarse inputs, fine constants, fine outputs) with the defaults filled in and checked.

    Defaults: every time-varying variable of the coarse set; every constant of the fine set; every
    time-varying variable of the fine set.
    """
    in_vars = list(coarse.variables if in_vars is None else in_vars)
    constants = list(fine.constants if constants is None else constants)
    out_vars = list(fine.variables if out_vars is None else out_vars)

    def missing(names, have, what, ds, key):
        bad = [v for v in names if v not in have]
        if bad:
            raise ValueError(f"downscaling.{key}: the {what} dataset {ds.root} has no {bad}; it has {sorted(have)}")

    missing(in_vars, set(coarse.variables) | set(coarse.constants), "coarse", coarse, "in_vars")
    missing(constants, set(fine.constants), "fine", fine, "constants (constants of the fine set)")
    missing(out_vars, set(fine.variables), "fine", fine, "out_vars (time-varying variables of the fine set)")
    both = sorted(set(in_vars) & set(constants))
    if both:
        raise ValueError(f"downscaling: {both} are both coarse inputs and fine constants; give each variable once "
                         "(the fine constants carry the high-resolution detail)")
    if not in_vars or not out_vars:
        raise ValueError("downscaling needs at least one coarse input (in_vars) and one output (out_vars)")
    return in_vars, constants, out_vars


def make_downscaler(net: ClimaX, coarse, fine, in_vars: Sequence[str], constants: Sequence[str],
                    out_vars: Sequence[str], *, residual: bool = True) -> Downscaler:
    """A ``Downscaler`` around ``net`` with the grids, statistics and constants of the two datasets."""
    cmean, cstd = coarse.normalizer(in_vars)
    fmean, fstd = fine.normalizer(out_vars)
    fields = None
    if constants:
        m, s = fine.normalizer(constants)
        fields = np.stack([(fine.constant_fields()[c] - m[k]) / s[k] for k, c in enumerate(constants)])
    return Downscaler(net, coarse.lat, coarse.lon, fine.lat, fine.lon, in_vars, cmean, cstd, out_vars, fmean, fstd,
                      constants, fields, residual=residual)


# ----------------------------------------------------------------------------- pairing
def paired_indices(coarse, fine, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(times, coarse rows, fine rows) of the time steps both datasets hold in ``split``."""
    tc, tf = coarse.axis(split).times, fine.axis(split).times
    times, ic, jf = np.intersect1d(tc, tf, assume_unique=True, return_indices=True)
    if not len(times):
        raise ValueError(
            f"downscaling: split {split!r} of the coarse dataset {coarse.root} ({tc[0]} .. {tc[-1]}, every "
            f"{coarse.step_hours:g} h) and of the fine dataset {fine.root} ({tf[0]} .. {tf[-1]}, every "
            f"{fine.step_hours:g} h) share no time step; build both with the same time range and splits "
            "(jobs.preprocess with the same recipe times and splits, only grid.resolution changed)")
    return times, ic.astype(np.int64), jf.astype(np.int64)


# ----------------------------------------------------------------------------- loader
class DownscalingLoader:
    """(coarse input, fine target) batches of one split for one rank, at the same times.

    Args:
        coarse, fine: ``climax.data.ShardDataset`` (or alike) on the coarse and the fine grid.
        split: split name, the same in both.
        in_vars: variables read from the coarse set (normalised with its statistics).
        out_vars: time-varying variables of the fine set (normalised with its statistics).
        batch_size, drop_last: batches of an epoch.
        seed, rank, world_size, shuffle: as ``climax.data.ForecastLoader``: with shuffle, a seeded
            permutation per epoch cut into equal parts per rank; without, time order in contiguous
            blocks.
        prefetch: batches read ahead by a background thread.
        max_batches: stop an epoch after this many batches.
    """

    def __init__(self, coarse, fine, split: str, in_vars: Sequence[str], out_vars: Sequence[str], batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, *, shuffle: bool = True, drop_last: bool = True,
                 prefetch: int = 2, max_batches: int | None = None):
        self.coarse, self.fine, self.split = coarse, fine, split
        self.dataset = fine  # for names in logs (and MixedLoader)
        self.in_vars, self.out_vars = list(in_vars), list(out_vars)
        if not self.in_vars or not self.out_vars:
            raise ValueError("downscaling needs at least one input and one output variable")
        coarse.check_variables(self.in_vars, "input variable")
        fine.check_variables(self.out_vars, "output variable")
        bad = [v for v in self.out_vars if v in set(fine.constants)]
        if bad:
            raise ValueError(f"output variable(s) {bad} of the fine dataset {fine.root} are constants; downscale "
                             f"time-varying variables: {fine.variables}")
        if batch_size < 1 or prefetch < 1:
            raise ValueError(f"batch_size and prefetch must be >= 1, got {batch_size}, {prefetch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.times, self.coarse_rows, self.fine_rows = paired_indices(coarse, fine, split)
        self.batch_size, self.seed, self.rank, self.world_size = int(batch_size), seed, int(rank), int(world_size)
        self.shuffle, self.drop_last, self.prefetch, self.max_batches = shuffle, drop_last, int(prefetch), max_batches
        self._cmean, self._cstd = coarse.normalizer(self.in_vars)
        self._fmean, self._fstd = fine.normalizer(self.out_vars)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int | None = None) -> np.ndarray:
        """This rank's pair indices for ``epoch``, in batch order."""
        n = len(self.times)
        if self.shuffle:
            perm = np.random.default_rng([self.seed, int(self.epoch if epoch is None else epoch)]).permutation(n)
            per = n // self.world_size
            return perm[self.rank * per:(self.rank + 1) * per]
        return np.array_split(np.arange(n), self.world_size)[self.rank]

    def __len__(self) -> int:
        n = len(self.order(0))
        nb = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return nb if self.max_batches is None else min(nb, int(self.max_batches))

    def read(self, pairs: np.ndarray) -> Batch:
        """The batch of pair indices ``pairs`` (normalised)."""
        x = self.coarse.read(self.split, self.coarse_rows[pairs], self.in_vars)
        x -= self._cmean[None, :, None, None]
        x /= self._cstd[None, :, None, None]
        y = self.fine.read(self.split, self.fine_rows[pairs], self.out_vars)
        y -= self._fmean[None, :, None, None]
        y /= self._fstd[None, :, None, None]
        return Batch(torch.from_numpy(x), torch.from_numpy(y), torch.zeros(len(pairs), dtype=torch.float32),
                     self.in_vars, self.out_vars, self.times[pairs], self.fine.name)

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        order, B = self.order(epoch), self.batch_size
        nb = len(self)
        with ThreadPoolExecutor(1, thread_name_prefix="climax-downscaling") as pool:
            pending: deque = deque()
            try:
                for b in range(start_batch, nb):
                    pending.append(pool.submit(self.read, order[b * B:(b + 1) * B]))
                    if len(pending) > self.prefetch:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate(self.epoch)


# ----------------------------------------------------------------------------- upsampling
def _linear_weights(src: np.ndarray, dst: np.ndarray, *, periodic: bool) -> np.ndarray:
    """(len(dst), len(src)) weights of linear interpolation between ascending points ``src``.

    Periodic (longitude, degrees): one wrapped point at each end, so 0/360 is crossed smoothly.
    Otherwise (latitude) the outermost points are held beyond the ends.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    idx = np.arange(len(src))
    if np.any(np.diff(src) <= 0):
        raise ValueError("grid coordinates must be strictly ascending (shards are south to north, lon from 0)")
    if periodic:
        dst = src[0] + np.mod(dst - src[0], 360.0)
        src = np.concatenate([src, [src[0] + 360.0]])
        idx = np.concatenate([idx, [0]])
    i = np.clip(np.searchsorted(src, dst, side="right") - 1, 0, len(src) - 2)
    w = np.clip((dst - src[i]) / (src[i + 1] - src[i]), 0.0, 1.0)
    out = np.zeros((len(dst), int(idx.max()) + 1))
    np.add.at(out, (np.arange(len(dst)), idx[i]), 1.0 - w)
    np.add.at(out, (np.arange(len(dst)), idx[i + 1]), w)
    return out


def bilinear_matrix(src_lat, src_lon, dst_lat, dst_lon) -> tuple[torch.Tensor, torch.Tensor]:
    """The latitude (H_dst, H_src) and longitude (W_dst, W_src) weights of bilinear regridding
    between global lat/lon grids (ascending coordinates, as in the shards):
    ``fine = A_lat @ coarse @ A_lon.T`` per field."""
    return (torch.from_numpy(_linear_weights(src_lat, dst_lat, periodic=False)).float(),
            torch.from_numpy(_linear_weights(src_lon, dst_lon, periodic=True)).float())


class Downscaler(nn.Module):
    """ClimaX as a downscaling model: coarse normalised fields in, fine normalised fields out.

    ``forward(x, lead_times, in_vars, out_vars)`` (the ``ClimaX`` call, so ``climax.training``'s
    ``train_step`` drives it unchanged): ``x`` (B, len(in_vars), h, w) on the coarse grid is
    upsampled bilinearly to the fine grid, the fine constants are appended, and ``net`` predicts
    ``out_vars`` at lead time 0 (``lead_times`` is passed through; the loader gives zeros).

    With ``residual``, an output variable that is also an input gets the bilinear field added (taken
    from the coarse normalisation to the fine one), so the network learns only what bilinear
    interpolation misses; outputs without a coarse counterpart are predicted directly.

    Args:
        net: the ClimaX at the fine grid (its ``default_vars`` hold the inputs, constants and outputs).
        coarse_lat, coarse_lon, fine_lat, fine_lon: grid coordinates (degrees, ascending).
        in_vars: the coarse input variables, in batch order; ``coarse_mean``/``coarse_std`` their statistics.
        constants: names of fine-grid constant inputs, ``constant_fields`` (C, H, W) already normalised.
        out_vars: predicted fine variables; ``fine_mean``/``fine_std`` their statistics.
    """

    def __init__(self, net: ClimaX, coarse_lat, coarse_lon, fine_lat, fine_lon, in_vars: Sequence[str],
                 coarse_mean, coarse_std, out_vars: Sequence[str], fine_mean, fine_std,
                 constants: Sequence[str] = (), constant_fields: np.ndarray | None = None, *, residual: bool = True):
        super().__init__()
        self.net = net
        self.in_vars, self.out_vars, self.constants = list(in_vars), list(out_vars), list(constants)
        self.residual = bool(residual)
        self.fine_shape = (len(fine_lat), len(fine_lon))
        self.coarse_shape = (len(coarse_lat), len(coarse_lon))
        if tuple(net.img_size) != self.fine_shape:
            raise ValueError(f"the model's grid {tuple(net.img_size)} is not the fine grid {self.fine_shape}")
        a_lat, a_lon = bilinear_matrix(coarse_lat, coarse_lon, fine_lat, fine_lon)
        self.register_buffer("a_lat", a_lat, persistent=False)
        self.register_buffer("a_lon", a_lon, persistent=False)
        cf = np.zeros((0, *self.fine_shape), _F32) if constant_fields is None else np.asarray(constant_fields, _F32)
        if cf.shape != (len(self.constants), *self.fine_shape):
            raise ValueError(f"constant_fields has shape {cf.shape}, "
                             f"expected {(len(self.constants), *self.fine_shape)}")
        self.register_buffer("constant_fields", torch.from_numpy(cf.copy()), persistent=False)

        def buf(name, values):
            self.register_buffer(name, torch.as_tensor(np.asarray(values, np.float32)).reshape(-1), persistent=False)

        buf("coarse_mean", coarse_mean)
        buf("coarse_std", coarse_std)
        buf("fine_mean", fine_mean)
        buf("fine_std", fine_std)
        # bilinear baseline of output k in the fine normalisation: up[:, src[k]] * scale[k] + shift[k]
        src = [self.in_vars.index(v) if v in self.in_vars else -1 for v in self.out_vars]
        self.baseline_vars = [v for v, s in zip(self.out_vars, src) if s >= 0]
        s = np.array([max(i, 0) for i in src])
        has = np.array([i >= 0 for i in src], np.float32)
        cm, cs = np.asarray(coarse_mean, np.float64)[s], np.asarray(coarse_std, np.float64)[s]
        fm, fs = np.asarray(fine_mean, np.float64), np.asarray(fine_std, np.float64)
        self.register_buffer("_src", torch.as_tensor(s, dtype=torch.long), persistent=False)
        buf("_has", has)
        buf("_scale", cs / fs * has)
        buf("_shift", (cm - fm) / fs * has)

    @property
    def model_vars(self) -> list[str]:
        """What ``net`` is fed: the coarse inputs then the fine constants."""
        return self.in_vars + self.constants

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        """(B, V, h, w) on the coarse grid to (B, V, H, W) on the fine grid, bilinear."""
        if tuple(x.shape[-2:]) != self.coarse_shape:
            raise ValueError(f"coarse input of shape {tuple(x.shape)} is not on the coarse grid {self.coarse_shape}")
        return torch.einsum("ih,bvhw,jw->bvij", self.a_lat.to(x.dtype), x, self.a_lon.to(x.dtype))

    def baseline(self, up: torch.Tensor) -> torch.Tensor:
        """The bilinear field of every output in the fine normalisation (0 for outputs that are no input)."""
        base = up[:, self._src] * self._scale.view(1, -1, 1, 1) + self._shift.view(1, -1, 1, 1)
        return base * self._has.view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor, lead_times: torch.Tensor, in_vars: Sequence[str] | None = None,
                out_vars: Sequence[str] | None = None, region: Any = None) -> torch.Tensor:
        if in_vars is not None and list(in_vars) != self.in_vars:
            raise ValueError(f"batch input variables {list(in_vars)} differ from the model's {self.in_vars}")
        if out_vars is not None and list(out_vars) != self.out_vars:
            raise ValueError(f"batch output variables {list(out_vars)} differ from the model's {self.out_vars}")
        if region is not None:
            raise ValueError("regional downscaling is not supported; downscale globally")
        # the interpolation and the residual sum stay in float32 under bf16 autocast: the learned
        # correction is small against the field, and bf16 keeps only ~3 significant digits
        with torch.autocast(x.device.type, enabled=False):
            up = self.upsample(x.float())
        inputs = up
        if self.constants:
            inputs = torch.cat([up, self.constant_fields.expand(len(x), -1, -1, -1)], dim=1)
        pred = self.net(inputs, lead_times, self.model_vars, self.out_vars)
        if self.residual:
            with torch.autocast(x.device.type, enabled=False):
                pred = pred.float() + self.baseline(up)
        return pred

    def physical(self, y: torch.Tensor) -> torch.Tensor:
        """Fine-normalised outputs to physical units."""
        return y * self.fine_std.view(1, -1, 1, 1) + self.fine_mean.view(1, -1, 1, 1)

    def bilinear_physical(self, x: torch.Tensor) -> torch.Tensor:
        """The bilinear baseline of every output in physical units (NaN where an output is no input)."""
        up = self.upsample(x)
        phys = up[:, self._src] * self.coarse_std[self._src].view(1, -1, 1, 1) + \
            self.coarse_mean[self._src].view(1, -1, 1, 1)
        return torch.where(self._has.view(1, -1, 1, 1) > 0, phys, torch.full_like(phys, float("nan")))


# ----------------------------------------------------------------------------- scores
class DownscalingScores:
    """Running sums of latitude-weighted RMSE, mean bias (prediction - truth) and Pearson
    correlation per variable, for the model and the bilinear baseline, in physical units.

    Every score is per sample over the grid (the map's RMSE, area-mean bias and spatial pattern
    correlation, ``climax.metrics``), then averaged over samples. ``all_reduce`` sums them over
    the process group when one is initialised.
    """

    STATS = ("rmse", "bias", "pearson")

    def __init__(self, out_vars: Sequence[str], device: torch.device | str = "cpu"):
        self.out_vars = list(out_vars)
        V = len(self.out_vars)
        # [loss * n, n, then per method and stat V sums, then baseline sample counts per variable]
        self.sums = torch.zeros(2 + len(METHODS) * len(self.STATS) * V + V, dtype=torch.float64, device=device)

    def _slot(self, method: int, stat: int) -> slice:
        V = len(self.out_vars)
        lo = 2 + (method * len(self.STATS) + stat) * V
        return slice(lo, lo + V)

    @torch.no_grad()
    def add(self, pred: torch.Tensor, truth: torch.Tensor, lat, baseline: torch.Tensor | None = None,
            loss: float | None = None) -> None:
        """Physical fields (B, V, H, W); ``baseline`` may hold NaN for variables without one."""
        n = pred.shape[0]
        lat_t = torch.as_tensor(np.asarray(lat), dtype=torch.float64, device=pred.device)
        pred, truth = pred.double(), truth.double()
        if loss is not None:
            self.sums[0] += loss * n
        self.sums[1] += n
        for m, field in enumerate((pred, baseline)):
            if field is None:
                continue
            field = field.double()
            ok = torch.isfinite(field).flatten(2).all(-1).all(0)  # (V,) variables with this method
            f = torch.where(ok.view(1, -1, 1, 1), field, truth)
            for s, fn in enumerate((lat_weighted_rmse, lat_weighted_bias, lat_weighted_pearson)):
                self.sums[self._slot(m, s)] += torch.where(ok, fn(f, truth, lat_t) * n, 0.0)
            if m == 1:
                self.sums[-len(self.out_vars):] += ok.double() * n

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums)

    @property
    def samples(self) -> int:
        return int(self.sums[1])

    def result(self) -> dict[str, float]:
        """``loss``, ``samples`` and ``<method>_<stat>/<variable>`` (baseline only where it exists)."""
        n = max(float(self.sums[1]), 1.0)
        out: dict[str, float] = {"loss": float(self.sums[0]) / n, "samples": self.samples}
        counts = self.sums[-len(self.out_vars):]
        for m, method in enumerate(METHODS):
            for s, stat in enumerate(self.STATS):
                vals = self.sums[self._slot(m, s)]
                for k, v in enumerate(self.out_vars):
                    denom = n if m == 0 else float(counts[k])
                    if denom > 0:
                        out[f"{method}_{stat}/{v}"] = float(vals[k]) / denom
        return out


@torch.no_grad()
def evaluate_downscaling(model: Downscaler, batches, lat, device: torch.device, *, bf16: bool = True,
                         scores: DownscalingScores | None = None) -> DownscalingScores:
    """Score ``model`` (a ``Downscaler``, or a DDP wrapper of one) on ``batches``; returns the
    running scores (all-reduced over the process group when one is initialised)."""
    ds = unwrap(model)
    model.eval()
    scores = scores or DownscalingScores(ds.out_vars, device)
    lat_t = torch.as_tensor(np.asarray(lat), dtype=torch.float32, device=device)
    for batch in batches:
        x, y = batch.x.to(device), batch.y.to(device)
        with autocast(device, bf16=bf16):
            pred = model(x, batch.lead_hours.to(device), batch.in_vars, batch.out_vars)
        pred = pred.float()
        loss = float(lat_weighted_mse(pred, y, lat_t))
        scores.add(ds.physical(pred), ds.physical(y), lat, ds.bilinear_physical(x), loss=loss)
    scores.all_reduce()
    return scores
