"""Finetune ClimaX on Ray Train: fixed lead times, from our checkpoint or an original ClimaX .ckpt.

    python -m jobs.finetune [CONFIG.yaml] init_checkpoint=PATH [key=value ...]

Default configuration: configs/finetune/global.yaml. Global forecasting at the configured lead times (one
model serves all of them through its lead-time input), regional forecasting (`data.region`: a
named box or [lat_min, lat_max, lon_min, lon_max]), new output variables (new embeddings and head
rows, the rest loaded; the load report is printed), `freeze_backbone=true` to train only the
embeddings and the head.
"""

from __future__ import annotations

import sys

from jobs.train import main as _main


def main(argv: list[str] | None = None):
    return _main(argv, __doc__, "configs/finetune/global.yaml")


if __name__ == "__main__":
    main(sys.argv[1:])
