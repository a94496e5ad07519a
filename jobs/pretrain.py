"""Pretrain ClimaX on Ray Train from preprocessed shards (random lead times, 6 h to 168 h).

    python -m jobs.pretrain [CONFIG.yaml] [key=value ...]

Default configuration: configs/pretrain.yaml. Relaunching with the same `name` and `storage_path`
resumes from the last checkpoint (step counter and learning-rate schedule included).
"""

from __future__ import annotations

import sys

from jobs.train import main as _main


def main(argv: list[str] | None = None):
    return _main(argv, __doc__, "configs/pretrain.yaml")


if __name__ == "__main__":
    main(sys.argv[1:])
