"""The training step, validation and training state: plain PyTorch, no Ray.

``climax/loop.py`` runs these for every task (``jobs/train.py`` inside Ray Train); they run in a notebook
on one process. Distributed runs only need ``torch.distributed`` to be initialised (validation
sums are all-reduced when it is).

- ``train_step``: ``forecast_loss`` (latitude-weighted MSE on normalised fields; bf16 autocast on
  CUDA) then ``optimizer_step`` (backward, gradient clipping, AdamW, warmup-cosine scheduler step).
  Every task's loop (``climax.loop.fit``) takes its steps through ``optimizer_step``.
- ``rollout_loss``: rollout finetuning (``train.rollout_steps`` k > 1): k steps at one lead, each
  prediction fed back (``rollout_feed``, evaluation's convention), the mean of the step losses.
- ``validate``: the loss, and latitude-weighted RMSE per variable in physical units (predictions
  and targets de-normalised with the dataset statistics) with persistence beside it.
- ``TrainState`` + ``save_train_state`` / ``load_train_state``: what a checkpoint holds beyond
  the weights (optimiser, scheduler, step, epoch, best validation loss), so a relaunch continues
  the step counter and the schedule exactly.
- ``freeze_backbone``: finetuning with the transformer frozen.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from climax.checkpoint import load_checkpoint, save_checkpoint
from climax.metrics import lat_weighted_mse, lat_weights
from climax.model import ClimaX
from climax.storage import atomic_path

__all__ = ["TrainState", "autocast", "forecast_loss", "rollout_loss", "rollout_feed", "optimizer_step", "batch_where",
           "train_step", "validate", "save_train_state", "load_train_state", "read_train_state",
           "UnsafeCheckpointError", "freeze_backbone", "unwrap", "BACKBONE"]

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
#: The top-level modules ``freeze_backbone`` freezes (declared by the model: ``ClimaX.BACKBONE``).
BACKBONE = ClimaX.BACKBONE


@dataclass
class TrainState:
    step: int = 0  # optimiser steps taken
    epoch: int = 0  # epochs finished
    samples: int = 0  # training samples seen (all workers)
    best_val_loss: float = math.inf
    restarts: int = 0  # how many times this run was resumed from a checkpoint
    history: list[dict] = field(default_factory=list)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` and DDP / FSDP wrappers (checkpoints hold bare keys)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    return model.module if isinstance(getattr(model, "module", None), nn.Module) else model


def autocast(device: torch.device, *, bf16: bool):
    """bf16 autocast on CUDA when asked; fp32 elsewhere (CPU bf16 is slower than fp32 here)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def freeze_backbone(model: ClimaX) -> list[str]:
    """Freeze the backbone (what ``model.backbone_names()`` names); returns the frozen parameter names."""
    backbone = model.backbone_names()
    frozen = []
    for name, p in model.named_parameters():
        if name in backbone:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def _lat(lat: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(lat), dtype=torch.float32, device=device)


