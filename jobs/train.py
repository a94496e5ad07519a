"""Training on Ray Train (Train V2): the Ray wiring of ``climax.loop``.

``jobs.pretrain`` and ``jobs.finetune`` are this module with different defaults; the configuration
is ``jobs.train_config.TrainConfig``. The loop and every task are plain PyTorch (``climax.loop``,
``climax/tasks/``: forecast, projection, downscaling, found by ``task:``); Ray only adds the worker
group, DDP, checkpoint storage and restarts:

- ``ScalingConfig(num_workers, use_gpu, resources_per_worker)`` from ``scaling``;
- each worker runs ``climax.loop.train`` with Ray's rank and device, ``prepare_model`` (DDP) as its
  wrapper, the checkpoint Ray hands back to resume from, and ``ray.train.report`` as its reporter;
  ``CheckpointConfig(num_to_keep, checkpoint_score_attribute="val_loss", "min")`` keeps the best;
- ``FailureConfig(max_failures)``: a lost worker restarts the group from the last checkpoint;
- a relaunch with the same ``name`` and ``storage_path`` resumes (step counter, schedule, data
  order: epoch e always reads the same batches).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from ray.train import UserCallback
from ray.train.torch import TorchTrainer

from climax.data import ShardReadError
from climax.loop import Worker, train
from climax.storage import arrow_s3
from climax.tasks import get_task
from jobs.common import error_line, final_error, init_ray, setup_logging
from jobs.config import fail
from jobs.observability import callbacks as observability_callbacks
from jobs.train_config import ROOT, DatasetSpec, TrainConfig, parse

__all__ = ["TrainConfig", "DatasetSpec", "ROOT", "train_loop_per_worker", "storage", "build_trainer", "fit", "main"]


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


def _prepare(model, *, find_unused_parameters: bool):
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
    ``pyarrow.fs.S3FileSystem`` subclass, default that class) builds the S3 filesystem from the
    storage_options (``climax.storage.arrow_s3``)."""
    if cfg.storage_path.startswith("s3://"):
        if not cfg.storage_options:
            return cfg.storage_path, None
        return cfg.storage_path.removeprefix("s3://"), arrow_s3(cfg.storage_options, filesystem_class, strict=False)
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
            for _rank, exc in sorted(worker_exceptions.items()):
                final = final_error(exc, ShardReadError)
                if final is not None:
                    raise final

    return StopOnDataError()


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
    # exclude_unset: the workers' TrainConfig knows which keys the user set (``model``: see climax.config)
    return TorchTrainer(train_loop_per_worker, train_loop_config=cfg.model_dump(mode="json", exclude_unset=True),
                        scaling_config=scaling, run_config=run)


def fit(cfg: TrainConfig):
    """Build the TorchTrainer for ``cfg`` and run it; returns the ``ray.train.Result``."""
    return build_trainer(cfg).fit()


def main(argv: list[str] | None, doc: str, default_config: str) -> Any:
    cfg = parse(argv if argv is not None else sys.argv[1:], doc, default_config)
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
