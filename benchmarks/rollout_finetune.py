"""Does rollout finetuning lower evaluation's rollout RMSE? (issue 19, item 2)

On the generated demo data (``pipelines.sample_data``, three years, 5.625 deg, 6-hourly, 13
time-varying variables + 3 constants; configs/recipes/demo.yaml: train 2015, val 2016, test 2017)
and the tiny model (configs/model/climax-tiny.yaml), in this process through the forecast task and
the Ray-free loop (``climax.loop.train``, the code every Ray Train worker runs):

1. one starting checkpoint: ``--init`` (e.g. the demo's finetuned model), or a model trained here
   at the 6 h lead for ``--base-steps`` steps;
2. from it, two continuations of ``--steps`` optimiser steps each, same data order, learning rate
   and schedule: ``train.rollout_steps=1`` (one step at 6 h, today's finetuning) and
   ``train.rollout_steps=K`` (K steps at 6 h, predictions fed back, loss averaged over the steps).
   Equal steps, not equal compute: a K-step rollout costs about K forward/backward passes;
3. ``climax.evaluation.evaluate_model`` on the test split in rollout mode (6 h steps) at
   ``--leads``, for the start and both continuations: latitude-weighted RMSE (WeatherBench 2's,
   global) per variable, and the mean over variables of RMSE / the variable's standard deviation.

Prints the table and the machine; writes ``results.json`` into ``--workdir``.

    python benchmarks/rollout_finetune.py [--shards DIR] [--init CKPT] [--steps 150] [--k 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SHOWN = ("geopotential_500", "temperature_850", "2m_temperature", "10m_u_component_of_wind")


class _Keep:
    """``climax.loop.Reporter``: keeps the last epoch's checkpoint and metrics."""

    def __init__(self, folder: Path):
        self.folder, self.metrics = folder, []

    def report(self, metrics, checkpoint_dir):
        self.metrics.append(metrics)
        if checkpoint_dir is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            shutil.copytree(checkpoint_dir, self.folder)


