"""The model configuration: ``ModelConfig`` (one field per ``climax.model.ClimaX`` argument) and the
one place where a run's ``model:`` (a YAML name or an inline mapping) becomes one. Torch-free and
Ray-free: jobs validate with it before any worker starts.

- ``resolve_model_config(model)``: a YAML file (``configs/model/*.yaml``; relative paths are tried
  from the working folder, then from the repository) or a mapping -> a validated ``ModelConfig``
  whose ``model_fields_set`` are the keys it gave. An unknown key is one ``ValueError`` naming it.
- ``run_model_config(model, user_set=..., recorded=...)``: the model of a run that may start from a
  checkpoint: the checkpoint's recorded configuration (``model_config`` in ``model.pt``) with the
  keys the run's own ``model:`` sets on top (its ``default_vars`` excepted), when the run names one
  (``user_set``: ``"model" in cfg.model_fields_set``); without a recorded one, the run's ``model:``.

Checkpoints keep recording ``ClimaX.config`` (a plain dict), so old checkpoints load as before.
Adding a constructor argument to ``ClimaX`` means adding its field here (``tests/test_model.py``
checks that the two agree).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["ModelConfig", "resolve_model_config", "run_model_config", "model_config_error", "ROOT",
           "DEFAULT_MODEL"]

ROOT = Path(__file__).resolve().parents[1]  # relative model YAML paths resolve here too
#: The ``model:`` of a run that names none (``TrainConfig.model``'s default).
DEFAULT_MODEL = "configs/model/climax-5.625.yaml"


class ModelConfig(BaseModel):
    """The arguments of ``climax.model.ClimaX`` (see its docstring); defaults equal its own.
    ``default_vars`` and ``img_size`` usually come from the data (None: not given)."""

    model_config = ConfigDict(extra="forbid")

    default_vars: list[str] | None = None
    img_size: tuple[int, int] = (32, 64)
    patch_size: int = 2
    embed_dim: int = 1024
    depth: int = 8
    decoder_depth: int = 2
    num_heads: int = 16
    mlp_ratio: float = 4.0
    drop_path: float = 0.1
    drop_rate: float = 0.1
    fast_var_agg: bool = True
    history_hours: list[float] | None = None

    def user_keys(self, exclude: set[str] = frozenset()) -> dict[str, Any]:
        """The keys that were given (not defaulted), as plain data."""
        return self.model_dump(mode="json", exclude_unset=True, exclude=set(exclude))


def model_config_error(e: ValidationError, source: str) -> str:
    """One line naming the key(s) of a ``ModelConfig`` validation error."""
    parts = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {key!r}; allowed keys: {', '.join(ModelConfig.model_fields)}")
        else:
            parts.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return f"{source}: " + "; ".join(parts)


def _validate(data: Any, source: str) -> ModelConfig:
    if not isinstance(data, Mapping):
        raise ValueError(f"{source} must be a mapping of ClimaX arguments, not a {type(data).__name__}")
    try:
        return ModelConfig.model_validate(dict(data))
    except ValidationError as e:
        raise ValueError(model_config_error(e, source)) from None


def resolve_model_config(model: str | Path | Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """``model`` (a YAML file name, a mapping or a ``ModelConfig``) as a validated ``ModelConfig``;
    its ``model_fields_set`` are the keys it gave."""
    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, Mapping):
        return _validate(model, "model configuration")
    path = Path(model)
    if not path.is_absolute() and not path.exists():
        path = ROOT / path
    if not path.is_file():
        raise FileNotFoundError(f"model configuration {model} does not exist; give a YAML file "
                                f"(e.g. configs/model/climax-5.625.yaml) or an inline mapping")
    return _validate(yaml.safe_load(path.read_text()) or {}, f"model configuration {model}")


def run_model_config(model: str | Mapping[str, Any] | ModelConfig, *, user_set: bool,
                     recorded: Mapping[str, Any] | None = None) -> ModelConfig:
    """The model configuration of a run: ``recorded`` (an init checkpoint's ``model_config``) with the
    keys of ``model`` on top when ``user_set`` (its ``default_vars`` excepted: the checkpoint's
    embeddings decide them); without ``recorded``, ``model`` itself."""
    if not recorded:
        return resolve_model_config(model)
    user = resolve_model_config(model).user_keys(exclude={"default_vars"}) if user_set else {}
    return _validate({**recorded, **user}, "the init checkpoint's model configuration")
