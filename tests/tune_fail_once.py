"""``python -m tests.tune_fail_once CONFIG [key=value ...]``: ``jobs.tune`` whose first trial to start
fails once; a test hook kept out of the production code (tests/test_tune.py, tests/test_hardening.py).

``CLIMAX_TUNE_TEST_FAIL_ONCE`` names a marker file, read here on the driver (the trials must see the
same filesystem: a local cluster); the trial that creates it fails. The patched ``run_trial`` is
defined in ``__main__``, so Tune ships it to the trials by value, with the marker path, and it keeps
the name Tune registers (``run_trial``: a relaunch restores the same trainable).
"""

from __future__ import annotations

import os
import sys

from jobs import tune
from jobs.tuning import runtime

MARKER = os.environ["CLIMAX_TUNE_TEST_FAIL_ONCE"]
ORIGINAL = runtime.run_trial


def run_trial(config: dict, campaign: dict) -> None:
    import ray.tune

    try:
        os.close(os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return ORIGINAL(config, campaign)
    trial_id = ray.tune.get_context().get_trial_id()
    raise RuntimeError(f"injected failure of trial {trial_id} (CLIMAX_TUNE_TEST_FAIL_ONCE)")


if __name__ == "__main__":
    runtime.run_trial = run_trial  # build_tuner reads its module's run_trial when it builds the trainable
    tune.main(sys.argv[1:])
