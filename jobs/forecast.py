"""Forecasts from a ClimaX checkpoint, written as one CF-1.8 NetCDF file or a WeatherBench 2 Zarr store.

    python -m jobs.forecast configs/forecast.yaml [key=value ...]

Initial conditions come from one of:

* ``data``: a shard dataset, at ``init_times`` (a list) or ``init_range`` (start, end, step), from
  whichever split holds each time;
* ``init_file``: a raw analysis in any source the pipeline reads (GRIB, NetCDF, Zarr; local, s3://
  or gs://; any resolution), read through ``pipelines.sources``, regridded in process to the
  checkpoint's grid and normalised with the checkpoint's statistics (an original ClimaX ``.ckpt``
  records none: give ``ckpt_statistics=`` the folder with its release's normalize_mean.npz and
  normalize_std.npz). ``init_times`` picks some of the file's times (default: all of them).

Forecasts at ``leads`` hours are direct (one forward pass per lead) or, with ``rollout_step``, the
model applied again and again. ``format=netcdf`` (the default) writes dimensions init_time,
lead_time (hours), lat and lon, a valid_time coordinate, one variable per output variable with its
units; ``format=zarr`` writes WeatherBench 2's forecast layout (``climax.forecast_io``: time,
prediction_timedelta, level, latitude, longitude; long names such as ``temperature(level)``), which
WB2's evaluation takes as a forecast path. Both are written atomically (temporary name, then rename).
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
from jobs.evaluate import build_region, iso_time, load_checkpoint_model, open_dataset, positive_leads, resolve_variables

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
    data: str | None = Field(None, description="shard dataset root holding the initial conditions (folder or s3://)")
    init_file: str | None = Field(None, description="or a raw analysis: GRIB, NetCDF or Zarr (local, s3://, gs://), "
                                                    "any resolution; regridded to the checkpoint's grid")
    init_format: str = Field("auto", description="init_file format: auto, grib, netcdf, zarr")
    member: int | None = Field(None, description="init_file ensemble member (files with several)")
    regrid: Literal["bilinear", "conservative"] = Field("bilinear", description="init_file regridding method")
    ckpt_statistics: str | None = Field(None, description="folder with an original release's normalize_mean.npz and "
                                                          "normalize_std.npz (for a .ckpt without statistics)")
    verify: bool = Field(False, description="also check each shard's sha256 against the manifest's, once per shard "
                                            "per process (one extra read); row counts are checked always")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for s3:// / gs://")
    in_vars: list[str] | None = Field(None, description="input variables (default: the checkpoint's)")
    out_vars: list[str] | None = Field(None, description="output variables (default: the checkpoint's)")
    init_times: list[str] | None = Field(None, description="initial times (ISO); or give init_range")
    init_range: InitRange | None = Field(None, description="initial times start..end every step")
    leads: list[float] = Field([6, 12, 24, 48, 72, 120], description="lead times in hours")
    rollout_step: float | None = Field(None, description="roll out at this step (hours); null: direct")
    region: str | list[float] | None = Field(None, description="named region or [lat_min, lat_max, lon_min, lon_max]")
    batch_size: int = Field(8, ge=1, description="initial times per forward pass")
    device: str = Field("auto", description="auto, cpu, cuda, ...")
    format: Literal["netcdf", "zarr"] = Field("netcdf", description="netcdf (CF-1.8) or zarr (WeatherBench 2 layout)")
    output: str | None = Field(None, description="file (netcdf) or store (zarr) to write, local or s3://; default "
                                                 "forecast_output/forecast.nc / .zarr")
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
        if (self.data is None) == (self.init_file is None):
            raise ValueError("give exactly one source of initial conditions: data (a shard dataset) or init_file "
                             "(a GRIB, NetCDF or Zarr analysis); with configs/forecast.yaml and init_file, add "
                             "data=null init_range=null")
        if self.init_times is not None and self.init_range is not None:
            raise ValueError("give init_times (a list) or init_range (start, end, step), not both")
        if self.data is not None and self.init_times is None and self.init_range is None:
            raise ValueError("give exactly one of init_times (a list) or init_range (start, end, step)")
        if self.init_file is not None and self.region is not None:
            raise ValueError("region= crops a shard dataset; forecasts from init_file cover the checkpoint's grid")
        if self.output is None:
            self.output = f"forecast_output/forecast.{'zarr' if self.format == 'zarr' else 'nc'}"
        return self

    def requested_times(self) -> np.ndarray | None:
        if self.init_times is not None:
            return np.array([np.datetime64(t, "ns") for t in self.init_times])
        return None if self.init_range is None else self.init_range.times()


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
    from climax.evaluation import forecast_fields, history_line

    model, meta = load_checkpoint_model(cfg.checkpoint)
    if cfg.init_file is not None:
        from climax.forecast_io import INIT_SPLIT

        dataset, in_vars, out_vars, init_index = initial_conditions(cfg, model, meta)
        times = dataset.times[init_index]
        fields = forecast_fields(model, dataset, INIT_SPLIT, init_index, cfg.leads, in_vars, out_vars,
                                 rollout_step=cfg.rollout_step, batch_size=cfg.batch_size, device=cfg.device,
                                 progress=cfg.progress)
        lat, lon, region, source = dataset.lat, dataset.lon, None, cfg.init_file
    else:
        dataset = open_dataset(cfg.data, cfg.storage_options, meta, cfg.statistics, f"checkpoint {cfg.checkpoint}",
                               verify=cfg.verify)
        in_vars, out_vars = resolve_variables(model, meta, dataset, cfg.in_vars, cfg.out_vars, cfg.data)
        region = build_region(cfg.region, dataset, model.patch_size)
        times = cfg.requested_times()
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
        source = cfg.data
    units = {v: dataset.manifest.raw["variables"][v].get("units", "") for v in out_vars}
    method = "direct" if cfg.rollout_step is None else f"rollout at {cfg.rollout_step:g} h steps"
    attrs = {"source": f"ClimaX model, checkpoint {cfg.checkpoint}",
             "history": history_line(["python -m jobs.forecast", *argv]),
             "references": "Nguyen et al. (2023), ClimaX, arXiv:2301.10343",
             "forecast_method": method, "initial_conditions": source,
             "input_variables": " ".join(in_vars)}
    if region is not None:
        attrs["region"] = region.name
    return write_forecast(cfg, fields, times, out_vars, lat, lon, units, redact(attrs))


def write_forecast(cfg: ForecastConfig, fields, times, out_vars, lat, lon, units, attrs) -> str:
    """NetCDF (CF-1.8) or Zarr (WeatherBench 2 layout), as ``cfg.format`` says."""
    if cfg.format == "zarr":
        from climax.forecast_io import wb2_dataset, write_zarr

        ds = wb2_dataset(fields, times, cfg.leads, out_vars, lat, lon, units, attrs)
        return write_zarr(ds, cfg.output, cfg.storage_options)
    from climax.evaluation import forecast_dataset, write_netcdf

    ds = forecast_dataset(fields, times, cfg.leads, out_vars, lat, lon, units, attrs)
    return write_netcdf(ds, cfg.output, cfg.storage_options, engine=cfg.engine)


def checkpoint_grid(model, meta: dict, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) of the checkpoint: recorded in ours; the equiangular ClimaX grid of the model's
    size for an original .ckpt."""
    h, w = (int(x) for x in model.img_size)
    grid = meta.get("grid") or {}
    if grid.get("lat") and grid.get("lon"):
        lat, lon = np.asarray(grid["lat"], dtype=np.float64), np.asarray(grid["lon"], dtype=np.float64)
        if (len(lat), len(lon)) != (h, w):
            raise ValueError(f"checkpoint {source} records a {len(lat)}x{len(lon)} grid but its model is {h}x{w}; "
                             "the checkpoint is inconsistent, re-save it")
        return lat, lon
    from pipelines.regrid import target_grid

    if w != 2 * h:
        raise ValueError(f"checkpoint {source} records no grid and its model's {h}x{w} is not an equiangular "
                         "global grid; forecast from a shard dataset (data=) instead")
    g = target_grid(180.0 / h)
    return np.asarray(g.lat), np.asarray(g.lon)


