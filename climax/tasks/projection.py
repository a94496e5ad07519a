"""Climate projection (ClimateBench): the task, its data windows, and its evaluation.

    python -m jobs.finetune configs/finetune/projection.yaml [init_checkpoint=PATH] [key=value ...]
    python -m jobs.evaluate configs/evaluate.yaml checkpoint=RUN/checkpoint_... data=SHARDS/ssp245 output=DIR

Training (``climax.loop`` with this task's hooks; on Ray Train through ``jobs.finetune``): each
ClimateBench scenario (a dataset that ``jobs.preprocess`` built with
``configs/recipes/climatebench.yaml``, one row per year) is read whole into memory; a sample is the
window of ``projection.history`` years of forcing ending at a target year. A seeded
``projection.val_fraction`` of the training windows is held out for validation. The loss is the
latitude-weighted MSE of the normalised targets; every epoch reports ``val_rmse/<var>`` in physical
units (with the linear baseline's beside it) and a checkpoint (``model.pt`` + ``train_state.pt``, as
the forecast task), so restarts and relaunches resume.

When the run ends, the driver evaluates the best checkpoint on ``projection.test`` (ssp245) over
``projection.test_years`` (2080-2100): ClimateBench's NRMSE (spatial, global, total) and the
latitude-weighted RMSE per variable for the model and for the baseline (a linear regression of each
grid point on the global-mean forcings) in ``metrics.csv``, and ``maps_<var>.png``: the truth's
2080-2100 mean and the model's and the baseline's mean error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from climax.checkpoint import load_checkpoint, read_checkpoint
from climax.data import ShardDataset
from climax.loop import Loaders
from climax.metrics import lat_weighted_mse
from climax.model import ClimaX
from climax.plots import plot_projection_maps
from climax.projection import (
    LinearBaseline,
    ProjectionModel,
    climatebench_nrmse,
    freeze_projection,
    load_scenario,
    window_targets,
    windows,
)
from climax.redact import without_redacted
from climax.storage import write_atomic
from climax.tasks import Task, model_config
from climax.training import MODEL_FILE, TrainState, autocast, freeze_backbone, read_train_state, unwrap

__all__ = ["ProjectionSpec", "ProjectionTask", "TASK", "Normalizer", "WindowLoader", "variables", "training_samples",
           "build_model", "predict", "load_state", "load_projection", "evaluate", "evaluate_run", "after_fit"]

DEFAULT_IN_VARS = ["CO2", "CH4", "SO2", "BC"]
DEFAULT_OUT_VARS = ["tas", "diurnal_temperature_range", "pr", "pr90"]


class ProjectionSpec(BaseModel):
    """The ``projection:`` section of a training configuration (``task: projection``)."""

    model_config = ConfigDict(extra="forbid")

    history: int = Field(10, gt=0, description="years of forcing per sample (the window ends at the target year)")
    test: str | None = Field(None, description="the held-out scenario's dataset (ssp245), evaluated after training")
    test_storage_options: dict[str, Any] = Field(default_factory=dict, description="s3 options for `test`")
    test_years: tuple[int, int] = Field((2080, 2100), description="target years scored on the test scenario")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="seeded share of training windows held out")
    historical_end: int | None = Field(2014, description="last historical year: targets up to it are taken only "
                                                        "from scenarios that end by then (the ssp datasets carry the "
                                                        "historical years as their first windows' inputs); null: all")
    freeze_blocks: bool = Field(True, description="freeze the backbone's transformer blocks")
    train_block_norms: bool = Field(True, description="with freeze_blocks: keep the blocks' LayerNorms trainable")
    output: str | None = Field(None, description="evaluation folder (local); default <storage_path>/<name>/evaluation")


# ----------------------------------------------------------------------------- data and model
def variables(cfg, dataset) -> tuple[list[str], list[str]]:
    """(forcings, targets) of a projection run: ``data.in_vars`` / ``data.out_vars`` or the
    ClimateBench defaults the dataset has."""
    have = set(dataset.variables) | set(dataset.constants)
    in_vars = list(cfg.data.in_vars or [v for v in DEFAULT_IN_VARS if v in have])
    out_vars = list(cfg.data.out_vars or [v for v in DEFAULT_OUT_VARS if v in have])
    missing = [v for v in in_vars + out_vars if v not in have]
    if missing or not in_vars or not out_vars:
        raise ValueError(f"dataset {dataset.name!r} ({dataset.root}) lacks {missing or 'forcings or targets'}; it has "
                         f"{sorted(have)}. A projection run needs ClimateBench shards "
                         "(configs/recipes/climatebench.yaml) or data.in_vars / data.out_vars that the dataset has")
    return in_vars, out_vars


def training_samples(scenarios: list, history: int, historical_end: int | None) -> list[tuple[int, int]]:
    """(scenario index, target index) of every training window; a historical target year is taken only
    from the scenarios that end by ``historical_end`` (no duplicates from the ssp datasets)."""
    out = []
    for k, s in enumerate(scenarios):
        first = None
        if historical_end is not None and s.years[-1] > historical_end:
            first = historical_end + 1
        out += [(k, int(t)) for t in window_targets(s.years, history, first=first)]
    return out


def build_model(cfg, in_vars: list[str], out_vars: list[str], grid: tuple[int, int], log=print):
    """The projection model: a backbone from the model config or ``init_checkpoint`` (a forecast
    checkpoint: blocks and norms loaded, token/variable embeddings fresh; or a projection checkpoint:
    everything loaded)."""
    spec = cfg.projection or ProjectionSpec()
    meta: dict = {}
    state = None
    if cfg.init_checkpoint:
        state, meta, _ = read_checkpoint(cfg.init_checkpoint)
    mc = meta.get("model_config") or {}
    if mc.get("task") == "projection":  # continue from a projection run
        model = ProjectionModel.from_config(mc)
        if model.out_vars != out_vars or list(model.backbone.default_vars) != in_vars or \
                tuple(model.backbone.img_size) != tuple(grid):
            raise ValueError(f"{cfg.init_checkpoint}: a projection checkpoint for {model.backbone.default_vars} -> "
                             f"{model.out_vars} on {model.backbone.img_size}; this run has {in_vars} -> {out_vars} "
                             f"on {list(grid)}")
        model.load_state_dict(state, strict=True)
        log(f"loaded the projection checkpoint {cfg.init_checkpoint}")
        return model
    # a forecast checkpoint's history neck is left out: the years are this task's time axis
    mcfg = model_config(cfg, mc).model_copy(update={"default_vars": list(in_vars), "img_size": tuple(grid),
                                                    "history_hours": None})
    backbone = ClimaX.from_config(mcfg)
    if cfg.init_checkpoint:
        report = load_checkpoint(backbone, cfg.init_checkpoint, ckpt_vars=cfg.ckpt_vars)
        log(f"loaded {cfg.init_checkpoint} into the backbone:\n{report}")
    model = ProjectionModel(backbone, out_vars, spec.history)
    if cfg.init_checkpoint:
        with torch.no_grad():
            model.reset_embeddings()
        log("token and variable embeddings initialised afresh for the forcings; forecasting head dropped")
    return model


class Normalizer:
    """Per-variable mean and standard deviation over every year of the training scenarios."""

    def __init__(self, arrays: list[np.ndarray]):
        a = np.concatenate([x.astype(np.float64) for x in arrays])  # (N, V, H, W)
        self.mean = a.mean(axis=(0, 2, 3))
        std = a.std(axis=(0, 2, 3))
        self.std = np.where(std > 0, std, 1.0)

    def __call__(self, x: np.ndarray, axis: int = -3) -> np.ndarray:
        shape = [1] * x.ndim
        shape[axis] = -1
        return ((x - self.mean.reshape(shape)) / self.std.reshape(shape)).astype(np.float32)

    def inverse(self, x: np.ndarray, axis: int = -3) -> np.ndarray:
        shape = [1] * x.ndim
        shape[axis] = -1
        return (x * self.std.reshape(shape) + self.mean.reshape(shape)).astype(np.float32)

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        n = cls.__new__(cls)
        n.mean, n.std = np.asarray(d["mean"], np.float64), np.asarray(d["std"], np.float64)
        return n


def predict(model, x_windows: np.ndarray, in_vars: list[str], xnorm: Normalizer, ynorm: Normalizer,
            device=None, batch_size: int = 16) -> np.ndarray:
    """Physical-unit predictions (N, V_out, H, W) for raw forcing windows (N, T, V_in, H, W)."""
    m = unwrap(model)
    device = device or next(m.parameters()).device
    was = m.training
    m.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x_windows), batch_size):
            xb = torch.from_numpy(xnorm(x_windows[i:i + batch_size])).to(device)
            out.append(m(xb, in_vars).float().cpu().numpy())
    m.train(was)
    return ynorm.inverse(np.concatenate(out)) if out else np.empty((0,), np.float32)



def load_state(directory, model, optimizer=None):
    """Restore a projection run's weights (strictly), optimiser and counters from a checkpoint folder."""
    payload = torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True)
    unwrap(model).load_state_dict(payload["state_dict"], strict=True)
    state = read_train_state(directory)  # weights_only=True: a planted pickle is refused
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return TrainState(**state["state"])


