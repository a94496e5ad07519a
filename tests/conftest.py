import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

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
