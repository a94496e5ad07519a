"""Evaluate a ClimaX checkpoint on a split of a shard dataset (the test split by default).

    python -m jobs.evaluate configs/evaluate.yaml [key=value ...]

Per variable, lead time and WeatherBench 2 region (global, tropics, extra-tropics, Europe, ...; or
the model's box for a regional model), in physical units, for the direct forecast, the iterative
rollout (``rollout_step``) and the persistence and climatology baselines: ``rmse`` (WeatherBench 2's
headline RMSE: sqrt of the time-mean of the area-weighted MSE), ``rmse_sample_mean`` (the mean of
per-sample RMSEs, the ClimaX paper's convention), ``bias`` (forecast - truth, WB2's) and ``acc``
(anomalies against the dataset's day-of-year x hour climatology at the valid time). Writes into
``output``: metrics.csv, metrics.json, rmse_vs_lead.png, acc_vs_lead.png and maps_<variable>.png
(forecast, truth and error at one initial time), and prints the table. Runs in this process, on
the GPU when there is one (``device=auto``).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from climax.atomic import write_atomic
from climax.evaluation import evaluate_model
from climax.redact import redact
from climax.tasks import checkpoint_task, get_task
from jobs.common import error_line, setup_logging
from jobs.config import fail, parse_args

log = logging.getLogger("jobs.evaluate")


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str = Field(description="model checkpoint: a model.pt file or a directory holding one "
                                        "(a Ray Train checkpoint)")
    data: str = Field(description="shard dataset root (a folder or s3://bucket/prefix)")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for s3:// data")
    split: str = Field("test", description="split to evaluate on")
    in_vars: list[str] | None = Field(None, description="input variables (default: the checkpoint's)")
    out_vars: list[str] | None = Field(None, description="output variables (default: the checkpoint's)")
    leads: list[float] = Field([6, 12, 24, 48, 72, 96, 120], description="lead times in hours")
    rollout_step: float | None = Field(6, description="rollout step in hours (null: no rollout)")
    region: str | list[float] | None = Field(None, description="named region or [lat_min, lat_max, lon_min, lon_max]")
    batch_size: int = Field(8, ge=1, description="initial times per forward pass")
    max_samples: int | None = Field(None, ge=1, description="at most this many initial times, evenly spread")
    baselines: bool = Field(True, description="also score persistence and climatology")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    output: str = Field("eval_output", description="output folder")
    map_lead: float | None = Field(None, description="lead time of the maps (default: the longest)")
    map_init: str | None = Field(None, description="initial time of the maps (default: the first scored)")
    progress: bool = Field(True, description="show progress bars")
    coarse: str | None = Field(None, description="downscaling checkpoints: the coarse input dataset (default: the "
                                                 "run's); data is the fine truth, leads and rollout are ignored")
    statistics: Literal["checkpoint", "dataset"] = Field(
        "checkpoint", description="normalisation: the checkpoint's statistics (a warning names the variables whose "
                                  "dataset statistics differ by more than 1 %) or the dataset's")

    _leads = field_validator("leads")(classmethod(lambda cls, v: positive_leads(v)))

    @field_validator("region")
    @classmethod
    def _region(cls, v):
        if isinstance(v, list) and len(v) != 4:
            raise ValueError("a region box is [lat_min, lat_max, lon_min, lon_max]")
        return v

    @field_validator("map_init", mode="before")
    @classmethod
    def _iso(cls, v):
        return iso_time(v)


def positive_leads(v: list[float]) -> list[float]:
    """The lead-time check of jobs.evaluate and jobs.forecast."""
    if not v or min(v) <= 0:
        raise ValueError("give at least one positive lead time in hours")
    return v


def iso_time(v):
    """YAML reads 2017-01-01 as a date: keep times as ISO strings, checked by numpy."""
    if v is None:
        return v
    import pandas as pd

    if hasattr(v, "isoformat"):
        v = v.isoformat()
    try:
        t = pd.Timestamp(str(v))
    except ValueError as e:
        raise ValueError(f"{v!r} is not an ISO time such as 2017-01-01T00:00") from e
    if t.tzinfo is not None:  # data times are UTC: convert the instant, never drop the offset
        return t.tz_convert("UTC").tz_localize(None).isoformat()
    np.datetime64(str(v), "ns")
    return str(v)


# ---------------------------------------------------------------------------------- shared with jobs.forecast
def load_checkpoint_model(path: str):
    """(model, checkpoint metadata) from one of our checkpoints, read once."""
    from climax.checkpoint import load_model, read_checkpoint

    state, meta, source = read_checkpoint(path)
    model, _ = load_model({**meta, "state_dict": state})
    log.info("model from %s: %d variables, grid %s, patch %d", source, len(model.default_vars),
             tuple(model.img_size), model.patch_size)
    return model, meta


def open_dataset(root: str, storage_options: dict | None, meta: dict | None = None, statistics: str = "checkpoint",
                 source: str = "the checkpoint"):
    """The shard dataset, normalising with the checkpoint's statistics (``meta``) unless
    ``statistics`` is "dataset" (docs/design.md, "Checkpoint statistics")."""
    from climax.data import ShardDataset
    from climax.normalization import apply_statistics, checkpoint_statistics

    dataset = ShardDataset(root, storage_options=storage_options or None)
    if meta is not None and statistics == "checkpoint":
        stats = checkpoint_statistics(meta)
        if stats:
            apply_statistics(dataset, stats, source, warn=print)
        else:
            print(f"note: {source} records no normalisation statistics; the dataset's are used")
    return dataset


def resolve_variables(model, meta: dict, dataset, in_vars: list[str] | None, out_vars: list[str] | None,
                      data: str) -> tuple[list[str], list[str]]:
    """In/out variables from the config, else the checkpoint; a clear error when the dataset lacks some."""
    have = set(dataset.variables) | set(dataset.constants)
    if in_vars is None:
        in_vars = list(meta.get("in_vars") or model.default_vars)
        missing = [v for v in in_vars if v not in have]
        if missing:
            usable = [v for v in in_vars if v in have]
            raise ValueError(f"the checkpoint's input variables {missing} are not in the dataset {data}; "
                             f"set in_vars to variables it holds (for example in_vars={usable}) or evaluate on a "
                             "dataset built with them")
    if out_vars is None:
        out_vars = list(meta.get("out_vars") or [v for v in in_vars if v in set(dataset.variables)])
        missing = [v for v in out_vars if v not in set(dataset.variables)]
        if missing:
            raise ValueError(f"the checkpoint's output variables {missing} are not in the dataset {data}; set "
                             f"out_vars to some of {[v for v in out_vars if v in set(dataset.variables)]}")
    return list(in_vars), list(out_vars)


def build_region(spec, dataset, patch_size: int):
    from climax.regions import Region

    return Region.from_spec(spec, dataset.lat, dataset.lon, patch_size)


def time_row(dataset, split: str, when: str) -> int:
    times = dataset.axis(split).times
    t = np.datetime64(when, "ns")
    row = int(np.searchsorted(times, t))
    if row >= len(times) or times[row] != t:
        raise ValueError(f"{when} is not a time step of split {split!r} ({times[0]} .. {times[-1]}, every "
                         f"{dataset.step_hours:g} h)")
    return row


# ---------------------------------------------------------------------------------- outputs
def headline(df):
    """The rows of the first region (global, or the model's box): what is printed and plotted."""
    if "region" not in df.columns or df.empty:
        return df
    return df[df["region"] == df["region"].iloc[0]]


def results_table(df) -> str:
    """Compact text for the first region: one block per metric, rows (variable, method), columns
    lead times. The other regions are in metrics.csv."""
    blocks = []
    df = headline(df)
    name = f" ({df['region'].iloc[0]})" if "region" in df.columns and len(df) else ""
    labels = {"rmse": f"RMSE (WeatherBench 2){name}", "rmse_sample_mean": f"RMSE_SAMPLE_MEAN (ClimaX paper){name}",
              "bias": f"BIAS{name}", "acc": f"ACC{name}"}
    for metric in [m for m in ("rmse", "rmse_sample_mean", "bias", "acc") if m in df.columns]:
        pivot = df.pivot_table(index=["variable", "method"], columns="lead_hours", values=metric, sort=False)
        pivot.columns = [f"{c:g}h" for c in pivot.columns]
        blocks.append(f"{labels[metric]}:\n" + pivot.to_string(float_format=lambda x: f"{x:.4g}"))
    return "\n\n".join(blocks)


def write_outputs(cfg: EvaluateConfig, df, model, dataset, in_vars, out_vars, region) -> Path:
    from climax.evaluation import forecast_fields
    from climax.plots import plot_maps, plot_metric_vs_lead

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "metrics.csv", df.to_csv(index=False))
    doc = {"checkpoint": cfg.checkpoint, "data": cfg.data, "split": cfg.split, "region": cfg.region,
           "in_vars": in_vars, "out_vars": out_vars, "notes": df.attrs.get("notes", []),
           "samples": int(df["samples"].max()), "first_init": df.attrs["init_times"][0],
           "last_init": df.attrs["init_times"][-1], "metrics": df.to_dict(orient="records")}
    write_atomic(out / "metrics.json", json.dumps(redact(doc), indent=1))
    top = headline(df)
    where = f" ({top['region'].iloc[0]})"
    plot_metric_vs_lead(top, "rmse", out / "rmse_vs_lead.png", f"RMSE (WeatherBench 2) on {cfg.split}{where}")
    plot_metric_vs_lead(top, "acc", out / "acc_vs_lead.png", f"ACC on {cfg.split}{where}")

    lead = float(cfg.map_lead if cfg.map_lead is not None else max(cfg.leads))
    row = time_row(dataset, cfg.split, cfg.map_init or df.attrs["init_times"][0])
    axis = dataset.axis(cfg.split)
    valid = np.datetime64(axis.times[row]) + np.timedelta64(int(round(lead * 3600)), "s")
    target = int(np.searchsorted(axis.times, valid))
    if target >= len(axis.times) or axis.times[target] != valid:
        raise ValueError(f"no truth at {valid} for the maps ({lead:g} h after {axis.times[row]}); choose "
                         "map_init/map_lead inside the split")
    fc = forecast_fields(model, dataset, cfg.split, [row], [lead], in_vars, out_vars, batch_size=1,
                         device=cfg.device, region=region, progress=False)[0, 0]
    truth = np.asarray(dataset.read(cfg.split, np.array([target]), out_vars))[0]
    lat, lon = dataset.lat, dataset.lon
    if region is not None:
        truth, lat, lon = region.crop(truth), region.lat(lat), region.lon(lon)
    units = {r.variable: r.units for r in df.itertuples()}
    for j, v in enumerate(out_vars):
        plot_maps(fc[j], truth[j], lat, lon, out / f"maps_{v}.png", v, units.get(v, ""),
                  title=f"{v}: {lead:g} h forecast from {str(axis.times[row])[:16]} (direct)")
    return out


