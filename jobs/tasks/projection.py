"""Climate projection (ClimateBench) finetuning on Ray Train, and its evaluation.

    python -m jobs.finetune configs/finetune/projection.yaml [init_checkpoint=PATH] [key=value ...]
    python -m jobs.evaluate configs/evaluate.yaml checkpoint=RUN/checkpoint_... data=SHARDS/ssp245 output=DIR

``jobs.finetune`` with ``task: projection`` runs :func:`projection_loop` in every Ray Train worker
(dispatched from ``jobs.train.train_loop_per_worker``): each ClimateBench scenario (a dataset that
``jobs.preprocess`` built with ``configs/recipes/climatebench.yaml``, one row per year) is read
whole into memory; a sample is the window of ``projection.history`` years of forcing ending at a
target year. A seeded ``projection.val_fraction`` of the training windows is held out for
validation. The loss is the latitude-weighted MSE of the normalised targets; every epoch reports
``val_rmse/<var>`` in physical units (with the linear baseline's beside it) and a checkpoint
(``model.pt`` + ``train_state.pt``, as the forecast task), so restarts and relaunches resume.

When the run ends, the driver evaluates the best checkpoint on ``projection.test`` (ssp245) over
``projection.test_years`` (2080-2100): ClimateBench's NRMSE (spatial, global, total) and the
latitude-weighted RMSE per variable for the model and for the baseline (a linear regression of each
grid point on the global-mean forcings) in ``metrics.csv``, and ``maps_<var>.png``: the truth's
2080-2100 mean and the model's and the baseline's mean error.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from climax.atomic import write_atomic
from climax.redact import redact, without_redacted

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


# ----------------------------------------------------------------------------- shared helpers
def variables(cfg, dataset) -> tuple[list[str], list[str]]:
    """(forcings, targets) of a projection run: ``data.in_vars`` / ``data.out_vars`` or the
    ClimateBench defaults the dataset has."""
    have = set(dataset.variables) | set(dataset.constants)
    in_vars = list(cfg.data.in_vars or [v for v in DEFAULT_IN_VARS if v in have])
    out_vars = list(cfg.data.out_vars or [v for v in DEFAULT_OUT_VARS if v in have])
    missing = [v for v in in_vars + out_vars if v not in have]
    if missing or not in_vars or not out_vars:
        raise ValueError(f"dataset {dataset.name!r} ({dataset.root}) lacks {missing or 'forcings or targets'}; it has "
                         f"{sorted(have)}. A projection run needs ClimateBench shards (configs/recipes/climatebench.yaml) "
                         "or data.in_vars / data.out_vars that the dataset has")
    return in_vars, out_vars


def training_samples(scenarios: list, history: int, historical_end: int | None) -> list[tuple[int, int]]:
    """(scenario index, target index) of every training window; a historical target year is taken only
    from the scenarios that end by ``historical_end`` (no duplicates from the ssp datasets)."""
    from climax.projection import window_targets

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
    import torch

    from climax import ClimaX
    from climax.checkpoint import load_checkpoint, read_checkpoint
    from climax.projection import ProjectionModel
    from jobs.train import TrainConfig, _model_config

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
    user = _model_config(cfg) if not (cfg.init_checkpoint and cfg.model == TrainConfig.model_fields["model"].default) \
        else {}
    mcfg = {**mc, **{k: v for k, v in user.items() if k != "default_vars"}} if mc else dict(user or _model_config(cfg))
    mcfg.update(default_vars=list(in_vars), img_size=list(grid))
    backbone = ClimaX(**mcfg)
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
    import torch

    from climax.training import unwrap

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


# ----------------------------------------------------------------------------- worker side
def projection_loop(cfg) -> None:
    """The per-worker training function of ``task: projection`` (see the module docstring)."""
    import ray.train
    import ray.train.torch
    import torch

    from climax.data import ShardDataset
    from climax.metrics import lat_weighted_mse
    from climax.projection import LinearBaseline, freeze_projection, load_scenario
    from climax.training import autocast, save_train_state, unwrap
    from jobs.train import _hms, start_or_resume

    spec = cfg.projection or ProjectionSpec()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(cfg.train.seed)

    datasets = [ShardDataset(d.root, d.storage_options, name=d.name, verify=d.verify) for d in cfg.data.datasets]
    in_vars, out_vars = variables(cfg, datasets[0])
    scenarios = [load_scenario(ds, in_vars, out_vars) for ds in datasets]
    grid = datasets[0].shape
    for ds in datasets[1:]:
        if ds.shape != grid:
            raise ValueError(f"dataset {ds.name} is on a {ds.shape} grid, {datasets[0].name} on {grid}; "
                             "preprocess every scenario with the same grid")
    lat = datasets[0].lat
    samples = training_samples(scenarios, spec.history, spec.historical_end)
    rng = np.random.default_rng(cfg.train.seed)
    order = rng.permutation(len(samples))
    n_val = int(round(spec.val_fraction * len(samples))) if spec.val_fraction > 0 else 0
    val_samples = [samples[i] for i in sorted(order[:n_val])]
    train_samples = [samples[i] for i in order[n_val:]]
    per_worker = len(train_samples) // world
    steps_per_pass = per_worker // cfg.data.batch_size
    if steps_per_pass <= 0:
        raise ValueError(f"{len(train_samples)} training windows of {spec.history} years give no batch of "
                         f"{cfg.data.batch_size} per worker with {world} workers; lower data.batch_size")
    steps_per_epoch = cfg.train.steps_per_epoch or steps_per_pass
    total_steps = cfg.train.epochs * steps_per_epoch
    xnorm = Normalizer([s.x for s in scenarios])
    ynorm = Normalizer([s.y for s in scenarios])

    def batch_of(pairs):
        x = np.stack([scenarios[k].x[t - spec.history + 1:t + 1] for k, t in pairs])
        y = np.stack([scenarios[k].y[t] for k, t in pairs])
        return x, y

    model = build_model(cfg, in_vars, out_vars, grid, log=log)
    frozen = freeze_projection(model, spec.freeze_blocks, spec.train_block_norms)
    if cfg.freeze_backbone:
        from climax.training import freeze_backbone

        frozen += [f"backbone.{n}" for n in freeze_backbone(model.backbone)]
    model.to(device)
    optimizer, scheduler, state = start_or_resume(cfg, model, total_steps, log, load=load_state)
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False,
                                              parallel_strategy_kwargs={"find_unused_parameters": bool(frozen)})
    if getattr(cfg.train, "compile", False) and device.type == "cuda":
        ddp_model = torch.compile(ddp_model)  # checkpoints keep bare keys (climax.training.unwrap)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"projection: {in_vars} -> {out_vars} on {list(grid)}, {spec.history}-year windows; "
        f"{len(train_samples)} training / {len(val_samples)} validation windows from "
        f"{', '.join(s.name for s in scenarios)}; {n_params / 1e6:.2f} M parameters ({n_train / 1e6:.2f} M trained, "
        f"{len(frozen)} tensors frozen); {world} worker(s) on {device}; {steps_per_epoch} steps per epoch x "
        f"{cfg.train.epochs} epochs, batch {cfg.data.batch_size} per worker")

    # the baseline on the same windows, for the per-epoch line (cheap: a least-squares fit)
    xs_tr, ys_tr = batch_of(train_samples)
    baseline = LinearBaseline(lat).fit(xs_tr[:, -1], ys_tr)
    del xs_tr, ys_tr
    val_x, val_y = batch_of(val_samples) if val_samples else (None, None)
    lat_t = torch.as_tensor(np.asarray(lat), dtype=torch.float32, device=device)

    if state.epoch >= cfg.train.epochs:
        log(f"run {cfg.name!r} already finished {state.epoch} epochs ({state.step} steps); raise train.epochs "
            "to train further, or use another name for a new run")
    start, first_epoch = time.time(), state.epoch
    for epoch in range(state.epoch, cfg.train.epochs):
        t0, losses = time.time(), []
        m = 0
        while len(losses) < steps_per_epoch:  # data passes epoch*k.. so a resumed epoch reads the same batches
            perm = np.random.default_rng([cfg.train.seed, epoch, m]).permutation(len(train_samples))
            mine = perm[rank * per_worker:(rank + 1) * per_worker]
            for b in range(steps_per_pass):
                if len(losses) == steps_per_epoch:
                    break
                x, y = batch_of([train_samples[i] for i in mine[b * cfg.data.batch_size:(b + 1) * cfg.data.batch_size]])
                xb, yb = torch.from_numpy(xnorm(x)).to(device), torch.from_numpy(ynorm(y)).to(device)
                ddp_model.train()
                with autocast(device, cfg.train.bf16):
                    pred = ddp_model(xb, in_vars)
                loss = lat_weighted_mse(pred.float(), yb, lat_t)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the training loss is {loss.item()} at step {state.step}; lower the "
                                             "learning rate or check the data")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   cfg.optim.grad_clip)
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                state.step += 1
                if cfg.train.log_every and state.step % cfg.train.log_every == 0:
                    log(f"  step {state.step}/{total_steps} loss {losses[-1]:.4f} lr {scheduler.get_last_lr()[0]:.2e}")
            m += 1
        train_time = time.time() - t0
        samples_seen = len(losses) * cfg.data.batch_size * world
        state.samples += samples_seen
        metrics: dict[str, Any] = {"epoch": epoch + 1, "step": state.step, "train_loss": float(np.mean(losses)),
                                   "lr": scheduler.get_last_lr()[0], "samples_per_s": samples_seen / max(train_time, 1e-9),
                                   "restarts": state.restarts}
        if val_x is not None:  # every rank scores the same small validation set
            from climax.projection import climatebench_nrmse

            pv = predict(ddp_model, val_x, in_vars, xnorm, ynorm, device)
            pb = baseline.predict(val_x[:, -1])
            metrics["val_loss"] = float(lat_weighted_mse(torch.from_numpy(ynorm(pv)), torch.from_numpy(ynorm(val_y)),
                                                         torch.as_tensor(np.array(lat))))
            for j, v in enumerate(out_vars):
                metrics[f"val_rmse/{v}"] = climatebench_nrmse(pv[:, j], val_y[:, j], lat)["rmse"]
                metrics[f"val_baseline_rmse/{v}"] = climatebench_nrmse(pb[:, j], val_y[:, j], lat)["rmse"]
            metrics["val_rmse"] = float(np.mean([metrics[f"val_rmse/{v}"] / s for v, s in zip(out_vars, ynorm.std)]))
        else:
            metrics["val_loss"] = metrics["train_loss"]
        state.epoch = epoch + 1
        state.best_val_loss = min(state.best_val_loss, metrics["val_loss"])
        state.history.append({k: metrics[k] for k in ("epoch", "step", "train_loss", "val_loss")})
        eta = (time.time() - start) / (epoch + 1 - first_epoch) * (cfg.train.epochs - epoch - 1)
        rm = ", ".join(f"{v} {metrics[f'val_rmse/{v}']:.3g} (baseline {metrics[f'val_baseline_rmse/{v}']:.3g})"
                       for v in out_vars[:4]) if val_x is not None else ""
        log(f"epoch {epoch + 1}/{cfg.train.epochs} step {state.step}/{total_steps} loss {metrics['train_loss']:.4f} "
            f"val {metrics['val_loss']:.4f} rmse [{rm}] {metrics['samples_per_s']:.1f} samples/s ETA {_hms(eta)}",
            flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_train_state(tmp, unwrap(ddp_model), optimizer, None, state, run_config=redact(cfg),
                                 in_vars=in_vars, out_vars=out_vars, metrics=metrics,
                                 projection={"x_norm": xnorm.to_dict(), "y_norm": ynorm.to_dict(),
                                             "lat": [float(v) for v in lat],
                                             "lon": [float(v) for v in datasets[0].lon]})
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


def load_state(directory, model, optimizer=None):
    """Restore a projection run's weights (strictly), optimiser and counters from a checkpoint folder."""
    import torch

    from climax.training import MODEL_FILE, TrainState, read_train_state, unwrap

    payload = torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True)
    unwrap(model).load_state_dict(payload["state_dict"], strict=True)
    state = read_train_state(directory)  # weights_only=True: a planted pickle is refused
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return TrainState(**state["state"])


