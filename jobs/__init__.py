"""Entry points that `ray job submit` runs: `python -m jobs.NAME CONFIG.yaml [key=value ...]`."""
