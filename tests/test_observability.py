"""Metrics to TensorBoard and MLflow through Ray Train's callbacks (jobs/observability.py)."""

from __future__ import annotations

import struct
import sys
import types
from pathlib import Path

import pytest

REPORT = {"epoch": 1, "step": 5, "train_loss": 0.5, "lr": 1e-3, "samples_per_s": 12.0, "restarts": 0,
          "val_loss": 0.4, "val_rmse": 0.9, "val_rmse/2m_temperature@6h": 1.25,
          "val_persistence_rmse/2m_temperature@6h": 2.0}


def read_tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from every event file under ``logdir`` (TFRecord framing)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return {tag: sorted(values) for tag, values in out.items()}


def test_tensorboard_callback_writes_every_scalar_at_the_step(tmp_path):
    from ray import cloudpickle

    from jobs.observability import TensorBoardCallback

    cb = cloudpickle.loads(cloudpickle.dumps(TensorBoardCallback(str(tmp_path / "tb"))))  # as sent to the controller
    cb.after_report(None, [REPORT, {**REPORT, "train_loss": 9.0}], checkpoint=None)  # rank 0's metrics
    cb.after_report(None, [{**REPORT, "epoch": 2, "step": 10, "train_loss": 0.25}], checkpoint=None)
    scalars = read_tensorboard_scalars(tmp_path / "tb")
    assert scalars["train_loss"] == [(5, 0.5), (10, 0.25)]
    assert scalars["val_rmse/2m_temperature_6h"][0] == (5, 1.25)
    assert "epoch" not in scalars and "step" not in scalars


def test_a_failing_logger_switches_off_and_never_raises(tmp_path, caplog):
    from jobs.observability import TensorBoardCallback

    (tmp_path / "file").write_text("")
    cb = TensorBoardCallback(str(tmp_path / "file" / "tb"))  # a folder below a file: cannot be made
    with caplog.at_level("WARNING", logger="jobs.observability"):
        cb.after_report(None, [REPORT], checkpoint=None)
        cb.after_report(None, [REPORT], checkpoint=None)
    warnings = [r for r in caplog.records if "switched off" in r.message]
    assert len(warnings) == 1 and "TensorBoard" in warnings[0].message


@pytest.fixture
def fake_mlflow(monkeypatch):
    """Just enough of mlflow's client API to record what the callback sends."""
    calls: dict = {"params": {}, "metrics": [], "status": [], "runs": []}

    class Metric:
        def __init__(self, key, value, timestamp, step):
            self.key, self.value, self.timestamp, self.step = key, value, timestamp, step

    class Client:
        def __init__(self, tracking_uri=None):
            calls["uri"] = tracking_uri

        def get_experiment_by_name(self, name):
            return types.SimpleNamespace(experiment_id="7") if name in calls.get("experiments", ()) else None

        def create_experiment(self, name):
            calls.setdefault("experiments", set()).add(name)
            return "7"

        def search_runs(self, exp_ids, filter_string, max_results, order_by):
            return [types.SimpleNamespace(info=types.SimpleNamespace(run_id=r)) for r in calls["runs"]
                    if r in filter_string][:max_results]

        def create_run(self, exp_id, run_name, tags):
            calls["runs"].append(run_name)
            return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_name))

        def update_run(self, run_id, status):
            calls["status"].append((run_id, status))

        def log_param(self, run_id, k, v):
            calls["params"][k] = v

        def log_batch(self, run_id, metrics):
            calls["metrics"] += [(m.key, m.value, m.step) for m in metrics]

        def set_terminated(self, run_id, status):
            calls["status"].append((run_id, status))

    mlflow = types.ModuleType("mlflow")
    tracking = types.ModuleType("mlflow.tracking")
    tracking.MlflowClient = Client
    entities = types.ModuleType("mlflow.entities")
    entities.Metric = Metric
    for name, mod in {"mlflow": mlflow, "mlflow.tracking": tracking, "mlflow.entities": entities}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def test_mlflow_callback_one_run_per_training_run(fake_mlflow):
    from jobs.observability import MLflowCallback

    params = {"name": "pre", "optim": {"lr": 0.001}, "data": {"datasets": [{"root": "s3://b/x"}]}}
    cb = MLflowCallback("http://mlflow:5000", "climax", "pre", params, epochs=2)
    cb.after_report(None, [REPORT], checkpoint=None)
    cb.after_report(None, [{**REPORT, "epoch": 2, "step": 10}], checkpoint=None)
    assert fake_mlflow["uri"] == "http://mlflow:5000" and fake_mlflow["runs"] == ["pre"]
    assert fake_mlflow["params"]["optim.lr"] == "0.001"
    assert ("val_rmse/2m_temperature_6h", 1.25, 5) in fake_mlflow["metrics"]  # '@' is not allowed by MLflow
    assert ("train_loss", 0.5, 10) in fake_mlflow["metrics"]
    assert not any(k in ("epoch", "step") for k, _, _ in fake_mlflow["metrics"])
    assert fake_mlflow["status"] == [("pre", "FINISHED")]
    # a relaunch with the same name continues the same MLflow run
    again = MLflowCallback("http://mlflow:5000", "climax", "pre", params, epochs=3)
    again.after_report(None, [{**REPORT, "epoch": 3, "step": 15}], checkpoint=None)
    assert fake_mlflow["runs"] == ["pre"] and ("pre", "RUNNING") in fake_mlflow["status"]


def test_callbacks_from_the_training_config(tmp_path):
    import ray.train

    from jobs.observability import MLflowCallback, TensorBoardCallback, callbacks
    from jobs.train import TrainConfig

    base = {"name": "r", "storage_path": str(tmp_path), "data": {"datasets": [{"root": "x"}]}}
    cbs = callbacks(TrainConfig.model_validate(base))
    assert [type(c) for c in cbs] == [TensorBoardCallback] and cbs[0].logdir == str(tmp_path / "r" / "tensorboard")
    ray.train.RunConfig(name="r", storage_path=str(tmp_path), callbacks=cbs)  # Train V2 accepts them
    cbs = callbacks(TrainConfig.model_validate({**base, "observability": {
        "tensorboard": False, "mlflow_tracking_uri": str(tmp_path / "mlruns")}}))
    assert [type(c) for c in cbs] == [MLflowCallback]
    s3 = {**base, "storage_path": "s3://bucket/runs"}
    assert callbacks(TrainConfig.model_validate(s3))[0].logdir == "s3://bucket/runs/r/tensorboard"
    s3_custom = {**s3, "storage_options": {"endpoint_url": "http://127.0.0.1:9000"}}
    assert callbacks(TrainConfig.model_validate(s3_custom)) == []  # tensorboardX cannot reach that endpoint
    local = {**s3_custom, "observability": {"tensorboard_dir": str(tmp_path / "tb")}}
    assert callbacks(TrainConfig.model_validate(local))[0].logdir == str(tmp_path / "tb")


def test_mlflow_without_the_extra_is_a_config_error(tmp_path):
    import importlib.util
    import subprocess

    from tests.helpers import ROOT

    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    out = subprocess.run([sys.executable, "-m", "jobs.pretrain", "configs/pretrain.yaml",
                          f"observability.mlflow_tracking_uri={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "pip install '.[observability]'" in out.stderr, out.stderr