def train(args, shards: Path, name: str, steps: int, lr: float, init: str | None, rollout_steps: int = 1,
          truncate: int = 0) -> tuple[Path, dict, float]:
    import torch

    from climax.loop import Worker
    from climax.loop import train as run
    from climax.tasks.forecast import ForecastTask
    from jobs.train import TrainConfig

    cfg = TrainConfig.model_validate({
        "name": name, "model": str(ROOT / args.model), "init_checkpoint": init,
        "data": {"datasets": [{"root": str(shards)}], "batch_size": args.batch_size, "max_val_batches": 4,
                 "leads": {"random": False, "hours": [args.lead]}},
        "optim": {"lr": lr, "warmup_steps": max(steps // 10, 1)},
        "train": {"epochs": 1, "steps_per_epoch": steps, "seed": args.seed, "rollout_steps": rollout_steps,
                  "rollout_truncate": truncate, "log_every": max(steps // 3, 1)},
    })
    torch.manual_seed(args.seed)
    keep = _Keep(Path(args.workdir).resolve() / "runs" / name)
    t0 = time.time()
    run(ForecastTask(cfg, Worker()), keep)
    return keep.folder, keep.metrics[-1], time.time() - t0


def score(args, shards: Path, ckpt: Path) -> dict:
    import numpy as np

    from climax.checkpoint import load_model
    from climax.data import ShardDataset
    from climax.evaluation import evaluate_model

    model, _ = load_model(ckpt / "model.pt" if ckpt.is_dir() else ckpt)
    ds = ShardDataset(str(shards))
    in_vars, out_vars = ds.constants + ds.variables, ds.variables
    df = evaluate_model(model, ds, "test", in_vars, out_vars, args.leads, rollout_step=args.lead,
                        batch_size=args.batch_size, max_samples=args.eval_samples, regions=["global"],
                        baselines=False, progress=False)
    roll = df[(df["method"] == "rollout") & (df["region"] == "global")]
    _, std = ds.normalizer(out_vars)
    std = dict(zip(out_vars, map(float, std)))
    out = {"rmse": {v: {int(h): float(roll[(roll.variable == v) & (roll.lead_hours == h)].rmse.iloc[0])
                        for h in args.leads} for v in out_vars}}
    out["normalised"] = {int(h): float(np.mean([out["rmse"][v][int(h)] / std[v] for v in out_vars]))
                         for h in args.leads}
    return out


def table(res: dict, leads: list[float]) -> str:
    arms = list(res["arms"])
    lines = ["| variable | lead | " + " | ".join(arms) + " | change |", "|---|---|" + "---|" * len(arms) + "---|"]
    one, k = arms[1], arms[2]
    rows = [(f"mean RMSE / std ({len(res['arms'][one]['score']['rmse'])} variables)", "normalised")] + \
        [(v, v) for v in SHOWN if v in res["arms"][one]["score"]["rmse"]]
    for label, v in rows:
        for h in leads:
            h = int(h)
            get = (lambda a, h=h: res["arms"][a]["score"]["normalised"][h]) if v == "normalised" else \
                (lambda a, v=v, h=h: res["arms"][a]["score"]["rmse"][v][h])
            vals = [get(a) for a in arms]
            lines.append(f"| {label} | {h} h | " + " | ".join(f"{x:.4g}" for x in vals) +
                         f" | {100 * (get(k) / get(one) - 1):+.1f} % |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="demo_output/rollout_finetune")
    ap.add_argument("--shards", default=None, help="the demo's shards (default: generate and build in --workdir)")
    ap.add_argument("--init", default=None, help="starting checkpoint (default: train one, --base-steps)")
    ap.add_argument("--model", default="configs/model/climax-tiny.yaml")
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=150, help="optimiser steps of each continuation")
    ap.add_argument("--k", type=int, default=3, help="rollout steps of the rollout arm")
    ap.add_argument("--truncate", type=int, default=0, help="train.rollout_truncate of the rollout arm")
    ap.add_argument("--lead", type=float, default=6.0)
    ap.add_argument("--leads", type=float, nargs="+", default=[6, 24, 72], help="scored rollout leads (hours)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4, help="continuations' peak learning rate")
    ap.add_argument("--eval-samples", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from benchmarks.common import machine
    from benchmarks.masked_pretraining import prepare_data

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    shards = Path(args.shards).resolve() if args.shards else prepare_data(work)
    res: dict = {"machine": machine(), "args": vars(args), "arms": {}}
    if args.init:
        init, base_wall = Path(args.init).resolve(), 0.0
    else:
        init, _, base_wall = train(args, shards, "base", args.base_steps, 2e-3, None)
    res["base_wall_s"] = base_wall
    res["arms"]["start"] = {"score": score(args, shards, init)}
    for label, k in (("rollout_steps=1", 1), (f"rollout_steps={args.k}", args.k)):
        ckpt, m, wall = train(args, shards, f"k{k}", args.steps, args.lr, str(init / "model.pt" if init.is_dir()
                                                                              else init), k, args.truncate)
        res["arms"][label] = {"wall_s": wall, "train_loss": m["train_loss"], "val_loss": m["val_loss"],
                              "score": score(args, shards, ckpt)}
    res["total_wall_s"] = time.time() - t_all
    (work / "results.json").write_text(json.dumps(res, indent=1))
    print(f"\nmachine: {res['machine']}")
    print(f"start: {args.init or f'{args.base_steps} steps at {args.lead:g} h'}; continuations: {args.steps} steps, "
          f"batch {args.batch_size}, lr {args.lr:g}; rollout arm k={args.k}"
          f"{f', truncate {args.truncate}' if args.truncate else ''}")
    for label, a in res["arms"].items():
        if "wall_s" in a:
            print(f"  {label}: {a['wall_s']:.0f} s, train_loss {a['train_loss']:.4f}, "
                  f"val_loss (1 step) {a['val_loss']:.4f}")
    print(f"evaluation: test split, rollout at {args.lead:g} h steps, {args.eval_samples} initial times, global "
          f"latitude-weighted RMSE\n")
    print(table(res, args.leads))
    print(f"\ntotal {res['total_wall_s']:.0f} s")


if __name__ == "__main__":
    main()
