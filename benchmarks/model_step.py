"""Forward+backward of the full ClimaX against the straightforward formulation, same process.

CPU (default): the 5.625 deg config (48 variables, 32 x 64, p = 2), B = 2, fp32. The baseline is the
original code's formulation: one convolution per variable and ``nn.MultiheadAttention`` projecting
every variable token; ours is the batched patch embedding and the exact factorised aggregation.
Time is the median of several steps after a warm-up; memory is the bytes autograd saves for the
backward pass (activation memory, counted exactly through saved-tensor hooks) and, on GPU, the
CUDA allocator's peak.

GPU (``--gpu``): bf16 autocast samples/s and model FLOPs utilisation of the 1.40625 deg config
(128 x 256, p = 4) for both formulations.

    python benchmarks/model_step.py [--config configs/model/climax-5.625.yaml] [--batch 2] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine  # noqa: E402
from climax import ClimaX  # noqa: E402


class Original(ClimaX):
    """The straightforward formulation: per-variable convolutions and the full cross-attention."""

    def __init__(self, **cfg):
        super().__init__(**cfg, fast_var_agg=False)

    def embed_tokens(self, x, ids):
        return torch.stack([self.token_embeds[i](x[:, k : k + 1]) for k, i in enumerate(ids)], dim=1)


def saved_activation_bytes(model, x, lead, vars_):
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, lead, vars_).float().pow(2).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def model_flops(cfg, batch, fast: bool) -> float:
    """Matmul FLOPs of one forward pass (x2 per multiply-add); backward is counted as 2x forward."""
    V, (H, W), p, D = len(cfg["default_vars"]), cfg["img_size"], cfg["patch_size"], cfg["embed_dim"]
    L, heads, depth = (H // p) * (W // p), cfg["num_heads"], cfg["depth"]
    tokens = batch * L
    f = 2 * tokens * V * p * p * D  # patch embedding
    if fast:
        f += 2 * tokens * (2 * heads * V * D + 2 * D * D)  # scores, mixing, value and output proj
    else:
        f += 2 * tokens * (2 * V * D * D + 2 * heads * V * (D // heads) + D * D) + 2 * batch * L * D * D
    mlp = int(cfg["mlp_ratio"] * D)
    f += depth * (2 * tokens * (4 * D * D + 2 * D * mlp) + 2 * 2 * batch * L * L * D)  # blocks
    f += 2 * tokens * (cfg["decoder_depth"] * D * D + D * V * p * p)  # head
    return 3 * f


def bench(cls, cfg, batch, steps, device, dtype):
    torch.manual_seed(0)
    model = cls(**cfg).to(device).train()
    vars_ = cfg["default_vars"]
    x = torch.randn(batch, len(vars_), *cfg["img_size"], device=device)
    lead = torch.full((batch,), 72.0, device=device)

    def step():  # forward + backward; the optimiser step is the same for both and not timed
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(x, lead, vars_).float().pow(2).mean()
        loss.backward()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        act = saved_activation_bytes(model, x, lead, vars_) / 2**20
    return statistics.median(times), act, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--gpu", action="store_true", help="bf16 on CUDA, 1.40625 deg config by default")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM: 989)")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    gpu = args.gpu and torch.cuda.is_available()
    config = args.config or str(root / "configs/model" / ("climax-1.40625.yaml" if gpu else "climax-5.625.yaml"))
    cfg = yaml.safe_load(Path(config).read_text())
    batch = args.batch or (16 if gpu else 2)
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    print(f"machine: {machine()}")
    print(f"config: {Path(config).name}, batch {batch}, {dtype}, {device}")
    rows = {}
    for name, cls in (("original", Original), ("ours", ClimaX)):
        t, act, peak = bench(cls, cfg, batch, args.steps, device, dtype)
        flops = model_flops(cfg, batch, fast=cls is ClimaX)
        rows[name] = (t, act, peak, flops)
        line = f"{name:9s} step {t * 1e3:9.1f} ms  {batch / t:8.2f} samples/s  activations {act:8.1f} MiB"
        if gpu:
            mfu = flops / t / (args.peak_tflops * 1e12)
            line += f"  peak {peak:8.1f} MiB  model TFLOP/s {flops / t / 1e12:6.1f}  MFU {100 * mfu:5.1f} %"
        print(line)
    (t0, a0, *_), (t1, a1, *_) = rows["original"], rows["ours"]
    print(f"ratio: {t0 / t1:.2f}x faster, {a0 / a1:.2f}x less activation memory "
          f"(ours needs {rows['ours'][3] / rows['original'][3]:.2f}x the FLOPs)")


if __name__ == "__main__":
    main()
