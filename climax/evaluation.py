"""Evaluation and forecasts: scores per variable and lead time, and CF-compliant forecast files.

One plain, in-process home (no Ray) used by ``jobs.evaluate``, ``jobs.forecast`` and the training
job's validation:

* :func:`evaluate_model` scores a model on a split of a shard dataset: RMSE (WeatherBench 2's and
  the per-sample mean), bias and ACC (``climax.wb2``) per region, variable and lead time, in
  physical units, for the direct forecast, the iterative rollout (the model applied again and
  again at a step lead, its outputs fed back as inputs) and the persistence and climatology baselines, in one table.
* :func:`forecast_fields` runs a model from given initial times to given lead times and returns
  physical fields; ``climax.forecast_io`` writes them (CF-1.8 NetCDF: ``forecast_dataset``,
  ``write_netcdf``, re-exported here; WeatherBench 2's Zarr layout). It lives in
  ``climax.forecasting`` with the model-running machinery both share (checks, ``ModelRunner``,
  batched reads); its public names are re-exported here, so ``from climax.evaluation import
  forecast_fields`` keeps working.

The dataset is duck-typed (``climax.data.ShardDataset`` is the real one): it needs ``lat``,
``lon``, ``variables`` (time-varying), ``constants``, ``step_hours``, ``manifest``,
``axis(split)`` (a ``climax.sampling.TimeAxis``), ``read(split, idx, variables)`` (raw physical
float32 (n, V, H, W)), ``normalizer(variables)`` (mean, std) and ``climatology(variables, times)``
(the day-of-year x hour climatology of the training years at ``times``).

Conventions, chosen once:

* Every score is computed on de-normalised (physical) fields, in float64. ``rmse`` and ``bias``
  follow WeatherBench 2: the square root of the time-mean of the area-weighted spatial MSE, and the
  time- and area-weighted mean of forecast - truth (WB2's cell-area latitude weights).
  ``rmse_sample_mean`` and ``acc`` are computed per sample over the grid (cos-latitude weights) and
  then averaged over the samples: the ClimaX paper's / WeatherBench 1's convention (WB2 calls that
  RMSE ``RMSESqrtBeforeTimeAvg``; its ACC is the same per-sample mean). ``rmse >= rmse_sample_mean``
  always (Jensen). All are kept as mergeable sums (``climax.wb2.ScoreSums``).
* Regions: WeatherBench 2's default regions (``climax.wb2.WB2_REGIONS``: global, tropics,
  extra-tropics, northern/southern hemisphere extra-tropics, Europe, North America, ...), each a
  mask on the full grid's weights; a region with no grid point on the dataset's grid is skipped
  with a note.
* ACC anomalies are taken against the climatology at the *valid* (target) time.
* Every method and lead time is scored on the same initial times: those whose every requested lead
  has its target inside the split. ``max_samples`` keeps that many, evenly spread over the split.
* A model region (``region=``, a model trained on a box) crops everything alike (inputs, targets,
  climatology, latitude weights); the model sees only the region's patches, and the table has one
  region, the box's name, instead of WB2's regions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from climax.forecast_io import cf_units, forecast_dataset, history_line, write_netcdf  # the forecast files' home
from climax.forecasting import (  # the model-running machinery, and the forecast runner (re-exported)
    EvalMode,
    ForecastFn,
    ForecastRequest,
    ModelRunner,
    check_history_rollout,
    check_model_grid,
    check_split,
    check_variables,
    forecast_fields,
    grid_and_crop,
    history_read,
    model_history,
    norm_stats,
    place_model,
    prefetched,
    progress_bar,
    resolve_device,
    rollout_blockers,
    variable_units,
)
from climax.metrics import lat_weights
from climax.regions import Region
from climax.sampling import history_rows, not_step_multiples
from climax.wb2 import WB2_REGIONS, ScoreSums, accumulate, area_weights, region_mask, region_weight_matrix

__all__ = [
    "METHODS", "ForecastRequest", "evaluate_model", "forecast_fields", "forecast_dataset", "write_netcdf",
    "check_variables", "rollout_blockers", "evaluation_inits", "resolve_device", "cf_units", "variable_units",
    "history_line", "ForecastFn", "scores_frame", "model_history", "check_history_rollout",
]

log = logging.getLogger("climax.evaluation")

METHODS = ("direct", "rollout", "persistence", "climatology")
COLUMNS = ["variable", "lead_hours", "method", "region", "rmse", "rmse_sample_mean", "bias", "acc", "units",
           "samples"]
_HOUR_NS = 3_600_000_000_000



def _check_leads(dataset, leads: Sequence[float], rollout_step: float | None) -> list[float]:
    leads = sorted({float(x) for x in leads})
    if not leads or leads[0] <= 0:
        raise ValueError(f"lead times must be positive hours, got {leads}")
    step = float(dataset.step_hours)
    bad = not_step_multiples(leads, step)
    if bad:
        raise ValueError(f"lead times {bad} h are not multiples of the dataset's {step:g} h time step")
    if rollout_step is not None and (rollout_step <= 0 or not_step_multiples([rollout_step], step)):
        raise ValueError(f"rollout_step {rollout_step} h must be a positive multiple of the dataset's "
                         f"{step:g} h time step")
    return leads


def evaluation_inits(times: np.ndarray, leads: Sequence[float], max_samples: int | None = None, *,
                     history: Sequence[float] = (0.0,)) -> np.ndarray:
    """Rows of ``times`` whose target exists at every lead (and, for a model with history input,
    whose every ``history`` step exists), evenly thinned to ``max_samples``."""
    t = np.asarray(times, dtype="datetime64[ns]").astype(np.int64)
    ok = np.ones(len(t), dtype=bool)
    if len(history) > 1:
        ok &= (history_rows(times, history) >= 0).all(axis=1)
    for lead in leads:
        target = t + int(round(lead * _HOUR_NS))
        pos = np.minimum(np.searchsorted(t, target), len(t) - 1)
        ok &= t[pos] == target
    rows = np.flatnonzero(ok)
    if len(rows) == 0:
        span = (np.datetime64(int(t[0]), "ns"), np.datetime64(int(t[-1]), "ns")) if len(t) else ("-", "-")
        hist = f" and every history step {list(history)} h" if len(history) > 1 else ""
        raise ValueError(f"no initial time of the split ({span[0]} .. {span[1]}) has targets at every lead "
                         f"time up to {max(leads):g} h{hist}; use shorter lead times or a longer split")
    if max_samples is not None and max_samples < len(rows):
        if max_samples < 1:
            raise ValueError(f"max_samples must be at least 1, got {max_samples}")
        rows = rows[np.unique(np.linspace(0, len(rows) - 1, max_samples).round().astype(int))]
    return rows

def _rows_at(times_ns: np.ndarray, rows: np.ndarray, lead: float) -> np.ndarray:
    target = times_ns[rows] + int(round(lead * _HOUR_NS))
    return np.searchsorted(times_ns, target)


# ---------------------------------------------------------------------------------- evaluation
def evaluate_model(
    model: Any,
    dataset,
    split: str,
    in_vars: Sequence[str],
    out_vars: Sequence[str],
    leads: Sequence[float],
    rollout_step: float | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    region: Region | None = None,
    max_samples: int | None = None,
    *,
    forecast_fn: ForecastFn | None = None,
    baselines: bool = True,
    progress: bool = True,
    regions: Sequence[str] | None = None,
    init_rows: Sequence[int] | np.ndarray | None = None,
    return_sums: bool = False,
) -> pd.DataFrame | dict[str, Any]:
    """Score forecasts on ``split``: one row per (method, variable, lead time, region).

    Args:
        model: a ``ClimaX`` (or any callable with its forward signature ``(x, lead_hours, in_vars,
            out_vars, region=)`` on normalised fields); None when ``forecast_fn`` gives the forecast.
        dataset: a ``climax.data.ShardDataset`` (or anything with its interface, see the module doc).
        split: the split to score on, usually ``"test"``.
        in_vars, out_vars: the model's input and output variables.
        leads: lead times in hours (multiples of the dataset's time step).
        rollout_step: when set, also score the rollout: the model applied at this lead again and
            again, its outputs fed back as inputs, scored at every lead that is a multiple of the
            step. Needs every time-varying input to be an output; otherwise the rollout is skipped
            with a note (``df.attrs["notes"]``).
        batch_size: initial times per forward pass.
        device: where the model runs (a module elsewhere is moved there); None: the model's
            device; "auto": CUDA when available.
        region: score on this box only (``climax.regions.Region`` of the dataset's grid).
        max_samples: score at most this many initial times, evenly spread over the split.
        forecast_fn: a known forecast instead of the model's direct one: called with a
            ``ForecastRequest`` per batch and lead, returns physical fields (the acceptance test
            scores the truth itself and the climatology this way).
        baselines: also score persistence (the input at the initial time) and climatology (the
            climatology at the valid time).
        progress: show a progress bar.
        regions: WeatherBench 2 regions to score (names of ``climax.wb2.WB2_REGIONS``); None: all
            of them. Ignored when ``region`` (a model's box) is given: then the box is the region.
        init_rows: score exactly these rows of the split (a worker's share of
            :func:`evaluation_inits`; ``max_samples`` is then ignored).
        return_sums: return the mergeable partial sums (:func:`scores_frame` turns merged ones
            into the table) instead of the table: a dict with ``sums`` ({(method, lead):
            ScoreSums} on the CPU), ``regions``, ``out_vars``, ``leads``, ``units``, ``notes``,
            ``init_times``.

    Returns:
        A DataFrame with columns variable, lead_hours, method (direct, rollout, persistence,
        climatology), region, rmse (WeatherBench 2's), rmse_sample_mean (the ClimaX paper's), bias
        (WB2's, forecast - truth), acc (all in physical units, latitude-weighted), units, samples.
        ``df.attrs`` holds ``notes`` (for example why the rollout was skipped) and ``init_times``.
    """
    if model is None and forecast_fn is None:
        raise ValueError("give a model or a forecast_fn")
    in_vars, out_vars = list(in_vars), list(out_vars)
    check_split(dataset, split)
    check_variables(dataset, in_vars if forecast_fn is None or model is not None else [], out_vars,
                    model if forecast_fn is None else None)
    if model is not None:
        check_model_grid(model, dataset)
    leads = _check_leads(dataset, leads, rollout_step)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = resolve_device(device, model)
    place_model(model, device)
    notes: list[str] = []
    history = model_history(model) if model is not None else [0.0]

    roll_leads: list[float] = []
    if rollout_step is not None:
        blockers = rollout_blockers(dataset, in_vars, out_vars)
        if model is None:
            notes.append("rollout skipped: it needs a model (only a forecast_fn was given)")
        elif blockers:
            notes.append(f"rollout skipped: input variable(s) {blockers} are time-varying but not outputs, so "
                         "predictions cannot be fed back; a rollout needs every time-varying input among out_vars")
        else:
            check_history_rollout(history, rollout_step)
            roll_leads = [x for x in leads if x % rollout_step == 0]
            off = [x for x in leads if x % rollout_step]
            if off:
                notes.append(f"rollout not scored at {off} h: not multiples of the {rollout_step:g} h step")
            if not roll_leads:
                notes.append(f"rollout skipped: no lead time is a multiple of the {rollout_step:g} h step")
    for note in notes:
        log.warning("%s", note)

    axis = dataset.axis(split)
    times_ns = np.asarray(axis.times, dtype="datetime64[ns]").astype(np.int64)
    if init_rows is not None:
        inits = np.asarray(init_rows, dtype=np.int64)
        gapped = 0  # reported by whoever split the initial times
    else:
        inits = evaluation_inits(axis.times, leads, max_samples, history=history)
        # initial times inside the split's span that a gap (calendar or data) leaves without a target
        # (or without a history step)
        longest = int(round(max(leads) * _HOUR_NS))
        oldest = int(round(history[0] * _HOUR_NS))
        gapped = int(np.sum((times_ns + longest <= times_ns[-1]) & (times_ns + oldest >= times_ns[0]))) - \
            len(evaluation_inits(axis.times, leads, history=history))
    if gapped > 0:
        notes.append(f"{gapped} initial times skipped: a target time at one of the leads is missing (calendar or "
                     "data gaps)")
        log.warning("%s", notes[-1])
    lat, lon, crop = grid_and_crop(dataset, region)
    # region weight matrices (h*w, R): WB2's area weights of the full grid (cropped with a model
    # region, never recomputed on the crop) and cos-latitude weights (climax.metrics)
    full_area = area_weights(np.asarray(dataset.lat, dtype=np.float64))
    if region is not None:
        names = [region.name]
        area_lat = region.lat(full_area)
        masks = [np.ones((len(lat), len(lon)), dtype=bool)]
    else:
        names = list(WB2_REGIONS) if regions is None else list(regions)
        area_lat = full_area
        masks = [region_mask(r, lat, lon) for r in names]
        empty = [r for r, m in zip(names, masks) if not m.any()]
        if empty:
            notes.append(f"region(s) {empty} skipped: no grid point of the {len(lat)}x{len(lon)} grid lies inside")
            log.warning("%s", notes[-1])
            names, masks = [r for r, m in zip(names, masks) if m.any()], [m for m in masks if m.any()]
    area_m = torch.as_tensor(region_weight_matrix(area_lat, masks), device=device)
    # climax.metrics' cos weights exactly as before (float32), so acc and rmse_sample_mean are unchanged
    cos_m = torch.as_tensor(region_weight_matrix(lat_weights(torch.as_tensor(lat)).double().numpy(), masks),
                            device=device)
    units = variable_units(dataset, out_vars)

    read_vars = list(dict.fromkeys([*in_vars, *out_vars]))
    in_pos = [read_vars.index(v) for v in in_vars]
    out_pos = [read_vars.index(v) for v in out_vars]
    in_mean, in_std = norm_stats(dataset, in_vars, device) if in_vars else (None, None)
    out_mean, out_std = norm_stats(dataset, out_vars, device)
    runner = ModelRunner(model, in_vars, out_vars, region, device) if model is not None else None

    def load(rows: np.ndarray):
        # inputs (and persistence) at the initial times; only the outputs at the valid times
        targets = {lead: _rows_at(times_ns, rows, lead) for lead in leads}
        valid = np.unique(np.concatenate(list(targets.values())))
        inputs = crop(history_read(dataset, split, rows, history, read_vars))
        truth = crop(np.asarray(dataset.read(split, valid, out_vars), dtype=np.float32))
        clim = crop(np.asarray(dataset.climatology(out_vars, axis.times[valid]), dtype=np.float32))
        return inputs, valid, truth, clim, targets

    sums: dict[tuple[str, float], ScoreSums] = {}

    def add(method: str, lead: float, pred: torch.Tensor, truth: torch.Tensor, clim: torch.Tensor) -> None:
        pred = pred.to(device=truth.device, dtype=torch.float64)
        if tuple(pred.shape) != tuple(truth.shape):
            raise ValueError(f"{method} forecast at {lead:g} h has shape {tuple(pred.shape)}, "
                             f"expected {tuple(truth.shape)}")
        if (method, lead) not in sums:
            sums[(method, lead)] = ScoreSums.zeros(len(out_vars), len(names), truth.device)
        accumulate(sums[(method, lead)], pred, truth, clim, area_m, cos_m)

    batches = [inits[i:i + batch_size] for i in range(0, len(inits), batch_size)]
    steps = int(round(max(roll_leads) / rollout_step)) if roll_leads else 0
    with EvalMode(model), torch.inference_mode():
        for rows, (inputs, valid, truth, clim, targets) in progress_bar(
                prefetched(load, batches), len(batches), f"evaluate {split}", progress=progress):
            f = torch.from_numpy(inputs).to(device)
            y = torch.from_numpy(truth).to(device, torch.float64)
            c = torch.from_numpy(clim).to(device, torch.float64)
            f_in = f[:, :, in_pos] if f.ndim == 5 else f[:, in_pos]  # (B, [T,] V, h, w)
            x = (f_in - in_mean) / in_std if in_vars else f_in
            persistence = (f[:, -1] if f.ndim == 5 else f)[:, out_pos]
            truth_of, clim_of = {}, {}
            for lead, trows in targets.items():
                at = torch.as_tensor(np.searchsorted(valid, trows), device=device)
                truth_of[lead], clim_of[lead] = y[at], c[at]
            for lead, trows in targets.items():
                if forecast_fn is not None:
                    req = ForecastRequest(split, rows, axis.times[rows], lead, trows, axis.times[trows], x,
                                          in_vars, out_vars)
                    pred = _as_tensor(forecast_fn(req))
                else:
                    pred = runner.direct(x, lead).float() * out_std + out_mean
                add("direct", lead, pred, truth_of[lead], clim_of[lead])
                if baselines:
                    add("persistence", lead, persistence, truth_of[lead], clim_of[lead])
                    add("climatology", lead, clim_of[lead], truth_of[lead], clim_of[lead])
            if steps:
                for k, pred in runner.rollout(x, rollout_step, steps):
                    lead = k * rollout_step
                    if lead in targets:
                        add("rollout", lead, pred.float() * out_std + out_mean, truth_of[lead], clim_of[lead])

    init_times = [str(t) for t in axis.times[inits]]
    if return_sums:
        return {"sums": {k: v.to("cpu") for k, v in sums.items()}, "regions": names, "out_vars": out_vars,
                "leads": leads, "units": units, "notes": notes, "init_times": init_times}
    return scores_frame(sums, names, out_vars, leads, units, notes, init_times)


def scores_frame(sums: dict[tuple[str, float], ScoreSums], regions: Sequence[str], out_vars: Sequence[str],
                 leads: Sequence[float], units: dict[str, str], notes: list[str],
                 init_times: list[str]) -> pd.DataFrame:
    """The table of :func:`evaluate_model` from (merged) sums: one row per (method, variable, lead, region)."""
    records = []
    for method in METHODS:
        for lead in leads:
            if (method, lead) not in sums:
                continue
            s = sums[(method, lead)].scores()
            for k, name in enumerate(regions):
                for j, v in enumerate(out_vars):
                    records.append(dict(variable=v, lead_hours=lead, method=method, region=name,
                                        **{m: float(s[m][j, k]) for m in ("rmse", "rmse_sample_mean", "bias", "acc")},
                                        units=units[v], samples=sums[(method, lead)].count))
    df = pd.DataFrame.from_records(records, columns=COLUMNS)
    df.attrs["notes"] = list(notes)
    df.attrs["regions"] = list(regions)
    df.attrs["init_times"] = list(init_times)
    return df


def _as_tensor(a) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))