def forecast_loss(model: nn.Module, batch: Any, lat: np.ndarray, device: torch.device, *, bf16: bool = True,
                  region: Any = None, masked: Any = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The training loss of a batch (``climax.data.Batch``): latitude-weighted MSE of the forecast,
    or with ``masked`` (a ``climax.masking.MaskedObjective``, masks drawn from ``generator``) of the
    reconstruction of the masked input at lead time 0, counting the masked points only."""
    model.train()
    x, y = batch.x.to(device, non_blocking=True), batch.y.to(device, non_blocking=True)
    lead = batch.lead_hours.to(device, non_blocking=True)
    with autocast(device, bf16=bf16):
        if masked is None:
            pred, target, points = model(x, lead, batch.in_vars, batch.out_vars, region=region), y, None
        else:
            pred, target, points = masked(model, x, batch.in_vars, batch.out_vars, generator)
    return lat_weighted_mse(pred.float(), target, _lat(lat, device), points)


def rollout_feed(in_vars: Sequence[str], out_vars: Sequence[str]) -> list[tuple[int, int]]:
    """(input channel, output channel) pairs a rollout feeds back: each output that is also an
    input replaces that input channel for the next step; the other inputs (constants) keep their
    initial values. The one convention of ``climax.evaluation``'s rollout and of ``rollout_loss``."""
    return [(list(in_vars).index(v), j) for j, v in enumerate(out_vars) if v in in_vars]


def rollout_loss(model: nn.Module, batch: Any, lat: np.ndarray, device: torch.device, *, bf16: bool = True,
                 region: Any = None, truncate: int = 0) -> torch.Tensor:
    """Rollout finetuning's loss (``train.rollout_steps`` k > 1): the model applied k times at the
    batch's lead, each prediction fed back as the next input in normalised space (``rollout_feed``,
    as ``climax.evaluation`` rolls out), scored against ``batch.y`` then ``batch.y_steps``.

    The loss is the mean over the k steps of each step's latitude-weighted MSE (GraphCast averages
    over steps: the loss stays on the scale of k = 1, so learning rates carry over). Gradients flow
    through the whole chain; ``truncate`` N > 0 detaches the fed-back input after every N steps
    (N = 1: no gradient through the chain, each step learns from its own forward pass only)."""
    model.train()
    x = batch.x.to(device, non_blocking=True)
    lead = batch.lead_hours.to(device, non_blocking=True)
    targets = [batch.y.to(device, non_blocking=True)]
    if batch.y_steps is not None:
        targets += list(batch.y_steps.to(device, non_blocking=True).unbind(1))
    feed = rollout_feed(batch.in_vars, batch.out_vars)
    src = torch.as_tensor([i for i, _ in feed], dtype=torch.long, device=device)
    dst = torch.as_tensor([j for _, j in feed], dtype=torch.long, device=device)
    lat_t = _lat(lat, device)
    state, losses = x, []
    for i, target in enumerate(targets):
        with autocast(device, bf16=bf16):
            pred = model(state, lead, batch.in_vars, batch.out_vars, region=region)
        losses.append(lat_weighted_mse(pred.float(), target, lat_t))
        if i + 1 < len(targets):
            state = state.index_copy(1, src, pred.index_select(1, dst).to(state.dtype))  # out of place: differentiable
            if truncate and (i + 1) % truncate == 0:
                state = state.detach()
    return torch.stack(losses).mean()


def batch_where(batch: Any) -> str:
    """Which batch, for an error message."""
    return f"on a batch of {batch.dataset!r} with inputs at {batch.input_time[:3]}..."


def optimizer_step(model: nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: Any,
                   grad_clip: float | None, where: Callable[[], str]) -> float:
    """Backward, clipping, optimiser and schedule step on ``loss``; returns its value. A loss that is
    not finite stops the run with ``where()`` (which batch, which step) in the message."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the training loss is {loss.item()} {where()}; lower the learning rate or "
                                 "check the data")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return float(loss.detach())


def train_step(model: nn.Module, batch: Any, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None, lat: np.ndarray,
               device: torch.device, grad_clip: float | None = 1.0, *, bf16: bool = True,
               region: Any = None, masked: Any = None, generator: torch.Generator | None = None) -> float:
    """One optimiser step on a batch (``forecast_loss`` then ``optimizer_step``); returns the loss."""
    loss = forecast_loss(model, batch, lat, device, bf16=bf16, region=region, masked=masked, generator=generator)
    return optimizer_step(model, loss, optimizer, scheduler, grad_clip, lambda: batch_where(batch))


@torch.no_grad()
def validate(model: nn.Module, batches: Iterable[Any], lat: np.ndarray, mean: np.ndarray, std: np.ndarray,
             out_vars: Sequence[str], device: torch.device, *, bf16: bool = True, region: Any = None) -> dict:
    """Validation over ``batches``: loss and latitude-weighted RMSE per variable, physical units.

    ``mean``/``std``: the statistics of ``out_vars`` (de-normalisation). RMSE is taken per sample
    over the grid and averaged over samples (WeatherBench); persistence (the input field as the
    forecast) is computed alongside for every output variable that is also an input. Sums are
    all-reduced over the process group when one is initialised, so every rank returns the totals.
    """
    model.eval()
    V = len(out_vars)
    w = lat_weights(_lat(lat, device)).reshape(-1, 1)
    mean_t = torch.as_tensor(np.asarray(mean), dtype=torch.float32, device=device).reshape(1, V, 1, 1)
    std_t = torch.as_tensor(np.asarray(std), dtype=torch.float32, device=device).reshape(1, V, 1, 1)
    # sums: [loss * n, n, rmse_v..., persistence_v..., persistence_available_v...]
    sums = torch.zeros(2 + 3 * V, dtype=torch.float64, device=device)
    for batch in batches:
        x, y = batch.x.to(device), batch.y.to(device)
        lead = batch.lead_hours.to(device)
        with autocast(device, bf16=bf16):
            pred = model(x, lead, batch.in_vars, batch.out_vars, region=region)
        pred = pred.float()
        n = x.shape[0]
        sums[0] += float(lat_weighted_mse(pred, y, _lat(lat, device))) * n
        sums[1] += n
        phys_pred, phys_y = pred * std_t + mean_t, y * std_t + mean_t
        sums[2:2 + V] += ((phys_pred - phys_y) ** 2 * w).mean(dim=(-2, -1)).sqrt().sum(dim=0).double()
        now = x[:, -1] if x.ndim == 5 else x  # history input: persistence of the current step
        for k, v in enumerate(batch.out_vars):
            if v in batch.in_vars:
                i = batch.in_vars.index(v)
                persist = now[:, i] * std_t[0, k] + mean_t[0, k]
                sums[2 + V + k] += ((persist - phys_y[:, k]) ** 2 * w).mean(dim=(-2, -1)).sqrt().sum().double()
                sums[2 + 2 * V + k] += n
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    n = max(float(sums[1]), 1.0)
    out = {"val_loss": float(sums[0]) / n, "val_samples": int(sums[1])}
    for k, v in enumerate(out_vars):
        out[f"val_rmse/{v}"] = float(sums[2 + k]) / n
        if sums[2 + 2 * V + k] > 0:
            out[f"val_persistence_rmse/{v}"] = float(sums[2 + V + k]) / float(sums[2 + 2 * V + k])
    return out


def save_train_state(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: Any, state: TrainState, **extra: Any) -> Path:
    """Write ``model.pt`` (our checkpoint format, loadable by ``climax.load_model``) and
    ``train_state.pt`` (optimiser, scheduler, counters) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(unwrap(model), directory / MODEL_FILE, train_state=asdict(state), **extra)
    payload = {"optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict() if scheduler is not None else None,
               "state": asdict(state)}
    check_plain(payload, STATE_FILE)  # what read_train_state's weights_only=True load accepts
    with atomic_path(directory / STATE_FILE) as tmp:
        torch.save(payload, tmp)
    return directory


def load_train_state(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     scheduler: Any = None) -> TrainState:
    """Restore weights (strictly: a resumed run has the same model), optimiser, scheduler, counters."""
    directory = Path(directory)
    report = load_checkpoint(unwrap(model), directory / MODEL_FILE, strict=True)
    del report
    payload = read_train_state(directory)
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload.get("scheduler") is not None:
        scheduler.load_state_dict(payload["scheduler"])
    return TrainState(**payload["state"])


class UnsafeCheckpointError(RuntimeError):
    """A training state that holds more than tensors and plain containers (refused, never unpickled)."""


_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def check_plain(obj: Any, what: str, where: str = "") -> None:
    """Raise TypeError unless ``obj`` is tensors, numbers, strings, None, lists, tuples and dicts."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_plain(k, what, where)
            check_plain(v, what, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, what, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(f"{what}: {where or 'the payload'} is a {type(obj).__name__}; a training state holds only "
                        "tensors, numbers, strings and lists/dicts of them (it is loaded with weights_only=True)")


def read_train_state(directory: str | os.PathLike) -> dict:
    """The ``train_state.pt`` payload of a checkpoint folder, read with ``torch.load(weights_only=True)``.

    Checkpoints come back from ``storage_path``: whoever can write there must not get code run on
    every worker at the next restart, so nothing but tensors and plain containers is unpickled; a
    file with anything else is refused with a message saying so.
    """
    path = Path(directory) / STATE_FILE
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it references {found.group(1)}" if found else "it is no plain training state"
        raise UnsafeCheckpointError(
            f"{path} holds Python objects besides tensors and plain containers and is refused, not unpickled "
            f"({what}). Training states written by this project never do; someone or "
            "something else wrote it. Check who can write to storage_path, then delete this checkpoint folder "
            "(the run resumes from an earlier one) or start the run under another name.") from None
    if not isinstance(payload, dict) or "state" not in payload:
        raise UnsafeCheckpointError(f"{path} is not a training state (no 'state' entry); delete this checkpoint "
                                    "folder or start the run under another name")
    return payload
