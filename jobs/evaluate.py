"""Evaluate a ClimaX checkpoint on a split of a shard dataset (the test split by default).

    python -m jobs.evaluate configs/evaluate.yaml [key=value ...]

Per variable, lead time and WeatherBench 2 region (global, tropics, extra-tropics, Europe, ...; or
the model's box for a regional model), in physical units, for the direct forecast, the iterative
rollout (``rollout_step``) and the persistence and climatology baselines: ``rmse`` (WeatherBench 2's
headline RMSE: sqrt of the time-mean of the area-weighted MSE), ``rmse_sample_mean`` (the mean of
per-sample RMSEs, the ClimaX paper's convention), ``bias`` (forecast - truth, WB2's) and ``acc``
(anomalies against the dataset's day-of-year x hour climatology at the valid time). Writes into
``output``: metrics.csv, metrics.json, rmse_vs_lead.png, acc_vs_lead.png, maps_<variable>.png
(forecast, truth and error at one initial time), spectra.csv and spectra_<variable>.png (WeatherBench
2's zonal energy spectra of the direct forecast and of the truth at ``spectra_leads``, averaged over
``spectra_samples`` initial times and the latitude band ``spectra_band``: ``climax.spectra``), and
prints the table. Runs in this process, on
the GPU when there is one (``device=auto``), or with ``workers=N`` split over N Ray tasks (CPU, or
``worker_gpus`` GPUs each) whose partial sums merge exactly into the same table.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from climax.evaluation import evaluate_model
from climax.redact import redact
from climax.storage import write_atomic
from climax.tasks import checkpoint_task, get_task
from jobs.common import error_line, setup_logging
from jobs.config import fail, parse_args

log = logging.getLogger("jobs.evaluate")


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str = Field(description="model checkpoint: a model.pt file or a directory holding one "
                                        "(a Ray Train checkpoint)")
    data: str = Field(description="shard dataset root (a folder or s3://bucket/prefix)")
    verify: bool = Field(False, description="also check each shard's sha256 against the manifest's, once per shard "
                                            "per process (one extra read); row counts are checked always")
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
    workers: int = Field(0, ge=0, description="Ray tasks the initial times are split over (0: all in this process); "
                                              "partial sums merge exactly")
    worker_gpus: float = Field(0.0, ge=0, description="GPUs per Ray task (0: CPU tasks)")
    spectra_leads: list[float] | None = Field(None, description="lead times of the zonal energy spectra (among leads; "
                                                                "default: all of them; []: no spectra)")
    spectra_samples: int = Field(8, ge=1, description="initial times the spectra are averaged over (evenly spread)")
    spectra_band: list[float] = Field([30.0, 60.0], min_length=2, max_length=2,
                                      description="|latitude| band (degrees) the spectra average over")
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
                 source: str = "the checkpoint", *, verify: bool = False):
    """The shard dataset, normalising with the checkpoint's statistics (``meta``) unless
    ``statistics`` is "dataset" (docs/design.md, "Checkpoint statistics")."""
    from climax.data import ShardDataset
    from climax.normalization import apply_statistics, checkpoint_statistics

    dataset = ShardDataset(root, storage_options=storage_options or None, verify=verify)
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


def check_grid(model, dataset, checkpoint: str, data: str) -> None:
    """A checkpoint trained on another grid than the dataset's: named before any work."""
    img = tuple(getattr(model, "img_size", ()) or ())
    have = (len(dataset.lat), len(dataset.lon))
    if img and img != have:
        raise ValueError(f"checkpoint {checkpoint} was trained on a {img} grid but dataset {data} has {have}; "
                         "evaluate on a dataset built at the checkpoint's resolution (jobs.preprocess grid.resolution) "
                         "or give a checkpoint trained on this grid")


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


def _score_share(cfg: EvaluateConfig, in_vars: list[str], out_vars: list[str], rows: np.ndarray) -> dict:
    """One Ray task: the partial sums of ``rows`` (the model and dataset opened in the worker)."""
    from climax.evaluation import evaluate_model

    model, meta = load_checkpoint_model(cfg.checkpoint)
    dataset = open_dataset(cfg.data, cfg.storage_options, meta, cfg.statistics, f"checkpoint {cfg.checkpoint}")
    region = build_region(cfg.region, dataset, model.patch_size)
    device = cfg.device if cfg.worker_gpus else "cpu"
    return evaluate_model(model, dataset, cfg.split, in_vars, out_vars, cfg.leads, cfg.rollout_step, cfg.batch_size,
                          device, region, baselines=cfg.baselines, progress=False, init_rows=rows, return_sums=True)


