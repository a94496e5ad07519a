"""``python -m pipelines.sample_data OUT_DIR [...]`` (see :mod:`pipelines.sample_data`)."""

import sys

if __name__ == "__main__":
    from pipelines.sample_data import main

    sys.exit(main())
