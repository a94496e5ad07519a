"""Hyperparameter campaigns on Ray Tune (``jobs.tune``) against generated data.

One campaign of 4 Optuna trials (ASHA, 2 at a time on the tests' 2-CPU local Ray) runs as a user
runs it (``jobs.tune`` through ``python -m tests.tune_fail_once CONFIG``, in a subprocess); it is
interrupted with SIGINT once two trials have finished and relaunched with the same command. The first
trial to start fails once (``tests/tune_fail_once.py``: ``CLIMAX_TUNE_TEST_FAIL_ONCE`` names a marker
file) and is retried.
The tests then read the table, the summary, the exported checkpoint and ``jobs.evaluate``'s
metrics (in-process). Configuration errors are checked in-process, without Ray.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.helpers import ROOT, tiny_model

VARS = ["land_sea_mask", "orography", "2m_temperature", "geopotential_500", "temperature_850"]
TRIALS = 4  # the third (Optuna, seed 0: lr 0.027) is far the worst at its first rung: ASHA stops it
SPACE = {
    "optim.lr": {"type": "loguniform", "low": 1.0e-4, "high": 3.0e-2},
    "optim.weight_decay": {"type": "loguniform", "low": 1.0e-6, "high": 1.0e-2},
    "optim.warmup_steps": {"type": "randint", "low": 0, "high": 5},
    "model.drop_path": {"type": "uniform", "low": 0.0, "high": 0.2},
    "data.batch_size": {"type": "choice", "values": [4, 8]},
    "freeze_backbone": {"type": "choice", "values": [False, True]},
    "data.leads.hours": {"type": "choice", "values": [[6], [6, 12]]},
}


def _env(ray_local, **extra) -> dict:
    """The jobs connect to the tests' local Ray (2 CPUs) through RAY_ADDRESS."""
    address = ray_local.get_runtime_context().gcs_address
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled", **extra}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_local) -> Path:
    """11.25-degree 6-hourly sample data: train 2014, val January-February 2015 (236 steps)."""
    from pipelines.build import build
    from pipelines.recipe import Recipe
    from pipelines.sample_data import generate

    raw = tmp_path_factory.mktemp("raw")
    generate(raw, years=(2014, 2015), resolution=11.25, step_hours=6, variables=VARS, formats=("weatherbench",),
             progress=False)
    out = tmp_path_factory.mktemp("shards")
    build(Recipe.model_validate({
        "sources": [{"path": str(raw / "weatherbench")}], "variables": VARS,
        "grid": {"resolution": 11.25, "method": "bilinear"},
        "time": {"start": "2014-01-01", "end": "2015-02-28T18:00", "step": "6h"},
        "splits": {"train": [2014, 2014], "val": [2015, 2015]},
        "output": str(out), "shard_bytes": 2_000_000}))
    return out


