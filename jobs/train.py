"""Training on Ray Train (Train V2): the configuration and the Ray wiring of ``climax.loop``.

``jobs.pretrain`` and ``jobs.finetune`` are this module with different defaults. The loop and every
task are plain PyTorch (``climax.loop``, ``climax/tasks/``: forecast, projection, downscaling, found
by ``task:``); Ray only adds the worker group, DDP, checkpoint storage and restarts:

- ``ScalingConfig(num_workers, use_gpu, resources_per_worker)`` from ``scaling``;
- each worker runs ``climax.loop.train`` with Ray's rank and device, ``prepare_model`` (DDP) as its
  wrapper, the checkpoint Ray hands back to resume from, and ``ray.train.report`` as its reporter;
  ``CheckpointConfig(num_to_keep, checkpoint_score_attribute="val_loss", "min")`` keeps the best;
- ``FailureConfig(max_failures)``: a lost worker restarts the group from the last checkpoint;
- a relaunch with the same ``name`` and ``storage_path`` resumes (step counter, schedule, data
  order: epoch e always reads the same batches).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any, Literal

import ray.train
import ray.train.torch
import torch
from pyarrow import fs
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray.train import UserCallback
from ray.train.torch import TorchTrainer

from climax.data import ShardReadError
from climax.loop import Worker, train
from climax.tasks import get_task, task_names
from climax.tasks.downscaling import DownscalingSpec
from climax.tasks.projection import ProjectionSpec
from jobs.common import error_line, init_ray, setup_logging
from jobs.config import fail, parse_args
from jobs.objective import ObjectiveSpec
from jobs.observability import callbacks as observability_callbacks

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
    history_hours: list[float] = Field(default_factory=lambda: [0.0], description=(
        "input times in hours relative to the initial time, oldest first, ending at 0, multiples of the data's "
        "step (e.g. [-12, -6, 0]): a time neck merges them before the backbone (forecast task); [0]: one input"))
    prefetch: int = 2
    cache_mb: float = Field(1024, ge=0, description="per worker and split: keep decoded rows when the split's "
                                                    "needed variables fit in this many MiB (0: never)")
    shuffle: Literal["auto", "global", "block"] = Field(
        "auto", description="training order: global (any sample beside any other; ~2 rows decoded per sample "
                            "when rows are not kept), block (seeded blocks of contiguous time, samples shuffled "
                            "within windows of blocks: each row decoded about once per epoch), auto: global when "
                            "the split fits cache_mb, else block")
    @field_validator("history_hours")
    @classmethod
    def _history(cls, v: list[float]) -> list[float]:
        from climax.sampling import check_history

        return check_history(v, what="data.history_hours")

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
    task: str = Field("forecast", description="a module of climax/tasks/: forecast (global/regional), projection "
                                              "(ClimateBench) or downscaling")
    projection: ProjectionSpec | None = Field(None, description="task: projection (climax/tasks/projection.py)")
    downscaling: DownscalingSpec | None = Field(None, description="task: downscaling (climax/tasks/downscaling.py)")
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        if v not in task_names():
            raise ValueError(f"unknown task {v!r}; one of {task_names()}")
        return v

    @model_validator(mode="after")
    def _task_sections(self) -> TrainConfig:
        get_task(self.task).check_config(self)
        return self

    @model_validator(mode="after")
    def _objective_for_forecasting(self) -> TrainConfig:
        if self.objective.uses_masking and self.task != "forecast":
            raise ValueError(f"objective.kind={self.objective.kind} pretrains the forecast task; "
                             f"task {self.task!r} trains with objective.kind=forecast")
        if len(self.data.history_hours) > 1:
            if self.task != "forecast":
                raise ValueError(f"data.history_hours feeds several input times to the forecast task; task "
                                 f"{self.task!r} takes data.history_hours=[0]")
            if self.objective.uses_masking:
                raise ValueError(f"objective.kind={self.objective.kind} reconstructs one input time; use "
                                 "data.history_hours=[0] with it, or objective.kind=forecast")
        return self


# ----------------------------------------------------------------------------- worker side
def _quiet_report_log() -> None:
    """Ray Train V2 logs every ``ray.train.report`` with the whole metrics dict (a screenful per epoch
    with per-variable RMSEs); our own one-line epoch summary says the same. Errors still show."""
    try:
        # Private module, on purpose: Train V2 names this logger by the module's file path and offers no
        # public switch for its per-report dump. Only the log level depends on it; if Ray moves the
        # module, the ImportError below leaves the default logging (no test depends on it).
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class _RayReporter:
    """``climax.loop.Reporter`` for Ray Train: each epoch's metrics and (rank 0) checkpoint folder."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


