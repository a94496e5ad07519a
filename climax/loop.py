"""The training loop of every task: plain PyTorch, no Ray.

``train(task, reporter, ...)`` runs one worker's share of a run: the task builds its model and
loaders (``climax/tasks/``), the optimiser starts fresh or from a checkpoint, ``wrap`` (DDP, when a
process group runs) wraps the model, and ``fit`` trains. ``jobs/train.py`` calls it inside Ray Train
with Ray's rank, device, checkpoint and ``ray.train.report``; in a notebook it runs on one process.

``fit(task, model, loaders, optim, reporter, state)``, once per epoch of ``steps_per_epoch`` optimiser
steps: the task's loss on each batch (``optimizer_step``: finite check, backward, clipping, AdamW,
schedule), then the task's validation, one log line, a checkpoint written by rank 0
(``save_train_state``: weights, optimiser, counters, the task's extras) and ``reporter.report``.
Data order is a function of (seed, epoch): a resumed epoch reads the same batches (``stream``).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from climax.optim import build_optimizer, warmup_cosine
from climax.parallel import is_sharded, load_sharded_train_state, save_sharded_train_state, shard_model
from climax.training import TrainState, optimizer_step, save_train_state, unwrap

__all__ = ["Worker", "Loaders", "Reporter", "stream", "hms", "start_or_resume", "fit", "train"]


def _silent(*args: Any, **kwargs: Any) -> None:
    return None


@dataclass(frozen=True)
class Worker:
    """Where this copy of the loop runs: rank and world size of the worker group, device, and
    ``log`` (``print`` on rank 0, silent elsewhere)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    log: Callable[..., None] = print

    @classmethod
    def of(cls, rank: int, world: int, device: torch.device) -> Worker:
        return cls(rank, world, device, print if rank == 0 else _silent)


@dataclass
class Loaders:
    """A task's data: ``train`` (``len()`` batches per pass, ``set_epoch(e)`` fixes a pass's order),
    ``val`` (whatever the task's ``validate`` reads) and the optimiser steps of one epoch."""

    train: Any
    val: Any
    steps_per_epoch: int


