"""Ablation: does history input help forecasting? 1 vs 3 input times at equal steps (issue 19).

On the generated demo data (``pipelines.sample_data``, three years, 5.625 deg, 6-hourly, 13
time-varying variables + 3 constants; preprocessed with configs/recipes/demo.yaml through
``jobs.preprocess``, as ``benchmarks/masked_pretraining.py``) and the tiny model
(configs/model/climax-tiny.yaml), in this process on a local Ray, through the real job
(``jobs.finetune.main``), from scratch:

- ``history [0]``: one input time (today's model, no neck);
- ``history [-12, -6, 0]``: three input times merged by the time neck (``climax.neck``);

the same optimiser steps, batch, learning rate, seed and fixed leads (6 and 24 h) for both. Reports
the validation RMSE (2016, physical units, first ``--val-batches`` batches per lead) per variable and
lead, the normalised mean (``val_rmse``), samples/s and the machine. Writes ``results.json`` into
``--workdir``. Several ``--seeds`` repeat the comparison (data fixed) and report each.

    python benchmarks/history_ablation.py [--steps 300] [--seeds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

LEADS = (6, 24)
ARMS = {"history [0]": "[0]", "history [-12, -6, 0]": "[-12, -6, 0]"}


def run_arms(args, shards: Path, seed: int) -> dict:
    from climax.data import ShardDataset
    from jobs import finetune

    ds = ShardDataset(str(shards))
    runs = Path(args.workdir).resolve() / "runs"
    out = {}
    for arm, hours in ARMS.items():
        name = f"hist{hours.count(',') + 1}-s{seed}-{args.steps}"
        t0 = time.time()
        res = finetune.main(["configs/finetune/global.yaml", f"name={name}", f"storage_path={runs}",
                             f"model={args.model}", f"data.datasets=[{{root: {shards}}}]",
                             f"data.batch_size={args.batch_size}", f"train.seed={seed}", "checkpoint.num_to_keep=1",
                             "observability.tensorboard=false", f"data.history_hours={hours}",
                             f"data.leads={{random: false, hours: {list(LEADS)}}}",
                             f"data.max_val_batches={args.val_batches}", "train.epochs=1",
                             f"train.steps_per_epoch={args.steps}", f"optim.lr={args.lr}",
                             f"optim.warmup_steps={max(args.steps // 10, 1)}"])
        m = res.metrics
        out[arm] = {"wall_s": time.time() - t0, "steps": m["step"], "samples_per_s": m["samples_per_s"],
                    "val_rmse_normalised": m["val_rmse"],
                    "rmse": {v: {h: m[f"val_rmse/{v}@{h}h"] for h in LEADS} for v in ds.variables},
                    "persistence": {v: {h: m.get(f"val_persistence_rmse/{v}@{h}h") for h in LEADS}
                                    for v in ds.variables}}
    return out


def table(res: dict) -> str:
    a, b = list(ARMS)
    lines = [f"| variable | lead | {a} | {b} | ratio |", "|---|---|---|---|---|"]
    for v in res[a]["rmse"]:
        for h in LEADS:
            x, y = res[a]["rmse"][v][h], res[b]["rmse"][v][h]
            lines.append(f"| {v} | {h} h | {x:.4g} | {y:.4g} | {y / x:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="demo_output/history_ablation")
    ap.add_argument("--model", default="configs/model/climax-tiny.yaml")
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps of each arm")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args(argv)

    import numpy as np

    from benchmarks.common import machine
    from benchmarks.masked_pretraining import prepare_data

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    shards = prepare_data(work)
    per_seed = [run_arms(args, shards, seed) for seed in range(args.seeds)]
    a, b = list(ARMS)
    print(f"\nmachine: {machine()}")
    print(f"history ablation: tiny model, {args.steps} steps x batch {args.batch_size} per arm, from scratch, "
          f"leads {list(LEADS)} h, {args.seeds} seed(s), {time.time() - t0:.0f} s in all")
    for seed, res in enumerate(per_seed):
        print(f"\nseed {seed}: normalised validation RMSE (mean over variables and leads): "
              f"{a} {res[a]['val_rmse_normalised']:.4f}, {b} {res[b]['val_rmse_normalised']:.4f} "
              f"(ratio {res[b]['val_rmse_normalised'] / res[a]['val_rmse_normalised']:.3f}); samples/s "
              f"{res[a]['samples_per_s']:.1f} vs {res[b]['samples_per_s']:.1f}")
        ratios = {h: [res[b]["rmse"][v][h] / res[a]["rmse"][v][h] for v in res[a]["rmse"]] for h in LEADS}
        for h in LEADS:
            print(f"  {h} h: geometric-mean RMSE ratio {np.exp(np.mean(np.log(ratios[h]))):.3f}, "
                  f"{sum(r < 1 for r in ratios[h])}/{len(ratios[h])} variables better with history")
    print("\n" + table(per_seed[0]))
    doc = {"machine": machine(), "args": vars(args), "per_seed": per_seed}
    path = work / "results.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
    print(f"\nwritten {path}")
    return doc


if __name__ == "__main__":
    main()