def campaign_config(tmp: Path, dataset: Path, checkpoint: Path) -> dict:
    return {
        "name": "campaign", "storage_path": str(tmp / "runs"), "output": str(tmp / "report"),
        "base": {
            "config": "configs/finetune/global.yaml", "init_checkpoint": str(checkpoint),
            "data": {"datasets": [{"root": str(dataset)}], "batch_size": 8, "max_val_batches": None,
                     "leads": {"random": False, "hours": [6], "val_hours": [6]}},
            "optim.warmup_steps": 2, "train": {"epochs": 2, "steps_per_epoch": 3},
            "scaling.num_workers": 1, "checkpoint.num_to_keep": 1},
        "search_space": SPACE, "search": "optuna", "num_samples": TRIALS,
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "max_concurrent_trials": "auto", "trial_max_failures": 1, "seed": 0,
    }


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, ray_local, dataset):
    """Launch, interrupt (SIGINT) after two finished trials, relaunch to the end."""
    import torch

    from climax import save_checkpoint

    tmp = tmp_path_factory.mktemp("tune")
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tiny_model(VARS), tmp / "init" / "model.pt")
    cfg = campaign_config(tmp, dataset, checkpoint)
    path = tmp / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = _env(ray_local, CLIMAX_TUNE_TEST_FAIL_ONCE=str(tmp / "fail-once"))
    cmd = [sys.executable, "-m", "tests.tune_fail_once", str(path)]  # jobs.tune, its first trial failing once

    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, done = [], 0
    for line in proc.stdout:
        lines.append(line)
        if re.search(r"^\[tune\] trial \S+ .* trials done\)", line):
            done += 1
            if done == 2:
                proc.send_signal(signal.SIGINT)
    first = "".join(lines)
    # interrupted with trials left: exit status 130, the unfinished trials marked in the table
    assert proc.wait(timeout=120) == 130, first
    assert "error: campaign campaign interrupted" in first, first
    first_table = pd.read_csv(tmp / "report" / "trials.csv", dtype={"trial_id": str})
    assert (first_table.loc[first_table["status"] != "TERMINATED", "stop_reason"] == "interrupted").all(), first_table
    first_runs = {p.name: sorted(c.name for c in p.glob("checkpoint_*"))
                  for p in (tmp / "runs" / "campaign" / "runs").iterdir() if p.is_dir()}
    t1 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    second = proc.stdout + proc.stderr
    assert proc.returncode == 0, second
    report = tmp / "report"
    return SimpleNamespace(
        tmp=tmp, cfg=cfg, dataset=dataset, first=first, second=second, first_table=first_table,
        first_runs=first_runs, report=report, table=pd.read_csv(report / "trials.csv", dtype={"trial_id": str}),
        summary=json.loads((report / "summary.json").read_text()), seconds=(t1 - t0, time.time() - t1))


def test_interrupted_campaign_resumes_without_rerunning_finished_trials(campaign):
    first, table = campaign.first_table, campaign.table.set_index("trial_id")
    finished = first[first["status"] == "TERMINATED"]
    assert 2 <= len(finished) < TRIALS, first
    assert f"of {TRIALS} trials not finished" in campaign.first, campaign.first
    assert "resuming campaign 'campaign'" in campaign.second, campaign.second
    # the configured number of trials in all, every one finished
    assert len(table) == TRIALS and (table["status"] == "TERMINATED").all(), table
    assert campaign.summary["trials"] == TRIALS and campaign.summary["unfinished"] == 0
    for row in finished.itertuples():
        # not started again, and no new checkpoint in its Ray Train run
        assert table.loc[row.trial_id, "attempts"] == row.attempts, (row, table)
        assert f"trial {row.trial_id} started" not in campaign.second, campaign.second
        run = campaign.tmp / "runs" / "campaign" / "runs" / row.trial_id
        assert sorted(c.name for c in run.glob("checkpoint_*")) == campaign.first_runs[row.trial_id]
        assert table.loc[row.trial_id, "epochs"] == row.epochs


def test_asha_stops_trials_early(campaign):
    table = campaign.table
    early = table[table["stop_reason"] == "early stop (asha)"]
    assert len(early) >= 1, table[["trial_id", "val_rmse", "epochs", "stop_reason"]]
    assert (early["epochs"] < early["planned_epochs"]).all()
    assert (table.loc[table["stop_reason"] == "completed", "epochs"] == 2).all()
    assert campaign.summary["early_stopped"] == len(early)


def test_failed_trial_is_retried_and_the_campaign_goes_on(campaign):
    table = campaign.table
    failed = table[table["failures"].fillna("").str.contains("injected failure")]
    assert len(failed) == 1, table[["trial_id", "attempts", "failures"]]
    assert failed["attempts"].iloc[0] >= 2 and failed["status"].iloc[0] == "TERMINATED"
    assert failed["epochs"].iloc[0] >= 1
    assert "injected failure" in campaign.first and "retrying" in campaign.first


