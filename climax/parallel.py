"""Models past one GPU's memory: FSDP2 sharding, activation checkpointing, full state dicts.

torch only (``climax`` imports no ray). The training job picks the strategy from
``scaling.strategy`` and calls ``shard_model`` where it would otherwise call Ray Train's
``prepare_model`` (DDP).

- ``shard_model(model, "fsdp")``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on each
  transformer block, then on the root, which holds the rest (embeddings, variable aggregation,
  head). Parameters, gradients and AdamW state are sharded over the process group's ranks; a
  block's full weights exist only while it runs. Build the optimiser *after* sharding: its
  parameters are the sharded DTensors. ``"ddp"`` returns the model unwrapped (the caller wraps it).
- ``activation_checkpointing=True``: each block's forward runs under
  ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``: only the block's input is kept for
  backward, the rest is recomputed. The block's ``forward`` is replaced in place, so state-dict
  keys do not change (no ``_checkpoint_wrapped_module`` prefix).
- ``full_state_dict`` / ``full_optimizer_state_dict``: unsharded CPU copies (collectives: call
  on every rank), so FSDP runs write our usual checkpoint (``save_sharded_train_state``) and
  ``load_checkpoint``, evaluation and forecast read it unchanged; ``load_sharded_train_state``
  restores both into a sharded model for an exact resume.
"""

from __future__ import annotations

import os
import types
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from climax.storage import atomic_path

__all__ = ["shard_model", "checkpoint_blocks", "full_state_dict", "full_optimizer_state_dict",
           "load_full_state", "save_sharded_train_state", "load_sharded_train_state", "is_sharded"]

STRATEGIES = ("ddp", "fsdp")


