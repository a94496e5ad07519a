"""Ablation: does masked-field reconstruction before forecasting help? (issue 9)

On the generated demo data (``pipelines.sample_data``, three years, 5.625 deg, 6-hourly, 13
time-varying variables + 3 constants; preprocessed with configs/recipes/demo.yaml through
``jobs.preprocess``) and the tiny model (configs/model/climax-tiny.yaml), in this process on a
local Ray, through the real jobs (``jobs.pretrain.main``, ``jobs.finetune.main``):

1. pretraining, same compute (optimiser steps x batch), random leads 6-72 h, one variable held
   out of pretraining (``--held-out``, default specific_humidity_850: neither input nor output):
   - ``forecast``: ClimaX's objective for all ``--pretrain-steps`` steps;
   - ``masked->forecast``: ``objective.kind=schedule``, the first ``--masked-share`` of the steps
     masked reconstruction (mask_ratio 0.75, var_drop 0.25), the rest forecast;
   - for reference, ``forecast, fewer steps``: forecast-only with just the masked arm's forecast
     steps (what do the masked steps add?);
2. finetuning of each (and, for reference, of a model from scratch) on the same global-forecast
   task: every variable (the held-out one included, new to both checkpoints) at 6, 24 and 72 h,
   ``--finetune-steps`` steps;
3. validation RMSE per variable at 6, 24 and 72 h (2016, physical units, first ``--val-batches``
   batches of each lead), pretraining wall time and samples/s of masked and forecast steps, and
   the FLOPs of one training step (forecast vs masked, counted by torch.utils.flop_counter).

Prints a table; writes ``results.json`` into ``--workdir`` and the plot to ``--plot``. Several
``--seeds`` repeat the whole comparison (data fixed) and report the mean.

    python benchmarks/masked_pretraining.py [--pretrain-steps 480] [--finetune-steps 200] [--seeds 1]
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

LEADS = (6, 24, 72)


def prepare_data(work: Path) -> Path:
    """Sample data + shards (reused when already there)."""
    import yaml

    from jobs import preprocess
    from pipelines.sample_data import generate

    shards = work / "shards"
    if (shards / "manifest.json").exists():
        return shards
    years = (2015, 2016, 2017)
    sample = work / "sample"
    if not (sample / "weatherbench").is_dir():
        generate(sample, years=years, formats=("weatherbench",))
    splits = {"train": [2015, 2015], "val": [2016, 2016], "test": [2017, 2017]}
    preprocess.main(["configs/recipes/demo.yaml", f"output={shards}", f"sources.0.path={sample / 'weatherbench'}",
                     "time.start='2015-01-01'", "time.end='2017-12-31T18:00'",
                     f"splits={yaml.safe_dump(splits, default_flow_style=True).strip()}"])
    return shards


def run_arms(args, shards: Path, seed: int) -> dict:
    from climax.data import ShardDataset
    from jobs import finetune, pretrain

    ds = ShardDataset(str(shards))
    held = args.held_out
    if held not in ds.variables:
        raise SystemExit(f"--held-out {held!r} is not a time-varying variable of {shards}: {ds.variables}")
    pre_in = [v for v in ds.constants + ds.variables if v != held]
    pre_out = [v for v in ds.variables if v != held]
    runs = Path(args.workdir).resolve() / "runs"
    S, F = args.pretrain_steps, args.finetune_steps
    masked_steps = int(round(args.masked_share * S))
    common = [f"storage_path={runs}", f"model={args.model}", f"data.datasets=[{{root: {shards}}}]",
              f"data.batch_size={args.batch_size}", f"train.seed={seed}", "checkpoint.num_to_keep=null",
              "observability.tensorboard=false"]
    arms = {
        "forecast": ["objective.kind=forecast"],
        "masked->forecast": ["objective.kind=schedule", f"objective.masked_steps={masked_steps}",
                             f"objective.mask_ratio={args.mask_ratio}", f"objective.var_drop={args.var_drop}"],
    }
    if args.short_reference:  # the masked arm without its masked steps: what did those steps add?
        arms["forecast, fewer steps"] = ["objective.kind=forecast"]
    out: dict = {"pretrain": {}, "finetune": {}}
    ckpts: dict = {"scratch": None}
    for arm, extra in arms.items():
        name = f"pre-{arm.replace('->', '-').replace(', ', '-').replace(' ', '-')}-s{seed}"
        steps = S - masked_steps if arm == "forecast, fewer steps" else S
        t0 = time.time()
        # two epochs: with --masked-share 0.5, the masked arm reconstructs in epoch 1 and forecasts in epoch 2
        res = pretrain.main(["configs/pretrain.yaml", f"name={name}", *common, *extra,
                             f"data.in_vars={pre_in}", f"data.out_vars={pre_out}",
                             "data.leads={random: true, min_hours: 6, max_hours: 72, val_hours: [6, 72]}",
                             "data.max_val_batches=8", "train.epochs=2", f"train.steps_per_epoch={steps // 2}",
                             f"optim.lr={args.lr}", f"optim.warmup_steps={max(steps // 20, 1)}"])
        wall = time.time() - t0
        hist = res.metrics_dataframe.to_dict("records") if res.metrics_dataframe is not None else [res.metrics]
        out["pretrain"][arm] = {"wall_s": wall, "steps": res.metrics["step"],
                                "samples_per_s_by_epoch": [h.get("samples_per_s") for h in hist],
                                "val_mask_loss_by_epoch": [h.get("val_mask_loss") for h in hist],
                                "val_loss_by_epoch": [h.get("val_loss") for h in hist]}
        ckpts[arm] = res.checkpoint.path  # the last one: equal steps for both arms
    mean, std = ds.normalizer(ds.variables)
    for arm in (*arms, "scratch"):
        if arm == "scratch" and not args.scratch:
            continue
        init = [f"init_checkpoint={ckpts[arm]}"] if ckpts[arm] else []
        tag = arm.replace('->', '-').replace(', ', '-').replace(' ', '-')
        res = finetune.main(["configs/finetune/global.yaml", f"name=ft-{tag}-s{seed}",
                             *common, *init, "data.leads={random: false, hours: [6, 24, 72]}",
                             f"data.max_val_batches={args.val_batches}", "train.epochs=1",
                             f"train.steps_per_epoch={F}", f"optim.lr={args.ft_lr}",
                             f"optim.warmup_steps={max(F // 10, 1)}"])
        m = res.metrics
        out["finetune"][arm] = {
            "rmse": {v: {h: m[f"val_rmse/{v}@{h}h"] for h in LEADS} for v in ds.variables},
            "persistence": {v: {h: m.get(f"val_persistence_rmse/{v}@{h}h") for h in LEADS} for v in ds.variables},
            "val_rmse_normalised": m["val_rmse"],
        }
    out["std"] = dict(zip(ds.variables, map(float, std)))
    return out


def step_flops(args, shards: Path) -> dict:
    """FLOPs of one training step (forward + backward, ``torch.utils.flop_counter``: matmuls,
    attention) on one batch: forecast vs masked (default decoder, and a lighter one). Counted, not
    timed: wall and CPU times of a step are not reproducible on a shared 2-core machine."""
    import torch
    import yaml
    from torch.utils.flop_counter import FlopCounterMode

    from climax import ClimaX
    from climax.data import ForecastLoader, ShardDataset
    from climax.masking import MaskedObjective, attach_decoder, step_generator
    from climax.metrics import lat_weighted_mse

    ds = ShardDataset(str(shards))
    in_vars = ds.constants + ds.variables
    batch = next(iter(ForecastLoader(ds, "train", in_vars, ds.variables, [6], random_lead=False,
                                     batch_size=args.batch_size, max_batches=1)))
    lat = torch.as_tensor(ds.lat, dtype=torch.float32)
    mcfg = yaml.safe_load((ROOT / (args.flops_model or args.model)).read_text())
    mcfg = {k: v for k, v in mcfg.items() if k not in ("default_vars", "img_size")}  # the data's
    out = {}
    for label, decoder in (("forecast", None), ("masked, decoder dim 128 depth 2 (default)", dict(dim=128, depth=2)),
                           ("masked, decoder dim 64 depth 1", dict(dim=64, depth=1))):
        torch.manual_seed(0)
        model = ClimaX(in_vars, img_size=ds.shape, **mcfg)
        if decoder:
            attach_decoder(model, **decoder)
        objective = MaskedObjective(args.mask_ratio, args.var_drop)
        counter = FlopCounterMode(display=False)
        with counter:
            if decoder:
                pred, target, points = objective(model, batch.x, batch.in_vars, batch.out_vars, step_generator(0, 0))
                loss = lat_weighted_mse(pred, target, lat, points)
            else:
                loss = lat_weighted_mse(model(batch.x, batch.lead_hours, batch.in_vars, batch.out_vars), batch.y, lat)
            loss.backward()
        out[label] = counter.get_total_flops()
    return out


def average(per_seed: list[dict]) -> dict:
    import numpy as np

    first = per_seed[0]
    avg = {"pretrain": {}, "finetune": {}, "std": first["std"]}
    for arm in first["pretrain"]:
        avg["pretrain"][arm] = {"wall_s": float(np.mean([r["pretrain"][arm]["wall_s"] for r in per_seed])),
                                "steps": first["pretrain"][arm]["steps"],
                                "samples_per_s_by_epoch": first["pretrain"][arm]["samples_per_s_by_epoch"],
                                "val_mask_loss_by_epoch": first["pretrain"][arm]["val_mask_loss_by_epoch"]}
    for arm in first["finetune"]:
        rm = {v: {h: float(np.mean([r["finetune"][arm]["rmse"][v][h] for r in per_seed])) for h in LEADS}
              for v in first["std"]}
        avg["finetune"][arm] = {"rmse": rm, "persistence": first["finetune"][arm]["persistence"],
                                "val_rmse_normalised": float(np.mean([r["finetune"][arm]["val_rmse_normalised"]
                                                                      for r in per_seed]))}
    return avg


def table(res: dict, held: str) -> str:
    arms = list(res["finetune"])
    lines = ["| variable | lead | " + " | ".join(arms) + " | masked->forecast / forecast |",
             "|---|---|" + "---|" * len(arms) + "---|"]
    for v in res["std"]:
        for h in LEADS:
            vals = [res["finetune"][a]["rmse"][v][h] for a in arms]
            ratio = res["finetune"]["masked->forecast"]["rmse"][v][h] / res["finetune"]["forecast"]["rmse"][v][h]
            name = f"**{v}** (held out)" if v == held else v
            lines.append(f"| {name} | {h} h | " + " | ".join(f"{x:.4g}" for x in vals) + f" | {ratio:.3f} |")
    return "\n".join(lines)


def summary(res: dict, held: str) -> dict:
    import numpy as np

    f, m = res["finetune"]["forecast"]["rmse"], res["finetune"]["masked->forecast"]["rmse"]
    out = {}
    for h in LEADS:
        ratios = [m[v][h] / f[v][h] for v in res["std"] if v != held]
        out[f"{h}h"] = {"geomean_ratio_pretrained_vars": float(np.exp(np.mean(np.log(ratios)))),
                        "vars_better": int(sum(r < 1 for r in ratios)), "vars": len(ratios),
                        "held_out_ratio": m[held][h] / f[held][h]}
    return out


def plot(res: dict, held: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    variables = list(res["std"])
    f, m = res["finetune"]["forecast"]["rmse"], res["finetune"]["masked->forecast"]["rmse"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [2.6, 1]})
    x = np.arange(len(variables))
    for k, h in enumerate(LEADS):
        change = [100 * (m[v][h] / f[v][h] - 1) for v in variables]
        ax.bar(x + (k - 1) * 0.27, change, 0.27, label=f"{h} h")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{v}\n(held out)" if v == held else v for v in variables], rotation=60, ha="right",
                       fontsize=7)
    ax.set_ylabel("validation RMSE change (%)\nmasked->forecast vs forecast-only")
    ax.set_title("after finetuning: below 0 = masked pretraining helped")
    ax.legend(title="lead", fontsize=8)
    for arm, style in (("forecast", "o-"), ("masked->forecast", "s-"), ("forecast, fewer steps", "d:"),
                       ("scratch", "^--")):
        if arm not in res["finetune"]:
            continue
        r = res["finetune"][arm]["rmse"]
        norm = [np.mean([r[v][h] / res["std"][v] for v in variables if v != held]) for h in LEADS]
        held_n = [r[held][h] / res["std"][held] for h in LEADS]
        line, = ax2.plot(LEADS, norm, style, label=f"{arm}")
        ax2.plot(LEADS, held_n, style, color=line.get_color(), alpha=0.45, lw=1)
    ax2.set_xticks(LEADS)
    ax2.set_xlabel("lead time (h)")
    ax2.set_ylabel("RMSE / std (mean over pretrained variables)")
    ax2.set_title(f"faint: held-out {held}", fontsize=9)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="demo_output/masked_ablation")
    ap.add_argument("--model", default="configs/model/climax-tiny.yaml")
    ap.add_argument("--pretrain-steps", type=int, default=480)
    ap.add_argument("--masked-share", type=float, default=0.5, help="share of the pretraining steps masked")
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--var-drop", type=float, default=0.25)
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ft-lr", type=float, default=5e-4)
    ap.add_argument("--val-batches", type=int, default=25, help="validation batches per lead (x batch size)")
    ap.add_argument("--held-out", default="specific_humidity_850")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--no-scratch", dest="scratch", action="store_false", help="skip the from-scratch reference")
    ap.add_argument("--no-short-reference", dest="short_reference", action="store_false",
                    help="skip the forecast-only pretraining with only the masked arm's forecast steps")
    ap.add_argument("--flops-only", action="store_true", help="only count the FLOPs of a forecast and a masked step")
    ap.add_argument("--flops-model", default=None, help="model configuration of the FLOP count (default: --model)")
    ap.add_argument("--plot", default=str(ROOT / "benchmarks" / "masked_pretraining.png"))
    args = ap.parse_args(argv)

    import ray

    from benchmarks.common import machine

    os.chdir(ROOT)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    from jobs.common import init_ray

    t0 = time.time()
    if not (work / "shards" / "manifest.json").exists():
        init_ray(num_cpus=2)
    shards = prepare_data(work)
    data_s = time.time() - t0
    flops = step_flops(args, shards)
    for label, f in flops.items():
        print(f"training step FLOPs ({args.batch_size} samples) {label}: {f / 1e9:.2f} GFLOP "
              f"({f / flops['forecast']:.2f}x forecast)", flush=True)
    if args.flops_only:
        return {"step_flops": flops}
    import shutil

    init_ray(num_cpus=2)  # as the jobs start it (the dashboard's State API lets Ray Train clean up)
    shutil.rmtree(work / "runs", ignore_errors=True)  # fresh runs (same names would resume)
    per_seed = [run_arms(args, shards, seed) for seed in range(args.seeds)]
    res = average(per_seed)
    res["step_flops"] = flops
    res.update(config=vars(args), machine=machine(), data_s=data_s, total_s=time.time() - t0,
               per_seed=per_seed if args.seeds > 1 else None, summary=summary(res, args.held_out))
    (work / "results.json").write_text(json.dumps(res, indent=1, default=str))
    plot(res, args.held_out, Path(args.plot))
    print(f"\nmachine: {res['machine']}")
    for arm, p in res["pretrain"].items():
        sps = ", ".join(f"{s:.1f}" for s in p["samples_per_s_by_epoch"] if s is not None)
        print(f"pretrain {arm}: {p['steps']} steps x {args.batch_size}, {p['wall_s']:.0f} s wall (job incl. Ray Train "
              f"start and validation); samples/s by epoch [{sps}]")
    print(table(res, args.held_out))
    for h, s in res["summary"].items():
        print(f"{h}: masked->forecast / forecast, geometric mean over the {s['vars']} pretrained variables "
              f"{s['geomean_ratio_pretrained_vars']:.3f} ({s['vars_better']} better); held-out "
              f"{args.held_out} {s['held_out_ratio']:.3f}")
    for arm, r in res["finetune"].items():
        print(f"{arm}: val_rmse (normalised, mean over variables and leads) {r['val_rmse_normalised']:.4f}")
    print(f"total {res['total_s']:.0f} s (data {data_s:.0f} s); results {work / 'results.json'}; plot {args.plot}")
    ray.shutdown()
    return res


if __name__ == "__main__":
    main()