def test_best_is_the_table_minimum_and_evaluate_reproduces_it(campaign, ray_local):
    from climax import load_model
    from climax.data import ShardDataset

    table, summary = campaign.table, campaign.summary
    best = table.loc[table["val_rmse"].idxmin()]
    assert summary["best_trial"] == best["trial_id"] == table["trial_id"].iloc[0]  # sorted best first
    assert summary["best_value"] == pytest.approx(table["val_rmse"].min(), rel=1e-9)
    ckpt = Path(summary["best_checkpoint"])
    assert ckpt == campaign.report / "best_checkpoint" and (ckpt / "model.pt").is_file()
    trial = json.loads((ckpt / "trial.json").read_text())
    assert trial["trial_id"] == best["trial_id"] and trial["epoch"] == best["best_epoch"]
    model, _ = load_model(ckpt / "model.pt")
    assert model.img_size == (16, 32)

    out = campaign.tmp / "eval"
    # jobs.evaluate's own entry point, in this process (its command line as a user gives it; the
    # subprocess path of the jobs is covered by the campaign itself and by test_job_submit)
    from jobs.evaluate import main as evaluate_main

    evaluate_main([f"checkpoint={ckpt}", f"data={campaign.dataset}", "split=val", "leads=[6]", "rollout_step=null",
                   "baselines=false", "device=cpu", "progress=false", f"output={out}"])
    metrics = pd.read_csv(out / "metrics.csv")
    # val_rmse is the per-sample mean (the ClimaX paper's convention): rmse_sample_mean, global
    direct = metrics[(metrics["method"] == "direct") & (metrics["region"] == "global")].set_index(
        "variable")["rmse_sample_mean"]
    for var, rmse in direct.items():  # physical units, every validation sample
        assert rmse == pytest.approx(best[f"val_rmse/{var}@6h"], rel=1e-4), (var, rmse, best)
    _, std = ShardDataset(str(campaign.dataset)).normalizer(list(direct.index))
    assert float(np.mean(direct.to_numpy() / np.asarray(std))) == pytest.approx(summary["best_value"], rel=1e-4)


def test_report_files(campaign):
    report, table = campaign.report, campaign.table
    parquet = pd.read_parquet(report / "trials.parquet")
    assert list(parquet.columns) == list(table.columns) and len(parquet) == TRIALS
    assert parquet["val_rmse"].tolist() == pytest.approx(table["val_rmse"].tolist())
    for key in SPACE:
        assert key in table.columns and table[key].notna().all()
    assert set(table["data.leads.hours"]) <= {"[6]", "[6, 12]"}
    assert {"val_rmse/2m_temperature@6h", "epochs", "stop_reason", "attempts", "best_epoch"} <= set(table.columns)
    png = report / "val_rmse_vs_epoch.png"
    assert png.stat().st_size > 10_000 and summary_paths(campaign.summary) <= {p.name for p in report.iterdir()}
    assert f"table: {report / 'trials.csv'}" in campaign.second
    print(f"campaign: first launch {campaign.seconds[0]:.0f} s, resumed launch {campaign.seconds[1]:.0f} s")


def summary_paths(summary: dict) -> set[str]:
    return {Path(summary[k]).name for k in ("table", "parquet", "plot", "best_checkpoint")}


