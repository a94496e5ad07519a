"""Training on Ray Train (Train V2): the configuration, the per-worker loop and the trainer.

``jobs.pretrain`` and ``jobs.finetune`` are this module with different defaults. The loop is plain
PyTorch (``climax.training``, ``climax.data``); Ray only adds the worker group, DDP, checkpoint
storage and restarts:

- ``ScalingConfig(num_workers, use_gpu, resources_per_worker)`` from ``scaling``;
- every ``train.steps_per_epoch`` steps: validation (RMSE per variable in physical units, with
  persistence), a one-line report on rank 0, and ``ray.train.report(metrics, checkpoint)``;
  ``CheckpointConfig(num_to_keep, checkpoint_score_attribute="val_loss", "min")`` keeps the best;
- ``FailureConfig(max_failures)``: a lost worker restarts the group from the last checkpoint;
- a relaunch with the same ``name`` and ``storage_path`` resumes (step counter, schedule, data
  order: epoch e always reads the same batches).
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from climax.redact import redact
from jobs.objective import ObjectiveSpec
from jobs.tasks.downscaling import DownscalingSpec
from jobs.tasks.projection import ProjectionSpec

ROOT = Path(__file__).resolve().parents[1]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetSpec(_Strict):
    root: str = Field(description="dataset written by jobs.preprocess (folder or s3://bucket/prefix)")
    weight: float = Field(1.0, gt=0, description="share of training batches drawn from this dataset")
    name: str | None = Field(None, description="label in logs (default: the folder name)")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="s3 options (endpoint_url, key, ...)")
    verify: bool = Field(False, description="also check each shard's sha256 against the manifest's, once per shard "
                                            "per process (one extra read); row counts are checked always")


class LeadConfig(_Strict):
    random: bool = Field(True, description="pretraining: one lead per sample drawn from min..max hours; "
                                           "finetuning (false): every sample at each of `hours`")
    min_hours: float = 6
    max_hours: float = 168
    hours: list[float] = Field(default_factory=lambda: [6.0], description="fixed lead times (random: false)")
    val_hours: list[float] | None = Field(None, description="validation lead times (default: `hours`)")


class DataConfig(_Strict):
    datasets: list[DatasetSpec] = Field(default_factory=list, description="at least one (task downscaling reads "
                                                                          "its own section instead)")
    in_vars: list[str] | None = Field(None, description="input variables (default: every variable incl. constants)")
    out_vars: list[str] | None = Field(None, description="predicted variables (default: every time-varying one)")
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = Field(8, gt=0, description="per worker")
    val_batch_size: int | None = None
    max_val_batches: int | None = Field(None, description="cap on validation batches per lead (per worker)")
    leads: LeadConfig = Field(default_factory=LeadConfig)
    region: str | list[float] | None = Field(None, description="regional training: a name (Europe, NorthAmerica, ...) "
                                                                "or [lat_min, lat_max, lon_min, lon_max]")
    prefetch: int = 2
    cache_mb: float = Field(1024, ge=0, description="per worker and split: keep decoded rows when the split's "
                                                    "needed variables fit in this many MiB (0: never)")
    shuffle: Literal["auto", "global", "block"] = Field(
        "auto", description="training order: global (any sample beside any other; ~2 rows decoded per sample "
                            "when rows are not kept), block (seeded blocks of contiguous time, samples shuffled "
                            "within windows of blocks: each row decoded about once per epoch), auto: global when "
                            "the split fits cache_mb, else block")
    block_steps: int | None = Field(None, gt=0, description="block shuffle: block length in time steps "
                                                            "(default: from the longest lead)")
    window_blocks: int = Field(4, gt=0, description="block shuffle: blocks per window (more mixing, more memory)")
    window_mb: float = Field(4096, gt=0, description="block shuffle: bound of one window's decoded rows per worker "
                                                     "(two windows are held)")


class OptimConfig(_Strict):
    lr: float = 5e-4
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(1000, ge=0)
    warmup_start_factor: float = 0.0
    min_lr_factor: float = 0.0
    grad_clip: float | None = 1.0


class LoopConfig(_Strict):
    epochs: int = Field(10, gt=0)
    steps_per_epoch: int | None = Field(None, description="optimiser steps between validations and checkpoints "
                                                          "(default: one pass over the training data)")
    seed: int = 0
    bf16: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU)")
    compile: bool = Field(False, description="torch.compile the model on GPU (1.2-1.3x samples/s on an H100, "
                                             "about a minute of compilation per input shape; ignored on CPU)")
    log_every: int = Field(0, description="also print the loss every N steps (0: only per epoch)")
    activation_checkpointing: bool = Field(False, description="recompute each transformer block in backward "
                                                              "(less activation memory, ~1/3 more compute)")


class ScalingSpec(_Strict):
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    accelerator_type: str | None = Field(None, description="GPU kind per worker on a mixed cluster: A10G, A100, "
                                                           "H100, ... (Ray's accelerator_type resource)")
    resources_per_worker: dict[str, float] | None = None
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp (replicated model) or fsdp (FSDP2: parameters, "
                                                                "gradients and AdamW state sharded per block; "
                                                                "forecast task; climax/parallel.py)")


class CheckpointSpec(_Strict):
    num_to_keep: int | None = Field(2, description="best checkpoints kept (by `score`)")
    score: str = Field("val_loss", description="reported metric ranking the kept checkpoints, lower is better "
                                               "(val_loss, val_rmse, val_rmse/<var>@<lead>h)")


class ObservabilitySpec(_Strict):
    tensorboard: bool = Field(True, description="TensorBoard event files of every report (tensorboardX), "
                                                "in tensorboard_dir")
    tensorboard_dir: str | None = Field(None, description="default: <storage_path>/<name>/tensorboard (local or s3://)")
    mlflow_tracking_uri: str | None = Field(None, description="log the run to MLflow (e.g. http://mlflow:5000 or "
                                                              "a folder); needs pip install '.[observability]'")
    mlflow_experiment: str = "climax"


class TrainConfig(_Strict):
    name: str = Field("climax-pretrain", description="run name; relaunching with the same name resumes")
    storage_path: str = Field("~/climax_runs", description="where runs and checkpoints go (folder or s3://)")
    storage_options: dict[str, Any] = Field(default_factory=dict,
                                            description="s3 options for storage_path (endpoint_url, key, secret)")
    model: str | dict[str, Any] = Field("configs/model/climax-5.625.yaml",
                                        description="model YAML or inline mapping; default_vars default to the data's")
    init_checkpoint: str | None = Field(None, description="finetune from ours or an original ClimaX .ckpt")
    ckpt_vars: list[str] | None = Field(None, description="variables of an init checkpoint that records none")
    statistics: Literal["checkpoint", "dataset"] = Field(
        "checkpoint", description="normalisation when finetuning: the init checkpoint's statistics (a warning names "
                                  "the variables whose dataset statistics differ by more than 1 %) or the dataset's")
    ckpt_statistics: str | None = Field(None, description="folder holding an original ClimaX release's "
                                                          "normalize_mean.npz and normalize_std.npz: the statistics "
                                                          "of an init_checkpoint that records none")
    freeze_backbone: bool = False
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: LoopConfig = Field(default_factory=LoopConfig)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    max_failures: int = Field(2, description="worker-group restarts from the last checkpoint before giving up")
    observability: ObservabilitySpec = Field(default_factory=ObservabilitySpec)
    task: Literal["forecast", "projection", "downscaling"] = Field(
        "forecast", description="forecast (global/regional), projection (ClimateBench) or downscaling")
    projection: ProjectionSpec | None = Field(None, description="task: projection (jobs/tasks/projection.py)")
    downscaling: DownscalingSpec | None = Field(None, description="task: downscaling (jobs/tasks/downscaling.py)")
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)

    @model_validator(mode="after")
    def _task_sections(self) -> TrainConfig:
        if self.task != "downscaling" and not self.data.datasets:
            raise ValueError(f"data.datasets needs at least one dataset (task {self.task})")
        if self.task == "downscaling":
            from jobs.tasks.downscaling import check_config

            check_config(self)
        return self

    @model_validator(mode="after")
    def _objective_for_forecasting(self) -> TrainConfig:
        if self.objective.uses_masking and self.task != "forecast":
            raise ValueError(f"objective.kind={self.objective.kind} pretrains the forecast task; "
                             f"task {self.task!r} trains with objective.kind=forecast")
        return self


# ----------------------------------------------------------------------------- worker side
def _model_config(cfg: TrainConfig) -> dict:
    if isinstance(cfg.model, dict):
        return dict(cfg.model)
    path = Path(cfg.model)
    if not path.is_absolute() and not path.exists():
        path = ROOT / path
    if not path.is_file():
        raise FileNotFoundError(f"model configuration {cfg.model} does not exist; give a YAML file "
                                f"(e.g. configs/model/climax-5.625.yaml) or an inline mapping")
    return yaml.safe_load(path.read_text())


def _variables(cfg: TrainConfig, ds) -> tuple[list[str], list[str]]:
    have = set(ds.variables) | set(ds.constants)
    in_vars = [v for v in (cfg.data.in_vars or ds.constants + ds.variables) if v in have]
    out_vars = [v for v in (cfg.data.out_vars or ds.variables) if v in set(ds.variables)]
    missing = [v for v in (cfg.data.in_vars or []) + (cfg.data.out_vars or []) if v not in have]
    if missing and len(cfg.data.datasets) == 1:
        raise ValueError(f"dataset {ds.name!r} has no variable(s) {missing}; it has {sorted(have)}")
    if not in_vars or not out_vars:
        raise ValueError(f"dataset {ds.name!r}: no input or output variable left; check data.in_vars / data.out_vars")
    return in_vars, out_vars


def build_model(cfg: TrainConfig, datasets: list, log=print):
    """The model of a run: from the model config, or from ``init_checkpoint`` (finetuning).

    default_vars: the config's (or the checkpoint's), extended by any data variable they lack
    (new variables get fresh embeddings and head rows); img_size: the data's grid.
    """
    from climax import ClimaX
    from climax.checkpoint import load_checkpoint, read_checkpoint

    data_vars: list[str] = []
    for ds in datasets:
        for v in sum(_variables(cfg, ds), []):
            if v not in data_vars:
                data_vars.append(v)
    mcfg = _model_config(cfg) if cfg.init_checkpoint is None or not isinstance(cfg.model, str) or \
        cfg.model != TrainConfig.model_fields["model"].default else {}
    state_meta = None
    if cfg.init_checkpoint:
        _, meta, _ = read_checkpoint(cfg.init_checkpoint)
        state_meta = meta
        if meta.get("model_config"):
            mcfg = {**meta["model_config"], **{k: v for k, v in mcfg.items() if k != "default_vars"}}
        elif not mcfg:
            mcfg = _model_config(cfg)
    base_vars = list(mcfg.get("default_vars") or (state_meta or {}).get("model_config", {}).get("default_vars") or [])
    mcfg["default_vars"] = base_vars + [v for v in data_vars if v not in base_vars]
    mcfg["img_size"] = [len(datasets[0].lat), len(datasets[0].lon)]
    model = ClimaX(**mcfg)
    if cfg.objective.uses_masking:  # before loading: a masked checkpoint's decoder continues
        from climax.masking import attach_decoder

        attach_decoder(model, **cfg.objective.decoder.model_dump())
    if cfg.init_checkpoint:
        report = load_checkpoint(model, cfg.init_checkpoint, ckpt_vars=cfg.ckpt_vars)
        log(f"loaded {cfg.init_checkpoint}:\n{report}")
        init_statistics(cfg, datasets, state_meta or {}, log)
    return model


def init_statistics(cfg: TrainConfig, datasets: list, meta: dict, log=print) -> None:
    """Finetuning normalises with the init checkpoint's statistics (``statistics: checkpoint``): those
    it records, else an original release's ``ckpt_statistics`` files; the dataset's otherwise."""
    from climax.normalization import apply_statistics, checkpoint_statistics, release_statistics

    if cfg.statistics == "dataset":
        if cfg.ckpt_statistics:
            log("note: ckpt_statistics is ignored with statistics=dataset")
        return
    stats, source = checkpoint_statistics(meta), f"checkpoint {cfg.init_checkpoint}"
    if cfg.ckpt_statistics:
        if stats:
            log(f"note: {cfg.init_checkpoint} records its statistics; ckpt_statistics {cfg.ckpt_statistics} "
                "fills only the variables it lacks")
        stats = {**release_statistics(cfg.ckpt_statistics), **stats}
        source = f"{source} + {cfg.ckpt_statistics}"
    if not stats:
        log(f"note: {cfg.init_checkpoint} records no normalisation statistics: the dataset's are used (for an "
            "original ClimaX .ckpt, ckpt_statistics=<folder with normalize_mean.npz, normalize_std.npz> gives the "
            "release's)")
        return
    for ds in datasets:
        if hasattr(ds, "use_statistics"):
            apply_statistics(ds, stats, source, warn=log)


def _stream(loader, epoch: int, steps: int):
    """``steps`` batches for training epoch ``epoch``: data epochs epoch*m, epoch*m+1, ... where
    m passes cover one training epoch, so a resumed epoch reads exactly the same batches."""
    per_pass = max(len(loader), 1)
    m = math.ceil(steps / per_pass)
    n = 0
    for k in range(m):
        loader.set_epoch(epoch * m + k)
        for batch in loader:
            yield batch
            n += 1
            if n == steps:
                return


def start_or_resume(cfg: TrainConfig, model, total_steps: int, log=print, load=None):
    """``(optimizer, scheduler, state)`` of a run on the worker: fresh, or restored from the
    checkpoint Ray Train hands back after a failure or a relaunch with the same name (weights,
    optimiser, counters; the schedule restarts at the restored step). Every task's loop uses this.
    ``load(directory, model, optimizer) -> TrainState`` defaults to ``climax.training.load_train_state``."""
    import ray.train

    from climax.optim import build_optimizer, warmup_cosine
    from climax.training import TrainState, load_train_state

    optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay, tuple(cfg.optim.betas))
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = (load or load_train_state)(d, model, optimizer)
        state.restarts += 1
        log(f"resumed from the checkpoint at step {state.step} (epoch {state.epoch}); restart {state.restarts}")
    scheduler = warmup_cosine(optimizer, min(cfg.optim.warmup_steps, max(total_steps - 1, 0)), total_steps,
                              cfg.optim.warmup_start_factor, cfg.optim.min_lr_factor, start_step=state.step)
    return optimizer, scheduler, state


def epoch_metrics(cfg: TrainConfig, state, epoch: int, losses: list, n_batches: int, world: int, t0: float,
                  scheduler) -> dict[str, Any]:
    """The training half of an epoch's metrics (every task's loop); counts the epoch's samples."""
    import numpy as np

    train_time = time.time() - t0
    samples = n_batches * cfg.data.batch_size * world
    state.samples += samples
    return {"epoch": epoch + 1, "step": state.step, "train_loss": float(np.mean(losses)),
            "lr": scheduler.get_last_lr()[0], "samples_per_s": samples / max(train_time, 1e-9),
            "restarts": state.restarts}


