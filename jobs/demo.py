"""``make demo``: the platform end to end on an embedded default, local Ray and local files.

1. generate three years of ERA5-like sample data (WeatherBench-layout NetCDF);
2. preprocess them on Ray Data into shards (configs/recipes/demo.yaml): train 2015, val 2016,
   test 2017;
3. pretrain a tiny ClimaX on Ray Train (random lead times 6 h to 72 h) for a few minutes;
4. finetune it at fixed lead times (6 h, 24 h, 72 h) from the pretraining checkpoint;
5. evaluate on the test split (direct, 6-hour rollout, persistence, climatology): print the RMSE
   (WeatherBench 2's and the ClimaX paper's) / bias / ACC table and the paths of the plots, zonal
   energy spectra included;
6. write CF-compliant NetCDF forecasts and a WeatherBench 2-layout Zarr store, and open them back
   with xarray;
7. a small Ray Tune campaign over the finetuning (learning rate, frozen backbone; ASHA, Optuna).

    python -m jobs.demo [workdir=demo_output] [pretrain_minutes=3] ...
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from jobs.config import parse_args

ROOT = Path(__file__).resolve().parents[1]


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workdir: str = Field("demo_output", description="where sample data, shards, runs and results go")
    years: list[int] = Field([2015, 2016, 2017], description="years of sample data (train, val, test)")
    recipe: str = Field("configs/recipes/demo.yaml", description="preprocessing recipe")
    model: str = Field("configs/model/climax-tiny.yaml", description="model configuration")
    pretrain_steps: int = Field(600, description="pretraining optimiser steps")
    finetune_steps: int = Field(200, description="finetuning optimiser steps")
    batch_size: int = 16
    workers: int = Field(1, description="Ray Train workers (CPU)")
    eval_samples: int = Field(120, description="initial times scored in the evaluation")
    tune_trials: int = Field(4, description="trials of the closing Ray Tune campaign (0: skip it)")


def _stage(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_args(DemoConfig, __doc__, argv, config_required=False)
    work = Path(cfg.workdir).resolve()
    t0 = time.time()

    _stage("1. sample data")
    from pipelines.sample_data import generate

    sample = work / "sample"
    if not (sample / "weatherbench").is_dir():
        generate(sample, years=tuple(cfg.years), formats=("weatherbench",))
    print(f"sample data in {sample}")

    _stage("2. preprocessing on Ray Data")
    from jobs import preprocess

    first, last = min(cfg.years), max(cfg.years)
    splits = {"train": [first, max(first, last - 2)], "val": [last - 1, last - 1], "test": [last, last]}
    shards = work / "shards"
    preprocess.main([cfg.recipe, f"output={shards}", f"sources.0.path={sample / 'weatherbench'}",
                     f"time.start='{first}-01-01'", f"time.end='{last}-12-31T18:00'",
                     f"splits={yaml.safe_dump(splits, default_flow_style=True).strip()}"])

    import shutil

    shutil.rmtree(work / "runs", ignore_errors=True)  # a fresh run each time (same names would resume)
    common = [f"storage_path={work / 'runs'}", f"model={cfg.model}", f"data.datasets=[{{root: {shards}}}]",
              f"data.batch_size={cfg.batch_size}", f"scaling.num_workers={cfg.workers}", "data.max_val_batches=8"]
    epochs = 3
    _stage("3. pretraining on Ray Train (random leads 6-72 h)")
    from jobs import finetune, pretrain

    pre = pretrain.main(["configs/pretrain.yaml", "name=demo-pretrain", *common,
                         "data.leads={random: true, min_hours: 6, max_hours: 72, val_hours: [6, 72]}",
                         f"train.epochs={epochs}", f"train.steps_per_epoch={cfg.pretrain_steps // epochs}",
                         "optim.lr=2e-3", f"optim.warmup_steps={max(cfg.pretrain_steps // 20, 1)}"])
    pre_ckpt = pre.get_best_checkpoint("val_loss", "min") or pre.checkpoint

    _stage("4. finetuning at fixed leads (6 h, 24 h, 72 h)")
    fine = finetune.main(["configs/finetune/global.yaml", "name=demo-finetune", *common,
                          f"init_checkpoint={pre_ckpt.path}",
                          "data.leads={random: false, hours: [6, 24, 72]}", "train.epochs=1",
                          f"train.steps_per_epoch={cfg.finetune_steps}", "optim.lr=5e-4",
                          f"optim.warmup_steps={max(cfg.finetune_steps // 10, 1)}"])
    fine_ckpt = fine.get_best_checkpoint("val_loss", "min") or fine.checkpoint

    _stage("5. evaluation on the test split")
    from jobs import evaluate, forecast

    evaluate.main(["configs/evaluate.yaml", f"checkpoint={fine_ckpt.path}", f"data={shards}",
                   "leads=[6, 24, 72]", "rollout_step=6", f"max_samples={cfg.eval_samples}",
                   f"output={work / 'evaluation'}", "progress=false"])

    _stage("6. forecasts: CF NetCDF and WeatherBench 2 Zarr")
    nc = forecast.main(["configs/forecast.yaml", f"checkpoint={fine_ckpt.path}", f"data={shards}",
                        f"init_range={{start: '{last}-01-01T00:00', end: '{last}-01-02T00:00', step: 12h}}",
                        "leads=[6, 24, 72]", f"output={work / 'forecasts' / 'forecast.nc'}", "progress=false"])
    zarr = forecast.main(["configs/forecast.yaml", f"checkpoint={fine_ckpt.path}", f"data={shards}",
                          f"init_range={{start: '{last}-01-01T00:00', end: '{last}-01-02T00:00', step: 12h}}",
                          "leads=[6, 24, 72]", "format=zarr", f"output={work / 'forecasts' / 'forecast.zarr'}",
                          "progress=false"])
    import xarray as xr

    with xr.open_dataset(nc) as ds:
        print(f"xarray opens it back: {dict(ds.sizes)}, variables {list(ds.data_vars)[:4]}...")
    with xr.open_zarr(zarr) as ds:
        print(f"WeatherBench 2 layout: {dict(ds.sizes)}, variables {list(ds.data_vars)[:4]}...")

    table = None
    if cfg.tune_trials:
        _stage(f"7. a Ray Tune campaign over the finetuning ({cfg.tune_trials} trials)")
        from jobs import tune

        campaign = {
            "name": "demo-tune", "storage_path": str(work / "runs"), "output": str(work / "tune"),
            "base": {"config": "configs/finetune/global.yaml", "model": cfg.model, "init_checkpoint": pre_ckpt.path,
                     "data.datasets": [{"root": str(shards)}], "data.batch_size": cfg.batch_size,
                     "data.max_val_batches": 4, "data.leads.hours": [24], "data.leads.val_hours": [24],
                     "train.epochs": 3, "train.steps_per_epoch": 20},
            "search_space": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 3e-3},
                             "freeze_backbone": {"type": "choice", "values": [False, True]}},
            "search": "optuna", "num_samples": cfg.tune_trials, "metric": "val_rmse", "mode": "min",
            "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        }
        path = work / "tune.yaml"
        path.write_text(yaml.safe_dump(campaign, sort_keys=False))
        summary = tune.main([str(path)])
        table = summary.get("table") or summary.get("trials_csv") or str(work / "tune")

    print(f"\ndemo finished in {time.time() - t0:.0f} s; outputs under {work}/:")
    print(f"  shards      {shards}/manifest.json")
    print(f"  checkpoints {pre_ckpt.path}\n              {fine_ckpt.path}")
    print(f"  evaluation  {work / 'evaluation'}/metrics.csv, rmse_vs_lead.png, acc_vs_lead.png, maps_*.png")
    spectra = sorted((work / "evaluation").glob("spectra_*.png"))
    print(f"  spectra     {work / 'evaluation' / 'spectra.csv'}" + "".join(f"\n              {p}" for p in spectra))
    print(f"  forecasts   {nc}\n              {zarr} (WeatherBench 2 layout)")
    if table:
        print(f"  tuning      {table}")


if __name__ == "__main__":
    main(sys.argv[1:])