# ----------------------------------------------------------------------------- configuration errors
@pytest.mark.parametrize("change, message", [
    ({"search_space": {"optim.lrr": {"type": "loguniform", "low": 1e-5, "high": 1e-3}}},
     "unknown search_space key 'optim.lrr'"),
    ({"search_space": {"optim.lr": {"type": "logunif", "low": 1e-5, "high": 1e-3}}}, "search_space.optim.lr.type"),
    ({"search_space": {"optim.lr": {"type": "loguniform", "low": 0, "high": 1e-3}}}, "loguniform needs low > 0"),
    ({"search_space": {"optim.lr": {"type": "uniform", "low": 1e-3}}}, "uniform needs `low` and `high`"),
    ({"search_space": {"data.batch_size": {"type": "uniform", "low": 2, "high": 9}}},
     "search_space 'data.batch_size' value"),
    ({"search_space": {"model.dropp": {"type": "uniform", "low": 0, "high": 0.1}}},
     "unknown search_space key 'model.dropp'"),
    ({"search_space": {"model.drop_path": {"type": "uniform", "low": 0, "high": 2}}},
     "search_space 'model.drop_path' value 2.0"),
    ({"search_space": {"data.datasets.weight": {"type": "uniform", "low": 0.5, "high": 2}}}, "data.datasets is a list"),
    ({"search_space": {"freeze_backbone": {"type": "grid", "values": [False, True]}}}, "grid entries need search"),
    ({"search": "grid"}, "search: grid needs finite entries"),
    ({"search_space": {"data.leads.hours": {"type": "choice", "values": [[6], [6, 12]]}}},
     "set base data.leads.val_hours"),
    ({"search_space": {"name": {"type": "choice", "values": ["a"]}}}, "name is set by the campaign"),
    ({"base": {"config": "configs/nope.yaml"}}, "base configuration file configs/nope.yaml does not exist"),
    ({"base": {"config": "configs/finetune/global.yaml", "optim.lrr": 1}}, "unknown key 'optim.lrr'"),
    ({"scheduler": {"grace_period": 9}}, "scheduler.grace_period 9 exceeds max_t"),
])
def test_bad_configuration_exits_2_naming_it(tmp_path, capsys, change, message):
    from jobs import tune

    cfg = {"base": {"config": "configs/finetune/global.yaml", "train.epochs": 3},
           "search_space": {"optim.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3}}, "output": str(tmp_path)}
    cfg.update(change)
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:
        tune.main([str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "trials.csv").exists()


def test_search_space_on_the_command_line_and_trial_configs(tmp_path, monkeypatch):
    from jobs import tune
    from jobs.config import apply_overrides, validate

    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards").mkdir()
    cfg = apply_overrides({"base": {"config": str(ROOT / "configs" / "finetune" / "global.yaml")}},
                          ["base.data.datasets=[{root: shards}]",
                           "search_space.optim.lr={type: loguniform, low: 1.0e-5, high: 1.0e-3}",
                           "search_space.data.leads.hours={type: choice, values: [[24], [6, 24]]}",
                           "base.data.leads.val_hours=[24]", "base.train.epochs=4", "search=random"])
    campaign = tune.resolve(validate(tune.CampaignConfig, cfg))
    assert set(campaign.cfg.search_space) == {"optim.lr", "data.leads.hours"}
    assert campaign.encoded == ["data.leads.hours"] and campaign.max_t == 4
    assert campaign.base["checkpoint"]["score"] == "val_rmse"
    space = tune.param_space(campaign)
    assert set(space) == {"optim.lr", "data.leads.hours"}
    trial = tune.trial_config(campaign.base, {"optim.lr": 2e-4, "data.leads.hours": "[6, 24]"},
                              campaign.model_base, campaign.encoded)
    assert trial["optim"]["lr"] == 2e-4 and trial["data"]["leads"]["hours"] == [6, 24]
    assert trial["data"]["leads"]["val_hours"] == [24] and trial["data"]["batch_size"] == 8  # from finetune/global.yaml
    # relative local paths are taken from the launching directory: Ray Train's workers run elsewhere
    assert trial["data"]["datasets"][0]["root"] == str(tmp_path / "shards")

    grid = tune.resolve(validate(tune.CampaignConfig, apply_overrides(cfg, [
        "search=grid", "search_space.optim.lr={type: grid, values: [1.0e-4, 1.0e-3]}"])))
    assert tune.planned_trials(grid) == 2 * 2 and grid.num_samples == 1
    assert all(set(v) == {"grid_search"} for v in tune.param_space(grid).values())
