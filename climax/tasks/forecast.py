"""The forecast task (global or regional), with the masked-reconstruction objective (issue 9).

Data: one or more shard datasets (``data.datasets``, mixed by ``weight``), a ``ForecastLoader`` per
dataset and split; random leads in [min_hours, max_hours] (pretraining) or fixed ``hours``
(finetuning). Model: ClimaX from the model config or ``init_checkpoint`` (finetuning; new variables
get fresh embeddings), the default variables extended by the data's. With ``objective.kind``
masked / schedule / mix, a decoder is attached and ``MaskedAutoencoder`` trains: steps that
``objective.masked_at(step)`` picks reconstruct masked input (``climax.masking``), the others
forecast. Validation: RMSE per variable and lead in physical units with persistence; the masked
reconstruction loss when masking. Rollout finetuning (``train.rollout_steps`` k > 1, one fixed lead):
the training loader adds the targets at 2L..kL and the loss is ``climax.training.rollout_loss``
(k steps, predictions fed back, mean over steps); validation stays one step at each lead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from climax.checkpoint import load_checkpoint, read_checkpoint
from climax.data import ForecastLoader, ShardDataset
from climax.loop import Loaders
from climax.masking import MaskedAutoencoder, MaskedObjective, attach_decoder, step_generator, validate_masked
from climax.mixing import MixedLoader
from climax.model import ClimaX
from climax.normalization import apply_statistics, checkpoint_record, checkpoint_statistics, release_statistics
from climax.regions import Region
from climax.sampling import lead_hours
from climax.tasks import Task, model_config
from climax.training import batch_where, forecast_loss, freeze_backbone, rollout_loss, validate

__all__ = ["ForecastTask", "TASK", "build_model", "init_statistics", "variables"]


def variables(cfg: Any, ds: Any) -> tuple[list[str], list[str]]:
    """(input, output) variables of a dataset: ``data.in_vars`` / ``data.out_vars`` it has, by default
    every variable (inputs also the constants)."""
    have = set(ds.variables) | set(ds.constants)
    in_vars = [v for v in (cfg.data.in_vars or ds.constants + ds.variables) if v in have]
    out_vars = [v for v in (cfg.data.out_vars or ds.variables) if v in set(ds.variables)]
    missing = [v for v in (cfg.data.in_vars or []) + (cfg.data.out_vars or []) if v not in have]
    if missing and len(cfg.data.datasets) == 1:
        raise ValueError(f"dataset {ds.name!r} has no variable(s) {missing}; it has {sorted(have)}")
    if not in_vars or not out_vars:
        raise ValueError(f"dataset {ds.name!r}: no input or output variable left; check data.in_vars / data.out_vars")
    return in_vars, out_vars


def build_model(cfg: Any, datasets: list, log=print) -> ClimaX:
    """The model of a run: from the model config, or from ``init_checkpoint`` (finetuning).

    default_vars: the config's (or the checkpoint's), extended by any data variable they lack
    (new variables get fresh embeddings and head rows); img_size: the data's grid. With a masking
    objective the decoder is attached before loading (a masked checkpoint's decoder continues).
    """
    data_vars: list[str] = []
    for ds in datasets:
        for v in sum(variables(cfg, ds), []):
            if v not in data_vars:
                data_vars.append(v)
    meta: dict = {}
    if cfg.init_checkpoint:
        _, meta, _ = read_checkpoint(cfg.init_checkpoint)
    mcfg = model_config(cfg, meta.get("model_config"))
    base_vars = list(mcfg.default_vars or [])
    # the data's history decides the neck (a checkpoint's neck is kept, refitted or left out to match)
    history = list(getattr(cfg.data, "history_hours", None) or [0.0])
    model = ClimaX.from_config(mcfg.model_copy(update={
        "default_vars": base_vars + [v for v in data_vars if v not in base_vars],
        "img_size": (len(datasets[0].lat), len(datasets[0].lon)),
        "history_hours": history if len(history) > 1 else None}))
    if cfg.objective.uses_masking:  # before loading: a masked checkpoint's decoder continues
        attach_decoder(model, **cfg.objective.decoder.model_dump())
    if cfg.init_checkpoint:
        report = load_checkpoint(model, cfg.init_checkpoint, ckpt_vars=cfg.ckpt_vars)
        log(f"loaded {cfg.init_checkpoint}:\n{report}")
        init_statistics(cfg, datasets, meta, log)
    return model


def init_statistics(cfg: Any, datasets: list, meta: dict, log=print) -> None:
    """Finetuning normalises with the init checkpoint's statistics (``statistics: checkpoint``): those
    it records, else an original release's ``ckpt_statistics`` files; the dataset's otherwise."""
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


class ForecastTask(Task):
    name = "forecast"

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if not cfg.data.datasets:
            raise ValueError(f"data.datasets needs at least one dataset (task {cfg.task})")

    # ------------------------------------------------------------------ model and data
    def build_model(self) -> nn.Module:
        cfg = self.cfg
        self.datasets = [ShardDataset(d.root, d.storage_options, name=d.name, verify=d.verify)
                                      for d in cfg.data.datasets]
        model = build_model(cfg, self.datasets, log=self.log)
        if cfg.freeze_backbone:
            frozen = freeze_backbone(model)
            self.log(f"backbone frozen: {len(frozen)} tensors")
        self.net = model
        objective = cfg.objective
        self.masked = MaskedObjective(objective.mask_ratio, objective.var_drop) if objective.uses_masking else None
        return MaskedAutoencoder(model) if self.masked is not None else model

    def make_loaders(self, model: nn.Module) -> Loaders:
        cfg, w, datasets = self.cfg, self.worker, self.datasets
        self.region = region = Region.from_spec(cfg.data.region, datasets[0].lat, datasets[0].lon, self.net.patch_size)
        if self.masked is not None and region is not None:
            raise ValueError(f"objective.kind={cfg.objective.kind} pretrains on the whole grid; set data.region=null")
        leads, d = cfg.data.leads, cfg.data

        def loader(ds, split, hours, batch_size, *, random_lead, shuffle, max_batches=None, rollout_steps=1):
            in_vars, out_vars = variables(cfg, ds)
            return ForecastLoader(ds, split, in_vars, out_vars, hours, random_lead=random_lead, batch_size=batch_size,
                                  seed=cfg.train.seed, rank=w.rank, world_size=w.world, shuffle=shuffle,
                                  drop_last=shuffle, region=region, prefetch=d.prefetch, max_batches=max_batches,
                                  pin_memory=w.device.type == "cuda", cache_mb=d.cache_mb, shuffle_mode=d.shuffle,
                                  block_steps=d.block_steps, window_blocks=d.window_blocks, window_mb=d.window_mb,
                                  rollout_steps=rollout_steps, history=d.history_hours)

        k = self.rollout_steps
        if k > 1:  # predictions are fed back: every time-varying input must be an output (as evaluation's rollout)
            from climax.evaluation import rollout_blockers

            for ds in datasets:
                blockers = rollout_blockers(ds, *variables(cfg, ds))
                if blockers:
                    raise ValueError(f"train.rollout_steps={k} feeds each prediction back as the next input, but "
                                     f"input variable(s) {blockers} of dataset {ds.name!r} are time-varying and not "
                                     "outputs: add them to data.out_vars, drop them from data.in_vars, or set "
                                     "train.rollout_steps=1")
        train_loaders = []
        for ds in datasets:
            hours = lead_hours(leads.min_hours, leads.max_hours, ds.step_hours) if leads.random else leads.hours
            train_loaders.append(loader(ds, d.train_split, hours, d.batch_size, random_lead=leads.random,
                                        shuffle=True, rollout_steps=k))
            self.log(train_loaders[-1].report())
        train_data = train_loaders[0] if len(train_loaders) == 1 else MixedLoader(
            train_loaders, [s.weight for s in d.datasets], seed=cfg.train.seed)
        steps_per_epoch = cfg.train.steps_per_epoch or len(train_data)
        if steps_per_epoch <= 0:
            raise ValueError(f"the training split {d.train_split!r} gives no batch of {d.batch_size} "
                             f"per worker with {w.world} workers; lower data.batch_size or use a longer split")
        self.val_ds = val_ds = datasets[0]
        self.val_in, self.val_out = variables(cfg, val_ds)
        self.val_leads = leads.val_hours or (leads.hours if not leads.random else [val_ds.step_hours])
        self.mean_std = val_ds.normalizer(self.val_out)
        self.lat = region.lat(val_ds.lat) if region is not None else val_ds.lat
        # built before the first step (and reused every epoch): a missing or too short validation split,
        # a lead it cannot serve or a variable it lacks stops the run now, not after an epoch of training
        val = {hours: loader(val_ds, d.val_split, [hours], d.val_batch_size or d.batch_size, random_lead=False,
                             shuffle=False, max_batches=d.max_val_batches) for hours in self.val_leads}
        for hours, vl in val.items():
            if w.rank == 0 and len(vl) == 0:  # rank 0 holds the largest contiguous block: empty there, everywhere
                raise ValueError(f"the validation split {d.val_split!r} of dataset {val_ds.name!r} gives no "
                                 f"sample at lead {hours:g} h with {w.world} worker(s); use a longer split, shorter "
                                 "data.leads.val_hours or fewer workers")
        return Loaders(train_data, val, steps_per_epoch)

    @property
    def rollout_steps(self) -> int:
        return int(getattr(self.cfg.train, "rollout_steps", 1))

    def find_unused_parameters(self, model: nn.Module) -> bool:
        uses_all = all(set(variables(self.cfg, ds)[0]) == set(self.net.default_vars) for ds in self.datasets)
        return not uses_all or self.cfg.freeze_backbone or self.masked is not None

    def describe(self, model: nn.Module, loaders: Loaders) -> str:
        cfg, w, net, region = self.cfg, self.worker, self.net, self.region
        n_params = sum(p.numel() for p in net.parameters())
        hist = f", history {net.history_hours} h" if len(net.history_hours) > 1 else ""
        return (f"ClimaX {n_params / 1e6:.2f} M parameters, grid {net.img_size}, patch {net.patch_size}{hist}"
                f"{f', region {region.name} {region.shape}' if region else ''}; {w.world} worker(s) on {w.device}; "
                f"{loaders.steps_per_epoch} steps per epoch x {cfg.train.epochs} epochs, batch {cfg.data.batch_size} "
                "per worker" + (f"; rollout finetuning: {self.rollout_steps} steps at {cfg.data.leads.hours[0]:g} h"
                                + (f", input detached every {cfg.train.rollout_truncate} step(s)"
                                   if cfg.train.rollout_truncate else "")
                                if self.rollout_steps > 1 else ""))

    # ------------------------------------------------------------------ steps
    def loss(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, str | None]:
        cfg, region = self.cfg, self.region
        lat = self.lat if batch.dataset == self.val_ds.name or region is not None else \
            next(ds.lat for ds in self.datasets if ds.name == batch.dataset)
        is_masked = self.masked is not None and cfg.objective.masked_at(step, cfg.train.seed)
        if self.rollout_steps > 1 and not is_masked:  # rollout finetuning: k steps, predictions fed back
            return rollout_loss(model, batch, lat, self.worker.device, bf16=cfg.train.bf16, region=region,
                                truncate=int(getattr(cfg.train, "rollout_truncate", 0))), None
        loss = forecast_loss(model, batch, lat, self.worker.device, bf16=cfg.train.bf16, region=region,
                             masked=self.masked if is_masked else None,
                             generator=step_generator(cfg.train.seed, step, self.worker.rank) if is_masked else None)
        return loss, "train_mask_loss" if is_masked else None

    def where(self, batch: Any, step: int) -> str:
        return batch_where(batch)

    def validate(self, model: nn.Module, val: dict, train_metrics: dict) -> dict[str, float]:
        cfg, device = self.cfg, self.worker.device
        mean, std = self.mean_std
        metrics: dict[str, float] = {}
        val_losses = []
        for hours, vl in val.items():
            res = validate(model, vl, self.lat, mean, std, self.val_out, device, bf16=cfg.train.bf16,
                           region=self.region)
            val_losses.append(res["val_loss"])
            for k, v in res.items():
                if k.startswith("val_rmse/") or k.startswith("val_persistence_rmse/"):
                    metrics[f"{k}@{hours:g}h"] = v
        metrics["val_loss"] = float(np.mean(val_losses))
        if self.masked is not None:  # reconstruction loss; the run's val_loss when it only reconstructs
            metrics.update(validate_masked(model, val[self.val_leads[0]], self.lat, self.masked, device,
                                           bf16=cfg.train.bf16, seed=cfg.train.seed))
            if cfg.objective.kind == "masked":
                metrics["val_loss"] = metrics["val_mask_loss"]
        # one number for schedulers (ASHA) and for comparing runs: the latitude-weighted RMSE in
        # units of each variable's standard deviation, averaged over variables and validation leads
        metrics["val_rmse"] = float(np.mean([metrics[f"val_rmse/{v}@{h:g}h"] / s
                                             for v, s in zip(self.val_out, std) for h in self.val_leads]))
        return metrics

    def summary(self, metrics: dict) -> str:
        out, lead = self.val_out, self.val_leads[0]
        mask_part = f" mask {metrics['val_mask_loss']:.4f}" if self.masked is not None else ""
        rm = ", ".join(f"{v} {metrics[f'val_rmse/{v}@{lead:g}h']:.3g}" for v in out[:4])
        return f"{mask_part} rmse@{lead:g}h [{rm}{', ...' if len(out) > 4 else ''}]"

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_module(self, model: nn.Module) -> nn.Module:
        return model.encoder if isinstance(model, MaskedAutoencoder) else model

    def checkpoint_extras(self) -> dict[str, Any]:
        return {**super().checkpoint_extras(), "in_vars": self.val_in, "out_vars": self.val_out,
                **checkpoint_record(self.val_ds, [*self.val_in, *self.val_out], self.region)}


TASK = ForecastTask
