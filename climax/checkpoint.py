"""Checkpoint I/O beside the model: original ClimaX ``.ckpt`` files, bare state dicts and ours.

``load_checkpoint`` never drops anything silently: every tensor of the file is either loaded,
interpolated (``pos_embed`` onto another grid), mapped by variable name (token embeddings,
variable embeddings and head rows when the variable lists differ) or reported as ignored, and every
parameter of the model that the file does not provide is reported as initialised.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from climax.config import resolve_model_config
from climax.model import ClimaX
from climax.storage import atomic_path
from climax.variables import NAME_ALIASES, ORIGINAL_DEFAULT_VARS

__all__ = [
    "CheckpointError",
    "LoadReport",
    "ORIGINAL_DEFAULT_VARS",
    "load_checkpoint",
    "load_model",
    "read_checkpoint",
    "save_checkpoint",
]

log = logging.getLogger("climax.checkpoint")

FORMAT = "climax-ray/1"

# Older ClimaX files call the variable tables "channel_*".
_RENAMES = {"channel_embed": "var_embed", "channel_query": "var_query", "channel_agg": "var_agg"}
_WRAPPER_PREFIXES = ("net.", "module.", "_orig_mod.")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


@dataclass
class LoadReport:
    """What ``load_checkpoint`` did with each tensor."""

    source: str
    loaded: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)
    mapped: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    decoder: list[str] = field(default_factory=list)  # masked-pretraining decoder, not part of ClimaX
    notes: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """Every tensor matched as it is (a pretraining decoder left out does not count)."""
        return not (self.interpolated or self.mapped or self.initialised or self.ignored)

    def __str__(self) -> str:
        lines = [f"checkpoint {self.source}: {len(self.loaded)} tensors loaded as they are"]
        for title, items in (("interpolated", self.interpolated), ("mapped by variable name", self.mapped),
                             ("initialised (not in the checkpoint)", self.initialised),
                             ("ignored (not in the model)", self.ignored),
                             ("notes", self.notes)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines += [f"    - {item}" for item in items]
        if self.decoder:  # one line: the masked-pretraining decoder is left out as a whole
            lines.append(f"  ignored (pretraining decoder): {len(self.decoder)} tensors "
                         f"{self.decoder[0].split('.')[0]}.*")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- saving
def save_checkpoint(model: ClimaX, path: str | os.PathLike, **extra: Any) -> Path:
    """Write our checkpoint atomically (temporary name, then rename): weights, model config, extras.

    Extras must be plain data (numbers, strings, lists, dicts, tensors) so that the file loads with
    ``torch.load(weights_only=True)``. They are stored redacted (``climax.redact``): a ``run_config``
    keeps no storage credentials.
    """
    from climax.redact import redact

    path = Path(path)
    payload = {"format": FORMAT, "model_config": dict(model.config), "state_dict": model.state_dict(),
               **{k: v if isinstance(v, torch.Tensor) else redact(v) for k, v in extra.items()}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


# ---------------------------------------------------------------------------------- reading
def read_checkpoint(path_or_state: str | os.PathLike | Mapping[str, Any]) -> tuple[dict, dict, str]:
    """Return (state_dict with normalised names, metadata, description of the source).

    Accepts a path to an original Lightning ``.ckpt``, a bare state-dict file, our checkpoint, a
    directory holding ``model.pt`` (a Ray Train checkpoint), or an in-memory dict of any of these.
    """
    if isinstance(path_or_state, Mapping):
        raw, source = dict(path_or_state), "<in-memory state>"
    else:
        p = Path(path_or_state)
        if p.is_dir():
            p = p / "model.pt"
        source = str(p)
        if not p.exists():
            raise CheckpointError(f"checkpoint file {p} does not exist; check the path")
        try:
            raw = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, zip errors...
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                raise CheckpointError(
                    f"{p} holds Python objects besides tensors and is refused by the safe loader "
                    f"({e.__class__.__name__}). If you trust the file, load it with "
                    "torch.load(path, weights_only=False) and pass the resulting dict instead."
                ) from e
            raise CheckpointError(
                f"{p} could not be read as a PyTorch checkpoint: it is truncated or corrupt "
                f"({e.__class__.__name__}: {str(e)[:200]}). Copy or download it again."
            ) from e
        if not isinstance(raw, Mapping):
            raise CheckpointError(f"{p} holds a {type(raw).__name__}, not a checkpoint dict")

    meta: dict[str, Any] = {}
    if raw.get("format") == FORMAT:
        state, meta = raw["state_dict"], {k: v for k, v in raw.items() if k != "state_dict"}
    elif "state_dict" in raw and isinstance(raw["state_dict"], Mapping):  # Lightning
        state = raw["state_dict"]
        meta = {"hyper_parameters": raw.get("hyper_parameters", {})}
    else:
        state = raw
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entries {bad[:5]} are not tensors; this is not a model state dict")
    return _normalise_names(state), meta, source


def _normalise_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        head, _, rest = key.partition(".")
        key = _RENAMES.get(head, head) + ("." + rest if rest else "")
        out[key] = value
    return out


def _find_key(tree: Any, name: str) -> Any:
    """Depth-first search for ``name`` in nested dicts (Lightning hyper_parameters vary by version)."""
    if isinstance(tree, Mapping):
        if name in tree:
            return tree[name]
        for value in tree.values():
            found = _find_key(value, name)
            if found is not None:
                return found
    return None


def _checkpoint_vars(state: dict, meta: dict, model: ClimaX, ckpt_vars: Sequence[str] | None,
                     report: LoadReport) -> list[str]:
    n = len({k.split(".")[1] for k in state if k.startswith("token_embeds.")})
    if n == 0 and "var_embed" in state:
        n = state["var_embed"].shape[1]
    names = ckpt_vars
    if names is None:
        names = _find_key(meta.get("model_config", {}), "default_vars") or _find_key(meta, "default_vars")
    if names is None:
        if n == len(model.default_vars):
            report.notes.append("the checkpoint does not name its variables; assumed the model's order")
            names = model.default_vars
        elif n == len(ORIGINAL_DEFAULT_VARS):
            report.notes.append("the checkpoint does not name its variables; assumed the 48 of the ClimaX release")
            names = ORIGINAL_DEFAULT_VARS
        else:
            raise CheckpointError(
                f"{report.source} holds {n} variable embeddings but does not name them; pass "
                "ckpt_vars=[...] (the variable list it was trained with) to load_checkpoint"
            )
    names = [NAME_ALIASES.get(v, v) for v in names]
    if n and len(names) != n:
        raise CheckpointError(f"{report.source} holds {n} variable embeddings but {len(names)} names were given")
    return names


def _infer_grid(num_patches: int, meta: dict, ckpt_grid: Sequence[int] | None, source: str) -> tuple[int, int]:
    if ckpt_grid is not None:
        return int(ckpt_grid[0]), int(ckpt_grid[1])
    cfg = meta.get("model_config") or {}
    if "img_size" in cfg and "patch_size" in cfg:
        return cfg["img_size"][0] // cfg["patch_size"], cfg["img_size"][1] // cfg["patch_size"]
    h = math.isqrt(num_patches // 2)
    if 2 * h * h == num_patches:  # global equiangular grids are twice as wide as tall
        return h, 2 * h
    raise CheckpointError(
        f"{source}: cannot tell the patch grid of a pos_embed with {num_patches} patches; "
        "pass ckpt_grid=(rows, cols)"
    )


def interpolate_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic interpolation of a (1, h*w, D) position embedding onto another patch grid."""
    d = pos.shape[-1]
    grid = pos.reshape(1, *old_grid, d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d).to(pos.dtype)