def checkpoint_blocks(model: nn.Module) -> int:
    """Activation checkpointing on every block of ``model.blocks``; returns how many blocks."""
    n = 0
    for blk in model.blocks:
        if getattr(blk, "_climax_checkpointed", False):
            continue
        inner = blk.forward  # the bound original forward

        def forward(self, *args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        blk.forward = types.MethodType(forward, blk)
        blk._climax_checkpointed = True
        n += 1
    return n


def shard_model(model: nn.Module, strategy: Literal["ddp", "fsdp"] = "ddp", *,
                activation_checkpointing: bool = False, mesh: Any = None,
                mp_policy: Any = None, reshard_after_forward: bool = True) -> nn.Module:
    """Prepare ``model`` (on its device already) for ``strategy``; returns the model to train.

    ``"fsdp"`` needs an initialised process group (gloo on CPU, nccl on GPU); ``mesh`` defaults to
    a 1-D mesh over all ranks on the model's device type. ``mp_policy``: an FSDP2
    ``MixedPrecisionPolicy`` (e.g. bf16 params, fp32 reduce on GPU; default: none, the loop's
    autocast decides). ``"ddp"`` only applies activation checkpointing: the caller wraps the model
    (Ray Train's ``prepare_model``).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"scaling.strategy must be one of {STRATEGIES}, got {strategy!r}")
    if activation_checkpointing:
        checkpoint_blocks(model)
    if strategy == "ddp":
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("scaling.strategy=fsdp needs a torch.distributed process group (Ray Train's "
                           "TorchTrainer starts one); start one or use scaling.strategy=ddp")
    if mesh is None:
        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    kw = dict(mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy())
    for blk in model.blocks:
        fully_shard(blk, reshard_after_forward=reshard_after_forward, **kw)
    # the root keeps its parameters gathered after forward: backward needs them at once
    fully_shard(model, reshard_after_forward=False, **kw)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    model = getattr(model, "_orig_mod", model)
    return isinstance(model, FSDPModule)


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _bare(model: nn.Module) -> nn.Module:
    """Inside torch.compile and DDP wrappers (FSDP2 modules are the model itself)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(getattr(model, "module", None), nn.Module) else model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full, unsharded CPU state dict with the bare ClimaX keys, from an FSDP, DDP or plain model.

    For FSDP it all-gathers: call it on every rank; with ``cpu_offload`` only rank 0 receives the
    full copy (the others get an empty dict), so no rank but the writer holds a second model.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    bare = _bare(model)
    if not is_sharded(bare):
        return {k: v.detach().cpu().clone() for k, v in bare.state_dict().items()}
    return get_model_state_dict(bare, options=_options())


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser state keyed by parameter name, unsharded, on CPU (collective for FSDP; the full
    copy is rank 0's, the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(_bare(model), optimizer, options=_options())


def load_full_state(model: nn.Module, state_dict: dict, optimizer: torch.optim.Optimizer | None = None,
                    optim_state: dict | None = None) -> None:
    """Load full (unsharded) model and optimiser state into an FSDP, DDP or plain model; every rank
    passes the same full dicts (the checkpoint is read on each)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    bare = _bare(model)
    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(bare, state_dict, options=opts)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(bare, optimizer, optim_state, options=opts)


class _FullModel:
    """What ``save_checkpoint`` reads from a model (``config``, ``state_dict()``), over a full copy."""

    def __init__(self, config: dict, state: dict):
        self.config, self._state = config, state

    def state_dict(self) -> dict:
        return self._state


def save_sharded_train_state(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                             scheduler: Any, state: Any, rank: int | None = None, **extra: Any) -> Path | None:
    """``climax.training.save_train_state`` for a sharded model: the same two files, the same format.

    Collective (every rank gathers the full state); rank 0 writes. The optimiser state is keyed by
    parameter name (``get_optimizer_state_dict``), which ``load_sharded_train_state`` reads back.
    """
    from climax.checkpoint import save_checkpoint
    from climax.training import MODEL_FILE, STATE_FILE, check_plain

    sd = full_state_dict(model)
    osd = full_optimizer_state_dict(model, optimizer)
    rank = dist.get_rank() if rank is None and dist.is_initialized() else (rank or 0)
    if rank != 0:
        return None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(_FullModel(dict(_bare(model).config), sd), directory / MODEL_FILE,
                    train_state=asdict(state), **extra)
    payload = {"optimizer": osd, "optimizer_keys": "names",
               "scheduler": scheduler.state_dict() if scheduler is not None else None, "state": asdict(state)}
    check_plain(payload, STATE_FILE)
    with atomic_path(directory / STATE_FILE) as tmp:
        torch.save(payload, tmp)
    return directory


def load_sharded_train_state(directory: str | os.PathLike, model: nn.Module,
                             optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None):
    """Restore a run into a sharded model (every rank reads the checkpoint); returns the TrainState.

    Reads checkpoints of FSDP runs (optimiser keyed by name) and of DDP runs (keyed by index, in
    ``param_groups`` order, which sharding keeps).
    """
    from climax.checkpoint import read_checkpoint
    from climax.training import TrainState, read_train_state

    directory = Path(directory)
    sd, _meta, _src = read_checkpoint(directory)
    payload = read_train_state(directory)
    osd = payload["optimizer"] if optimizer is not None else None
    if osd is not None and payload.get("optimizer_keys") != "names":
        osd = _names_from_indices(model, optimizer, osd)
    if osd is not None:  # keys a scheduler added (initial_lr) must exist before the groups are matched
        for group, saved in zip(optimizer.param_groups, osd["param_groups"]):
            for k, v in saved.items():
                if k != "params":
                    group.setdefault(k, v)
    load_full_state(model, sd, optimizer, osd)
    if scheduler is not None and payload.get("scheduler") is not None:
        scheduler.load_state_dict(payload["scheduler"])
    return TrainState(**payload["state"])


def _names_from_indices(model: nn.Module, optimizer: torch.optim.Optimizer, osd: dict) -> dict:
    """An index-keyed ``optimizer.state_dict()`` (DDP runs) rekeyed by parameter name."""
    names = {id(p): n.removeprefix("module.") for n, p in _bare(model).named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    state = {order[i]: v for i, v in osd["state"].items()}
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}