def main(argv: list[str] | None = None):
    from climax.atomic import is_remote, staged_output

    cfg, _ = parse_args(EvaluateConfig, __doc__, argv)
    setup_logging()
    # output=s3://...: written to a local folder, uploaded at the end (a bucket that is not there is
    # refused before any work); a local path stays as it is
    try:
        with staged_output(cfg.output, cfg.storage_options) as local:
            result = _evaluate(cfg.model_copy(update={"output": str(local)}))
    except Exception as e:  # the bucket refused up front, or the upload; _evaluate exits on its own errors
        fail(error_line(e), code=1)
    if is_remote(cfg.output):
        print(f"uploaded to {cfg.output}/")
    return result


def _evaluate(cfg: EvaluateConfig):
    task = checkpoint_task(cfg.checkpoint)  # recorded by the run that wrote it
    if task != "forecast":  # projection: ClimateBench NRMSE; downscaling: vs bilinear (climax/tasks/)
        try:
            return get_task(task).evaluate(cfg)
        except Exception as e:  # one clear line, non-zero exit
            fail(error_line(e), code=1)
    try:
        model, meta = load_checkpoint_model(cfg.checkpoint)
        dataset = open_dataset(cfg.data, cfg.storage_options, meta, cfg.statistics, f"checkpoint {cfg.checkpoint}")
        in_vars, out_vars = resolve_variables(model, meta, dataset, cfg.in_vars, cfg.out_vars, cfg.data)
        region = build_region(cfg.region, dataset, model.patch_size)
        df = evaluate_model(model, dataset, cfg.split, in_vars, out_vars, cfg.leads, cfg.rollout_step,
                            cfg.batch_size, cfg.device, region, cfg.max_samples, baselines=cfg.baselines,
                            progress=cfg.progress)
        out = write_outputs(cfg, df, model, dataset, in_vars, out_vars, region)
    except Exception as e:  # one clear line, non-zero exit
        fail(error_line(e), code=1)
    print(f"\n{cfg.split}: {int(df['samples'].max())} initial times "
          f"({df.attrs['init_times'][0][:16]} .. {df.attrs['init_times'][-1][:16]})")
    for note in df.attrs.get("notes", []):
        print(f"note: {note}")
    print(results_table(df))
    print(f"\nwritten to {out}/: metrics.csv, metrics.json, rmse_vs_lead.png, acc_vs_lead.png, "
          + ", ".join(f"maps_{v}.png" for v in out_vars))
    return df


if __name__ == "__main__":
    main(sys.argv[1:])
