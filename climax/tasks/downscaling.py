"""The downscaling task (issue 8): coarse fields in, fine fields out, and its evaluation.

    python -m jobs.finetune configs/finetune/downscaling.yaml [init_checkpoint=PATH] [key=value ...]
    python -m jobs.evaluate configs/evaluate.yaml checkpoint=RUN/checkpoint_... data=FINE_SHARDS [coarse=...]

Training (``climax.loop`` with this task's hooks; on Ray Train through ``jobs.finetune``): the same
run as forecasting (worker group, DDP, warmup-cosine AdamW, one line and one checkpoint per epoch,
restarts, resume by name), with ``climax.downscaling``'s paired loader and model: the coarse input
regridded bilinearly onto the fine grid, the fine set's constants, ClimaX at the fine grid at lead
time 0. Validation reports latitude-weighted RMSE, mean bias and Pearson correlation per variable in
physical units, with the bilinear baseline beside them.

``jobs.evaluate`` on a downscaling checkpoint (it records its task) calls ``DownscalingTask.evaluate``:
the metrics table (``metrics.csv``, ``metrics.json``) and the maps (coarse input, downscaled, truth,
error) per variable.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from climax.checkpoint import load_model, read_checkpoint
from climax.data import ShardDataset
from climax.downscaling import (
    METHODS,
    DownscalingLoader,
    DownscalingScores,
    evaluate_downscaling,
    make_downscaler,
    resolve_variables,
)
from climax.evaluation import resolve_device, variable_units
from climax.loop import Loaders
from climax.normalization import checkpoint_record
from climax.plots import plot_downscaling_maps
from climax.storage import write_atomic
from climax.tasks import Task
from climax.tasks.forecast import build_model
from climax.training import batch_where, forecast_loss, freeze_backbone

__all__ = ["DownscalingData", "DownscalingSpec", "DownscalingTask", "TASK", "build_net", "metrics_of",
           "load_downscaler", "evaluate", "results_table"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DownscalingData(_Strict):
    root: str = Field(description="dataset written by jobs.preprocess (folder or s3://bucket/prefix)")
    name: str | None = Field(None, description="label in logs (default: the folder name)")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="s3 options (endpoint_url, key, ...)")
    verify: bool = Field(False, description="also check each shard's sha256 against the manifest's, once per shard "
                                            "per process (one extra read); row counts are checked always")


class DownscalingSpec(_Strict):
    """The ``downscaling:`` section of a training configuration (``task: downscaling``)."""

    coarse: DownscalingData = Field(description="input dataset on the coarse grid (e.g. ERA5 or CMIP6 at 5.625 deg)")
    fine: DownscalingData = Field(description="target dataset on the fine grid, same times (e.g. ERA5 at 1.40625 "
                                              "deg)")
    in_vars: list[str] | None = Field(None, description="coarse variables fed to the model (default: its "
                                                        "time-varying ones)")
    constants: list[str] | None = Field(None, description="fine-grid constants fed to the model (default: all of the "
                                                          "fine set's; [] for none)")
    out_vars: list[str] | None = Field(None, description="fine variables predicted (default: its time-varying ones)")
    residual: bool = Field(True, description="predict the correction to the bilinear field (false: the field "
                                             "itself, as the paper)")


def open_datasets(spec: DownscalingSpec) -> tuple[ShardDataset, ShardDataset]:
    coarse = ShardDataset(spec.coarse.root, spec.coarse.storage_options, name=spec.coarse.name,
                          verify=spec.coarse.verify)
    fine = ShardDataset(spec.fine.root, spec.fine.storage_options, name=spec.fine.name, verify=spec.fine.verify)
    if coarse.shape == fine.shape:
        raise ValueError(f"the coarse dataset {coarse.root} and the fine dataset {fine.root} share the grid "
                         f"{fine.shape}; downscaling needs a coarser input (e.g. jobs.preprocess with a larger "
                         "grid.resolution)")
    return coarse, fine


def build_net(cfg: Any, fine: Any, in_vars: list[str], constants: list[str], out_vars: list[str], log=print):
    """ClimaX at the fine grid (the forecast task's ``build_model``: from the model config or the init
    checkpoint, its position embedding interpolated) over inputs, constants and outputs."""
    view = SimpleNamespace(name=fine.name, variables=list(dict.fromkeys(in_vars + out_vars)),
                           constants=list(constants), lat=fine.lat, lon=fine.lon)
    mcfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"in_vars": None, "out_vars": None})})
    return build_model(mcfg, [view], log=log)


def metrics_of(scores: dict, prefix: str = "val") -> dict[str, float]:
    """``<prefix>_<stat>/<var>`` for the model, ``<prefix>_bilinear_<stat>/<var>`` for the baseline."""
    out = {}
    for key, value in scores.items():
        if "/" in key:
            method_stat, var = key.split("/", 1)
            method, stat = method_stat.split("_", 1)
            name = f"{prefix}_{stat}" if method == "downscaled" else f"{prefix}_{method}_{stat}"
            out[f"{name}/{var}"] = value
    return out


class DownscalingTask(Task):
    name = "downscaling"

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if cfg.downscaling is None:
            raise ValueError("task downscaling needs a 'downscaling' section: downscaling.coarse.root (input shards "
                             "on the coarse grid) and downscaling.fine.root (target shards on the fine grid)")
        if cfg.data.region is not None:
            raise ValueError("data.region: regional downscaling is not supported (task downscaling is global)")
        if cfg.data.datasets:
            raise ValueError("task downscaling reads downscaling.coarse and downscaling.fine; leave data.datasets "
                             "empty")

    @classmethod
    def local_roots(cls, cfg: Any) -> list[Any]:
        return [cfg.downscaling.coarse, cfg.downscaling.fine]

    # ------------------------------------------------------------------ model and data
    def build_model(self) -> nn.Module:
        spec = self.spec = self.cfg.downscaling
        self.coarse, self.fine = coarse, fine = open_datasets(spec)
        self.in_vars, self.constants, self.out_vars = resolve_variables(coarse, fine, spec.in_vars, spec.constants,
                                                                        spec.out_vars)
        net = build_net(self.cfg, fine, self.in_vars, self.constants, self.out_vars, self.log)
        if self.cfg.freeze_backbone:
            self.log(f"backbone frozen: {len(freeze_backbone(net))} tensors")
        return make_downscaler(net, coarse, fine, self.in_vars, self.constants, self.out_vars, residual=spec.residual)

    def make_loaders(self, model: nn.Module) -> Loaders:
        cfg, w, d = self.cfg, self.worker, self.cfg.data

        def loader(split, batch_size, *, shuffle, max_batches=None):
            return DownscalingLoader(self.coarse, self.fine, split, self.in_vars, self.out_vars, batch_size,
                                     seed=cfg.train.seed, rank=w.rank, world_size=w.world, shuffle=shuffle,
                                     drop_last=shuffle, prefetch=d.prefetch, max_batches=max_batches)

        train_data = loader(d.train_split, d.batch_size, shuffle=True)
        steps_per_epoch = cfg.train.steps_per_epoch or len(train_data)
        if steps_per_epoch <= 0 or len(train_data) == 0:
            raise ValueError(f"the training split {d.train_split!r} gives no batch of {d.batch_size} "
                             f"per worker with {w.world} workers; lower data.batch_size or use a longer split")
        _, self.fstd = self.fine.normalizer(self.out_vars)
        # built before the first step and reused every epoch: a bad validation split fails now (issue 16)
        val = loader(d.val_split, d.val_batch_size or d.batch_size, shuffle=False, max_batches=d.max_val_batches)
        return Loaders(train_data, val, steps_per_epoch)

    def find_unused_parameters(self, model: nn.Module) -> bool:
        return set(model.model_vars) != set(model.net.default_vars) or bool(self.cfg.freeze_backbone)

    def describe(self, model: nn.Module, loaders: Loaders) -> str:
        cfg, w, net, coarse, fine = self.cfg, self.worker, model.net, self.coarse, self.fine
        return (f"downscaling {coarse.name} {coarse.shape} -> {fine.name} {fine.shape}: ClimaX "
                f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters, patch {net.patch_size}, inputs "
                f"{self.in_vars} + constants {self.constants}, outputs {self.out_vars}"
                f"{' (residual on bilinear)' if self.spec.residual else ''}; {len(loaders.train.times)} training "
                f"pairs; {w.world} worker(s) on {w.device}; {loaders.steps_per_epoch} steps per epoch x "
                f"{cfg.train.epochs} epochs, batch {cfg.data.batch_size} per worker")

    # ------------------------------------------------------------------ steps
    def loss(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, str | None]:
        return forecast_loss(model, batch, self.fine.lat, self.worker.device, bf16=self.cfg.train.bf16), None

    def where(self, batch: Any, step: int) -> str:
        return batch_where(batch)

    def validate(self, model: nn.Module, val: Any, train_metrics: dict) -> dict[str, float]:
        scores = evaluate_downscaling(model, val, self.fine.lat, self.worker.device, bf16=self.cfg.train.bf16).result()
        metrics = {"val_loss": scores["loss"], **metrics_of(scores)}
        # one number for schedulers and comparisons: RMSE in units of each variable's std, mean over variables
        metrics["val_rmse"] = float(np.mean([metrics[f"val_rmse/{v}"] / s for v, s in zip(self.out_vars, self.fstd)]))
        return metrics

    def summary(self, metrics: dict) -> str:
        out = self.out_vars
        rm = ", ".join(f"{v} {metrics[f'val_rmse/{v}']:.3g}"
                       + (f" (bilinear {metrics[f'val_bilinear_rmse/{v}']:.3g})"
                          if f"val_bilinear_rmse/{v}" in metrics else "") for v in out[:4])
        return f" rmse [{rm}{', ...' if len(out) > 4 else ''}]"

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_module(self, model: nn.Module) -> nn.Module:
        return model.net

    def checkpoint_extras(self) -> dict[str, Any]:
        spec, coarse, fine = self.spec, self.coarse, self.fine
        return {**super().checkpoint_extras(), "task": "downscaling", "in_vars": self.in_vars + self.constants,
                "out_vars": self.out_vars,
                "downscaling": {"coarse_vars": self.in_vars, "constants": self.constants, "out_vars": self.out_vars,
                                "residual": spec.residual, "coarse": spec.coarse.root, "fine": spec.fine.root,
                                "coarse_grid": [len(coarse.lat), len(coarse.lon)],
                                "coarse_statistics": checkpoint_record(coarse, self.in_vars)["statistics"]},
                # self-contained: the fine grid, its statistics and manifest fingerprint (climax.normalization)
                **checkpoint_record(fine, [*self.constants, *self.out_vars])}

    # ------------------------------------------------------------------ evaluation (driver side)
    @classmethod
    def evaluate(cls, cfg: Any, log=print) -> Any:
        """``jobs.evaluate`` on a downscaling checkpoint (``cfg``: its EvaluateConfig): scores against
        the bilinear baseline, the table printed; returns it."""
        state, meta, _ = read_checkpoint(cfg.checkpoint)
        net, _ = load_model({**meta, "state_dict": state})
        df, out = evaluate(cfg, net, meta)
        log(f"\n{cfg.split}: {int(df['samples'].max())} time steps, downscaled vs bilinear interpolation")
        log(results_table(df))
        log(f"\nwritten to {out}/: metrics.csv, metrics.json, " + ", ".join(df.attrs["maps"]))
        return df


def load_downscaler(meta: dict, net, coarse_root: str | None, fine_root: str | None,
                    storage_options: dict | None = None):
    """(Downscaler, coarse, fine) from a downscaling checkpoint's metadata; roots default to the run's."""
    info = meta.get("downscaling")
    if not info:
        raise ValueError("the checkpoint is not a downscaling run's (it records no 'downscaling' section); "
                         "evaluate it with task=forecast")
    coarse_root, fine_root = coarse_root or info["coarse"], fine_root or info["fine"]
    coarse = ShardDataset(coarse_root, storage_options or None)
    fine = ShardDataset(fine_root, storage_options or None)
    in_vars, constants, out_vars = resolve_variables(coarse, fine, info["coarse_vars"], info["constants"],
                                                     info["out_vars"])
    return make_downscaler(net, coarse, fine, in_vars, constants, out_vars, residual=info["residual"]), coarse, fine


def evaluate(cfg, net, meta: dict) -> Any:
    """``jobs.evaluate`` for a downscaling checkpoint: scores on ``cfg.split`` and maps; returns (table, folder)."""
    model, coarse, fine = load_downscaler(meta, net, cfg.coarse, cfg.data, cfg.storage_options)
    device = resolve_device(cfg.device, model)
    model.to(device)
    loader = DownscalingLoader(coarse, fine, cfg.split, model.in_vars, model.out_vars, cfg.batch_size, shuffle=False,
                               drop_last=False)
    if cfg.max_samples is not None and cfg.max_samples < len(loader.times):
        keep = np.unique(np.linspace(0, len(loader.times) - 1, cfg.max_samples).round().astype(np.int64))
        batches = (loader.read(keep[i:i + cfg.batch_size]) for i in range(0, len(keep), cfg.batch_size))
    else:
        batches = iter(loader)
    scores = evaluate_downscaling(model, batches, fine.lat, device, bf16=False,
                                  scores=DownscalingScores(model.out_vars, device)).result()
    units = variable_units(fine, model.out_vars)
    rows = []
    for v in model.out_vars:
        for method in METHODS:
            if f"{method}_rmse/{v}" in scores:
                rows.append({"variable": v, "method": method, **{s: scores[f"{method}_{s}/{v}"]
                                                                 for s in DownscalingScores.STATS},
                             "units": units[v], "samples": scores["samples"]})
    df = pd.DataFrame(rows, columns=["variable", "method", "rmse", "bias", "pearson", "units", "samples"])

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "metrics.csv", df.to_csv(index=False))
    doc = {"task": "downscaling", "checkpoint": cfg.checkpoint, "coarse": coarse.root, "fine": fine.root,
           "split": cfg.split, "in_vars": model.in_vars, "constants": model.constants, "out_vars": model.out_vars,
           "samples": scores["samples"], "metrics": df.to_dict(orient="records")}
    write_atomic(out / "metrics.json", json.dumps(doc, indent=1))

    # maps at one time: coarse input, downscaled, truth, error
    pair = 0
    if cfg.map_init:
        t = np.datetime64(cfg.map_init, "ns")
        hit = np.flatnonzero(loader.times == t)
        if not len(hit):
            raise ValueError(f"{cfg.map_init} is not a time step both datasets hold in split {cfg.split!r} "
                             f"({loader.times[0]} .. {loader.times[-1]})")
        pair = int(hit[0])
    batch = loader.read(np.array([pair]))
    model.eval()
    with torch.no_grad():
        pred = model.physical(model(batch.x.to(device), batch.lead_hours.to(device))).cpu().numpy()[0]
    truth = fine.read(cfg.split, loader.fine_rows[[pair]], model.out_vars)[0]
    raw = coarse.read(cfg.split, loader.coarse_rows[[pair]], model.in_vars)[0]
    when = str(loader.times[pair])[:16]
    maps = []
    for k, v in enumerate(model.out_vars):
        src = raw[model.in_vars.index(v)] if v in model.in_vars else None
        path = out / f"maps_{v}.png"
        plot_downscaling_maps(src, coarse.lat, coarse.lon, pred[k], truth[k], fine.lat, fine.lon, path, v, units[v],
                              title=f"{v} at {when}: {coarse.name} {coarse.shape} -> {fine.name} {fine.shape}")
        maps.append(path.name)
    df.attrs["maps"] = maps
    return df, out


def results_table(df) -> str:
    return df.drop(columns=["samples"]).to_string(index=False, float_format=lambda x: f"{x:.4g}")


TASK = DownscalingTask