def _quiet_report_log() -> None:
    """Ray Train V2 logs every ``ray.train.report`` with the whole metrics dict (a screenful per epoch
    with per-variable RMSEs); our own one-line epoch summary says the same. Errors still show."""
    import logging

    try:
        # Private module, on purpose: Train V2 names this logger by the module's file path and offers no
        # public switch for its per-report dump. Only the log level depends on it; if Ray moves the
        # module, the ImportError below leaves the default logging (no test depends on it).
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict) -> None:
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch

    from climax.data import ForecastLoader, MixedLoader, ShardDataset
    from climax.masking import MaskedObjective, step_generator, validate_masked
    from climax.normalization import checkpoint_record
    from climax.regions import Region
    from climax.sampling import lead_hours
    from climax.training import freeze_backbone, save_train_state, train_step, validate

    cfg = TrainConfig.model_validate(config)
    _quiet_report_log()
    if cfg.task == "projection":
        from jobs.tasks.projection import projection_loop

        return projection_loop(cfg)
    if cfg.task == "downscaling":
        from jobs.tasks.downscaling import downscaling_loop

        return downscaling_loop(cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(cfg.train.seed)

    datasets = [ShardDataset(d.root, d.storage_options, name=d.name, verify=d.verify) for d in cfg.data.datasets]
    model = build_model(cfg, datasets, log=log)
    if cfg.freeze_backbone:
        frozen = freeze_backbone(model)
        log(f"backbone frozen: {len(frozen)} tensors")
    patch = model.patch_size
    region = Region.from_spec(cfg.data.region, datasets[0].lat, datasets[0].lon, patch)
    objective = cfg.objective
    masked = MaskedObjective(objective.mask_ratio, objective.var_drop) if objective.uses_masking else None
    if masked is not None and region is not None:
        raise ValueError(f"objective.kind={objective.kind} pretrains on the whole grid; set data.region=null")
    leads = cfg.data.leads

    def loader(ds, split, random_lead, hours, batch_size, shuffle, max_batches=None):
        in_vars, out_vars = _variables(cfg, ds)
        d = cfg.data
        return ForecastLoader(ds, split, in_vars, out_vars, hours, random_lead=random_lead, batch_size=batch_size,
                              seed=cfg.train.seed, rank=rank, world_size=world, shuffle=shuffle,
                              drop_last=shuffle, region=region, prefetch=d.prefetch, max_batches=max_batches,
                              pin_memory=device.type == "cuda", cache_mb=d.cache_mb, shuffle_mode=d.shuffle,
                              block_steps=d.block_steps, window_blocks=d.window_blocks, window_mb=d.window_mb)

    train_loaders = []
    for ds in datasets:
        hours = lead_hours(leads.min_hours, leads.max_hours, ds.step_hours) if leads.random else leads.hours
        train_loaders.append(loader(ds, cfg.data.train_split, leads.random, hours, cfg.data.batch_size, True))
        log(train_loaders[-1].report())
    train_data = train_loaders[0] if len(train_loaders) == 1 else MixedLoader(
        train_loaders, [d.weight for d in cfg.data.datasets], seed=cfg.train.seed)
    steps_per_epoch = cfg.train.steps_per_epoch or len(train_data)
    if steps_per_epoch <= 0:
        raise ValueError(f"the training split {cfg.data.train_split!r} gives no batch of {cfg.data.batch_size} "
                         f"per worker with {world} workers; lower data.batch_size or use a longer split")
    total_steps = cfg.train.epochs * steps_per_epoch
    val_ds = datasets[0]
    val_in, val_out = _variables(cfg, val_ds)
    val_leads = leads.val_hours or (leads.hours if not leads.random else [val_ds.step_hours])
    mean, std = val_ds.normalizer(val_out)
    lat = region.lat(val_ds.lat) if region is not None else val_ds.lat
    # built before the first step (and reused every epoch): a missing or too short validation split,
    # a lead it cannot serve or a variable it lacks stops the run now, not after an epoch of training
    val_loaders = {hours: loader(val_ds, cfg.data.val_split, False, [hours], cfg.data.val_batch_size or
                                 cfg.data.batch_size, False, cfg.data.max_val_batches) for hours in val_leads}
    for hours, vl in val_loaders.items():
        if rank == 0 and len(vl) == 0:  # rank 0 holds the largest contiguous block: empty there, empty everywhere
            raise ValueError(f"the validation split {cfg.data.val_split!r} of dataset {val_ds.name!r} gives no "
                             f"sample at lead {hours:g} h with {world} worker(s); use a longer split, shorter "
                             "data.leads.val_hours or fewer workers")

    model.to(device)
    # --- scaling.strategy / train.activation_checkpointing (climax/parallel.py) ---
    from climax.parallel import load_sharded_train_state, save_sharded_train_state, shard_model

    fsdp = cfg.scaling.strategy == "fsdp"
    if fsdp and masked is not None:
        raise ValueError(f"objective.kind={objective.kind} is not sharded yet; use scaling.strategy=ddp")
    model = shard_model(model, cfg.scaling.strategy, activation_checkpointing=cfg.train.activation_checkpointing)
    optimizer, scheduler, state = start_or_resume(cfg, model, total_steps, log,
                                                  load=load_sharded_train_state if fsdp else None)
    # --- end scaling.strategy ---
    uses_all = all(set(_variables(cfg, ds)[0]) == set(model.default_vars) for ds in datasets)
    ddp_model = model if fsdp else ray.train.torch.prepare_model(
        model, move_to_device=False,
        parallel_strategy_kwargs={"find_unused_parameters": not uses_all or cfg.freeze_backbone or masked is not None})
    if cfg.train.compile and device.type == "cuda":
        ddp_model = torch.compile(ddp_model)  # checkpoints still hold bare keys (climax.training.unwrap)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"ClimaX {n_params / 1e6:.2f} M parameters, grid {model.img_size}, patch {patch}"
        f"{f', region {region.name} {region.shape}' if region else ''}; {world} worker(s) on {device}; "
        f"{steps_per_epoch} steps per epoch x {cfg.train.epochs} epochs, batch {cfg.data.batch_size} per worker")

    if state.epoch >= cfg.train.epochs:
        log(f"run {cfg.name!r} already finished {state.epoch} epochs ({state.step} steps); raise train.epochs "
            "to train further, or use another name for a new run")
    start, first_epoch = time.time(), state.epoch
    for epoch in range(state.epoch, cfg.train.epochs):
        t0, losses, n_batches, mask_losses = time.time(), [], 0, []
        for batch in _stream(train_data, epoch, steps_per_epoch):
            lat_b = lat if batch.dataset == val_ds.name or region is not None else \
                next(ds.lat for ds in datasets if ds.name == batch.dataset)
            is_masked = objective.masked_at(state.step, cfg.train.seed)
            losses.append(train_step(ddp_model, batch, optimizer, scheduler, lat_b, device,
                                     cfg.optim.grad_clip, cfg.train.bf16, region=region,
                                     masked=masked if is_masked else None,
                                     generator=step_generator(cfg.train.seed, state.step, rank) if is_masked else None))
            if is_masked:
                mask_losses.append(losses[-1])
            state.step += 1
            n_batches += 1
            if cfg.train.log_every and state.step % cfg.train.log_every == 0:
                log(f"  step {state.step}/{total_steps} loss {losses[-1]:.4f} lr {scheduler.get_last_lr()[0]:.2e}")
        metrics: dict[str, Any] = epoch_metrics(cfg, state, epoch, losses, n_batches, world, t0, scheduler)
        val_losses = []
        for hours, vl in val_loaders.items():
            res = validate(ddp_model, vl, lat, mean, std, val_out, device, cfg.train.bf16, region=region)
            val_losses.append(res["val_loss"])
            for k, v in res.items():
                if k.startswith("val_rmse/") or k.startswith("val_persistence_rmse/"):
                    metrics[f"{k}@{hours:g}h"] = v
        metrics["val_loss"] = float(np.mean(val_losses))
        if masked is not None:  # reconstruction loss; the run's val_loss when it only reconstructs
            metrics.update(validate_masked(ddp_model, val_loaders[val_leads[0]], lat, masked, device, cfg.train.bf16,
                                           cfg.train.seed))
            if mask_losses:
                metrics["train_mask_loss"] = float(np.mean(mask_losses))
            if objective.kind == "masked":
                metrics["val_loss"] = metrics["val_mask_loss"]
        # one number for schedulers (ASHA) and for comparing runs: the latitude-weighted RMSE in
        # units of each variable's standard deviation, averaged over variables and validation leads
        metrics["val_rmse"] = float(np.mean([metrics[f"val_rmse/{v}@{h:g}h"] / s
                                             for v, s in zip(val_out, std) for h in val_leads]))
        state.epoch = epoch + 1
        state.best_val_loss = min(state.best_val_loss, metrics["val_loss"])
        state.history.append({k: metrics[k] for k in ("epoch", "step", "train_loss", "val_loss")})
        elapsed = time.time() - start
        eta = elapsed / (epoch + 1 - first_epoch) * (cfg.train.epochs - epoch - 1)
        mask_part = f" mask {metrics['val_mask_loss']:.4f}" if masked is not None else ""
        rm = ", ".join(f"{v} {metrics[f'val_rmse/{v}@{val_leads[0]:g}h']:.3g}" for v in val_out[:4])
        log(f"epoch {epoch + 1}/{cfg.train.epochs} step {state.step}/{total_steps} loss {metrics['train_loss']:.4f} "
            f"val {metrics['val_loss']:.4f}{mask_part} rmse@{val_leads[0]:g}h [{rm}{', ...' if len(val_out) > 4 else ''}] "
            f"{metrics['samples_per_s']:.1f} samples/s ETA {_hms(eta)}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if fsdp:  # collective: every rank gathers, rank 0 writes the usual format
                save_sharded_train_state(tmp, ddp_model, optimizer, None, state, run_config=redact(cfg),
                                         in_vars=val_in, out_vars=val_out, metrics=metrics,
                                         **checkpoint_record(val_ds, [*val_in, *val_out], region))
            if rank == 0:
                if not fsdp:
                    save_train_state(tmp, ddp_model, optimizer, None, state, run_config=redact(cfg),
                                 in_vars=val_in, out_vars=val_out, metrics=metrics,
                                 **checkpoint_record(val_ds, [*val_in, *val_out], region))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ----------------------------------------------------------------------------- driver side
def storage(cfg: TrainConfig, filesystem_class=None):
    """(storage_path, pyarrow filesystem or None) for the RunConfig; ``filesystem_class`` (a
    ``pyarrow.fs.S3FileSystem`` subclass, default that class) builds the S3 filesystem."""
    if cfg.storage_path.startswith("s3://"):
        if not cfg.storage_options:
            return cfg.storage_path, None
        from pyarrow import fs

        opts = cfg.storage_options
        endpoint = opts.get("endpoint_url") or opts.get("client_kwargs", {}).get("endpoint_url")
        kwargs: dict[str, Any] = {}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host, scheme=scheme)
        if opts.get("key"):
            kwargs.update(access_key=opts["key"], secret_key=opts.get("secret"))
        return cfg.storage_path.removeprefix("s3://"), (filesystem_class or fs.S3FileSystem)(**kwargs)
    return str(Path(cfg.storage_path).expanduser().resolve()), None


