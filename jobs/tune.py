"""Hyperparameter campaigns for finetuning on Ray Tune: the best configuration, its checkpoint, a report.

    python -m jobs.tune configs/tune.yaml base.init_checkpoint=PATH [key=value ...]
    ray job submit --working-dir . -- python -m jobs.tune configs/tune.yaml base.init_checkpoint=PATH

``base`` is a finetuning configuration (``jobs.finetune``'s, a file and/or dotted-key overrides);
``search_space`` maps any of its keys, by dotted path, to a distribution:

    optim.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}
    optim.warmup_steps: {type: randint, low: 0, high: 1000}      # high exclusive
    model.drop_path: {type: uniform, low: 0.0, high: 0.2}
    data.leads.hours: {type: choice, values: [[24], [6, 24]]}
    freeze_backbone: {type: choice, values: [false, true]}

Every key and distribution is checked against the finetuning configuration before any Ray work
(exit 2 naming it). Each trial is a driver function that builds the ``TorchTrainer`` of
``jobs.finetune`` (same training function) with a ``TuneReportCallback``; ASHA stops poor trials
early on ``metric`` (validation latitude-weighted RMSE in units of each variable's standard
deviation); Optuna's TPE proposes configurations (``search: random`` or ``grid`` also work).

Written to ``output``: trials.csv and trials.parquet (one row per trial: configuration, best
validation RMSE per variable, epochs run, why it stopped), val_rmse_vs_epoch.png,
best_checkpoint/ (model.pt for ``jobs.evaluate``/``jobs.forecast``, train_state.pt, trial.json)
and summary.json; a summary is printed. Relaunching with the same ``name`` and ``storage_path``
resumes the campaign: finished trials are kept, unfinished ones continue from their last
checkpoint, errored ones get another try.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from climax.atomic import write_atomic
from climax.redact import redact, redact_text
from jobs.config import ConfigError, inner_model, fail, parse_args, validate
from jobs.train import ROOT, TrainConfig

DEFAULT_BASE = "configs/finetune/global.yaml"
#: keys the campaign sets for every trial (run name and storage are per trial)
RESERVED = ("name", "storage_path", "storage_options")
#: what a trial's driver function reserves (it runs no training itself)
DRIVER_MEMORY = 256 * 2**20
#: how often the driver frees what stopped trials' Ray Train runs hold (see reap_stopped_runs)
REAP_EVERY_S = 3.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Strict):
    """One search-space entry. loguniform/uniform: low..high; randint: integers low..high-1;
    choice: one of ``values`` (sampled); grid: every one of ``values`` (crossed with the rest)."""
    type: Literal["loguniform", "uniform", "randint", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self):
        t = self.type
        if t in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"{t} needs a non-empty `values` list")
            if self.low is not None or self.high is not None:
                raise ValueError(f"{t} takes `values`, not low/high")
            return self
        if self.values is not None:
            raise ValueError(f"{t} takes low/high, not `values`")
        if self.low is None or self.high is None:
            raise ValueError(f"{t} needs `low` and `high`")
        if not self.low < self.high:
            raise ValueError(f"{t} needs low < high (got low={self.low:g}, high={self.high:g})")
        if t == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (got low={self.low:g})")
        if t == "randint" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"randint needs integer bounds (got {self.low:g}, {self.high:g})")
        return self

    def candidates(self) -> list:
        """Representative values, each validated against the finetuning configuration."""
        if self.type in ("choice", "grid"):
            return list(self.values)
        if self.type == "randint":
            return [int(self.low), int(self.high) - 1]
        inside = self.low * (self.high / self.low) ** 0.37 if self.type == "loguniform" else \
            self.low + (self.high - self.low) * 0.37  # a fractional value: an integer key needs randint
        return [self.low, inside, self.high]


class SchedulerSpec(_Strict):
    type: Literal["asha", "fifo"] = Field("asha", description="asha: stop poor trials early; fifo: run every "
                                                               "trial to the end")
    grace_period: int = Field(1, gt=0, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2, gt=1, description="ASHA keeps 1/reduction_factor of the trials at each rung")
    max_t: int | None = Field(None, gt=0, description="epochs of a full trial (default: the base's train.epochs)")


class CampaignConfig(_Strict):
    name: str = Field("climax-tune", description="campaign name; relaunching with the same name resumes")
    storage_path: str = Field("~/climax_runs", description="campaign state and trial runs go to storage_path/name "
                                                          "(folder or s3://; shared storage on multi-node clusters)")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="s3 options for storage_path")
    base: str | dict[str, Any] = Field(DEFAULT_BASE, description="finetuning configuration: a YAML file, or a mapping "
                                       "{config: FILE, dotted.key: value, ...} of overrides (applied in order)")
    search_space: dict[str, Distribution] = Field(
        min_length=1, description="dotted key of the finetuning configuration -> {type: "
                                  "loguniform|uniform|randint|choice|grid, low, high | values}")
    search: Literal["optuna", "random", "grid"] = Field("optuna", description="optuna: TPE; random; grid: every "
                                                        "combination of the grid/choice entries")
    num_samples: int | None = Field(None, gt=0, description="trials (optuna, random; default 10); grid: repeats of the "
                                    "whole grid (default 1)")
    time_budget_s: float | None = Field(None, gt=0, description="stop the campaign after this many seconds "
                                                                "(counted per launch)")
    metric: str = Field("val_rmse", description="what is optimised: val_rmse (lat-weighted RMSE / std, mean over "
                        "variables and validation leads), val_loss, or one val_rmse/<var>@<lead>h")
    mode: Literal["min"] = Field("min", description="the metrics are errors: lower is better")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    max_concurrent_trials: Literal["auto"] | int = Field("auto", description="auto: the cluster's CPUs (GPUs) divided "
                                                         "by what one trial's workers need")
    trial_max_failures: int = Field(1, ge=0, description="retries of a failed trial (it resumes from its checkpoint)")
    seed: int | None = Field(0, description="seed of the search algorithm")
    output: str = Field("tune_output", description="local folder for the table, plot, best checkpoint and summary")

    @field_validator("search_space", mode="before")
    @classmethod
    def _flatten(cls, space):
        """Nested sections (``optim: {lr: {...}}``, or ``search_space.optim.lr=...`` on the command
        line) become dotted keys; a mapping with a ``type`` is a distribution."""
        if not isinstance(space, dict):
            return space
        flat: dict = {}
        for key, value in space.items():
            if isinstance(value, dict) and "type" not in value and value and \
                    all(isinstance(v, dict) for v in value.values()):
                for sub, dist in cls._flatten(value).items():
                    flat[f"{key}.{sub}"] = dist
            else:
                flat[key] = value
        return flat


# ----------------------------------------------------------------------------- configuration
def _read_yaml(path: str) -> dict:
    p = Path(path).expanduser()
    if not p.is_file() and not p.is_absolute() and (ROOT / p).is_file():
        p = ROOT / p
    if not p.is_file():
        raise ConfigError(f"base configuration file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"base configuration file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"base configuration file {path} must hold a mapping")
    return data


def set_key(cfg: dict, key: str, value: Any) -> dict:
    """Set ``key`` (dotted path) in ``cfg``; a mapping value merges into a mapping already there."""
    *path, last = key.split(".")
    node: Any = cfg
    for part in path:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{key!r}: {part!r} is not a section")
        if not isinstance(node.get(part), (dict, list)):
            node[part] = {}
        node = node[part]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif not isinstance(node, dict):
        raise ConfigError(f"{key!r}: the parent of {last!r} is not a section")
    elif isinstance(value, dict) and isinstance(node.get(last), dict):
        for k, v in value.items():
            set_key(node[last], k, v)
    else:
        node[last] = copy.deepcopy(value)
    return cfg


def base_config(base: str | dict) -> dict:
    """The base finetuning configuration as a mapping (not validated yet)."""
    if isinstance(base, str):
        return _read_yaml(base)
    base = dict(base)
    cfg = _read_yaml(base.pop("config")) if base.get("config") else {}
    base.pop("config", None)
    for key, value in base.items():
        set_key(cfg, key, value)
    return cfg


def _model_args() -> list[str]:
    from climax.model import ClimaX

    skip = {"self", "default_vars", "img_size"}  # set from the data
    return [p for p in inspect.signature(ClimaX.__init__).parameters if p not in skip]


def check_key(key: str) -> None:
    """Raise ConfigError unless ``key`` addresses a finetuning configuration value."""
    parts = key.split(".")
    if parts[0] in RESERVED:
        raise ConfigError(f"search_space key {key!r}: {parts[0]} is set by the campaign for each trial")
    if parts[0] == "model":
        args = _model_args()
        if len(parts) != 2 or parts[1] not in args:
            raise ConfigError(f"unknown search_space key {key!r}; model keys: {', '.join('model.' + a for a in args)}")
        return
    current: Any = TrainConfig
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "(top level)"
        if isinstance(current, type) and issubclass(current, BaseModel):
            if part not in current.model_fields:
                raise ConfigError(f"unknown search_space key {key!r}; allowed keys at {where}: "
                                  f"{', '.join(current.model_fields)}")
            annotation = current.model_fields[part].annotation
            inner = inner_model(annotation)
            if inner is None:
                origin = getattr(annotation, "__origin__", None)
                if origin is dict or "dict[" in str(annotation):
                    return  # free-form mapping (resources_per_worker, ...)
                if i != len(parts) - 1:
                    raise ConfigError(f"search_space key {key!r}: {'.'.join(parts[:i + 1])} is a value, not a section")
                return
            current = ("list", inner) if "list[" in str(annotation) else inner
        elif isinstance(current, tuple):  # a list of sections: an index, then the section's keys
            if not part.isdigit():
                raise ConfigError(f"search_space key {key!r}: {where} is a list; give an index ({where}.0. ...)")
            current = current[1]
        else:
            raise ConfigError(f"search_space key {key!r}: {where} is a value, not a section")
    if isinstance(current, tuple) or (isinstance(current, type) and issubclass(current, BaseModel)):
        raise ConfigError(f"search_space key {key!r} is a whole section; address one of its values")


def _is_plain(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


@dataclass
class Campaign:
    """A checked campaign: everything the driver and the trials need."""
    cfg: CampaignConfig
    base: dict                 # validated finetuning configuration (JSON-able)
    model_base: dict | None    # the model mapping that model.* keys are set in
    encoded: list[str]         # choice/grid keys whose values travel as JSON strings (lists, mappings)
    max_t: int
    storage: str               # Tune storage_path (local absolute or bucket/prefix)
    filesystem: Any            # pyarrow filesystem (None: from the path)
    runs_path: str             # storage_path of the trials' Ray Train runs
    output: Path
    num_samples: int
    extra: dict = field(default_factory=dict)

    @property
    def experiment(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.cfg.name}"


def trial_config(base: dict, params: dict, model_base: dict | None = None, encoded: list[str] = ()) -> dict:
    """The finetuning configuration of one trial: ``base`` with the sampled ``params`` set."""
    cfg = copy.deepcopy(base)
    for key, value in params.items():
        if key in encoded and isinstance(value, str):
            value = json.loads(value)
        if key.startswith("model."):
            if not isinstance(cfg.get("model"), dict):
                cfg["model"] = copy.deepcopy(model_base or {})
            cfg["model"][key.split(".", 1)[1]] = value
        else:
            set_key(cfg, key, value)
    return cfg


def _absolute_paths(cfg: dict) -> dict:
    """Relative local paths (data roots, init checkpoint, model file) made absolute from the
    driver's directory: Ray Train's workers run in their run's own folder."""
    def fix(path):
        if not isinstance(path, str) or "://" in path or Path(path).expanduser().is_absolute():
            return path
        full = Path(path).expanduser().resolve()
        return str(full) if full.exists() else path

    for ds in cfg["data"]["datasets"] + [cfg["downscaling"][k] for k in ("coarse", "fine") if cfg.get("downscaling")]:
        ds["root"] = fix(ds["root"])
    cfg["init_checkpoint"] = fix(cfg.get("init_checkpoint"))
    if isinstance(cfg.get("model"), str) and cfg["model"] != TrainConfig.model_fields["model"].default:
        cfg["model"] = fix(cfg["model"])
    return cfg


