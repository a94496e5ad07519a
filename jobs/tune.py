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
# The code lives in jobs/tuning/ along its seams: campaign.py (the configuration, checked; no Ray),
# runtime.py (Ray Tune: trials, scheduler, Tuner, trial log) and report.py (table, plot, best
# checkpoint, summary). This module runs a launch and re-exports their public names.

from __future__ import annotations

import sys
import time

from jobs.config import ConfigError, fail, parse_args
from jobs.tuning.campaign import (
    DEFAULT_BASE,
    RESERVED,
    Campaign,
    CampaignConfig,
    Distribution,
    SchedulerSpec,
    base_config,
    check_key,
    planned_epochs,
    planned_trials,
    rebuild_experiment_fs,
    resolve,
    set_key,
    short_config,
    trial_config,
)
from jobs.tuning.report import collect, export_checkpoint, plot_history, print_summary, write_report
from jobs.tuning.runtime import (
    ACTIVE,
    DRIVER_MEMORY,
    REAP_EVERY_S,
    CampaignASHA,
    CampaignLog,
    build_tuner,
    campaign_fs,
    error_text,
    max_concurrent,
    param_space,
    reap_stopped_runs,
    run_trial,
)

#: the name campaigns saved before the split into jobs/tuning/ pickled (Tune's experiment state holds
#: the filesystem's reducer): kept so that such a campaign still resumes
_rebuild_experiment_fs = rebuild_experiment_fs

__all__ = [
    "ACTIVE", "DEFAULT_BASE", "DRIVER_MEMORY", "REAP_EVERY_S", "RESERVED", "Campaign",
    "CampaignASHA", "CampaignConfig", "CampaignLog", "Distribution", "SchedulerSpec", "base_config",
    "build_tuner", "campaign_fs", "check_key", "collect", "error_text", "exit_status", "export_checkpoint",
    "main", "max_concurrent", "param_space", "planned_epochs", "planned_trials", "plot_history",
    "print_summary", "reap_stopped_runs", "resolve", "run", "run_trial", "set_key", "short_config",
    "trial_config", "write_report",
]


def run(campaign: Campaign) -> dict:
    """Run (or resume) the campaign on the connected Ray cluster and write the report."""
    campaign.extra["max_concurrent"] = max_concurrent(campaign)
    ACTIVE["campaign"] = campaign
    tuner, resumed = build_tuner(campaign)
    if resumed:
        ACTIVE["replay"] = {k: v for k, v in collect(campaign)[1].items() if v is not None and len(v)}
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
    # run from the module's real name: the Tune experiment pickles the callback and trainable
    # (jobs.tuning.runtime) by reference, and ``__main__`` objects would not restore in a later launch
    from jobs import tune

    tune.main(sys.argv[1:])
