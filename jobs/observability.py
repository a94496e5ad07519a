"""Training metrics to TensorBoard and MLflow through Ray Train's callbacks.

Ray Train V2 refuses Ray Tune's logger callbacks (``TBXLoggerCallback``, ``MLflowLoggerCallback``:
"All callbacks must be instances of `ray.train.UserCallback`", ray-project/ray#49454); its own
callback interface is ``ray.train.UserCallback``, whose ``after_report`` runs in the Train
controller (on the node of the job driver) after every ``ray.train.report``. The two callbacks
here log rank 0's metrics of each report (one per training epoch: train_loss, lr, samples_per_s,
val_loss, val_rmse, val_rmse/<var>_<lead>h, val_persistence_rmse/...: ``@`` becomes ``_``, which
neither allows) at the optimiser step:

- ``TensorBoardCallback``: event files through tensorboardX (installed with Ray Tune), in
  ``<storage_path>/<name>/tensorboard`` by default, local or ``s3://`` (boto3, the instance
  profile; ``S3_ENDPOINT`` for another endpoint). View with ``tensorboard --logdir ...`` (the
  ``observability`` extra installs TensorBoard).
- ``MLflowCallback``: one MLflow run per training run (a relaunch with the same name continues it),
  the flattened configuration as parameters.
  Needs ``pip install '.[observability]'`` (mlflow-skinny).

A logging failure never stops training: it is reported once and that logger switches off.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any

from ray.train import UserCallback

from climax.redact import redact

log = logging.getLogger("jobs.observability")

SKIP = {"epoch", "step"}


def scalars(metrics: dict) -> dict[str, float]:
    """The finite numeric metrics of one report, without the counters."""
    out = {}
    for k, v in metrics.items():
        if k in SKIP or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[k] = float(v)
    return out


class _SafeCallback(UserCallback):
    """Disables itself after the first failure, with one warning."""

    name = "logger"

    def __init__(self) -> None:
        self._failed = False

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if self._failed or not metrics or not metrics[0]:
            return
        try:
            self.log(run_context, metrics[0])
        except Exception as e:  # noqa: BLE001 - observability must not stop training
            self._failed = True
            log.warning("%s logging switched off after an error: %s: %s", self.name, type(e).__name__, e)

    def log(self, run_context, metrics: dict) -> None:
        raise NotImplementedError

    def __getstate__(self) -> dict:  # open writers and clients stay behind
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_client")}


class TensorBoardCallback(_SafeCallback):
    name = "TensorBoard"

    def __init__(self, logdir: str) -> None:
        super().__init__()
        self.logdir = logdir

    def log(self, run_context, metrics: dict) -> None:
        # One small event file per report, closed at once: tensorboardX's flush() does not wait for
        # its writer thread, and a report comes only once per training epoch. TensorBoard merges them.
        from tensorboardX import SummaryWriter

        step = int(metrics.get("step", 0))
        writer = SummaryWriter(self.logdir, filename_suffix=f".step{step}")
        try:
            for k, v in scalars(metrics).items():
                writer.add_scalar(safe_key(k), v, global_step=step)
        finally:
            writer.close()


def safe_key(key: str) -> str:
    """Letters, digits and ``_ - . /`` only, as TensorBoard tags and MLflow metric names require:
    ``val_rmse/2m_temperature@6h`` becomes ``val_rmse/2m_temperature_6h``."""
    return re.sub(r"[^\w\-./]", "_", key)


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(d, dict):
        out: dict[str, str] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): str(d)[:500]}


class MLflowCallback(_SafeCallback):
    name = "MLflow"

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, params: dict,
                 epochs: int | None = None) -> None:
        super().__init__()
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.params, self.epochs = params, epochs
        self._client = None
        self._client_run = None

    def _start(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        exp = client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(self.experiment)
        found = client.search_runs([exp_id], filter_string=f"tags.climax_run = '{self.run_name}'",
                                   max_results=1, order_by=["attributes.start_time DESC"])
        if found:  # a relaunch with the same name resumes: continue its MLflow run
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = client.create_run(exp_id, run_name=self.run_name, tags={"climax_run": self.run_name}).info.run_id
            for k, v in flatten(self.params).items():
                client.log_param(run_id, k, v)
        self._client, self._client_run = client, run_id

    def log(self, run_context, metrics: dict) -> None:
        from mlflow.entities import Metric

        if getattr(self, "_client", None) is None:
            self._start()
        step, now = int(metrics.get("step", 0)), int(time.time() * 1000)
        self._client.log_batch(self._client_run, metrics=[Metric(safe_key(k), v, now, step)
                                                          for k, v in scalars(metrics).items()])
        if self.epochs is not None and metrics.get("epoch") == self.epochs:
            self._client.set_terminated(self._client_run, "FINISHED")


def callbacks(cfg) -> list[UserCallback]:
    """The callbacks that ``cfg.observability`` (a ``jobs.train_config.TrainConfig``) asks for."""
    obs = cfg.observability
    out: list[UserCallback] = []
    if obs.tensorboard:
        logdir = obs.tensorboard_dir
        if logdir is None and cfg.storage_path.startswith("s3://") and cfg.storage_options:
            # tensorboardX reaches S3 with boto3's defaults only: not another endpoint or explicit keys
            log.info("TensorBoard: off (storage_path has its own storage_options); set "
                     "observability.tensorboard_dir to a local folder to write event files")
        else:
            out.append(TensorBoardCallback(logdir or f"{run_dir(cfg)}/tensorboard"))
    if obs.mlflow_tracking_uri:
        out.append(MLflowCallback(obs.mlflow_tracking_uri, obs.mlflow_experiment, cfg.name,
                                  redact(cfg), cfg.train.epochs))  # parameters without credentials
    return out


def run_dir(cfg) -> str:
    from pathlib import Path

    if cfg.storage_path.startswith("s3://"):
        return f"{cfg.storage_path.rstrip('/')}/{cfg.name}"
    return str(Path(cfg.storage_path).expanduser().resolve() / cfg.name)
