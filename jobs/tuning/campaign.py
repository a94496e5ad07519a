"""A campaign's configuration, checked: the search space against the finetuning configuration.

``CampaignConfig`` is what ``configs/tune.yaml`` holds; :func:`resolve` checks the base finetuning
configuration and every search-space key and distribution before any Ray work (``ConfigError``
naming the problem) and returns the :class:`Campaign` that the Tune runtime (``jobs.tuning.runtime``)
and the report (``jobs.tuning.report``) use. Nothing here imports Ray.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from climax.config import ModelConfig, resolve_model_config
from jobs.config import ConfigError, inner_model, validate
from jobs.train_config import ROOT, TrainConfig

DEFAULT_BASE = "configs/finetune/global.yaml"
#: keys the campaign sets for every trial (run name and storage are per trial)
RESERVED = ("name", "storage_path", "storage_options")


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
    skip = {"default_vars", "img_size"}  # set from the data
    return [p for p in ModelConfig.model_fields if p not in skip]


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
    if isinstance(cfg.get("model"), str):
        cfg["model"] = fix(cfg["model"])
    return cfg


def _model_base(base: TrainConfig) -> dict:
    """The mapping a trial's ``model.*`` keys are set in: the keys of the base's model (its YAML file or
    mapping), or none when the base names no model and its init checkpoint records one (the trial's
    keys then go on top of the checkpoint's: ``climax.config.run_model_config``)."""
    if "model" not in base.model_fields_set and base.init_checkpoint:
        from climax.checkpoint import read_checkpoint

        _, meta, _ = read_checkpoint(base.init_checkpoint)
        if meta.get("model_config"):
            return {}
    return resolve_model_config(base.model).user_keys()


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
    base_dump = base.model_dump(mode="json")
    if "model" not in base.model_fields_set:  # trials know it unset (with init_checkpoint: the checkpoint's model)
        del base_dump["model"]
    base_dump = _absolute_paths(base_dump)
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
                return rebuild_experiment_fs, ({k: v for k, v in self._kwargs.items() if k not in _SECRET_KW},)

        ExperimentS3.__module__ = __name__
        ExperimentS3.__qualname__ = "_ExperimentS3"
        _ExperimentS3 = ExperimentS3
    return _ExperimentS3


_ExperimentS3 = None
_SECRET_KW = ("access_key", "secret_key", "session_token")


def rebuild_experiment_fs(kwargs: dict):
    return _experiment_filesystem_class()(**kwargs)


def _check_model_value(key: str, value: Any, model: dict) -> None:
    arg = key.split(".", 1)[1]
    if arg in ("drop_path", "drop_rate") and not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise ConfigError(f"search_space {key!r} value {value!r}: a probability in [0, 1) is needed")
    if arg in ("embed_dim", "num_heads", "depth", "decoder_depth", "patch_size") and \
            not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ConfigError(f"search_space {key!r} value {value!r}: a positive integer is needed")


def planned_trials(campaign: Campaign) -> int:
    """Trials the campaign runs in all: num_samples, times the grid's size."""
    grid = 1
    for d in campaign.cfg.search_space.values():
        if d.type == "grid" or (d.type == "choice" and campaign.cfg.search == "grid"):
            grid *= len(d.values)
    return campaign.num_samples * grid

def planned_epochs(campaign: Campaign, config: dict) -> int:
    if "train.epochs" in config:
        return int(config["train.epochs"])
    return int(campaign.base["train"]["epochs"])


def short_config(config: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())
