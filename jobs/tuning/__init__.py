"""The parts of ``jobs.tune`` (hyperparameter campaigns), along their seams: ``campaign`` (the
configuration, checked; no Ray), ``runtime`` (Ray Tune: trials, scheduler, Tuner, trial log) and
``report`` (table, plot, best checkpoint, summary). ``python -m jobs.tune`` is the entry point."""
