"""ClimaX: the model and what it needs to learn (architecture, checkpoints, metrics, schedules,
shard reading and forecast sampling). Imports neither Ray nor ``pipelines``.

Names are imported lazily so that torch-free parts (for example ``climax.shards``) can be used by
the preprocessing pipeline without importing torch.
"""

from importlib import import_module

__all__ = ["ClimaX", "load_checkpoint", "load_model", "save_checkpoint"]

_LAZY = {
    "ClimaX": "climax.model",
    "load_checkpoint": "climax.checkpoint",
    "load_model": "climax.checkpoint",
    "save_checkpoint": "climax.checkpoint",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'climax' has no attribute {name!r}")