def load_projection(checkpoint: str | Path):
    """(model, in_vars, out_vars, x Normalizer, y Normalizer) from a run checkpoint folder or its model.pt."""
    import torch

    from climax.projection import ProjectionModel

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


# ----------------------------------------------------------------------------- evaluation
def evaluate(checkpoint: str | Path, test_root: str, train_roots: list[str], output: str | Path,
             test_years: tuple[int, int] = (2080, 2100), storage_options: dict | None = None,
             train_storage_options: list[dict] | None = None, historical_end: int | None = 2014, log=print):
    """Score a projection checkpoint on the test scenario; returns the metrics table (DataFrame).

    Writes ``metrics.csv`` (method, variable, units, nrmse_s, nrmse_g, nrmse, rmse, years) for the
    model and the linear baseline (fitted on ``train_roots``' windows, the same samples the model
    trained on), ``predictions.npz`` and ``maps_<variable>.png``.
    """
    import pandas as pd

    from climax.data import ShardDataset
    from climax.projection import LinearBaseline, climatebench_nrmse, load_scenario, window_targets, windows

    model, in_vars, out_vars, xnorm, ynorm = load_projection(checkpoint)
    history = model.history
    test_ds = ShardDataset(test_root, storage_options)
    test = load_scenario(test_ds, in_vars, out_vars)
    targets = window_targets(test.years, history, first=test_years[0], last=test_years[1])
    if not len(targets):
        raise ValueError(f"test dataset {test_root} has no {history}-year window ending in {test_years[0]}..{test_years[1]} "
                         f"(its years: {test.years[0]}..{test.years[-1]}); check projection.test_years")
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
        _maps(pred[:, j].mean(0), base[:, j].mean(0), truth[:, j].mean(0), test.lat, test.lon,
              out / f"maps_{v}.png", v, units[v], span)
    log(f"projection on {test_ds.name} {span} ({len(targets)} years), written to {out}:")
    log(df.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    return df


def _maps(pred, base, truth, lat, lon, path, variable, units, span):
    """Truth's mean, the model's and the baseline's mean error over the test years (one PNG)."""
    from climax.plots import _figure, _save

    order = np.argsort(lat)
    lat = np.asarray(lat)[order]
    pred, base, truth = pred[order], base[order], truth[order]
    fig = _figure(14, 3.6)
    axes = fig.subplots(1, 3)
    emax = float(max(np.abs(pred - truth).max(), np.abs(base - truth).max())) or 1.0
    panels = [(f"truth, mean {span}", truth, "viridis", truth.min(), truth.max()),
              ("ClimaX mean error", pred - truth, "RdBu_r", -emax, emax),
              ("linear baseline mean error", base - truth, "RdBu_r", -emax, emax)]
    for ax, (name, field, cmap, vmin, vmax) in zip(axes, panels):
        mesh = ax.pcolormesh(lon, lat, field, cmap=cmap, vmin=vmin, vmax=vmax, shading="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("longitude (deg E)")
        ax.set_ylabel("latitude (deg N)")
        ax.set_aspect("equal")
        fig.colorbar(mesh, ax=ax, shrink=0.8, label=units)
    fig.suptitle(f"{variable}: ssp245 {span}")
    return _save(fig, path)


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


def is_projection_checkpoint(checkpoint: str | Path) -> bool:
    """Whether ``checkpoint`` (a folder holding model.pt, or the file) is a projection run's."""
    import torch

    path = Path(checkpoint)
    path = path / "model.pt" if path.is_dir() else path
    if not path.is_file():
        return False
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not ours: let the caller's loader explain
        return False
    return isinstance(payload, dict) and (payload.get("model_config") or {}).get("task") == "projection"


def evaluate_run(checkpoint: str | Path, test_root: str, output: str | Path, storage_options: dict | None = None,
                 log=print):
    """``jobs.evaluate`` on a projection checkpoint: the test scenario ``test_root`` (``data=``), the
    test years and the training scenarios (for the baseline) from the run's recorded configuration."""
    import torch

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