def checkpoint_stats(meta: dict, folder: str | None, needed: list[str], source: str) -> dict:
    """{variable: (mean, std)}: the checkpoint's, completed (and overridden) by a release's npz files."""
    from climax.normalization import checkpoint_statistics, release_statistics

    stats = dict(checkpoint_statistics(meta))
    if folder is not None:
        stats.update(release_statistics(folder))
    missing = [v for v in needed if v not in stats]
    if missing:
        hint = ("the release's normalize_*.npz lack them" if folder is not None else
                "give ckpt_statistics= (the folder with the release's normalize_mean.npz and normalize_std.npz)")
        raise ValueError(f"checkpoint {source} has no normalisation statistics for {missing}; {hint}")
    return stats


def initial_conditions(cfg: ForecastConfig, model, meta: dict):
    """(FieldDataset on the checkpoint's grid, in_vars, out_vars, rows of the initial times in it) from
    ``cfg.init_file``. A model with history input also needs the file's fields at its history steps."""
    from climax.evaluation import model_history
    from climax.forecast_io import FieldDataset
    from pipelines.names import parse_variable
    from pipelines.regrid import Grid, RegridError, get_regridder
    from pipelines.sources import open_source

    src = cfg.init_file
    in_vars = list(cfg.in_vars or meta.get("in_vars") or model.default_vars)
    constants = [v for v in in_vars if parse_variable(v).is_constant]
    out_vars = list(cfg.out_vars or meta.get("out_vars") or [v for v in in_vars if v not in constants])
    lat, lon = checkpoint_grid(model, meta, cfg.checkpoint)
    stats = checkpoint_stats(meta, cfg.ckpt_statistics, list(dict.fromkeys([*in_vars, *out_vars])), cfg.checkpoint)
    read = [v for v in in_vars if v != "latitude"]  # latitude is computed on the checkpoint's grid
    ds = open_source(src, cfg.init_format, variables=read, member=cfg.member,
                     storage_options=cfg.storage_options or None)
    missing = [v for v in read if v not in ds.data_vars]
    if missing:
        raise ValueError(f"{src} lacks input variable(s) {missing} of checkpoint {cfg.checkpoint}; it holds "
                         f"{sorted(ds.data_vars)}. Give a file with them, or in_vars= a subset the model knows")
    times = np.asarray(ds["time"].values, dtype="datetime64[ns]")
    wanted = cfg.requested_times()
    if wanted is None:
        rows = np.arange(len(times))
    else:
        absent = [str(t)[:16] for t in wanted if t not in set(times)]
        if absent:
            have = ", ".join(str(t)[:16] for t in times[:8]) + (" ..." if len(times) > 8 else "")
            raise ValueError(f"{src} has no fields at initial time(s) {absent}; its times are {have}")
        rows = np.array([int(np.flatnonzero(times == t)[0]) for t in wanted])
    history = model_history(model)
    init_times = times[rows]
    if len(history) > 1:  # the history steps of every initial time are read too
        offsets = np.round(np.asarray(history) * 3600e9).astype(np.int64).astype("timedelta64[ns]")
        if wanted is None:  # every time of the file whose history steps it holds
            have = set(times)
            init_times = np.array([t for t in init_times if all(t + o in have for o in offsets)], dtype=times.dtype)
            if not len(init_times):
                raise ValueError(f"no time of {src} has the fields of the model's history_hours {history} before it; "
                                 "give a file with several consecutive times")
        needed = np.unique((init_times[:, None] + offsets[None, :]).reshape(-1))
        absent = [str(t)[:16] for t in needed if t not in set(times)]
        if absent:
            raise ValueError(f"{src} has no fields at {absent[:5]}, which the model's history_hours {history} need "
                             f"for the initial times asked; give a file with them, or later initial times")
        rows = np.array([int(np.flatnonzero(times == t)[0]) for t in needed])
    try:
        regrid = get_regridder(Grid(np.asarray(ds["lat"].values), np.asarray(ds["lon"].values)), Grid(lat, lon),
                               cfg.regrid)
    except RegridError as e:
        raise ValueError(f"{src}: its {ds.sizes['lat']}x{ds.sizes['lon']} grid cannot give checkpoint "
                         f"{cfg.checkpoint}'s {len(lat)}x{len(lon)} grid: {e}") from None
    fields = np.empty((len(rows), len(in_vars), len(lat), len(lon)), dtype=np.float32)
    for j, v in enumerate(in_vars):
        if v == "latitude":
            fields[:, j] = lat[None, :, None]
            continue
        da = ds[v]
        values = da.isel(time=rows).values if "time" in da.dims else np.broadcast_to(da.values, (len(rows), *da.shape))
        fields[:, j] = regrid(values)
    units = {v: parse_variable(v).units for v in [*in_vars, *out_vars]}
    step = float(np.median(np.diff(times)) / np.timedelta64(1, "h")) if len(times) > 1 else 6.0
    log.info("initial conditions from %s: %d times, %s -> %dx%d (%s)", src, len(rows),
             tuple(ds["lat"].shape + ds["lon"].shape), len(lat), len(lon), cfg.regrid)
    # the rows of the initial times among those read (all of them, in order, without history)
    init_index = np.searchsorted(times[rows], init_times) if len(history) > 1 else np.arange(len(rows))
    return (FieldDataset(fields, times[rows], in_vars, lat, lon, stats, constants=constants, units=units,
                         step_hours=step), in_vars, out_vars, init_index)


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, _ = parse_args(ForecastConfig, __doc__, argv)
    setup_logging()
    try:
        path = run(cfg, argv)
    except Exception as e:  # one clear line, non-zero exit
        fail(error_line(e), code=1)
    print(f"{cfg.format} forecasts, {len(cfg.leads)} lead times, written to {path}")
    return path


if __name__ == "__main__":
    main()