def _stop_on_data_error_callback():
    """A ``ray.train.UserCallback`` that ends the run at the first worker error that retrying cannot
    fix (``climax.data.ShardReadError``: a corrupt shard), instead of ``max_failures`` restarts.

    Ray Train V2's failure policy retries every worker-group error up to ``max_failures`` and has no
    public way to mark one as final; a callback error, however, is a controller error, which it does
    not retry. So ``after_exception`` (run on the controller when workers fail, before the policy
    decides) raises the worker's own error for such failures; ``fit()`` then raises it at once."""
    from ray.train import UserCallback

    class StopOnDataError(UserCallback):
        def after_exception(self, run_context, worker_exceptions: dict) -> None:
            for rank, exc in sorted(worker_exceptions.items()):
                final = _final_error(exc)
                if final is not None:
                    raise final

    return StopOnDataError()


def _final_error(exc: BaseException) -> BaseException | None:
    """The non-retryable error (an exception with ``retryable = False``) inside Ray's wrappers, or None."""
    from climax.data import ShardReadError

    name = f"{ShardReadError.__module__}.{ShardReadError.__name__}: "
    seen = set()
    while isinstance(exc, BaseException) and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "retryable", True) is False:
            return exc
        # a wrapper that kept only the worker's traceback text: its last line names the error
        lines = str(exc).strip().splitlines()
        if lines and lines[-1].startswith(name):
            return ShardReadError(lines[-1][len(name):])
        exc = getattr(exc, "_base_exc", None) or getattr(exc, "cause", None) or exc.__cause__
    return None