def _model_base(base: TrainConfig) -> dict:
    from climax.tasks import model_config

    if isinstance(base.model, dict):
        return dict(base.model)
    if base.init_checkpoint and base.model == TrainConfig.model_fields["model"].default:
        from climax.checkpoint import read_checkpoint

        _, meta, _ = read_checkpoint(base.init_checkpoint)
        if meta.get("model_config"):
            return {}  # the checkpoint's configuration, these keys on top
    return model_config(base)


def resolve(cfg: CampaignConfig) -> Campaign:
    """Check the base and every search-space key and distribution; raises ConfigError naming the problem."""
    from jobs.train import storage

    raw = base_config(cfg.base)
    base = validate(TrainConfig, raw, source="base configuration")
    space = cfg.search_space
    for key in space:
        check_key(key)
    if cfg.search == "optuna":
        bad = [k for k, d in space.items() if d.type == "grid"]
        if bad:
            raise ConfigError(f"search_space {bad[0]!r}: grid entries need search: grid or random (optuna samples; "
                              "use type: choice)")
    if cfg.search == "grid":
        bad = [k for k, d in space.items() if d.type not in ("grid", "choice")]
        if bad:
            raise ConfigError(f"search_space {bad[0]!r}: search: grid needs finite entries (grid or choice), "
                              f"not {space[bad[0]].type}")
    if "data.leads.hours" in space and not base.data.leads.val_hours:
        raise ConfigError("search_space 'data.leads.hours': set base data.leads.val_hours so that every trial is "
                          "scored at the same lead times")
    if not (cfg.metric in ("val_rmse", "val_loss") or cfg.metric.startswith("val_rmse/")):
        raise ConfigError(f"metric {cfg.metric!r}: use val_rmse, val_loss or val_rmse/<variable>@<lead>h")
    needs_model = any(k.startswith("model.") for k in space)
    try:
        model_base = _model_base(base) if needs_model else None
    except (OSError, ValueError) as e:
        raise ConfigError(f"base model configuration: {e}") from None
    encoded = [k for k, d in space.items() if d.values and not all(_is_plain(v) for v in d.values)]
    base_dump = _absolute_paths(base.model_dump(mode="json"))
    for key, dist in space.items():
        for value in dist.candidates():
            trial = trial_config(base_dump, {key: value}, model_base)
            try:
                validate(TrainConfig, trial, source=f"search_space {key!r} value {value!r}")
            except ConfigError as e:
                raise ConfigError(str(e)) from None
            if key.startswith("model."):
                _check_model_value(key, value, trial["model"])
    epochs = [base.train.epochs]
    if "train.epochs" in space:
        epochs = [int(v) for v in space["train.epochs"].candidates()]
    max_t = cfg.scheduler.max_t or max(epochs)
    if cfg.scheduler.type == "asha" and cfg.scheduler.grace_period > max_t:
        raise ConfigError(f"scheduler.grace_period {cfg.scheduler.grace_period} exceeds max_t {max_t} epochs")
    if "score" in base_dump["checkpoint"]:
        # each trial keeps its best checkpoints by the campaign's metric: the best one is always there to export
        base_dump["checkpoint"]["score"] = cfg.metric
    path, filesystem = storage(SimpleNamespace(storage_path=cfg.storage_path, storage_options=cfg.storage_options),
                               filesystem_class=_experiment_filesystem_class())
    s3 = cfg.storage_path.startswith("s3://")
    runs = (cfg.storage_path.rstrip("/") if s3 else path) + f"/{cfg.name}/runs"
    num = cfg.num_samples or (1 if cfg.search == "grid" else 10)
    return Campaign(cfg, base_dump, model_base, encoded, max_t, path, filesystem, runs,
                    Path(cfg.output).expanduser().resolve(), num)


