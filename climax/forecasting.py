"""Running a model forward over a shard dataset, and forecasts from it.

The machinery ``climax.evaluation`` scores with and ``jobs.forecast`` / ``jobs.evaluate`` forecast
with, in-process (no Ray):

* the checks (split, variables, model grid, rollout feasibility, history spacing) and the device;
* :class:`ModelRunner`: a model's direct and rollout (outputs fed back as inputs) forecasts on
  normalised fields; :func:`history_read` reads inputs with their history steps; :func:`prefetched`
  reads the next batch while one is computed;
* :class:`ForecastRequest` / ``ForecastFn``: what ``evaluate_model``'s ``forecast_fn`` is asked;
* :func:`forecast_fields`: forecasts from given initial times to given lead times, in physical
  units (``climax.forecast_io`` writes them to files).

The dataset is duck-typed as in ``climax.evaluation`` (``climax.data.ShardDataset`` is the real one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from climax.regions import Region
from climax.sampling import history_rows
from climax.training import rollout_feed

__all__ = [
    "ForecastRequest", "ForecastFn", "forecast_fields", "resolve_device", "place_model", "check_split",
    "check_variables", "rollout_blockers", "model_history", "check_history_rollout", "history_read",
    "ModelRunner", "EvalMode", "norm_stats", "grid_and_crop", "check_model_grid", "prefetched", "progress_bar",
    "variable_units",
]


@dataclass
class ForecastRequest:
    """What a ``forecast_fn`` is asked for: one batch of initial times at one lead time.

    The answer is a (B, len(out_vars), h, w) array or tensor in physical units on the evaluation
    grid (the region's crop when a region is given).
    """

    split: str
    init_index: np.ndarray  # (B,) rows of the split's time axis
    init_time: np.ndarray  # (B,) datetime64[ns]
    lead_hours: float
    valid_index: np.ndarray  # (B,) rows of the targets
    valid_time: np.ndarray  # (B,) datetime64[ns]
    x: torch.Tensor  # (B, len(in_vars), h, w) normalised inputs, as the model gets them
    in_vars: list[str]
    out_vars: list[str]


ForecastFn = Callable[[ForecastRequest], "torch.Tensor | np.ndarray"]


# ---------------------------------------------------------------------------------- checks
def resolve_device(device: str | torch.device | None, model: Any = None) -> torch.device:
    """``None`` -> the model's device (CPU for callables); ``"auto"`` -> CUDA when available."""
    if device is None:
        if isinstance(model, torch.nn.Module):
            p = next(model.parameters(), None)
            return p.device if p is not None else torch.device("cpu")
        return torch.device("cpu")
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but this machine has no CUDA GPU; use device=cpu "
                         "or device=auto")
    return device


def place_model(model: Any, device: torch.device) -> None:
    """Move a module to ``device`` when it is elsewhere (in place, as ``Module.to`` does)."""
    if isinstance(model, torch.nn.Module):
        p = next(model.parameters(), None)
        if p is not None and p.device != device:
            model.to(device)


def _splits(dataset) -> list[str]:
    return list(dataset.manifest.raw.get("splits", {}))


def check_split(dataset, split: str) -> None:
    if split not in _splits(dataset):
        raise ValueError(f"the dataset has no split {split!r}; its splits are {_splits(dataset)}. "
                         "Set split= to one of them, or rebuild the dataset with that split in its recipe")


def check_variables(dataset, in_vars: Sequence[str], out_vars: Sequence[str], model: Any = None) -> None:
    """Raise with what to do when the dataset or the model lacks a variable."""
    have = set(dataset.variables) | set(dataset.constants)
    missing = [v for v in in_vars if v not in have]
    if missing:
        raise ValueError(f"input variable(s) {missing} are not in the dataset (it has {sorted(have)}); set "
                         "in_vars to variables the dataset holds, or rebuild the dataset with these variables")
    missing = [v for v in out_vars if v not in set(dataset.variables)]
    if missing:
        const = [v for v in missing if v in set(dataset.constants)]
        hint = f" ({const} are constants, which are not forecast)" if const else ""
        raise ValueError(f"output variable(s) {missing} are not time-varying variables of the dataset{hint}; "
                         f"it has {list(dataset.variables)}. Set out_vars to some of those")
    known = getattr(model, "var_map", None)
    if known is not None:
        unknown = [v for v in [*in_vars, *out_vars] if v not in known]
        if unknown:
            raise ValueError(f"the model does not know variable(s) {unknown} (it knows {list(known)}); "
                             "choose in_vars/out_vars among those, or finetune a model with them")


