"""Training tasks, one module each, found by name: ``climax/tasks/<name>.py`` defines ``TASK``, a
``Task`` subclass. Adding a task means adding one file (and, when it has one, its config section
in ``jobs/train_config.py``'s ``TrainConfig``).

A task supplies the hooks ``climax.loop`` calls: ``build_model``, ``make_loaders``, ``loss``,
``validate`` (+ ``summary`` for the epoch line), ``checkpoint_module`` / ``checkpoint_extras`` /
``load_state``; driver side: ``check_config`` (config validation), ``after_fit`` (after training)
and ``evaluate`` (``jobs.evaluate`` on one of its checkpoints). ``cfg`` is the validated
``jobs.train_config.TrainConfig`` (read by attribute; climax does not import jobs).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from climax.config import ROOT, ModelConfig, run_model_config
from climax.loop import Loaders, Worker
from climax.redact import redact
from climax.training import TrainState, load_train_state

__all__ = ["Task", "get_task", "task_names", "checkpoint_task", "model_config", "ROOT"]


def task_names() -> list[str]:
    """Every task: the modules of this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get_task(name: str) -> type[Task]:
    """The ``Task`` class registered under ``name``."""
    if name not in task_names():
        raise ValueError(f"unknown task {name!r}; one of {task_names()}")
    return importlib.import_module(f"{__name__}.{name}").TASK


def checkpoint_task(path: str | Path) -> str:
    """The task whose run wrote a checkpoint (a folder holding model.pt, or the file); ``forecast``
    for one that records none (ours before tasks, original ClimaX files) or cannot be read here."""
    path = Path(path)
    path = path / "model.pt" if path.is_dir() else path
    if not path.is_file():
        return "forecast"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not ours: let the loader explain
        return "forecast"
    if not isinstance(payload, dict):
        return "forecast"
    name = (payload.get("model_config") or {}).get("task") or payload.get("task") or "forecast"
    return name if name in task_names() else "forecast"


def model_config(cfg: Any, recorded: dict | None = None) -> ModelConfig:
    """The validated model configuration of a run (``climax.config.run_model_config``): ``cfg.model``
    (a YAML name or a mapping), on top of ``recorded`` (an init checkpoint's ``model_config``) when the
    run's configuration sets ``model`` (pydantic's ``model_fields_set``)."""
    user_set = "model" in getattr(cfg, "model_fields_set", {"model"})
    return run_model_config(cfg.model, user_set=user_set, recorded=recorded)


class Task:
    """The hooks of one task. One instance per worker: ``cfg`` (the run's validated config) and
    ``worker`` (rank, world size, device, log)."""

    name: ClassVar[str]

    def __init__(self, cfg: Any, worker: Worker | None = None):
        self.cfg = cfg
        self.worker = worker or Worker()
        self.log = self.worker.log

    # ------------------------------------------------------------------ driver side
    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Raise ValueError when ``cfg`` cannot run this task (called by TrainConfig's validation)."""

    @classmethod
    def local_roots(cls, cfg: Any) -> list[Any]:
        """The dataset sections (``.root``) the run reads, for resolving local paths on the driver."""
        return list(cfg.data.datasets)

    @classmethod
    def after_fit(cls, cfg: Any, result: Any, log=print) -> Any:
        """Driver side, after training (``result``: the trainer's result)."""
        return None

    # ------------------------------------------------------------------ worker side
    def build_model(self) -> nn.Module:
        """The module that trains (DDP wraps it); its ``checkpoint_module`` is saved and optimised."""
        raise NotImplementedError

    def make_loaders(self, model: nn.Module) -> Loaders:
        """Training and validation data; invalid splits or leads fail here, before the first step."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, str | None]:
        """(loss of ``batch`` at optimiser step ``step``, the name of an extra per-epoch mean it also
        counts towards, or None). Puts ``model`` in training mode."""
        raise NotImplementedError

    def where(self, batch: Any, step: int) -> str:
        """Which batch, for the message of a loss that is not finite."""
        return f"at step {step}"

    def validate(self, model: nn.Module, val: Any, train_metrics: dict) -> dict[str, float]:
        """Validation metrics (``train_metrics``: the epoch's training half, read only); must hold
        ``val_loss`` (and ``val_rmse``: one number for schedulers)."""
        raise NotImplementedError

    def summary(self, metrics: dict) -> str:
        """The epoch line's part after ``val <loss>`` (starts with a space)."""
        return ""

    def describe(self, model: nn.Module, loaders: Loaders) -> str:
        """The line logged before the first step."""
        return ""

    def find_unused_parameters(self, model: nn.Module) -> bool:
        """Whether DDP must expect parameters without gradient (frozen, unused variables, decoder)."""
        return bool(self.cfg.freeze_backbone)

    def checkpoint_module(self, model: nn.Module) -> nn.Module:
        """The module saved in ``model.pt`` and optimised (``model``: the unwrapped trained module)."""
        return model

    def checkpoint_extras(self) -> dict[str, Any]:
        """What ``model.pt`` records beside the weights (plain data)."""
        return {"run_config": redact(self.cfg)}

    def load_state(self, directory: str, module: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
        """Restore weights, optimiser and counters from a checkpoint folder this task wrote."""
        return load_train_state(directory, module, optimizer)