class Reporter(Protocol):
    """Receives each epoch's metrics and (rank 0) the folder holding its checkpoint; the folder is
    deleted when ``report`` returns (``jobs.train``: ``ray.train.report``)."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None: ...


def stream(loader: Any, epoch: int, steps: int) -> Iterator[Any]:
    """``steps`` batches for training epoch ``epoch``: data epochs epoch*m, epoch*m+1, ... where
    m passes cover one training epoch, so a resumed epoch reads exactly the same batches."""
    per_pass = max(len(loader), 1)
    m = math.ceil(steps / per_pass)
    n = 0
    for k in range(m):
        loader.set_epoch(epoch * m + k)
        for batch in loader:
            yield batch
            n += 1
            if n == steps:
                return


def hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def start_or_resume(task: Any, module: nn.Module, total_steps: int,
                    restore: Callable[[Callable[[str], TrainState]], TrainState | None] | None = None, *,
                    sharded: bool = False):
    """``(optimizer, scheduler, state)`` of a run: fresh, or restored through ``restore(load)``
    (which calls ``load(directory)`` on the checkpoint to resume from and returns its result, or
    returns None when there is none): weights, optimiser, counters; the schedule restarts at the
    restored step. ``sharded``: ``module`` is FSDP-sharded (every rank reads the full checkpoint)."""
    o = task.cfg.optim
    optimizer = build_optimizer(module, o.lr, o.weight_decay, tuple(o.betas))
    load = (lambda d: load_sharded_train_state(d, module, optimizer)) if sharded else \
        (lambda d: task.load_state(d, module, optimizer))
    state = restore(load) if restore is not None else None
    if state is None:
        state = TrainState()
    else:
        state.restarts += 1
        task.log(f"resumed from the checkpoint at step {state.step} (epoch {state.epoch}); restart {state.restarts}")
    scheduler = warmup_cosine(optimizer, min(o.warmup_steps, max(total_steps - 1, 0)), total_steps,
                              o.warmup_start_factor, o.min_lr_factor, start_step=state.step)
    return optimizer, scheduler, state


def fit(task: Any, model: nn.Module, loaders: Loaders, optim: tuple[torch.optim.Optimizer, Any],
        reporter: Reporter, state: TrainState) -> TrainState:
    """Train ``model`` (the task's module, possibly DDP / compile wrapped) from ``state`` to the
    configured epochs; see the module docstring. Returns the final state."""
    cfg, w = task.cfg, task.worker
    optimizer, scheduler = optim
    epochs, steps = cfg.train.epochs, loaders.steps_per_epoch
    total_steps = epochs * steps
    if state.epoch >= epochs:
        w.log(f"run {cfg.name!r} already finished {state.epoch} epochs ({state.step} steps); raise train.epochs "
              "to train further, or use another name for a new run")
    start, first_epoch = time.time(), state.epoch
    for epoch in range(state.epoch, epochs):
        t0, losses, tagged = time.time(), [], {}
        for batch in stream(loaders.train, epoch, steps):
            step = state.step
            loss, tag = task.loss(model, batch, step)
            losses.append(optimizer_step(model, loss, optimizer, scheduler, cfg.optim.grad_clip,
                                         lambda batch=batch, step=step: task.where(batch, step)))
            if tag:  # a share of the steps with their own loss (masked steps of a schedule)
                tagged.setdefault(tag, []).append(losses[-1])
            state.step += 1
            if cfg.train.log_every and state.step % cfg.train.log_every == 0:
                w.log(f"  step {state.step}/{total_steps} loss {losses[-1]:.4f} lr {scheduler.get_last_lr()[0]:.2e}")
        train_time = time.time() - t0
        samples = len(losses) * cfg.data.batch_size * w.world
        state.samples += samples
        metrics: dict[str, Any] = {"epoch": epoch + 1, "step": state.step, "train_loss": float(np.mean(losses)),
                                   "lr": scheduler.get_last_lr()[0], "samples_per_s": samples / max(train_time, 1e-9),
                                   "restarts": state.restarts}
        metrics.update({tag: float(np.mean(v)) for tag, v in tagged.items()})
        metrics.update(task.validate(model, loaders.val, metrics))
        state.epoch = epoch + 1
        state.best_val_loss = min(state.best_val_loss, metrics["val_loss"])
        state.history.append({k: metrics[k] for k in ("epoch", "step", "train_loss", "val_loss")})
        eta = (time.time() - start) / (epoch + 1 - first_epoch) * (epochs - epoch - 1)
        w.log(f"epoch {epoch + 1}/{epochs} step {state.step}/{total_steps} loss {metrics['train_loss']:.4f} "
              f"val {metrics['val_loss']:.4f}{task.summary(metrics)} {metrics['samples_per_s']:.1f} samples/s "
              f"ETA {hms(eta)}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            directory = None
            module = task.checkpoint_module(unwrap(model))
            if is_sharded(module):  # collective: every rank gathers the full state, rank 0 writes our format
                save_sharded_train_state(tmp, module, optimizer, None, state, metrics=metrics,
                                         **task.checkpoint_extras())
                directory = tmp if w.rank == 0 else None
            elif w.rank == 0:
                save_train_state(tmp, module, optimizer, None, state, metrics=metrics, **task.checkpoint_extras())
                directory = tmp
            reporter.report(metrics, directory)
    return state


def train(task: Any, reporter: Reporter, restore: Callable | None = None,
          wrap: Callable[..., nn.Module] | None = None) -> TrainState:
    """One worker's run of ``task``: build the model and the loaders, start or resume
    (``start_or_resume``), ``wrap(model, find_unused_parameters=...)`` (DDP; default: none), optionally
    ``torch.compile`` on GPU, then ``fit``. Seed the torch RNG before building the task."""
    cfg, w = task.cfg, task.worker
    model = task.build_model()
    loaders = task.make_loaders(model)
    model.to(w.device)
    module = task.checkpoint_module(model)
    # scaling.strategy / train.activation_checkpointing (climax/parallel.py): FSDP2 shards the
    # plain forecast model per block before the optimiser is built; checkpointing wraps each block
    strategy = getattr(cfg.scaling, "strategy", "ddp")
    checkpointing = getattr(cfg.train, "activation_checkpointing", False)
    if (strategy == "fsdp" and module is not model) or ((strategy == "fsdp" or checkpointing)
                                                        and not hasattr(module, "blocks")):
        raise ValueError(f"scaling.strategy={strategy} with train.activation_checkpointing={checkpointing} is "
                         f"not supported for task {cfg.task!r} with this objective; use scaling.strategy=ddp "
                         "and train.activation_checkpointing=false")
    shard_model(module, strategy, activation_checkpointing=checkpointing)  # in place
    sharded = strategy == "fsdp"
    optimizer, scheduler, state = start_or_resume(task, module, cfg.train.epochs * loaders.steps_per_epoch, restore,
                                                  sharded=sharded)
    if sharded or wrap is None:
        trained = model
    else:
        trained = wrap(model, find_unused_parameters=task.find_unused_parameters(model))
    if cfg.train.compile and w.device.type == "cuda":
        trained = torch.compile(trained)  # checkpoints still hold bare keys (climax.training.unwrap)
    w.log(task.describe(model, loaders))
    return fit(task, trained, loaders, (optimizer, scheduler), reporter, state)