def _experiment_filesystem_class():
    """``pyarrow.fs.S3FileSystem`` for the campaign's own storage, whose pickle holds no credentials.

    Tune pickles its ``RunConfig`` (``storage_filesystem`` included) into ``tuner.pkl`` in the
    experiment folder, and a pyarrow ``S3FileSystem`` pickles its access and secret keys: they would
    be stored in the bucket. This subclass pickles its options without them: ``tuner.pkl`` is only
    read on restore, which is handed a fresh filesystem (``build_tuner``). The trial actors, which
    receive a copy too, report metrics only (``TuneReportCallback``) and write nothing there; the
    trials' Ray Train runs have their own filesystem with the keys (``run_trial``). Not
    ``ray.util.register_serializer``: it changes Ray's cloudpickle globally, ``tuner.pkl`` included."""
    import pyarrow.fs

    global _ExperimentS3
    if _ExperimentS3 is None:
        class ExperimentS3(pyarrow.fs.S3FileSystem):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self._kwargs = kwargs

            def __reduce__(self):
                return _rebuild_experiment_fs, ({k: v for k, v in self._kwargs.items() if k not in _SECRET_KW},)

        ExperimentS3.__module__ = __name__
        ExperimentS3.__qualname__ = "_ExperimentS3"
        _ExperimentS3 = ExperimentS3
    return _ExperimentS3