def load_projection(checkpoint: str | Path):
    """(model, in_vars, out_vars, x Normalizer, y Normalizer) from a run checkpoint folder or its model.pt."""
    path = Path(checkpoint)
    path = path / "model.pt" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: no model.pt; give a projection run's checkpoint folder")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    mc = payload.get("model_config") or {}
    if mc.get("task") != "projection" or "projection" not in payload:
        raise ValueError(f"{path} is not a projection checkpoint (model_config task {mc.get('task')!r}); "
                         "give a checkpoint of a `task: projection` run")
    model = ProjectionModel.from_config(mc)
    model.load_state_dict(payload["state_dict"], strict=True)
    model.eval()
    p = payload["projection"]
    return model, list(payload["in_vars"]), list(payload["out_vars"]), Normalizer.from_dict(p["x_norm"]), \
        Normalizer.from_dict(p["y_norm"])



# ----------------------------------------------------------------------------- task
class WindowLoader:
    """Training batches of forcing windows for one worker: ``len()`` batches per pass; pass ``k`` of
    training epoch ``e`` (``set_epoch(e * m + k)``, m passes per epoch as ``climax.loop.stream``
    counts them) reads this rank's share of a permutation seeded by (seed, e, k)."""

    def __init__(self, task: ProjectionTask, samples: list, batch_size: int, steps_per_epoch: int):
        w = task.worker
        self.task, self.samples, self.batch_size = task, samples, batch_size
        self.rank, self.per_worker = w.rank, len(samples) // w.world
        self.steps_per_pass = self.per_worker // batch_size
        self.passes = math.ceil(steps_per_epoch / max(self.steps_per_pass, 1))
        self.epoch, self.k = 0, 0

    def __len__(self) -> int:
        return self.steps_per_pass

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.k = divmod(epoch, self.passes)

    def __iter__(self):
        t, bs = self.task, self.batch_size
        perm = np.random.default_rng([t.cfg.train.seed, self.epoch, self.k]).permutation(len(self.samples))
        mine = perm[self.rank * self.per_worker:(self.rank + 1) * self.per_worker]
        for b in range(self.steps_per_pass):
            x, y = t.batch_of([self.samples[i] for i in mine[b * bs:(b + 1) * bs]])
            yield torch.from_numpy(t.xnorm(x)), torch.from_numpy(t.ynorm(y))


