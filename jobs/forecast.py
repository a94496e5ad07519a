"""Forecasts from a ClimaX checkpoint, written as one CF-1.8 NetCDF file.

    python -m jobs.forecast configs/forecast.yaml [key=value ...]

The initial conditions are read from a shard dataset at ``init_times`` (a list) or ``init_range``
(start, end, step), from whichever split holds each time. Forecasts at ``leads`` hours are direct
(one forward pass per lead) or, with ``rollout_step``, the model applied again and again. The file
has dimensions init_time, lead_time (hours), lat and lon, a valid_time coordinate, one variable
per output variable with its units, and is written atomically (temporary name, then rename).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from climax.redact import redact
from jobs.common import error_line, setup_logging
from jobs.config import fail, parse_args
from jobs.evaluate import (build_region, iso_time, load_checkpoint_model, open_dataset, positive_leads,
                           resolve_variables)

log = logging.getLogger("jobs.forecast")


class InitRange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: str = Field(description="first initial time (ISO)")
    end: str = Field(description="last initial time (ISO, included)")
    step: str = Field("12h", description="spacing, e.g. 6h, 12h, 1D")

    @field_validator("start", "end", mode="before")
    @classmethod
    def _iso(cls, v):
        return iso_time(v)

    @field_validator("step")
    @classmethod
    def _step(cls, v: str) -> str:
        try:
            if pd.Timedelta(v) <= pd.Timedelta(0):
                raise ValueError
        except ValueError as e:
            raise ValueError(f"{v!r} is not a positive time step such as 6h or 1D") from e
        return v

    def times(self) -> np.ndarray:
        start, end = np.datetime64(self.start, "ns"), np.datetime64(self.end, "ns")
        if end < start:
            raise ValueError(f"init_range ends ({self.end}) before it starts ({self.start})")
        return np.arange(start, end + np.timedelta64(1, "ns"), pd.Timedelta(self.step).to_timedelta64())


class ForecastConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str = Field(description="model checkpoint: a model.pt file or a directory holding one")
    data: str = Field(description="shard dataset root holding the initial conditions (folder or s3://)")
    verify: bool = Field(False, description="also check each shard's sha256 against the manifest's, once per shard "
                                            "per process (one extra read); row counts are checked always")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for s3://")
    in_vars: list[str] | None = Field(None, description="input variables (default: the checkpoint's)")
    out_vars: list[str] | None = Field(None, description="output variables (default: the checkpoint's)")
    init_times: list[str] | None = Field(None, description="initial times (ISO); or give init_range")
    init_range: InitRange | None = Field(None, description="initial times start..end every step")
    leads: list[float] = Field([6, 12, 24, 48, 72, 120], description="lead times in hours")
    rollout_step: float | None = Field(None, description="roll out at this step (hours); null: direct")
    region: str | list[float] | None = Field(None, description="named region or [lat_min, lat_max, lon_min, lon_max]")
    batch_size: int = Field(8, ge=1, description="initial times per forward pass")
    device: str = Field("auto", description="auto, cpu, cuda, ...")
    output: str = Field("forecast.nc", description="NetCDF file to write (local path or s3://)")
    engine: Literal["netcdf4", "h5netcdf"] = Field("netcdf4", description="xarray NetCDF engine")
    progress: bool = Field(True, description="show a progress bar")
    statistics: Literal["checkpoint", "dataset"] = Field(
        "checkpoint", description="normalisation: the checkpoint's statistics (a warning names the variables whose "
                                  "dataset statistics differ by more than 1 %) or the dataset's")

    @field_validator("init_times", mode="before")
    @classmethod
    def _times(cls, v):
        return None if v is None else [iso_time(t) for t in (v if isinstance(v, list) else [v])]

    _leads = field_validator("leads")(classmethod(lambda cls, v: positive_leads(v)))

    @model_validator(mode="after")
    def _one_source(self):
        if (self.init_times is None) == (self.init_range is None):
            raise ValueError("give exactly one of init_times (a list) or init_range (start, end, step)")
        return self


def locate(dataset, times: np.ndarray) -> list[tuple[str, int]]:
    """(split, row) of every initial time; an error lists the dataset's splits when one is absent."""
    axes = {s: dataset.axis(s).times for s in dataset.manifest.raw["splits"]}
    found = []
    for t in times:
        for split, ax in axes.items():
            row = int(np.searchsorted(ax, t))
            if row < len(ax) and ax[row] == t:
                found.append((split, row))
                break
        else:
            spans = ", ".join(f"{s} {ax[0]} .. {ax[-1]}" for s, ax in axes.items())
            raise ValueError(f"initial time {t} is not a time step of the dataset ({spans}, every "
                             f"{dataset.step_hours:g} h); choose init times inside it")
    return found


def run(cfg: ForecastConfig, argv: list[str]) -> str:
    from climax.evaluation import forecast_dataset, forecast_fields, history_line, write_netcdf

    model, meta = load_checkpoint_model(cfg.checkpoint)
    dataset = open_dataset(cfg.data, cfg.storage_options, meta, cfg.statistics, f"checkpoint {cfg.checkpoint}",
                           verify=cfg.verify)
    in_vars, out_vars = resolve_variables(model, meta, dataset, cfg.in_vars, cfg.out_vars, cfg.data)
    region = build_region(cfg.region, dataset, model.patch_size)
    times = (np.array([np.datetime64(t, "ns") for t in cfg.init_times]) if cfg.init_times is not None
             else cfg.init_range.times())
    where = locate(dataset, times)
    fields = None
    for split in dict.fromkeys(s for s, _ in where):
        pos = [i for i, (s, _) in enumerate(where) if s == split]
        part = forecast_fields(model, dataset, split, [where[i][1] for i in pos], cfg.leads, in_vars, out_vars,
                               rollout_step=cfg.rollout_step, batch_size=cfg.batch_size, device=cfg.device,
                               region=region, progress=cfg.progress)
        if fields is None:
            fields = np.empty((len(times), *part.shape[1:]), dtype=np.float32)
        fields[pos] = part
    lat, lon = (dataset.lat, dataset.lon) if region is None else (region.lat(dataset.lat), region.lon(dataset.lon))
    units = {v: dataset.manifest.raw["variables"][v].get("units", "") for v in out_vars}
    method = "direct" if cfg.rollout_step is None else f"rollout at {cfg.rollout_step:g} h steps"
    attrs = {"source": f"ClimaX model, checkpoint {cfg.checkpoint}",
             "history": history_line(["python -m jobs.forecast", *argv]),
             "references": "Nguyen et al. (2023), ClimaX, arXiv:2301.10343",
             "forecast_method": method, "initial_conditions": cfg.data,
             "input_variables": " ".join(in_vars)}
    if region is not None:
        attrs["region"] = region.name
    ds = forecast_dataset(fields, times, cfg.leads, out_vars, lat, lon, units, redact(attrs))
    return write_netcdf(ds, cfg.output, cfg.storage_options, engine=cfg.engine)


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, _ = parse_args(ForecastConfig, __doc__, argv)
    setup_logging()
    try:
        path = run(cfg, argv)
    except Exception as e:  # one clear line, non-zero exit
        fail(error_line(e), code=1)
    n = len(cfg.init_times) if cfg.init_times is not None else len(cfg.init_range.times())
    print(f"{n} initial times x {len(cfg.leads)} lead times written to {path}")
    return path


if __name__ == "__main__":
    main()