def build_trainer(cfg: TrainConfig, callbacks: list | None = None):
    """The ``TorchTrainer`` of a run (``jobs.tune`` adds its ``TuneReportCallback``)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    # Ray Train workers run in their run folder: resolve local dataset roots on the driver
    for d in cfg.data.datasets + ([cfg.downscaling.coarse, cfg.downscaling.fine] if cfg.downscaling else []):
        if "://" not in d.root:
            d.root = str(Path(d.root).expanduser().resolve())
    if cfg.ckpt_statistics and "://" not in cfg.ckpt_statistics:
        cfg.ckpt_statistics = str(Path(cfg.ckpt_statistics).expanduser().resolve())

    from jobs.observability import callbacks as observability_callbacks

    path, filesystem = storage(cfg)
    scaling = ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                      accelerator_type=cfg.scaling.accelerator_type,
                                      resources_per_worker=cfg.scaling.resources_per_worker)
    run = ray.train.RunConfig(
        name=cfg.name, storage_path=path, storage_filesystem=filesystem,
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep,
                                                     checkpoint_score_attribute=cfg.checkpoint.score,
                                                     checkpoint_score_order="min"),
        callbacks=[*(callbacks or []), *observability_callbacks(cfg), _stop_on_data_error_callback()])
    return TorchTrainer(train_loop_per_worker, train_loop_config=cfg.model_dump(mode="json"),
                        scaling_config=scaling, run_config=run)


def fit(cfg: TrainConfig):
    """Build the TorchTrainer for ``cfg`` and run it; returns the ``ray.train.Result``."""
    return build_trainer(cfg).fit()


def main(argv: list[str] | None, doc: str, default_config: str) -> Any:
    import sys

    from jobs.common import error_line, init_ray, setup_logging
    from jobs.config import fail, parse_args

    cfg, _ = parse_args(TrainConfig, doc, argv if argv is not None else sys.argv[1:], default_config=default_config)
    if cfg.observability.mlflow_tracking_uri:
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            fail("observability.mlflow_tracking_uri is set but MLflow is not installed: pip install '.[observability]' "
                 "(or set observability.mlflow_tracking_uri=null)")
    setup_logging()
    init_ray()
    try:
        result = fit(cfg)
    except Exception as e:  # one clear line, non-zero exit
        fail(error_line(e), code=1)
    if result.error:
        fail(error_line(result.error), code=1)
    best = result.get_best_checkpoint(cfg.checkpoint.score, "min") if result.best_checkpoints else result.checkpoint
    m = result.metrics or {}
    print(f"run {cfg.name}: {m.get('step', 'no new')} steps, val_loss {m.get('val_loss', float('nan')):.4f}")
    print(f"last checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    print(f"best checkpoint: {best.path if best else None}")
    if cfg.task == "projection":
        from jobs.tasks.projection import after_fit

        try:
            after_fit(cfg, result)
        except Exception as e:
            fail(error_line(e), code=1)
    return result