class ProjectionTask(Task):
    name = "projection"

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if not cfg.data.datasets:
            raise ValueError(f"data.datasets needs at least one dataset (task {cfg.task})")

    @classmethod
    def after_fit(cls, cfg: Any, result: Any, log=print) -> Any:
        return after_fit(cfg, result, log)

    @classmethod
    def evaluate(cls, cfg: Any, log=print) -> Any:
        """``jobs.evaluate`` on a projection checkpoint: the ClimateBench table and maps."""
        return evaluate_run(cfg.checkpoint, cfg.data, cfg.output, cfg.storage_options or None, log=log)

    # ------------------------------------------------------------------ model and data
    def build_model(self) -> nn.Module:
        cfg = self.cfg
        self.spec = spec = cfg.projection or ProjectionSpec()
        self.datasets = datasets = [ShardDataset(d.root, d.storage_options, name=d.name, verify=d.verify)
                                      for d in cfg.data.datasets]
        self.in_vars, self.out_vars = variables(cfg, datasets[0])
        self.grid = grid = datasets[0].shape
        for ds in datasets[1:]:
            if ds.shape != grid:
                raise ValueError(f"dataset {ds.name} is on a {ds.shape} grid, {datasets[0].name} on {grid}; "
                                 "preprocess every scenario with the same grid")
        model = build_model(cfg, self.in_vars, self.out_vars, grid, log=self.log)
        self.frozen = freeze_projection(model, blocks=spec.freeze_blocks, block_norms_trainable=spec.train_block_norms)
        if cfg.freeze_backbone:
            self.frozen += [f"backbone.{n}" for n in freeze_backbone(model.backbone)]
        return model

    def make_loaders(self, model: nn.Module) -> Loaders:
        cfg, spec, w = self.cfg, self.spec, self.worker
        self.scenarios = scenarios = [load_scenario(ds, self.in_vars, self.out_vars) for ds in self.datasets]
        self.lat = lat = self.datasets[0].lat
        samples = training_samples(scenarios, spec.history, spec.historical_end)
        order = np.random.default_rng(cfg.train.seed).permutation(len(samples))
        n_val = int(round(spec.val_fraction * len(samples))) if spec.val_fraction > 0 else 0
        self.val_samples = [samples[i] for i in sorted(order[:n_val])]
        self.train_samples = train_samples = [samples[i] for i in order[n_val:]]
        steps_per_pass = len(train_samples) // w.world // cfg.data.batch_size
        if steps_per_pass <= 0:
            raise ValueError(f"{len(train_samples)} training windows of {spec.history} years give no batch of "
                             f"{cfg.data.batch_size} per worker with {w.world} workers; lower data.batch_size")
        steps_per_epoch = cfg.train.steps_per_epoch or steps_per_pass
        self.xnorm = Normalizer([s.x for s in scenarios])
        self.ynorm = Normalizer([s.y for s in scenarios])
        # the baseline on the same windows, for the per-epoch line (cheap: a least-squares fit)
        xs_tr, ys_tr = self.batch_of(train_samples)
        self.baseline = LinearBaseline(lat).fit(xs_tr[:, -1], ys_tr)
        del xs_tr, ys_tr
        val = self.batch_of(self.val_samples) if self.val_samples else None
        self.lat_t = torch.as_tensor(np.asarray(lat), dtype=torch.float32, device=w.device)
        return Loaders(WindowLoader(self, train_samples, cfg.data.batch_size, steps_per_epoch), val, steps_per_epoch)

    def batch_of(self, pairs: list) -> tuple[np.ndarray, np.ndarray]:
        h, sc = self.spec.history, self.scenarios
        return np.stack([sc[k].x[t - h + 1:t + 1] for k, t in pairs]), np.stack([sc[k].y[t] for k, t in pairs])

    def find_unused_parameters(self, model: nn.Module) -> bool:
        return bool(self.frozen)

    def describe(self, model: nn.Module, loaders: Loaders) -> str:
        cfg, w, spec = self.cfg, self.worker, self.spec
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return (f"projection: {self.in_vars} -> {self.out_vars} on {list(self.grid)}, {spec.history}-year windows; "
                f"{len(self.train_samples)} training / {len(self.val_samples)} validation windows from "
                f"{', '.join(s.name for s in self.scenarios)}; {n_params / 1e6:.2f} M parameters "
                f"({n_train / 1e6:.2f} M trained, {len(self.frozen)} tensors frozen); "
                f"{w.world} worker(s) on {w.device}; "
                f"{loaders.steps_per_epoch} steps per epoch x {cfg.train.epochs} epochs, batch {cfg.data.batch_size} "
                "per worker")

    # ------------------------------------------------------------------ steps
    def loss(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, str | None]:
        device = self.worker.device
        xb, yb = batch[0].to(device), batch[1].to(device)
        model.train()
        with autocast(device, bf16=self.cfg.train.bf16):
            pred = model(xb, self.in_vars)
        return lat_weighted_mse(pred.float(), yb, self.lat_t), None

    def validate(self, model: nn.Module, val: Any, train_metrics: dict) -> dict[str, float]:
        if val is None:
            return {"val_loss": train_metrics["train_loss"]}
        val_x, val_y = val  # every rank scores the same small validation set
        lat, out_vars, ynorm = self.lat, self.out_vars, self.ynorm
        pv = predict(model, val_x, self.in_vars, self.xnorm, ynorm, self.worker.device)
        pb = self.baseline.predict(val_x[:, -1])
        metrics = {"val_loss": float(lat_weighted_mse(torch.from_numpy(ynorm(pv)), torch.from_numpy(ynorm(val_y)),
                                                      torch.as_tensor(np.array(lat))))}
        for j, v in enumerate(out_vars):
            metrics[f"val_rmse/{v}"] = climatebench_nrmse(pv[:, j], val_y[:, j], lat)["rmse"]
            metrics[f"val_baseline_rmse/{v}"] = climatebench_nrmse(pb[:, j], val_y[:, j], lat)["rmse"]
        metrics["val_rmse"] = float(np.mean([metrics[f"val_rmse/{v}"] / s for v, s in zip(out_vars, ynorm.std)]))
        return metrics

    def summary(self, metrics: dict) -> str:
        rm = ", ".join(f"{v} {metrics[f'val_rmse/{v}']:.3g} (baseline {metrics[f'val_baseline_rmse/{v}']:.3g})"
                       for v in self.out_vars[:4]) if self.val_samples else ""
        return f" rmse [{rm}]"

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_extras(self) -> dict[str, Any]:
        return {**super().checkpoint_extras(), "in_vars": self.in_vars, "out_vars": self.out_vars,
                "projection": {"x_norm": self.xnorm.to_dict(), "y_norm": self.ynorm.to_dict(),
                               "lat": [float(v) for v in self.lat],
                               "lon": [float(v) for v in self.datasets[0].lon]}}

    def load_state(self, directory: str, module: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
        return load_state(directory, module, optimizer)


# ----------------------------------------------------------------------------- evaluation (driver side)
def evaluate(checkpoint: str | Path, test_root: str, train_roots: list[str], output: str | Path,
             test_years: tuple[int, int] = (2080, 2100), storage_options: dict | None = None,
             train_storage_options: list[dict] | None = None, historical_end: int | None = 2014, log=print):
    """Score a projection checkpoint on the test scenario; returns the metrics table (DataFrame).

    Writes ``metrics.csv`` (method, variable, units, nrmse_s, nrmse_g, nrmse, rmse, years) for the
    model and the linear baseline (fitted on ``train_roots``' windows, the same samples the model
    trained on), ``predictions.npz`` and ``maps_<variable>.png``.
    """
    model, in_vars, out_vars, xnorm, ynorm = load_projection(checkpoint)
    history = model.history
    test_ds = ShardDataset(test_root, storage_options)
    test = load_scenario(test_ds, in_vars, out_vars)
    targets = window_targets(test.years, history, first=test_years[0], last=test_years[1])
    if not len(targets):
        raise ValueError(f"test dataset {test_root} has no {history}-year window ending in "
                         f"{test_years[0]}..{test_years[1]} (its years: {test.years[0]}..{test.years[-1]}); "
                         "check projection.test_years")
    xw = windows(test.x, targets, history)
    truth = test.y[targets]
    pred = predict(model, xw, in_vars, xnorm, ynorm)
    train = [load_scenario(ShardDataset(r, (train_storage_options or [{}] * len(train_roots))[i]), in_vars, out_vars)
             for i, r in enumerate(train_roots)]
    samples = training_samples(train, history, historical_end)
    baseline = LinearBaseline(test.lat).fit(np.stack([train[k].x[t] for k, t in samples]),
                                            np.stack([train[k].y[t] for k, t in samples]))
    base = baseline.predict(test.x[targets])
    units = {v: test_ds.manifest.raw["variables"].get(v, {}).get("units", "") for v in out_vars}
    rows = []
    for method, p in (("climax", pred), ("linear_baseline", base)):
        for j, v in enumerate(out_vars):
            rows.append({"method": method, "variable": v, "units": units[v],
                         **climatebench_nrmse(p[:, j], truth[:, j], test.lat),
                         "years": f"{int(test.years[targets[0]])}-{int(test.years[targets[-1]])}"})
    df = pd.DataFrame(rows)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "metrics.csv", df.to_csv(index=False))
    np.savez(out / "predictions.npz", years=test.years[targets], prediction=pred, baseline=base, truth=truth,
             lat=test.lat, lon=test.lon, variables=np.array(out_vars))
    span = f"{int(test.years[targets[0]])}-{int(test.years[targets[-1]])}"
    for j, v in enumerate(out_vars):
        plot_projection_maps(pred[:, j].mean(0), base[:, j].mean(0), truth[:, j].mean(0), test.lat, test.lon,
              out / f"maps_{v}.png", v, units[v], span)
    log(f"projection on {test_ds.name} {span} ({len(targets)} years), written to {out}:")
    log(df.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    return df


def after_fit(cfg, result, log=print):
    """Driver side, after ``jobs.finetune``: evaluate the best checkpoint on ``projection.test``."""
    spec = cfg.projection or ProjectionSpec()
    if not spec.test:
        log("projection.test is not set: no evaluation (later: python -m jobs.evaluate configs/evaluate.yaml "
            "checkpoint=RUN/checkpoint_... data=SHARDS/ssp245)")
        return None
    best = result.get_best_checkpoint(cfg.checkpoint.score, "min") if result.best_checkpoints else result.checkpoint
    if best is None:
        return None
    output = spec.output or (str(Path(cfg.storage_path).expanduser() / cfg.name / "evaluation")
                             if "://" not in cfg.storage_path else None)
    if output is None:
        log("set projection.output (a local folder) to evaluate a run stored on s3://")
        return None
    with best.as_directory() as d:
        return evaluate(d, spec.test, [ds.root for ds in cfg.data.datasets], output, spec.test_years,
                        spec.test_storage_options, [ds.storage_options for ds in cfg.data.datasets],
                        spec.historical_end, log=log)


def evaluate_run(checkpoint: str | Path, test_root: str, output: str | Path, storage_options: dict | None = None,
                 log=print):
    """``jobs.evaluate`` on a projection checkpoint: the test scenario ``test_root`` (``data=``), the
    test years and the training scenarios (for the baseline) from the run's recorded configuration."""
    path = Path(checkpoint)
    payload = torch.load(path / "model.pt" if path.is_dir() else path, map_location="cpu", weights_only=True)
    run = payload.get("run_config") or {}
    spec = ProjectionSpec.model_validate(run.get("projection") or {})
    datasets = (run.get("data") or {}).get("datasets") or []
    if not datasets:
        raise ValueError(f"{checkpoint}: the run configuration records no training datasets (needed for the baseline)")
    return evaluate(checkpoint, test_root, [d["root"] for d in datasets], output, spec.test_years, storage_options,
                    # stored redacted: the keys left (endpoint, ...) plus the environment's credentials
                    [without_redacted(d.get("storage_options") or {}) for d in datasets], spec.historical_end,
                    log=log)


TASK = ProjectionTask