# ---------------------------------------------------------------------------------- loading
def load_checkpoint(
    model: ClimaX,
    path_or_state: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = False,
    ckpt_vars: Sequence[str] | None = None,
    ckpt_grid: Sequence[int] | None = None,
) -> LoadReport:
    """Load a checkpoint into ``model`` and return (and log) a report of what happened.

    Args:
        model: the ClimaX to fill.
        path_or_state: an original ClimaX ``.ckpt`` (Lightning dict whose ``state_dict`` keys carry
            ``net.``), a bare state dict, our checkpoint, a Ray checkpoint directory, or a dict.
        strict: raise unless every tensor matches the model exactly (same names, shapes, variables).
        ckpt_vars: the checkpoint's variable list, when the file does not record it.
        ckpt_grid: the checkpoint's patch grid (rows, cols), when it cannot be inferred.
    """
    state, meta, source = read_checkpoint(path_or_state)
    report = LoadReport(source=source)
    target = model.state_dict()
    names = _checkpoint_vars(state, meta, model, ckpt_vars, report)
    ckpt_index = {v: i for i, v in enumerate(names)}
    model_vars = model.default_vars
    p, V = model.patch_size, len(model_vars)
    head_out = f"head.{len(model.head) - 1}"
    used: set[str] = set()
    new_state: dict[str, torch.Tensor] = {}

    for key, init in target.items():
        parts = key.split(".")
        if parts[0] == "token_embeds":  # per-variable: map by name
            var = model_vars[int(parts[1])]
            src_key = f"token_embeds.{ckpt_index[var]}.{'.'.join(parts[2:])}" if var in ckpt_index else None
            if src_key in state and state[src_key].shape == init.shape:
                new_state[key] = state[src_key]
                used.add(src_key)
                (report.loaded if src_key == key else report.mapped).append(
                    key if src_key == key else f"{key} <- {src_key} ({var})")
            else:
                new_state[key] = init
                report.initialised.append(f"{key} (variable {var!r} not in the checkpoint)")
        elif key == "var_embed" and key in state:
            new_state[key] = _map_rows(state[key], init, names, model_vars, axis=1, report=report, key=key)
            used.add(key)
        elif key.startswith(head_out) and key in state and state[key].shape != init.shape:
            # Output rows are ordered (p, q, variable): map the variable axis by name.
            src = state[key]
            if src.shape[0] != len(names) * p * p:
                new_state[key] = init
                report.initialised.append(f"{key} (checkpoint head has {src.shape[0]} rows, not "
                                          f"{len(names)} variables x {p}x{p} patches)")
            else:
                src_r = src.reshape(p * p, len(names), *src.shape[1:])
                init_r = init.reshape(p * p, V, *init.shape[1:])
                new_state[key] = _map_rows(src_r, init_r, names, model_vars, axis=1, report=report,
                                           key=key).reshape(init.shape)
            used.add(key)
        elif key not in state:
            new_state[key] = init
            report.initialised.append(f"{key} (not in the checkpoint)")
        elif state[key].shape == init.shape:
            new_state[key] = state[key]
            used.add(key)
            report.loaded.append(key)
        elif key == "pos_embed":
            old = _infer_grid(state[key].shape[1], meta, ckpt_grid, source)
            new_state[key] = interpolate_pos_embed(state[key], old, model.grid_size)
            used.add(key)
            report.interpolated.append(f"pos_embed {old[0]}x{old[1]} -> {model.grid_size[0]}x{model.grid_size[1]} "
                                       "patches (bicubic)")
        else:
            new_state[key] = init
            used.add(key)
            report.initialised.append(f"{key} (the checkpoint's tensor of shape {tuple(state[key].shape)} "
                                      f"does not fit the model's {tuple(init.shape)} and is not used)")

    for key in sorted(set(state) - used):
        (report.decoder if key.startswith(f"{ClimaX.DECODER}.") else report.ignored).append(key)
    if list(names) != list(model_vars):
        missing = [v for v in model_vars if v not in ckpt_index]
        extra = [v for v in names if v not in set(model_vars)]
        report.notes.append(f"variables mapped by name; new in the model: {missing or 'none'}; "
                            f"in the checkpoint only: {extra or 'none'}")
    if strict and (not report.exact or names != model_vars):
        raise CheckpointError(f"strict load of {source} failed, the checkpoint does not match exactly:\n{report}")
    model.load_state_dict(new_state, strict=True)
    log.info("%s", report)
    return report