def evaluate_distributed(cfg: EvaluateConfig, dataset, in_vars: list[str], out_vars: list[str], *,
                         history: list[float] | None = None):
    """Split the scored initial times over ``cfg.workers`` Ray tasks and merge their sums exactly: the
    same table as one process (to float64 round-off), with a progress bar and ETA over the shares."""
    import ray
    from tqdm.auto import tqdm

    from climax.evaluation import evaluation_inits, scores_frame
    from jobs.common import init_ray

    axis = dataset.axis(cfg.split)
    leads = sorted({float(x) for x in cfg.leads})
    history = history or [0.0]  # the model's input times (climax.evaluation.model_history)
    inits = evaluation_inits(axis.times, leads, cfg.max_samples, history=history)
    # shares of whole batches, a few per worker so that a slow one does not hold the rest up
    n_shares = max(1, min(len(inits) // cfg.batch_size or 1, 4 * cfg.workers))
    shares = [s for s in np.array_split(inits, n_shares) if len(s)]
    init_ray()
    task = ray.remote(num_cpus=1, num_gpus=cfg.worker_gpus)(_score_share)
    pending = [task.remote(cfg, in_vars, out_vars, rows) for rows in shares]
    parts = []
    with tqdm(total=len(inits), desc=f"evaluate {cfg.split} on {cfg.workers} Ray workers", unit="init",
              disable=not cfg.progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            part = ray.get(done[0])
            parts.append(part)
            bar.update(len(part["init_times"]))
    sums = {}
    for part in parts:
        for key, s in part["sums"].items():
            sums[key] = s if key not in sums else sums[key].merge(s)
    first = parts[0]
    notes = list(dict.fromkeys(n for p in parts for n in p["notes"]))
    times_ns = np.asarray(axis.times, dtype="datetime64[ns]").astype(np.int64)
    longest, oldest = int(round(max(leads) * 3600e9)), int(round(history[0] * 3600e9))
    gapped = int(np.sum((times_ns + longest <= times_ns[-1]) & (times_ns + oldest >= times_ns[0]))) - \
        len(evaluation_inits(axis.times, leads, history=history))
    if gapped > 0:
        notes.insert(0, f"{gapped} initial times skipped: a target time at one of the leads is missing (calendar or "
                        "data gaps)")
    df = scores_frame(sums, first["regions"], first["out_vars"], first["leads"], first["units"], notes,
                      [str(t) for t in axis.times[inits]])
    return df


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
    write_spectra(cfg, df, model, dataset, in_vars, out_vars, region, out, units)
    return out


def write_spectra(cfg: EvaluateConfig, df, model, dataset, in_vars, out_vars, region, out: Path, units) -> None:
    """spectra.csv and spectra_<variable>.png: zonal energy spectra of the direct forecast and the truth."""
    from climax.evaluation import forecast_fields
    from climax.plots import plot_spectra
    from climax.spectra import spectra_table

    leads = [float(x) for x in (cfg.leads if cfg.spectra_leads is None else cfg.spectra_leads)]
    if not leads:
        return
    if region is not None:
        df.attrs.setdefault("notes", []).append("spectra skipped: a regional model does not cover whole circles of "
                                                "latitude")
        return
    band = np.abs(np.asarray(dataset.lat, dtype=np.float64))
    if not ((band >= cfg.spectra_band[0]) & (band <= cfg.spectra_band[1])).any():
        df.attrs.setdefault("notes", []).append(f"spectra skipped: no latitude row of the grid lies in spectra_band "
                                                f"{cfg.spectra_band}")
        return
    off = [x for x in leads if x not in {float(y) for y in cfg.leads}]
    if off:
        raise ValueError(f"spectra_leads {off} are not among the evaluated leads {cfg.leads}; choose some of those")
    axis = dataset.axis(cfg.split)
    inits = np.array(df.attrs["init_times"], dtype="datetime64[ns]")  # every one has a target at every lead
    inits = inits[np.unique(np.linspace(0, len(inits) - 1, min(cfg.spectra_samples, len(inits))).round().astype(int))]
    rows = np.searchsorted(axis.times, inits)
    fc = forecast_fields(model, dataset, cfg.split, rows, leads, in_vars, out_vars, batch_size=cfg.batch_size,
                         device=cfg.device, progress=False)
    forecast, truth = {}, {}
    for i, lead in enumerate(leads):
        targets = np.searchsorted(axis.times, inits + np.timedelta64(int(round(lead * 3600)), "s"))
        forecast[lead] = fc[:, i]
        truth[lead] = np.asarray(dataset.read(cfg.split, targets, out_vars), dtype=np.float32)
    table = spectra_table(forecast, truth, out_vars, dataset.lat, dataset.lon, cfg.spectra_band, units)
    write_atomic(out / "spectra.csv", table.to_csv(index=False))
    band = f"|lat| {cfg.spectra_band[0]:g}-{cfg.spectra_band[1]:g}"
    for v in out_vars:
        plot_spectra(table, out / f"spectra_{v}.png", v,
                     title=f"{v}: zonal energy spectra, {band}, {len(inits)} initial times")


def main(argv: list[str] | None = None):
    from climax.storage import is_remote, staged_output

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
        dataset = open_dataset(cfg.data, cfg.storage_options, meta, cfg.statistics, f"checkpoint {cfg.checkpoint}",
                               verify=cfg.verify)
        check_grid(model, dataset, cfg.checkpoint, cfg.data)
        in_vars, out_vars = resolve_variables(model, meta, dataset, cfg.in_vars, cfg.out_vars, cfg.data)
        region = build_region(cfg.region, dataset, model.patch_size)
        if cfg.workers:
            from climax.evaluation import model_history

            df = evaluate_distributed(cfg, dataset, in_vars, out_vars, history=model_history(model))
        else:
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
    spectra = [f"spectra_{v}.png" for v in out_vars if (out / f"spectra_{v}.png").is_file()]
    print(f"\nwritten to {out}/: metrics.csv, metrics.json, rmse_vs_lead.png, acc_vs_lead.png, "
          + ", ".join([f"maps_{v}.png" for v in out_vars] + (["spectra.csv", *spectra] if spectra else [])))
    return df


if __name__ == "__main__":
    main(sys.argv[1:])
