"""A campaign's report: the trials table (CSV, Parquet), the metric-against-epoch plot, the best
checkpoint exported, summary.json, and the summary printed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from climax.redact import redact, redact_text
from climax.storage import atomic_path, write_atomic
from jobs.tuning.campaign import Campaign, planned_epochs, planned_trials, short_config, trial_config
from jobs.tuning.runtime import ACTIVE, campaign_fs, error_text


def collect(campaign: Campaign):
    """(table, histories): one row per trial; per trial the reported metrics by epoch."""
    import pandas as pd
    from ray.tune import ExperimentAnalysis

    cfg = campaign.cfg
    fs, exp = campaign_fs(campaign)
    import logging

    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level, quiet.level = quiet.level, logging.ERROR  # trials not started yet have no results: expected
    try:
        analysis = ExperimentAnalysis(exp, storage_filesystem=fs, default_metric=cfg.metric, default_mode=cfg.mode)
    finally:
        quiet.setLevel(level)
    log = ACTIVE["log"].state["trials"] if "log" in ACTIVE else {}
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
        row["planned_epochs"] = min(planned_epochs(campaign, trial.config), campaign.max_t)
        row["attempts"] = rec.get("starts", 0)
        row["failures"] = " | ".join(rec.get("failures", []))
        reason = rec.get("stop_reason")
        if trial.status == "ERROR":
            reason = reason if reason and reason.startswith("error") else f"error: {error_text(trial)}"
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
    import pyarrow.fs
    import torch

    fs, _ = campaign_fs(campaign)
    metric = campaign.cfg.metric
    rows = history.dropna(subset=["checkpoint_path"]).sort_values(metric, kind="stable") \
        if "checkpoint_path" in history else history.iloc[:0]
    for path in rows["checkpoint_path"]:
        if fs.get_file_info(f"{path}/model.pt").type == pyarrow.fs.FileType.File:
            break
    else:
        raise RuntimeError(f"no checkpoint of the best trial is left (searched {len(rows)} reported ones)")
    local = pyarrow.fs.LocalFileSystem()
    with atomic_path(out) as tmp:  # a folder: copied whole, then swapped in
        local.create_dir(str(tmp))
        pyarrow.fs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=local)
        metrics = torch.load(tmp / "model.pt", map_location="cpu", weights_only=True).get("metrics") or {}
    return path, metrics


def write_report(campaign: Campaign, table, histories, *, interrupted: bool = False) -> dict:
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
              f"{summary['best_epoch']}; " + short_config(summary["best_params"]))
        print(f"best checkpoint: {summary['best_checkpoint']}")
    print(f"table: {summary['table']} (and {Path(summary['parquet']).name}); plot: {summary['plot']}")
