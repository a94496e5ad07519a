"""Self-contained checkpoints: the statistics, grid, variables and dataset a model was trained with.

A model only works on inputs normalised as in training. Every checkpoint we write therefore carries
(``checkpoint_record``): the per-variable (mean, std) it normalised with, its grid (lat, lon, their
order), its variables and the fingerprint of the dataset's manifest. Finetuning, evaluation and
forecasts normalise with the checkpoint's statistics by default (``apply_statistics`` sets them on a
``climax.data.ShardDataset``, whose ``normalizer`` every loader and scorer uses) and warn about the
variables whose dataset statistics differ by more than 1 %. An original ClimaX ``.ckpt`` records no
statistics: its release's ``normalize_mean.npz`` / ``normalize_std.npz`` (as the original
preprocessing writes them) give them (``release_statistics``). Precedence: docs/design.md,
"Checkpoint statistics".

No Ray, no ``pipelines``; plain data only, so checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from climax.variables import NAME_ALIASES

__all__ = ["TOLERANCE", "checkpoint_record", "checkpoint_statistics", "release_statistics", "differing",
           "apply_statistics"]

log = logging.getLogger("climax.normalization")

#: Relative difference above which dataset statistics are reported as differing from a checkpoint's.
TOLERANCE = 0.01


def checkpoint_record(dataset, variables: Sequence[str], region=None) -> dict[str, Any]:
    """What a checkpoint stores about its data: ``statistics`` ({variable: {mean, std}}, as the
    dataset normalises now, i.e. after ``apply_statistics``), ``grid``, ``variables`` and ``dataset``
    (root, name, manifest fingerprint). Plain data for ``torch.load(weights_only=True)``."""
    variables = list(dict.fromkeys(variables))
    mean, std = dataset.normalizer(variables)
    raw = dataset.manifest.raw
    grid = {"lat": [float(x) for x in dataset.lat], "lon": [float(x) for x in dataset.lon],
            "lat_order": raw.get("grid", {}).get("lat_order", "south_to_north"),
            "resolution": raw.get("grid", {}).get("resolution")}
    if region is not None:
        grid["region"] = {"name": region.name, "lat": [float(x) for x in region.lat(dataset.lat)],
                          "lon": [float(x) for x in region.lon(dataset.lon)]}
    return {
        "statistics": {v: {"mean": float(m), "std": float(s)} for v, m, s in zip(variables, mean, std)},
        "grid": grid,
        "variables": variables,
        "dataset": {"root": str(dataset.root), "name": dataset.name,
                    "manifest_fingerprint": dataset.manifest.fingerprint,
                    "calendar": raw.get("time", {}).get("calendar", "standard")},
    }


def checkpoint_statistics(meta: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """{variable: (mean, std)} recorded in a checkpoint's metadata (empty for files without)."""
    stats = meta.get("statistics") or {}
    return {NAME_ALIASES.get(v, v): (float(s["mean"]), float(s["std"])) for v, s in stats.items()}


def release_statistics(folder: str | Path) -> dict[str, tuple[float, float]]:
    """{variable: (mean, std)} of an original ClimaX release: ``normalize_mean.npz`` and
    ``normalize_std.npz`` in ``folder`` as the original preprocessing writes them (one array of
    shape (1,) per variable, pressure levels as ``<base>_<hPa>``, ``lattitude`` for latitude)."""
    folder = Path(folder)
    paths = [folder / "normalize_mean.npz", folder / "normalize_std.npz"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} not found; give the folder holding the release's "
                                "normalize_mean.npz and normalize_std.npz (written by ClimaX's preprocessing)")
    with np.load(paths[0], allow_pickle=False) as m, np.load(paths[1], allow_pickle=False) as s:
        lacking = sorted(set(m.files) ^ set(s.files))
        if lacking:
            raise ValueError(f"{folder}: normalize_mean.npz and normalize_std.npz disagree on variables {lacking}")
        out = {}
        for k in m.files:
            mean, std = np.asarray(m[k], np.float64).reshape(-1), np.asarray(s[k], np.float64).reshape(-1)
            if mean.size != 1 or std.size != 1:
                raise ValueError(f"{paths[0]}: {k} holds {mean.size} values; expected one mean and one std per "
                                 "variable")
            out[NAME_ALIASES.get(k, k)] = (float(mean[0]), float(std[0]))
    return out


def differing(stats: Mapping[str, tuple[float, float]], dataset, tolerance: float = TOLERANCE) -> list[str]:
    """Variables whose dataset statistics differ from ``stats``: the means by more than ``tolerance``
    of the checkpoint's std (a relative difference of means near 0, or of 280 K, means little), or
    the stds by more than ``tolerance`` relatively."""
    have = set(dataset.variables) | set(dataset.constants)
    names = [v for v in stats if v in have]
    if not names:
        return []
    mean, std = dataset.manifest.mean_std(names)
    out = []
    for v, m, s in zip(names, mean, std):
        cm, cs = stats[v]
        scale = abs(cs) if cs else 1.0
        if abs(m - cm) > tolerance * scale or abs(s - cs) > tolerance * scale:
            out.append(v)
    return out


def apply_statistics(dataset, stats: Mapping[str, tuple[float, float]], source: str,
                     warn: Callable[[str], None] | None = None, tolerance: float = TOLERANCE) -> list[str]:
    """Normalise ``dataset`` with ``stats`` (a checkpoint's) for the variables it has; print one
    warning naming the variables whose dataset statistics differ by more than ``tolerance``.
    Returns those variables."""
    have = set(dataset.variables) | set(dataset.constants)
    use = {v: stats[v] for v in stats if v in have}
    if not use:
        return []
    diff = differing(use, dataset, tolerance)
    dataset.use_statistics(use)
    if diff:
        (warn or log.warning)(
            f"warning: dataset {dataset.name} statistics differ by more than {tolerance * 100:g} % from those of "
            f"{source} "
            f"for {', '.join(diff)}; inputs are normalised with the checkpoint's (statistics=dataset uses the "
            "dataset's)")
    return diff
