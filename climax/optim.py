"""Optimiser parameter groups and the learning-rate schedule (stepped per optimiser step)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["param_groups", "build_optimizer", "warmup_cosine"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for weight matrices; none for biases, norms and what the model's
    ``no_weight_decay()`` names (timm's convention; ``ClimaX``: its embedding tables)."""
    bare_model = getattr(model, "module", model)  # a DDP wrapper's names carry "module."
    skip = set(bare_model.no_weight_decay()) if hasattr(bare_model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        bare = name.removeprefix("module.")
        if p.ndim <= 1 or bare in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 1e-5,
                    betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  warmup_start_factor: float = 0.0, min_factor: float = 0.0,
                  start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from ``warmup_start_factor * lr`` to ``lr`` over ``warmup_steps``, then cosine
    decay to ``min_factor * lr`` at ``total_steps`` (held there after). Call ``step()`` once per
    optimiser step; ``start_step`` (optimiser steps already taken) resumes the schedule.
    """
    if total_steps <= 0 or warmup_steps < 0:
        raise ValueError(f"need total_steps > 0 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_start_factor + (1 - warmup_start_factor) * step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    if start_step > 0:  # LambdaLR needs initial_lr to start anywhere but the beginning
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_step - 1)