def rollout_blockers(dataset, in_vars: Sequence[str], out_vars: Sequence[str]) -> list[str]:
    """Time-varying inputs that are not outputs: a rollout cannot feed them back (empty: possible)."""
    constants, outs = set(dataset.constants), set(out_vars)
    return [v for v in in_vars if v not in outs and v not in constants]


def model_history(model: Any) -> list[float]:
    """The input times a model takes, in hours relative to the initial time ([0]: one)."""
    return [float(h) for h in getattr(model, "history_hours", None) or [0.0]]


def check_history_rollout(history: Sequence[float], rollout_step: float) -> None:
    """A rollout with history slides a window of states one rollout step at a time: the history
    must be spaced by the rollout step."""
    if len(history) > 1 and not np.allclose(np.diff(history), rollout_step):
        raise ValueError(f"the model takes history_hours {list(history)}, but a rollout at {rollout_step:g} h steps "
                         f"can only feed back states {rollout_step:g} h apart; set rollout_step to the history's "
                         "spacing, or forecast directly (rollout_step=null)")


def history_read(dataset, split: str, rows: np.ndarray, history: Sequence[float], variables: list[str]) -> np.ndarray:
    """Raw fields at ``rows`` (n, V, H, W), or with history (n, T, V, H, W) (oldest first)."""
    if len(history) == 1:
        return np.asarray(dataset.read(split, rows, variables), dtype=np.float32)
    times = dataset.axis(split).times
    hist = history_rows(times, history, rows)
    if (hist < 0).any():
        bad = [str(times[r])[:16] for r in np.asarray(rows)[(hist < 0).any(axis=1)][:5]]
        raise ValueError(f"initial time(s) {bad} of split {split!r} lack a history step ({list(history)} h) in the "
                         "data; the model needs every one of them: choose later initial times")
    out = np.asarray(dataset.read(split, hist.reshape(-1), variables), dtype=np.float32)
    return out.reshape(len(rows), len(history), *out.shape[1:])