def _map_rows(src: torch.Tensor, init: torch.Tensor, names: Sequence[str], model_vars: Sequence[str],
              axis: int, report: LoadReport, key: str) -> torch.Tensor:
    """Copy ``src`` slices along ``axis`` into ``init`` where the variable names match."""
    if list(names) == list(model_vars) and src.shape == init.shape:
        report.loaded.append(key)
        return src
    out = init.clone()
    index = {v: i for i, v in enumerate(names)}
    hits = [(j, index[v]) for j, v in enumerate(model_vars) if v in index]
    if hits:
        dst_idx = torch.tensor([j for j, _ in hits])
        src_idx = torch.tensor([i for _, i in hits])
        out.index_copy_(axis, dst_idx, src.index_select(axis, src_idx).to(out.dtype))
    new = [v for v in model_vars if v not in index]
    report.mapped.append(f"{key}: {len(hits)} variables by name" + (f", {len(new)} initialised: {new}" if new else ""))
    return out


def load_model(path: str | os.PathLike, **overrides: Any) -> tuple[ClimaX, LoadReport]:
    """Rebuild a model from one of our checkpoints (its recorded config, ``overrides`` applied)."""
    state, meta, source = read_checkpoint(path)
    cfg = dict(meta.get("model_config") or {})
    if not cfg:
        raise CheckpointError(f"{source} records no model config; build ClimaX(...) yourself and call load_checkpoint")
    cfg.update(overrides)
    model = ClimaX.from_config(resolve_model_config(cfg))
    return model, load_checkpoint(model, {"format": FORMAT, "state_dict": state, **meta})