_ExperimentS3 = None
_SECRET_KW = ("access_key", "secret_key", "session_token")


def _rebuild_experiment_fs(kwargs: dict):
    return _experiment_filesystem_class()(**kwargs)


def _check_model_value(key: str, value: Any, model: dict) -> None:
    arg = key.split(".", 1)[1]
    if arg in ("drop_path", "drop_rate") and not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise ConfigError(f"search_space {key!r} value {value!r}: a probability in [0, 1) is needed")
    if arg in ("embed_dim", "num_heads", "depth", "decoder_depth", "patch_size") and \
            not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ConfigError(f"search_space {key!r} value {value!r}: a positive integer is needed")


# ----------------------------------------------------------------------------- Ray side
def param_space(campaign: Campaign) -> dict:
    from ray import tune

    space = {}
    for key, d in campaign.cfg.search_space.items():
        values = [json.dumps(v) for v in d.values] if key in campaign.encoded else d.values
        if d.type == "loguniform":
            space[key] = tune.loguniform(d.low, d.high)
        elif d.type == "uniform":
            space[key] = tune.uniform(d.low, d.high)
        elif d.type == "randint":
            space[key] = tune.randint(int(d.low), int(d.high))
        elif d.type == "choice" and campaign.cfg.search != "grid":
            space[key] = tune.choice(values)
        else:
            space[key] = tune.grid_search(values)
    return space


