import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's controller polls its workers every 2 s by default: a run's start, its reports and its
# end each wait up to one interval. The tests' runs are seconds long, so they poll more often (Ray's
# own knob; every Ray the tests start, and the jobs they run in subprocesses, inherit it).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Ray Train 2.60 starts one more actor per run, a PreemptionWatcher polling for node drains (spot
# reclaims); the tests' local clusters are never drained, so they run without it: one process fewer
# per run, for the ~30 runs of the suite (Ray's own switch, propagated to every run the tests start).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real sample files beside the checkout; tests using them skip in a user's clone."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent (only on developer machines and CI)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs) for every in-process pipeline test."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def forecast_shards(tmp_path_factory, ray_local) -> Path:
    """Three years of 6-hourly 11.25-degree sample data, preprocessed: train 2014, val 2015, test
    2016 (``tests.helpers.FORECAST_VARS``). Built once for the session: test_train and test_masking
    train on it."""
    from pipelines.build import build
    from pipelines.recipe import Recipe
    from pipelines.sample_data import generate
    from tests.helpers import FORECAST_VARS as variables

    raw = tmp_path_factory.mktemp("raw")
    generate(raw, years=(2014, 2015, 2016), resolution=11.25, step_hours=6, variables=variables,
             formats=("weatherbench",), progress=False)
    out = tmp_path_factory.mktemp("shards")
    build(Recipe.model_validate({
        "sources": [{"path": str(raw / "weatherbench")}], "variables": variables,
        "grid": {"resolution": 11.25, "method": "bilinear"},
        "time": {"start": "2014-01-01", "end": "2016-12-31T18:00", "step": "6h"},
        "splits": {"train": [2014, 2014], "val": [2015, 2015], "test": [2016, 2016]},
        "output": str(out), "shard_bytes": 2_000_000}))
    return out


@pytest.fixture(scope="session")
def moto_s3():
    """A real S3 API: moto in server mode on 127.0.0.1. Yields s3fs ``storage_options``."""
    import logging

    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
    server.stop()
