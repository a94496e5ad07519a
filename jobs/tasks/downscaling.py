"""The downscaling task on Ray Train and its evaluation (issue 8).

    python -m jobs.finetune configs/finetune/downscaling.yaml [init_checkpoint=PATH] [key=value ...]
    python -m jobs.evaluate configs/evaluate.yaml checkpoint=RUN/checkpoint_... data=FINE_SHARDS [coarse=...]

``jobs.finetune`` with ``task: downscaling`` runs :func:`downscaling_loop` in every Ray Train worker
(dispatched from ``jobs.train.train_loop_per_worker``): the
same Ray Train run as forecasting (worker group, DDP, warmup-cosine AdamW, one line and one
checkpoint per epoch, ``max_failures`` restarts, resume by name), with ``climax.downscaling``'s
paired loader and model: the coarse input regridded bilinearly onto the fine grid, the fine set's
constants, ClimaX at the fine grid at lead time 0. Validation reports latitude-weighted RMSE, mean
bias and Pearson correlation per variable in physical units, with the bilinear baseline beside them.

``jobs.evaluate`` on a downscaling checkpoint (it records its task) calls :func:`evaluate`: the metrics table (``metrics.csv``, ``metrics.json``) and the maps (coarse
input, downscaled, truth, error) per variable.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from climax.atomic import write_atomic
from climax.redact import redact


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


def check_config(cfg) -> None:
    """What a downscaling configuration must hold (called by TrainConfig's validation)."""
    if cfg.downscaling is None:
        raise ValueError("task downscaling needs a 'downscaling' section: downscaling.coarse.root (input shards "
                         "on the coarse grid) and downscaling.fine.root (target shards on the fine grid)")
    if cfg.data.region is not None:
        raise ValueError("data.region: regional downscaling is not supported (task downscaling is global)")
    if cfg.data.datasets:
        raise ValueError("task downscaling reads downscaling.coarse and downscaling.fine; leave data.datasets empty")


def open_datasets(spec) -> tuple[Any, Any]:
    from climax.data import ShardDataset

    coarse = ShardDataset(spec.coarse.root, spec.coarse.storage_options, name=spec.coarse.name,
                          verify=spec.coarse.verify)
    fine = ShardDataset(spec.fine.root, spec.fine.storage_options, name=spec.fine.name, verify=spec.fine.verify)
    if coarse.shape == fine.shape:
        raise ValueError(f"the coarse dataset {coarse.root} and the fine dataset {fine.root} share the grid "
                         f"{fine.shape}; downscaling needs a coarser input (e.g. jobs.preprocess with a larger "
                         "grid.resolution)")
    return coarse, fine


def _net(cfg, fine, in_vars, constants, out_vars, log):
    """ClimaX at the fine grid (``jobs.train.build_model``: from the model config or the init
    checkpoint, its position embedding interpolated) over inputs, constants and outputs."""
    from jobs.train import build_model

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


def downscaling_loop(cfg) -> None:
    """The Ray Train worker loop of ``task: downscaling`` (``cfg``: the validated TrainConfig)."""
    import ray.train
    import ray.train.torch
    import torch

    from climax.downscaling import DownscalingLoader, evaluate_downscaling, make_downscaler, resolve_variables
    from climax.normalization import checkpoint_record
    from climax.training import freeze_backbone, save_train_state, train_step
    from jobs.train import _hms, _stream, epoch_metrics, start_or_resume

    spec = cfg.downscaling
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(cfg.train.seed)

    coarse, fine = open_datasets(spec)
    in_vars, constants, out_vars = resolve_variables(coarse, fine, spec.in_vars, spec.constants, spec.out_vars)
    net = _net(cfg, fine, in_vars, constants, out_vars, log)
    if cfg.freeze_backbone:
        log(f"backbone frozen: {len(freeze_backbone(net))} tensors")
    model = make_downscaler(net, coarse, fine, in_vars, constants, out_vars, spec.residual)

    def loader(split, batch_size, shuffle, max_batches=None):
        return DownscalingLoader(coarse, fine, split, in_vars, out_vars, batch_size, seed=cfg.train.seed, rank=rank,
                                 world_size=world, shuffle=shuffle, drop_last=shuffle, prefetch=cfg.data.prefetch,
                                 max_batches=max_batches)

    train_data = loader(cfg.data.train_split, cfg.data.batch_size, True)
    steps_per_epoch = cfg.train.steps_per_epoch or len(train_data)
    if steps_per_epoch <= 0 or len(train_data) == 0:
        raise ValueError(f"the training split {cfg.data.train_split!r} gives no batch of {cfg.data.batch_size} "
                         f"per worker with {world} workers; lower data.batch_size or use a longer split")
    total_steps = cfg.train.epochs * steps_per_epoch
    _, fstd = fine.normalizer(out_vars)
    # built before the first step and reused every epoch: a bad validation split fails now (issue 16)
    val = loader(cfg.data.val_split, cfg.data.val_batch_size or cfg.data.batch_size, False, cfg.data.max_val_batches)

    model.to(device)
    optimizer, scheduler, state = start_or_resume(cfg, net, total_steps, log)
    uses_all = set(model.model_vars) == set(net.default_vars)
    ddp_model = ray.train.torch.prepare_model(
        model, move_to_device=False,
        parallel_strategy_kwargs={"find_unused_parameters": not uses_all or cfg.freeze_backbone})
    if cfg.train.compile and device.type == "cuda":
        ddp_model = torch.compile(ddp_model)
    log(f"downscaling {coarse.name} {coarse.shape} -> {fine.name} {fine.shape}: ClimaX "
        f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters, patch {net.patch_size}, inputs "
        f"{in_vars} + constants {constants}, outputs {out_vars}{' (residual on bilinear)' if spec.residual else ''}; "
        f"{len(train_data.times)} training pairs; {world} worker(s) on {device}; {steps_per_epoch} steps per epoch "
        f"x {cfg.train.epochs} epochs, batch {cfg.data.batch_size} per worker")
    extra = {"task": "downscaling", "in_vars": model.model_vars, "out_vars": out_vars,
             "downscaling": {"coarse_vars": in_vars, "constants": constants, "out_vars": out_vars,
                             "residual": spec.residual, "coarse": spec.coarse.root, "fine": spec.fine.root,
                             "coarse_grid": [len(coarse.lat), len(coarse.lon)],
                             "coarse_statistics": checkpoint_record(coarse, in_vars)["statistics"]},
             # self-contained: the fine grid, its statistics and manifest fingerprint (climax.normalization)
             **checkpoint_record(fine, [*constants, *out_vars])}

    if state.epoch >= cfg.train.epochs:
        log(f"run {cfg.name!r} already finished {state.epoch} epochs ({state.step} steps); raise train.epochs "
            "to train further, or use another name for a new run")
    start, first_epoch = time.time(), state.epoch
    for epoch in range(state.epoch, cfg.train.epochs):
        t0, losses, n_batches = time.time(), [], 0
        for batch in _stream(train_data, epoch, steps_per_epoch):
            losses.append(train_step(ddp_model, batch, optimizer, scheduler, fine.lat, device, cfg.optim.grad_clip,
                                     cfg.train.bf16))
            state.step += 1
            n_batches += 1
            if cfg.train.log_every and state.step % cfg.train.log_every == 0:
                log(f"  step {state.step}/{total_steps} loss {losses[-1]:.4f} lr {scheduler.get_last_lr()[0]:.2e}")
        metrics: dict[str, Any] = epoch_metrics(cfg, state, epoch, losses, n_batches, world, t0, scheduler)
        scores = evaluate_downscaling(ddp_model, val, fine.lat, device, cfg.train.bf16).result()
        metrics["val_loss"] = scores["loss"]
        metrics.update(metrics_of(scores))
        # one number for schedulers and comparisons: RMSE in units of each variable's std, mean over variables
        metrics["val_rmse"] = float(np.mean([metrics[f"val_rmse/{v}"] / s for v, s in zip(out_vars, fstd)]))
        state.epoch = epoch + 1
        state.best_val_loss = min(state.best_val_loss, metrics["val_loss"])
        state.history.append({k: metrics[k] for k in ("epoch", "step", "train_loss", "val_loss")})
        eta = (time.time() - start) / (epoch + 1 - first_epoch) * (cfg.train.epochs - epoch - 1)
        rm = ", ".join(f"{v} {metrics[f'val_rmse/{v}']:.3g}"
                       + (f" (bilinear {metrics[f'val_bilinear_rmse/{v}']:.3g})"
                          if f"val_bilinear_rmse/{v}" in metrics else "") for v in out_vars[:4])
        log(f"epoch {epoch + 1}/{cfg.train.epochs} step {state.step}/{total_steps} loss {metrics['train_loss']:.4f} "
            f"val {metrics['val_loss']:.4f} rmse [{rm}{', ...' if len(out_vars) > 4 else ''}] "
            f"{metrics['samples_per_s']:.1f} samples/s ETA {_hms(eta)}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_train_state(tmp, net, optimizer, None, state, run_config=redact(cfg),
                                 metrics=metrics, **extra)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


# ----------------------------------------------------------------------------- evaluation
def load_downscaler(meta: dict, net, coarse_root: str | None, fine_root: str | None,
                    storage_options: dict | None = None):
    """(Downscaler, coarse, fine) from a downscaling checkpoint's metadata; roots default to the run's."""
    from climax.data import ShardDataset
    from climax.downscaling import make_downscaler, resolve_variables

    info = meta.get("downscaling")
    if not info:
        raise ValueError("the checkpoint is not a downscaling run's (it records no 'downscaling' section); "
                         "evaluate it with task=forecast")
    coarse_root, fine_root = coarse_root or info["coarse"], fine_root or info["fine"]
    coarse = ShardDataset(coarse_root, storage_options or None)
    fine = ShardDataset(fine_root, storage_options or None)
    in_vars, constants, out_vars = resolve_variables(coarse, fine, info["coarse_vars"], info["constants"],
                                                     info["out_vars"])
    return make_downscaler(net, coarse, fine, in_vars, constants, out_vars, info["residual"]), coarse, fine


def evaluate(cfg, net, meta: dict) -> Any:
    """``jobs.evaluate`` for a downscaling checkpoint: scores on ``cfg.split`` and maps; returns (table, folder)."""
    import pandas as pd
    import torch

    from climax.downscaling import METHODS, DownscalingLoader, DownscalingScores, evaluate_downscaling
    from climax.evaluation import _units, resolve_device
    from climax.plots import plot_downscaling_maps

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
    units = _units(fine, model.out_vars)
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