def run_trial(config: dict, campaign: dict) -> None:
    """One trial: the finetuning ``TorchTrainer`` of ``config``, its reports forwarded to Tune.

    The Ray Train run is named after the trial, so a retried or resumed trial continues from its
    last checkpoint instead of starting again.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.train import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(campaign["base"], config, campaign["model_base"], campaign["encoded"])
    cfg.update(name=trial_id, storage_path=campaign["runs_path"], storage_options=campaign["storage_options"])
    build_trainer(TrainConfig.model_validate(cfg), callbacks=[TuneReportCallback()]).fit()


def max_concurrent(campaign: Campaign) -> int:
    """Trials at once: ``max_concurrent_trials``, or what the cluster's resources hold (auto)."""
    import ray

    n = campaign.cfg.max_concurrent_trials
    if n != "auto":
        return max(int(n), 1)
    sc = campaign.base["scaling"]
    per_worker = dict(sc.get("resources_per_worker") or {})
    per_worker.setdefault("CPU", 1)
    if sc.get("use_gpu"):
        per_worker.setdefault("GPU", 1)
    have = ray.cluster_resources()
    fits = [int(have.get(k, 0) // (v * sc["num_workers"])) for k, v in per_worker.items() if v > 0]
    return max(min(fits or [1]), 1)


# the campaign of this driver process: the log callback below is pickled with the Tune experiment
# and unpickled on resume, so it finds its file and budget here rather than in its own fields
_ACTIVE: dict[str, Any] = {}


def _fs(campaign: Campaign):
    import pyarrow.fs

    if campaign.filesystem is not None:
        return campaign.filesystem, campaign.experiment
    if campaign.experiment.startswith("s3://"):
        return pyarrow.fs.FileSystem.from_uri(campaign.experiment)
    return pyarrow.fs.LocalFileSystem(), campaign.experiment


def _ray_callback_base():
    from ray.tune import Callback

    return Callback


class CampaignLog(_ray_callback_base()):
    """One line per trial event, and a record of how often each trial started, its failures and
    why it stopped (the table's ``attempts``, ``failures`` and ``stop_reason``). The record is
    kept in Tune's own experiment checkpoint (``get_state``/``set_state``), so it survives a resume."""

    def __init__(self):
        self.state: dict = {"launches": 0, "trials": {}}

    def get_state(self) -> dict:
        return copy.deepcopy(self.state)

    def set_state(self, state: dict) -> None:
        self.state = copy.deepcopy(state)

    def setup(self, **info):
        _ACTIVE["log"] = self
        self.state["launches"] += 1
        self.start = time.time()
        self.total = info.get("total_num_samples") or info.get("num_samples")
        self.last_reap = 0.0

    def _reap(self, force: bool = False):
        if force or time.time() - self.last_reap > REAP_EVERY_S:
            self.last_reap = time.time()
            try:
                reap_stopped_runs()
            except Exception as e:  # best effort: never end a campaign over it
                print(f"[tune] could not free the resources of stopped trials: {e}", flush=True)

    def on_step_end(self, iteration, trials, **info):
        self._reap()

    def _rec(self, trial) -> dict:
        return self.state["trials"].setdefault(trial.trial_id, {"starts": 0, "failures": [], "stop_reason": None})

    def on_trial_start(self, iteration, trials, trial, **info):
        rec = self._rec(trial)
        rec["starts"] += 1
        rec["stop_reason"] = None
        print(f"[tune] trial {trial.trial_id} started (attempt {rec['starts']}): "
              f"{_short_config(trial.config)}", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        msg = _error_text(trial)
        self._rec(trial)["failures"].append(msg)
        print(f"[tune] trial {trial.trial_id} failed ({msg}); retrying from its last checkpoint", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        rec = self._rec(trial)
        msg = _error_text(trial)
        rec["failures"].append(msg)
        rec["stop_reason"] = f"error: {msg}"
        print(f"[tune] trial {trial.trial_id} failed for good after {rec['starts']} attempt(s): {msg}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        campaign: Campaign = _ACTIVE["campaign"]
        result = trial.last_result or {}
        epoch = int(result.get("epoch") or 0)
        planned = _planned_epochs(campaign, trial.config)
        budget = campaign.cfg.time_budget_s
        if epoch >= min(planned, campaign.max_t):
            reason = "completed"
        elif budget and time.time() - self.start >= budget - 1:
            reason = "time budget"
        elif campaign.cfg.scheduler.type == "asha":
            reason = "early stop (asha)"
        else:
            reason = "stopped"
        self._rec(trial)["stop_reason"] = reason
        done = sum(1 for r in self.state["trials"].values() if r["stop_reason"])
        metric = campaign.cfg.metric
        print(f"[tune] trial {trial.trial_id} {reason} at epoch {epoch}/{planned}: {metric} "
              f"{result.get(metric, float('nan')):.4g} ({done}/{self.total or '?'} trials done)", flush=True)


def reap_stopped_runs() -> int:
    """Free what the Ray Train runs of stopped trials still hold; returns the placement groups removed.

    When Tune stops a trial (ASHA, time budget, a failure) it kills the trial's actor, and with it
    the run's controller. Ray keeps a dead actor's placement groups until its job ends, and Ray
    Train's own cleaner (a detached actor per run) finds the controller's death through the
    dashboard's State API, which a minimal Ray install lacks (and which cannot pick a cluster when
    several run on one machine). The workers' CPUs would then stay reserved and the next trials
    wait for ever. So the campaign driver removes the placement groups created by dead Ray Train
    controllers of its own job, and ends their cleaners.
    """
    import ray
    # Private Ray API, kept on purpose while Ray is pinned (2.60): the public state API
    # (ray.util.state.list_placement_groups) does not report which actor created a placement group,
    # and that is how the groups of dead Train controllers of this job are told apart from live
    # ones. tests/test_tune.py's interrupted-and-resumed campaign breaks if Ray changes it.
    from ray._private.state import actors, state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    table = actors()
    dead = {aid: a for aid, a in table.items()
            if a["ActorClassName"] == "TrainController" and a["State"] == "DEAD" and a["JobID"] == job}
    if not dead:
        return 0
    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached or \
                pg.creator_actor_id.hex() not in dead:
            continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
        removed += 1
    # the detached cleaners of those runs now have nothing left to do; they live on this (the head)
    # node, where the driver of `ray job submit` runs, and exit on SIGTERM
    addresses = {(a["Address"]["IPAddress"], a["Address"]["Port"]) for a in dead.values()}
    node = ray.get_runtime_context().get_node_id()
    for a in table.values():
        if a["ActorClassName"] == "PlacementGroupCleaner" and a["State"] == "ALIVE" and a.get("Pid") and \
                a["Address"]["NodeID"] == node and \
                (a["OwnerAddress"]["IPAddress"], a["OwnerAddress"]["Port"]) in addresses:
            try:
                os.kill(int(a["Pid"]), signal.SIGTERM)
            except OSError:  # already gone
                pass
    return removed


def _asha_base():
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler


class CampaignASHA(_asha_base()):
    """ASHA that, on a resumed campaign, first replays the results reported before the
    interruption: Tune restores the searcher but not the scheduler, whose rungs would otherwise
    start empty and let the next trials through unchallenged."""

    def on_trial_add(self, tune_controller, trial):
        if not getattr(self, "_replayed", False):
            self._replayed = True
            for trial_id, df in (_ACTIVE.get("replay") or {}).items():
                stub = SimpleNamespace(trial_id=trial_id)  # ASHA keys its records by trial id
                super().on_trial_add(tune_controller, stub)
                for result in df[[self._time_attr, self._metric]].to_dict("records"):
                    super().on_trial_result(tune_controller, stub, result)
                super().on_trial_remove(tune_controller, stub)
        super().on_trial_add(tune_controller, trial)


def _short_config(config: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())


def _error_text(trial) -> str:
    """One line for the trial's latest error (the driver's copy first: storage is synced later)."""
    from ray import cloudpickle

    from jobs.common import error_line

    err = None
    local = getattr(trial, "pickled_error_file", None)
    try:
        if local and Path(local).is_file():
            err = cloudpickle.loads(Path(local).read_bytes())
        else:
            err = trial.get_pickled_error()
    except Exception:
        err = None
    if isinstance(err, BaseException):
        return error_line(err)[:300]
    text = ""
    try:
        text = (trial.get_error() or "").strip()
    except Exception:
        pass
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "unknown error"


def _planned_epochs(campaign: Campaign, config: dict) -> int:
    if "train.epochs" in config:
        return int(config["train.epochs"])
    return int(campaign.base["train"]["epochs"])


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def build_tuner(campaign: Campaign):
    """A new ``ray.tune.Tuner`` for the campaign, or the restored one when its state exists."""
    import ray.tune
    from ray.tune.schedulers import FIFOScheduler

    cfg = campaign.cfg
    trainable = ray.tune.with_parameters(run_trial, campaign={
        "base": campaign.base, "model_base": campaign.model_base, "encoded": campaign.encoded,
        "runs_path": campaign.runs_path, "storage_options": cfg.storage_options})
    # the trial's function only drives its TorchTrainer: no CPU (the workers get them all), some memory
    trainable = ray.tune.with_resources(trainable, {"cpu": 0, "memory": DRIVER_MEMORY})
    fs, exp = _fs(campaign)
    if ray.tune.Tuner.can_restore(exp, storage_filesystem=fs):
        print(f"resuming campaign {cfg.name!r} from {campaign.experiment}", flush=True)
        return ray.tune.Tuner.restore(exp, trainable=trainable, resume_errored=True, storage_filesystem=fs), True
    concurrent = campaign.extra["max_concurrent"]
    if cfg.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    else:  # Tune ignores max_concurrent_trials with a BasicVariantGenerator given: it takes its own
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg, concurrent = BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrent), None
    if cfg.scheduler.type == "asha":
        # max_t one epoch beyond the last: a trial that is not stopped early ends by returning from fit()
        # (its Ray Train run shuts down cleanly) rather than being stopped by ASHA at its last report
        scheduler = CampaignASHA(time_attr="epoch", max_t=campaign.max_t + (cfg.scheduler.max_t is None),
                                  grace_period=cfg.scheduler.grace_period,
                                  reduction_factor=cfg.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    tuner = ray.tune.Tuner(
        trainable, param_space=param_space(campaign),
        tune_config=ray.tune.TuneConfig(
            metric=cfg.metric, mode=cfg.mode, search_alg=search_alg, scheduler=scheduler,
            num_samples=campaign.num_samples, time_budget_s=cfg.time_budget_s,
            max_concurrent_trials=concurrent, trial_dirname_creator=_trial_dirname),
        run_config=ray.tune.RunConfig(
            name=cfg.name, storage_path=campaign.storage, storage_filesystem=campaign.filesystem,
            failure_config=ray.tune.FailureConfig(max_failures=cfg.trial_max_failures),
            callbacks=[CampaignLog()], verbose=1))
    return tuner, False


# ----------------------------------------------------------------------------- results
def collect(campaign: Campaign):
    """(table, histories): one row per trial; per trial the reported metrics by epoch."""
    import pandas as pd
    from ray.tune import ExperimentAnalysis

    cfg = campaign.cfg
    fs, exp = _fs(campaign)
    import logging

    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level, quiet.level = quiet.level, logging.ERROR  # trials not started yet have no results: expected
    try:
        analysis = ExperimentAnalysis(exp, storage_filesystem=fs, default_metric=cfg.metric, default_mode=cfg.mode)
    finally:
        quiet.setLevel(level)
    log = _ACTIVE["log"].state["trials"] if "log" in _ACTIVE else {}
    rows, histories = [], {}
    for trial in analysis.trials:
        df = analysis.trial_dataframes.get(trial.trial_id)
        rec = log.get(trial.trial_id, {})
        row: dict[str, Any] = {"trial_id": trial.trial_id, "status": trial.status}
        for key in cfg.search_space:
            value = trial.config.get(key)
            row[key] = json.dumps(json.loads(value)) if key in campaign.encoded and isinstance(value, str) else value
        if df is not None and len(df) and cfg.metric in df and "epoch" in df:
            df = df.dropna(subset=[cfg.metric]).drop_duplicates("epoch", keep="last").sort_values("epoch")
        else:
            df = None
        histories[trial.trial_id] = df
        if df is not None and len(df):
            best = df.loc[df[cfg.metric].idxmin() if cfg.mode == "min" else df[cfg.metric].idxmax()]
            row[cfg.metric] = float(best[cfg.metric])
            row["best_epoch"] = int(best["epoch"])
            row["epochs"] = int(df["epoch"].max())
            row["last_" + cfg.metric] = float(df[cfg.metric].iloc[-1])
            for col in df.columns:
                if col.startswith("val_rmse/") and col != cfg.metric:
                    row[col] = float(best[col])
            row["checkpoint"] = best.get("checkpoint_path")
        else:
            row.update({cfg.metric: math.nan, "best_epoch": 0, "epochs": 0})
        row["planned_epochs"] = min(_planned_epochs(campaign, trial.config), campaign.max_t)
        row["attempts"] = rec.get("starts", 0)
        row["failures"] = " | ".join(rec.get("failures", []))
        reason = rec.get("stop_reason")
        if trial.status == "ERROR":
            reason = reason if reason and reason.startswith("error") else f"error: {_error_text(trial)}"
        elif trial.status == "TERMINATED" and not reason:  # Tune's time budget stops trials without telling
            reason = "completed" if row["epochs"] >= row["planned_epochs"] else \
                "time budget" if cfg.time_budget_s else "stopped"
        elif trial.status in ("PENDING", "PAUSED", "RUNNING"):
            reason = "not finished" if row["epochs"] else "not started"
        row["stop_reason"] = reason
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table) and table[cfg.metric].notna().any():
        table = table.sort_values(cfg.metric, ascending=cfg.mode == "min", na_position="last", kind="stable")
    return table.reset_index(drop=True), histories


def planned_trials(campaign: Campaign) -> int:
    """Trials the campaign runs in all: num_samples, times the grid's size."""
    grid = 1
    for d in campaign.cfg.search_space.values():
        if d.type == "grid" or (d.type == "choice" and campaign.cfg.search == "grid"):
            grid *= len(d.values)
    return campaign.num_samples * grid


def plot_history(histories: dict, best_id: str | None, metric: str, path: Path) -> Path:
    from climax.plots import figure, save_figure

    fig = figure(7.5, 4.5)
    ax = fig.add_subplot()
    for tid, df in histories.items():
        if df is None or not len(df) or tid == best_id:
            continue
        ax.plot(df["epoch"], df[metric], color="tab:gray", alpha=0.6, marker="o", markersize=3, linewidth=1)
    if best_id is not None and histories.get(best_id) is not None:
        df = histories[best_id]
        ax.plot(df["epoch"], df[metric], color="tab:red", marker="o", linewidth=2.5, label=f"best: {best_id}")
        ax.legend()
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against epoch, every trial (grey), the best highlighted")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def export_checkpoint(campaign: Campaign, history, out: Path) -> tuple[str, dict]:
    """Copy the best checkpoint of one trial (by the metric, among those its run kept) to ``out``;
    returns its source path and the metrics stored in it."""
    import shutil

    import pyarrow.fs
    import torch

    fs, _ = _fs(campaign)
    metric = campaign.cfg.metric
    rows = history.dropna(subset=["checkpoint_path"]).sort_values(metric, kind="stable") \
        if "checkpoint_path" in history else history.iloc[:0]
    for path in rows["checkpoint_path"]:
        if fs.get_file_info(f"{path}/model.pt").type == pyarrow.fs.FileType.File:
            break
    else:
        raise RuntimeError(f"no checkpoint of the best trial is left (searched {len(rows)} reported ones)")
    local = pyarrow.fs.LocalFileSystem()
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    local.create_dir(str(tmp))
    pyarrow.fs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=local)
    metrics = torch.load(tmp / "model.pt", map_location="cpu", weights_only=True).get("metrics") or {}
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return path, metrics


def write_report(campaign: Campaign, table, histories, interrupted: bool = False) -> dict:
    import io

    cfg = campaign.cfg
    out = campaign.output
    out.mkdir(parents=True, exist_ok=True)
    if interrupted:  # the trials this launch left unfinished say so
        unfinished = table["status"].isin(["PENDING", "RUNNING", "PAUSED"])
        table.loc[unfinished, "stop_reason"] = "interrupted"
    # error texts and paths may quote an endpoint URL: no credentials in the report (climax.redact)
    for col in ("failures", "stop_reason", "checkpoint"):
        if col in table:
            table[col] = table[col].map(lambda v: redact_text(v) if isinstance(v, str) else v)
    # every file of the report is written whole or not at all (temporary name, then rename)
    write_atomic(out / "trials.csv", table.to_csv(index=False))
    # object columns (lead-time sets, reasons, paths) as strings, missing values as nulls
    buf = io.BytesIO()
    table.astype({c: "string" for c in table.columns if table[c].dtype == object}).to_parquet(buf, index=False)
    write_atomic(out / "trials.parquet", buf.getvalue())
    scored = table[table[cfg.metric].notna()]
    best = scored.iloc[0].to_dict() if len(scored) else None
    plot = plot_history(histories, best["trial_id"] if best else None, cfg.metric,
                        out / f"{cfg.metric.replace('/', '_')}_vs_epoch.png")
    summary: dict[str, Any] = {
        "campaign": cfg.name, "experiment": campaign.experiment, "metric": cfg.metric, "mode": cfg.mode,
        "trials": int(len(table)), "finished": int((table["status"] == "TERMINATED").sum()),
        "errored": int((table["status"] == "ERROR").sum()),
        "early_stopped": int(table["stop_reason"].astype(str).str.startswith("early stop").sum()),
        "planned": planned_trials(campaign),
        "unfinished": int(table["status"].isin(["PENDING", "RUNNING", "PAUSED"]).sum()),
        "interrupted": bool(interrupted),
        "errored_trials": table.loc[table["status"] == "ERROR", "trial_id"].astype(str).tolist(),
        "table": str(out / "trials.csv"), "parquet": str(out / "trials.parquet"), "plot": str(plot)}
    if best:
        ckpt_dir = out / "best_checkpoint"
        source, metrics = export_checkpoint(campaign, histories[best["trial_id"]], ckpt_dir)
        params = {k: best[k] for k in cfg.search_space}
        doc = {"trial_id": best["trial_id"], "metric": cfg.metric, "value": float(metrics[cfg.metric]),
               "epoch": int(metrics["epoch"]), "params": params, "source": str(source),
               "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
               "config": trial_config(campaign.base, {k: best[k] for k in cfg.search_space},
                                      campaign.model_base, campaign.encoded)}
        write_atomic(ckpt_dir / "trial.json", json.dumps(redact(doc), indent=1, default=str))
        summary.update(best_trial=best["trial_id"], best_value=doc["value"], best_epoch=doc["epoch"],
                       best_params=params, best_checkpoint=str(ckpt_dir))
    write_atomic(out / "summary.json", json.dumps(redact(summary), indent=1, default=str))
    return summary


def print_summary(summary: dict, table) -> None:
    import pandas as pd

    metric = summary["metric"]
    cols = ["trial_id", "status", metric, "best_epoch", "epochs", "attempts", "stop_reason"]
    params = list(summary.get("best_params", {}))
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_colwidth", 40):
        print("\n" + table[[c for c in cols[:3] + params + cols[3:] if c in table]].to_string(
            index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"\ncampaign {summary['campaign']}: {summary['trials']} trials ({summary['finished']} finished, of which "
          f"{summary['early_stopped']} stopped early by ASHA; {summary['errored']} errored)")
    missing = summary["unfinished"] + max(summary["planned"] - summary["trials"], 0)
    if missing:
        why = "interrupted" if summary.get("interrupted") else "out of time budget"
        print(f"{missing} of {summary['planned']} trials not finished ({why}): relaunch the same command to resume")
    if "best_trial" in summary:
        print(f"best: trial {summary['best_trial']}, {metric} {summary['best_value']:.4g} at epoch "
              f"{summary['best_epoch']}; " + _short_config(summary["best_params"]))
        print(f"best checkpoint: {summary['best_checkpoint']}")
    print(f"table: {summary['table']} (and {Path(summary['parquet']).name}); plot: {summary['plot']}")


def run(campaign: Campaign) -> dict:
    """Run (or resume) the campaign on the connected Ray cluster and write the report."""
    campaign.extra["max_concurrent"] = max_concurrent(campaign)
    _ACTIVE["campaign"] = campaign
    tuner, resumed = build_tuner(campaign)
    if resumed:
        _ACTIVE["replay"] = {k: v for k, v in collect(campaign)[1].items() if v is not None and len(v)}
    else:
        print(f"campaign {campaign.cfg.name!r}: {planned_trials(campaign)} trials, search {campaign.cfg.search}, "
              f"scheduler {campaign.cfg.scheduler.type}, up to {campaign.extra['max_concurrent']} at once, "
              f"at most {campaign.max_t} epoch(s) each; state in {campaign.experiment}", flush=True)
    t0 = time.time()
    tuner.fit()
    table, histories = collect(campaign)
    # trials left unfinished without the time budget running out: the launch was interrupted (Tune
    # stops gracefully on SIGINT/SIGTERM and fit() returns normally)
    budget = campaign.cfg.time_budget_s
    missing = int(table["status"].isin(["PENDING", "RUNNING", "PAUSED"]).sum()) + \
        max(planned_trials(campaign) - len(table), 0) if len(table) else planned_trials(campaign)
    interrupted = bool(missing) and not (budget and time.time() - t0 >= budget - 1)
    summary = write_report(campaign, table, histories, interrupted=interrupted)
    print_summary(summary, table)
    return summary


def exit_status(summary: dict) -> tuple[int, str | None]:
    """(status, message) of a finished launch: 0 when every trial ran; 1 when a trial errored; 130
    (as for SIGINT) when the campaign was interrupted with trials left."""
    if summary.get("interrupted"):
        return 130, (f"campaign {summary['campaign']} interrupted; the table marks the unfinished trials "
                     f"'interrupted' ({summary['table']}); relaunch the same command to resume")
    if summary.get("errored"):
        ids = ", ".join(summary.get("errored_trials") or [])
        return 1, (f"{summary['errored']} of {summary['trials']} trials errored ({ids}); their error is in the "
                   f"stop_reason column of {summary['table']}; relaunch the same command to retry them")
    return 0, None


def main(argv: list[str] | None = None) -> dict:
    """``python -m jobs.tune CONFIG [key=value ...]``; returns the summary (also in output/summary.json)."""
    from jobs.common import error_line, init_ray, setup_logging

    cfg, _ = parse_args(CampaignConfig, __doc__, argv if argv is not None else sys.argv[1:],
                        default_config="configs/tune.yaml")
    try:
        campaign = resolve(cfg)
    except ConfigError as e:
        fail(str(e))
    setup_logging()
    import logging

    # Tune's TensorBoard logger renames every "val_rmse/<var>@<h>h" metric ('@' is not allowed in
    # TensorBoard tags) with one warning per metric and trial; the renamed tags are fine.
    logging.getLogger("tensorboardX.summary").setLevel(logging.ERROR)
    init_ray()
    try:
        summary = run(campaign)
    except Exception as e:  # one clear line, non-zero exit
        fail(error_line(e), code=1)
    code, message = exit_status(summary)
    if code:
        fail(message, code=code)
    return summary


if __name__ == "__main__":
    # run from the module's real name: the Tune experiment pickles this module's callback and
    # trainable by reference, and ``__main__`` objects would not restore in a later launch
    from jobs import tune

    tune.main(sys.argv[1:])
