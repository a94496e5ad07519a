"""Memory and scale (docs/design.md): the computed per-GPU table for the 110 M, 300 M and 1 B
configs at 1.40625 deg, and a CPU measurement of the bytes autograd saves for backward (the
activations) with and without activation checkpointing, which checks the formula's ratio.

    .venv/bin/python -m benchmarks.memory_scale            # table + CPU measurement (~1 min, 2 cores)

Saved bytes are counted with ``torch.autograd.graph.saved_tensors_hooks`` (torch.cuda is absent on
this machine, so no allocator peak): every tensor autograd packs for backward, deduplicated by
storage, during one forward of a training step.
"""

from __future__ import annotations

import argparse

import torch
import yaml

from climax.model import ClimaX
from climax.parallel import checkpoint_blocks

GB = 1e9
CONFIGS = {"110M": "configs/model/climax-1.40625.yaml", "300M": "configs/model/climax-300m.yaml",
           "1B": "configs/model/climax-1b.yaml"}


def count(path: str) -> tuple[int, dict]:
    """Exact count with the model class: built with one block (cheap), plus the other depth - 1."""
    cfg = yaml.safe_load(open(path))
    m = ClimaX(**{**cfg, "depth": 1})
    block = sum(p.numel() for p in m.blocks[0].parameters())
    return sum(p.numel() for p in m.parameters()) + (cfg["depth"] - 1) * block, cfg


def state_bytes(n: int, gpus: int, strategy: str) -> dict:
    """fp32 master weights (4 B), fp32 gradients (4 B), AdamW exp_avg + exp_avg_sq (8 B); bf16
    compute under autocast casts on the fly (FSDP2 with a bf16 MixedPrecisionPolicy also holds one
    gathered bf16 block at a time, small against these)."""
    shard = gpus if strategy == "fsdp" else 1
    return {"params": 4 * n / shard, "grads": 4 * n / shard, "adamw": 8 * n / shard}


def activation_bytes(cfg: dict, ac: bool, bytes_per=2, factor=18) -> dict:
    """Per sample. Tokens L = (H/p)(W/p) after aggregation. A pre-norm ViT block saves about
    ``factor`` x L x D values for backward (LN inputs, qkv, attention output + logsumexp, proj,
    the MLP's 4D hidden before and after GELU, residuals; measured below on CPU); SDPA/flash keeps
    no L^2 matrix. With checkpointing a block keeps only its input (L x D) and one block's full set
    exists during its recomputation. Before aggregation the per-variable embedding is V x L x D
    (ours fuses it away, ``embed_and_aggregate``; the original model materialises it)."""
    H, W = cfg["img_size"]
    p, D, depth, V = cfg["patch_size"], cfg["embed_dim"], cfg["depth"], len(cfg["default_vars"])
    L = (H // p) * (W // p)
    per_block = factor * L * D * bytes_per
    blocks = depth * L * D * bytes_per + per_block if ac else depth * per_block
    return {"tokens": L, "blocks": blocks, "var_embed_unfused": V * L * D * bytes_per}


def saved_bytes(model: torch.nn.Module, x, lead, vars_) -> int:
    seen: dict = {}

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.dtype)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, lead, vars_, vars_)
    out.float().square().mean().backward()
    return sum(seen.values())


def measure(depth: int = 4, D: int = 192, heads: int = 4, grid=(32, 64), patch=2, batch=4) -> dict:
    vars_ = [f"v{i}" for i in range(8)]
    res = {}
    for ac in (False, True):
        torch.manual_seed(0)
        m = ClimaX(vars_, img_size=grid, patch_size=patch, embed_dim=D, depth=depth, decoder_depth=1,
                   num_heads=heads, mlp_ratio=4.0, drop_path=0.0, drop_rate=0.0)
        if ac:
            checkpoint_blocks(m)
        x = torch.randn(batch, len(vars_), *grid)
        res[ac] = saved_bytes(m, x, torch.full((batch,), 6.0), vars_)
    L = (grid[0] // patch) * (grid[1] // patch)
    # the blocks' share: the difference between two depths isolates one block
    m2 = {}
    for d in (depth, depth + 1):
        torch.manual_seed(0)
        m = ClimaX(vars_, img_size=grid, patch_size=patch, embed_dim=D, depth=d, decoder_depth=1, num_heads=heads,
                   mlp_ratio=4.0, drop_path=0.0, drop_rate=0.0)
        m2[d] = saved_bytes(m, torch.randn(batch, len(vars_), *grid), torch.full((batch,), 6.0), vars_)
    per_block = m2[depth + 1] - m2[depth]
    return {"no_ac": res[False], "ac": res[True], "per_block": per_block,
            "factor": per_block / (batch * L * D * 4), "tokens": L, "depth": depth}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=8)
    args = ap.parse_args()
    print("| config | params | strategy | params+grads+AdamW per GPU (GB) | activations/sample, no AC (GB) "
          "| with AC (GB) |")
    for name, path in CONFIGS.items():
        n, cfg = count(path)
        for strategy in ("ddp", "fsdp"):
            s = state_bytes(n, args.gpus, strategy)
            a0, a1 = activation_bytes(cfg, False), activation_bytes(cfg, True)
            print(f"| {name} | {n / 1e6:.1f} M | {strategy} | {sum(s.values()) / GB:.2f} | {a0['blocks'] / GB:.3f} | "
                  f"{a1['blocks'] / GB:.3f} |")
    r = measure()
    print(f"CPU measurement (fp32, depth {r['depth']}, {r['tokens']} tokens): saved for backward "
          f"{r['no_ac'] / 2**20:.1f} MiB without AC, {r['ac'] / 2**20:.1f} MiB with AC "
          f"(ratio {r['ac'] / r['no_ac']:.3f}); one block saves {r['factor']:.1f} x tokens x D values")


if __name__ == "__main__":
    main()