def _restore(load):
    """The resumed state from the checkpoint Ray Train hands back after a failure or a relaunch with
    the same name (``load(directory)``), or None on a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None
    with checkpoint.as_directory() as d:
        return load(d)


def _prepare(model, find_unused_parameters: bool):
    return ray.train.torch.prepare_model(model, move_to_device=False,
                                         parallel_strategy_kwargs={"find_unused_parameters": find_unused_parameters})


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: the task's loop (``climax.loop.train``) with Ray's rank, device,
    checkpoint, DDP and reports."""
    cfg = TrainConfig.model_validate(config)
    _quiet_report_log()
    ctx = ray.train.get_context()
    worker = Worker.of(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
    torch.manual_seed(cfg.train.seed)
    train(get_task(cfg.task)(cfg, worker), _RayReporter(), restore=_restore, wrap=_prepare)


# ----------------------------------------------------------------------------- driver side
def storage(cfg: TrainConfig, filesystem_class=None):
    """(storage_path, pyarrow filesystem or None) for the RunConfig; ``filesystem_class`` (a
    ``pyarrow.fs.S3FileSystem`` subclass, default that class) builds the S3 filesystem."""
    if cfg.storage_path.startswith("s3://"):
        if not cfg.storage_options:
            return cfg.storage_path, None
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


def _stop_on_data_error_callback() -> UserCallback:
    """A ``ray.train.UserCallback`` that ends the run at the first worker error that retrying cannot
    fix (``climax.data.ShardReadError``: a corrupt shard), instead of ``max_failures`` restarts.

    Ray Train V2's failure policy retries every worker-group error up to ``max_failures`` and has no
    public way to mark one as final; a callback error, however, is a controller error, which it does
    not retry. So ``after_exception`` (run on the controller when workers fail, before the policy
    decides) raises the worker's own error for such failures; ``fit()`` then raises it at once."""

    # Defined in here, not at module level: cloudpickle then ships the class by value, so the Train
    # controller needs no importable jobs.train of the same version (a cluster started elsewhere).
    class StopOnDataError(UserCallback):
        def after_exception(self, run_context, worker_exceptions: dict) -> None:
            for rank, exc in sorted(worker_exceptions.items()):
                final = _final_error(exc)
                if final is not None:
                    raise final

    return StopOnDataError()


def _final_error(exc: BaseException) -> BaseException | None:
    """The non-retryable error (an exception with ``retryable = False``) inside Ray's wrappers, or None."""
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
    # Ray Train workers run in their run folder: resolve local dataset roots on the driver
    for d in get_task(cfg.task).local_roots(cfg):
        if "://" not in d.root:
            d.root = str(Path(d.root).expanduser().resolve())
    if cfg.ckpt_statistics and "://" not in cfg.ckpt_statistics:
        cfg.ckpt_statistics = str(Path(cfg.ckpt_statistics).expanduser().resolve())
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
    cfg, _ = parse_args(TrainConfig, doc, argv if argv is not None else sys.argv[1:], default_config=default_config)
    if cfg.observability.mlflow_tracking_uri:
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
    try:
        get_task(cfg.task).after_fit(cfg, result)
    except Exception as e:
        fail(error_line(e), code=1)
    return result