# ---------------------------------------------------------------------------------- model calls
class ModelRunner:
    """Calls a model on normalised fields: direct and rollout forecasts, no gradients."""

    def __init__(self, model, in_vars, out_vars, region, device):
        self.model, self.in_vars, self.out_vars = model, list(in_vars), list(out_vars)
        self.region, self.device = region, device
        # input channels fed back from the outputs during a rollout
        self.feed = rollout_feed(self.in_vars, self.out_vars)

    def direct(self, x: torch.Tensor, lead: float) -> torch.Tensor:
        lead_t = torch.full((x.shape[0],), float(lead), device=x.device, dtype=torch.float32)
        return self.model(x, lead_t, self.in_vars, self.out_vars, region=self.region)

    def rollout(self, x: torch.Tensor, step: float, steps: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (k, prediction after k steps) for k = 1..steps. With history input (x of shape
        (B, T, V, H, W), steps ``step`` apart), the window of states slides: the oldest drops out, the
        new state (the current one with the outputs fed back) comes in last."""
        state = x.clone()
        src = torch.as_tensor([i for i, _ in self.feed], device=x.device)
        dst = torch.as_tensor([j for _, j in self.feed], device=x.device)
        for k in range(1, steps + 1):
            pred = self.direct(state, step)
            yield k, pred
            if state.ndim == 5:
                new = state[:, -1].clone()
                new[:, src] = pred[:, dst].to(state.dtype)
                state = torch.cat([state[:, 1:], new[:, None]], dim=1)
            else:
                state = state.clone()
                state[:, src] = pred[:, dst].to(state.dtype)


class EvalMode:
    """Switches a module to eval mode and back."""

    def __init__(self, model):
        self.model = model if isinstance(model, torch.nn.Module) else None

    def __enter__(self):
        if self.model is not None:
            self.was_training = self.model.training
            self.model.eval()

    def __exit__(self, *exc):
        if self.model is not None:
            self.model.train(self.was_training)


def norm_stats(dataset, variables, device) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = dataset.normalizer(list(variables))
    shape = (1, len(variables), 1, 1)
    return (torch.as_tensor(np.asarray(mean, dtype=np.float32)).reshape(shape).to(device),
            torch.as_tensor(np.asarray(std, dtype=np.float32)).reshape(shape).to(device))


def grid_and_crop(dataset, region: Region | None) -> tuple[np.ndarray, np.ndarray, Callable]:
    lat, lon = np.asarray(dataset.lat, dtype=np.float64), np.asarray(dataset.lon, dtype=np.float64)
    if region is None:
        return lat, lon, lambda a: a
    if tuple(region.grid_shape) != (len(lat), len(lon)):
        raise ValueError(f"region {region.name!r} was cut from a {tuple(region.grid_shape)} grid; the dataset's "
                         f"grid is {(len(lat), len(lon))}. Build the region from the dataset's lat/lon")
    return region.lat(lat), region.lon(lon), region.crop


def check_model_grid(model, dataset) -> None:
    img = getattr(model, "img_size", None)
    if img is not None and tuple(img) != (len(dataset.lat), len(dataset.lon)):
        raise ValueError(f"the model's grid {tuple(img)} differs from the dataset's "
                         f"{(len(dataset.lat), len(dataset.lon))}; evaluate on a dataset built at the model's "
                         "resolution")


def prefetched(loader: Callable[[np.ndarray], Any], batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, Any]]:
    """Load batch i + 1 on one background thread while batch i is computed (reads stay serial)."""
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-read") as pool:
        future = pool.submit(loader, batches[0])
        for i, rows in enumerate(batches):
            data = future.result()
            if i + 1 < len(batches):
                future = pool.submit(loader, batches[i + 1])
            yield rows, data


def progress_bar(iterable, total: int, desc: str, *, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", disable=not progress, leave=False)


def variable_units(dataset, variables: Sequence[str]) -> dict[str, str]:
    specs = dataset.manifest.raw.get("variables", {})
    return {v: str(specs.get(v, {}).get("units", "")) for v in variables}



# ---------------------------------------------------------------------------------- forecasts
def forecast_fields(
    model: Any,
    dataset,
    split: str,
    init_index: Sequence[int] | np.ndarray,
    leads: Sequence[float],
    in_vars: Sequence[str],
    out_vars: Sequence[str],
    *,
    rollout_step: float | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    region: Region | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Forecasts from rows ``init_index`` of ``split``: float32 (n_init, n_lead, V_out, h, w), physical.

    Direct (one forward pass per lead) unless ``rollout_step`` is given; then every lead must be a
    multiple of it and every time-varying input an output. Lead times need no target in the data.
    """
    in_vars, out_vars = list(in_vars), list(out_vars)
    check_split(dataset, split)
    check_variables(dataset, in_vars, out_vars, model)
    check_model_grid(model, dataset)
    leads = [float(x) for x in leads]
    if not leads or min(leads) <= 0:
        raise ValueError(f"lead times must be positive hours, got {leads}")
    if rollout_step is not None:
        if rollout_step <= 0:
            raise ValueError(f"rollout_step must be positive, got {rollout_step}")
        off = [x for x in leads if x % rollout_step]
        if off:
            raise ValueError(f"lead times {off} h are not multiples of the rollout step {rollout_step:g} h")
        blockers = rollout_blockers(dataset, in_vars, out_vars)
        if blockers:
            raise ValueError(f"cannot roll out: input variable(s) {blockers} are time-varying but not outputs; "
                             "forecast directly (no rollout_step) or use a model whose outputs include them")
        check_history_rollout(model_history(model), rollout_step)
    history = model_history(model)
    device = resolve_device(device, model)
    place_model(model, device)
    _, _, crop = grid_and_crop(dataset, region)
    init_index = np.asarray(init_index, dtype=np.int64)
    n_rows = len(dataset.axis(split))
    if len(init_index) == 0 or init_index.min() < 0 or init_index.max() >= n_rows:
        raise ValueError(f"initial rows {init_index.tolist()[:5]}... are outside the split's {n_rows} time steps")
    in_mean, in_std = norm_stats(dataset, in_vars, device)
    out_mean, out_std = norm_stats(dataset, out_vars, device)
    runner = ModelRunner(model, in_vars, out_vars, region, device)
    lead_pos = {lead: i for i, lead in enumerate(leads)}

    def load(rows):
        return crop(history_read(dataset, split, rows, history, in_vars))

    out: np.ndarray | None = None
    batches = [init_index[i:i + batch_size] for i in range(0, len(init_index), batch_size)]
    start = 0
    with EvalMode(model), torch.inference_mode():
        for rows, fields in progress_bar(prefetched(load, batches), len(batches), "forecast", progress=progress):
            x = (torch.from_numpy(fields).to(device) - in_mean) / in_std
            preds: dict[float, torch.Tensor] = {}
            if rollout_step is None:
                for lead in leads:
                    preds[lead] = runner.direct(x, lead)
            else:
                steps = int(round(max(leads) / rollout_step))
                for k, pred in runner.rollout(x, rollout_step, steps):
                    if k * rollout_step in lead_pos:
                        preds[k * rollout_step] = pred
            if out is None:
                h, w = fields.shape[-2:]
                out = np.empty((len(init_index), len(leads), len(out_vars), h, w), dtype=np.float32)
            for lead, pred in preds.items():
                out[start:start + len(rows), lead_pos[lead]] = (pred.float() * out_std + out_mean).cpu().numpy()
            start += len(rows)
    return out
