"""``make demo``: the platform end to end on an embedded default, local Ray and local files.

1. generate three years of ERA5-like sample data (WeatherBench-layout NetCDF);
2. preprocess them on Ray Data into shards (configs/recipes/demo.yaml);
3. build the full ClimaX (configs/model/climax-5.625.yaml), read a batch from the shards
   (normalised with the manifest's statistics), run one forward and backward pass, print the
   parameter count and the loss.

    python -m jobs.demo [workdir=demo_output] [years=[2015,2016,2017]]
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
    workdir: str = Field("demo_output", description="where sample data and shards go")
    years: list[int] = Field([2015, 2016, 2017], description="years of sample data (train, val, test)")
    recipe: str = Field("configs/recipes/demo.yaml", description="preprocessing recipe")
    model: str = Field("configs/model/climax-5.625.yaml", description="model configuration")
    batch_size: int = 2


def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_args(DemoConfig, __doc__, argv, config_required=False)
    work = Path(cfg.workdir)
    t0 = time.time()

    print("\n== 1. sample data ==")
    from pipelines.sample_data import generate

    sample = work / "sample"
    if not (sample / "weatherbench").is_dir():
        generate(sample, years=tuple(cfg.years), formats=("weatherbench",))
    print(f"sample data in {sample}")

    print("\n== 2. preprocessing on Ray Data ==")
    from jobs import preprocess

    first, last = min(cfg.years), max(cfg.years)
    splits = {"train": [first, max(first, last - 2)], "val": [last - 1, last - 1], "test": [last, last]}
    manifest = preprocess.main([cfg.recipe, f"output={work / 'shards'}",
                                f"sources.0.path={sample / 'weatherbench'}",
                                f"time.start='{first}-01-01'", f"time.end='{last}-12-31T18:00'",
                                f"splits={yaml.safe_dump(splits, default_flow_style=True).strip()}"])

    print("\n== 3. the ClimaX model ==")
    import numpy as np
    import torch

    from climax import ClimaX
    from climax import shards as S
    from climax.metrics import lat_weighted_mse

    model_cfg = yaml.safe_load((ROOT / cfg.model).read_text() if not Path(cfg.model).is_absolute()
                               else Path(cfg.model).read_text())
    model = ClimaX(**model_cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"ClimaX from {cfg.model}: {n_params / 1e6:.1f} M parameters, "
          f"{len(model.default_vars)} variables, grid {model.img_size}, patch {model.patch_size}")
    man = S.Manifest(manifest)
    in_vars = [v for v in man.variables if v in model.var_map]
    shard = man.shards("train")[0]
    times, arrays = S.read_shard(str(work / "shards" / shard["path"]), in_vars,
                                 rows=list(range(cfg.batch_size + 1)))
    mean, std = man.mean_std(in_vars)
    x = np.stack([arrays[v] for v in in_vars], axis=1)
    x = torch.from_numpy((x - mean[None, :, None, None]) / std[None, :, None, None]).float()
    inp, target = x[:-1], x[1:]  # 6-hour forecast pairs from consecutive steps
    lead = torch.full((len(inp),), man.step_hours)
    t1 = time.time()
    pred = model(inp, lead, in_vars, in_vars)
    loss = lat_weighted_mse(pred, target, torch.from_numpy(man.lat))
    loss.backward()
    print(f"one forward+backward on a batch of {len(inp)} ({len(in_vars)} input variables from the shards): "
          f"loss {loss.item():.4f} (latitude-weighted MSE, normalised units) in {time.time() - t1:.1f} s")
    print(f"\ndemo finished in {time.time() - t0:.0f} s; outputs under {work}/")


if __name__ == "__main__":
    main(sys.argv[1:])
