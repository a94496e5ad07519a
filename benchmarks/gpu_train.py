"""A full training step on a GPU: bf16 autocast vs fp32, eager vs ``torch.compile``, same process.

What `jobs.pretrain` runs per step (``climax.training.train_step``: forward, latitude-weighted MSE,
backward, gradient clipping, AdamW, schedule), on random normalised fields of the full variable set.
For each model config it prints samples/s, model FLOP/s and MFU (matmul FLOPs counted by
``benchmarks.model_step.model_flops``; backward = 2x forward), the CUDA allocator's peak, and:

- bf16 correctness: relative L2 error of the bf16-autocast forward against fp32 with the same weights
  (expected ~1e-2 or below), and a bf16 run of 30 steps on one fixed batch whose loss must fall;
- the ratio of bf16 to fp32 (the baseline, run in the same process) and of compiled to eager.

    python benchmarks/gpu_train.py [--configs climax-5.625 climax-1.40625] [--batch 32 8] [--steps 10]
    python benchmarks/gpu_train.py --shards PATH [--configs climax-5.625] [--batch 32]

``--shards``: the same step fed by ``climax.data.ForecastLoader`` from real shards (random leads
6-72 h, pinned memory) against the same step on a resident batch of the same shape: does the loader
keep the GPU busy? Prints the loader alone, loader + step, and step alone (samples/s), first epoch
(decoding from Parquet) and later epochs (rows cached).

Needs CUDA; on a CPU-only machine it runs the tiny config once as a smoke test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import machine  # noqa: E402
from benchmarks.model_step import model_flops  # noqa: E402
from climax import ClimaX  # noqa: E402
from climax.optim import build_optimizer, warmup_cosine  # noqa: E402
from climax.training import train_step  # noqa: E402


def make_batch(cfg: dict, batch: int, device: torch.device, seed: int = 0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    vars_ = cfg["default_vars"]
    h, w = cfg["img_size"]
    x = torch.randn(batch, len(vars_), h, w, generator=g)
    y = 0.7 * x + 0.3 * torch.randn(batch, len(vars_), h, w, generator=g)  # learnable target
    return SimpleNamespace(x=x.to(device), y=y.to(device), lead_hours=torch.full((batch,), 72.0).to(device),
                           in_vars=vars_, out_vars=vars_, dataset="random", input_time=["-"])


def run(cfg: dict, batch: int, steps: int, device: torch.device, bf16: bool, compile_: bool,
        masked: bool = False) -> dict:
    torch.manual_seed(0)
    model = ClimaX(**cfg)
    objective = gen = None
    if masked:  # masked-field reconstruction (jobs.pretrain objective.kind=masked), default ratios
        from climax.masking import MaskedObjective, attach_decoder

        attach_decoder(model)
        objective, gen = MaskedObjective(), torch.Generator().manual_seed(0)
    model = model.to(device)
    step_model = torch.compile(model) if compile_ else model
    opt = build_optimizer(model, lr=5e-4)
    sched = warmup_cosine(opt, 10, 10_000)
    lat = np.linspace(-88, 88, cfg["img_size"][0])
    b = make_batch(cfg, batch, device)
    for _ in range(3):  # warm-up (and compilation)
        train_step(step_model, b, opt, sched, lat, device, bf16=bf16, masked=objective, generator=gen)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        train_step(step_model, b, opt, sched, lat, device, bf16=bf16, masked=objective,
                   generator=gen)  # returns a float: synchronises
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del model, step_model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"step_s": t, "samples_s": batch / t, "peak_gib": peak}


def bf16_checks(cfg: dict, batch: int, device: torch.device) -> tuple[float, float, float]:
    """(relative error of the bf16 forward vs fp32, first loss, loss after 30 bf16 steps)."""
    torch.manual_seed(0)
    model = ClimaX(**{**cfg, "drop_path": 0.0, "drop_rate": 0.0}).to(device).eval()
    b = make_batch(cfg, batch, device, seed=1)
    with torch.no_grad():
        ref = model(b.x, b.lead_hours, b.in_vars).double()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(b.x, b.lead_hours, b.in_vars).double()
    rel = float((out - ref).norm() / ref.norm())
    opt = build_optimizer(model, lr=5e-4)
    sched = warmup_cosine(opt, 5, 10_000)
    lat = np.linspace(-88, 88, cfg["img_size"][0])
    losses = [train_step(model, b, opt, sched, lat, device, bf16=True) for _ in range(30)]
    del model, opt
    return rel, losses[0], losses[-1]


def loader_fed(root: str, cfg: dict, batch: int, epochs: int, device: torch.device) -> None:
    from climax.data import ForecastLoader, ShardDataset
    from climax.sampling import lead_hours

    ds = ShardDataset(root)
    in_vars, out_vars = ds.constants + ds.variables, ds.variables
    cfg = {**cfg, "default_vars": in_vars, "img_size": [len(ds.lat), len(ds.lon)]}
    hours = lead_hours(6, 72, ds.step_hours)
    cuda = device.type == "cuda"

    def make_loader():
        return ForecastLoader(ds, "train", in_vars, out_vars, hours, random_lead=True, batch_size=batch,
                              pin_memory=cuda)

    print(f"\nloader-fed: {root}, {len(in_vars)} inputs, {len(out_vars)} outputs, grid {cfg['img_size']}, "
          f"batch {batch}, {len(make_loader())} batches per epoch", flush=True)
    # 1. the loader alone
    loader = make_loader()
    for e in range(epochs):
        loader.set_epoch(e)
        t0, n = time.perf_counter(), 0
        for b in loader:
            b.to(device)
            n += len(b)
        if cuda:
            torch.cuda.synchronize()
        print(f"  loader alone     epoch {e}: {n / (time.perf_counter() - t0):8.1f} samples/s", flush=True)
    # 2. loader + bf16 training step, and 3. the same step on one resident batch
    torch.manual_seed(0)
    model = ClimaX(**cfg).to(device)
    opt = build_optimizer(model, lr=5e-4)
    sched = warmup_cosine(opt, 10, 10_000)
    loader = make_loader()
    first = None
    for e in range(epochs):
        loader.set_epoch(e)
        t0, n = time.perf_counter(), 0
        for b in loader:
            first = first or b.to(device)
            train_step(model, b, opt, sched, ds.lat, device, bf16=True)
            n += len(b)
        print(f"  loader + step    epoch {e}: {n / (time.perf_counter() - t0):8.1f} samples/s", flush=True)
    t0, n = time.perf_counter(), 0
    for _ in range(len(loader)):
        train_step(model, first, opt, sched, ds.lat, device, bf16=True)
        n += len(first)
    print(f"  resident batch          : {n / (time.perf_counter() - t0):8.1f} samples/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["climax-5.625", "climax-1.40625"])
    ap.add_argument("--batch", nargs="+", type=int, default=[32, 8], help="one per config")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--shards", default=None, help="shard root: time the loader-fed step instead")
    ap.add_argument("--epochs", type=int, default=4, help="epochs of the loader-fed run")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM: 989)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        args.configs, args.batch, args.steps, args.no_compile = ["climax-tiny"], [2], 2, True
    print(f"machine: {machine()}, torch {torch.__version__}", flush=True)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 baseline as users would run it
        torch.backends.cudnn.allow_tf32 = True
    if args.shards:
        cfg = yaml.safe_load((ROOT / "configs/model" / f"{args.configs[0]}.yaml").read_text())
        loader_fed(args.shards, cfg, args.batch[0], args.epochs, device)
        return
    for name, batch in zip(args.configs, args.batch, strict=True):
        cfg = yaml.safe_load((ROOT / "configs/model" / f"{name}.yaml").read_text())
        cfg.setdefault("default_vars", [f"var{i}" for i in range(13)])  # tiny: the demo's 13 variables
        cfg.setdefault("img_size", [32, 64])
        nparam = sum(p.numel() for p in ClimaX(**cfg).parameters()) / 1e6
        flops = model_flops(cfg, batch, fast=True)
        print(f"\n{name}: {len(cfg['default_vars'])} variables, {cfg['img_size']}, patch {cfg['patch_size']}, "
              f"{nparam:.1f} M parameters, batch {batch}, {flops / batch / 1e12:.3f} TFLOP per sample-step",
              flush=True)
        rel, l0, l1 = bf16_checks(cfg, min(batch, 4), device)
        print(f"  bf16 forward vs fp32: relative L2 error {rel:.2e}; bf16 loss on a fixed batch "
              f"{l0:.4f} -> {l1:.4f} in 30 steps", flush=True)
        rows = {}
        variants = [("fp32 eager", False, False, False), ("bf16 eager", True, False, False)]
        if not args.no_compile:
            variants.append(("bf16 compiled", True, True, False))
        variants.append(("bf16 masked", True, False, True))  # masked pretraining step, same batch
        for label, bf16, comp, masked in variants:
            try:
                r = run(cfg, batch, args.steps, device, bf16, comp, masked)
            except Exception as e:  # noqa: BLE001 - report and go on (e.g. compile unsupported)
                print(f"  {label:14s} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            rows[label] = r
            mfu = flops / r["step_s"] / (args.peak_tflops * 1e12)
            rate = "(FLOPs not counted)" if masked else \
                f"{flops / r['step_s'] / 1e12:6.1f} TFLOP/s  MFU {100 * mfu:5.1f} %"
            print(f"  {label:14s} step {r['step_s'] * 1e3:8.1f} ms  {r['samples_s']:8.1f} samples/s  "
                  f"{rate}  peak {r['peak_gib']:6.2f} GiB", flush=True)
        base = rows.get("fp32 eager")
        for label, r in rows.items():
            if base and label != "fp32 eager":
                print(f"  ratio {label} / fp32 eager: {base['step_s'] / r['step_s']:.2f}x samples/s", flush=True)
        if "bf16 masked" in rows and "bf16 eager" in rows:
            print(f"  masked step / forecast step (bf16 eager): "
                  f"{rows['bf16 masked']['step_s'] / rows['bf16 eager']['step_s']:.2f}x the time", flush=True)


if __name__ == "__main__":
    main()
