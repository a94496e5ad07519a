"""The training configuration (``python -m jobs.pretrain`` / ``jobs.finetune``): ``TrainConfig`` and its
sections, validated before Ray starts.

The loop and the tasks (``climax.loop``, ``climax/tasks/``) read it by attribute; a task's own
section (``projection:``, ``downscaling:``) is defined in its file, the objective in
``jobs/objective.py`` and the model in ``climax.config.ModelConfig`` (``model:`` names a YAML file
or holds an inline mapping, checked here; ``climax.tasks.model_config`` resolves it on the worker).
"Did the user set ``model``" is ``"model" in cfg.model_fields_set``, so ``jobs.train`` ships the
configuration to the workers with ``exclude_unset=True``.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from climax.config import DEFAULT_MODEL, ROOT, resolve_model_config
from climax.tasks import get_task, task_names
from climax.tasks.downscaling import DownscalingSpec
from climax.tasks.projection import ProjectionSpec
from jobs.config import fail, parse_args
from jobs.objective import ObjectiveSpec

__all__ = ["DatasetSpec", "LeadConfig", "DataConfig", "OptimConfig", "LoopConfig", "ScalingSpec", "CheckpointSpec",
           "ObservabilitySpec", "TrainConfig", "parse", "ROOT"]


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
    rollout_steps: int = Field(1, ge=1, description="rollout finetuning: train on k autoregressive steps at the one "
                                                    "fixed lead (data.leads.hours: [L]), each prediction the next "
                                                    "input, loss averaged over the steps (1: one step)")
    rollout_truncate: int = Field(0, ge=0, description="rollout finetuning: detach the fed-back input every N steps "
                                                       "(0: gradients through the whole chain; 1: through none)")


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
    model: str | dict[str, Any] = Field(DEFAULT_MODEL, description="model YAML or inline mapping "
                                                                  "(climax.config.ModelConfig); default_vars default "
                                                                  "to the data's")
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

    @field_validator("model")
    @classmethod
    def _model_keys(cls, v: str | dict[str, Any]) -> str | dict[str, Any]:
        if isinstance(v, dict):  # checked now (one line naming a bad key), kept as given; a file is read on the worker
            try:
                resolve_model_config(v)
            except ValueError as e:
                raise ValueError(str(e).removeprefix("model configuration: ")) from None
        return v

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
    def _rollout_at_one_lead(self) -> TrainConfig:
        k = self.train.rollout_steps
        if k > 1 and self.task != "forecast":
            raise ValueError(f"train.rollout_steps={k} rolls out the forecast task; task {self.task!r} trains on "
                             "one step: set train.rollout_steps=1")
        leads = self.data.leads
        if k > 1 and (leads.random or len(leads.hours) != 1):
            got = "random leads (data.leads.random=true)" if leads.random else f"data.leads.hours={leads.hours}"
            raise ValueError(f"train.rollout_steps={k} trains on a rollout at one fixed lead, got {got}: set "
                             "data.leads.random=false and data.leads.hours to a single lead (e.g. [6]), or "
                             "train.rollout_steps=1")
        if k > 1 and len(self.data.history_hours) > 1:
            raise ValueError(f"train.rollout_steps={k} feeds each prediction back as the one next input; with "
                             f"data.history_hours={self.data.history_hours} set train.rollout_steps=1 or "
                             "data.history_hours=[0]")
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


def parse(argv: list[str], doc: str, default_config: str) -> TrainConfig:
    """The validated configuration of ``python -m jobs.pretrain|finetune [CONFIG.yaml] [key=value ...]``;
    a bad key, value or file exits with status 2 and one ``error:`` line."""
    cfg, _ = parse_args(TrainConfig, doc, argv, default_config=default_config)
    if cfg.observability.mlflow_tracking_uri:
        if importlib.util.find_spec("mlflow") is None:
            fail("observability.mlflow_tracking_uri is set but MLflow is not installed: pip install '.[observability]' "
                 "(or set observability.mlflow_tracking_uri=null)")
    return cfg
