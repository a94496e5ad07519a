"""Training on Ray Train against generated data: two nodes, a killed worker, a relaunch (checkpoints on
S3), finetuning from an original-format checkpoint on another grid, regional orientation.

The jobs run as users run them (``python -m jobs.pretrain CONFIG key=value``) in subprocesses,
against a two-node ``ray.cluster_utils.Cluster`` or a local Ray started by the job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import FORECAST_VARS, ROOT

VARS = FORECAST_VARS
TINY = {"patch_size": 2, "embed_dim": 64, "depth": 2, "decoder_depth": 1, "num_heads": 4, "mlp_ratio": 2.0,
        "drop_path": 0.0, "drop_rate": 0.0}


@pytest.fixture
def dataset(forecast_shards) -> Path:
    """Three years of 6-hourly 11.25-degree sample data, preprocessed: train 2014, val 2015, test 2016
    (``forecast_shards``, built once per session: tests/conftest.py)."""
    return forecast_shards


def config(dataset: Path, storage: Path, **kw) -> dict:
    cfg = {
        "name": "run", "storage_path": str(storage), "model": dict(TINY),
        "data": {"datasets": [{"root": str(dataset)}], "batch_size": 8, "max_val_batches": 4,
                 "leads": {"random": True, "min_hours": 6, "max_hours": 24, "val_hours": [6]}},
        "optim": {"lr": 2e-3, "warmup_steps": 10},
        "train": {"epochs": 2, "steps_per_epoch": 5, "seed": 0},
        "scaling": {"num_workers": 1},
        "max_failures": 2,
    }
    for key, value in kw.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def run_job(module: str, cfg: dict, tmp: Path, env: dict | None = None, wait: bool = True, timeout: float = 600):
    path = tmp / f"{cfg['name']}-{time.time_ns()}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", module, str(path)], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if (p / "model.pt").exists())


def last_metrics(run_dir: Path) -> dict:
    """Metrics stored in the newest checkpoint (by step)."""
    best = None
    for p in checkpoints(run_dir):
        meta = torch.load(p / "model.pt", map_location="cpu", weights_only=True)
        if best is None or meta["metrics"]["step"] > best["step"]:
            best = meta["metrics"]
    assert best is not None, f"no checkpoint under {run_dir}"
    return best


def test_two_node_pretraining_beats_persistence(dataset, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        # random-lead pretraining restricted to 6 h leads, so that a few hundred CPU steps suffice
        cfg = config(dataset, tmp_path / "runs", **{
            "name": "two-nodes", "scaling.num_workers": 2, "train.epochs": 3, "train.steps_per_epoch": 100,
            "data.batch_size": 4, "data.leads.max_hours": 6, "data.max_val_batches": 8,
            "model.embed_dim": 128, "optim.lr": 2e-3, "optim.warmup_steps": 20})
        out = run_job("jobs.pretrain", cfg, tmp_path, env={"RAY_ADDRESS": cluster.address})
    finally:
        cluster.shutdown()
    assert "2 worker(s)" in out and "epoch 3/3" in out, out
    # each node has one CPU and each worker takes one, so the workers sit on different Ray nodes
    # (Ray Train's node_rank groups by IP, which both local nodes share)
    m = last_metrics(tmp_path / "runs" / "two-nodes")
    assert m["step"] == 300
    better = [v for v in ("10m_v_component_of_wind", "2m_temperature", "geopotential_500", "temperature_850")
              if m[f"val_rmse/{v}@6h"] < m[f"val_persistence_rmse/{v}@6h"]]
    assert better, {k: v for k, v in m.items() if "rmse" in k}


def _train_workers(ray_tmp: Path) -> list[int]:
    """PIDs of the Ray Train workers of the Ray whose temp dir is ``ray_tmp`` (the job's own local
    Ray; each worker logs to ``python-core-worker-*_<pid>.log`` there), never anyone else's."""
    ours = {int(p.stem.rsplit("_", 1)[1]) for p in ray_tmp.glob("**/session_*/logs/python-core-worker-*_*.log")}
    pids = []
    for pid in ours:
        try:
            if b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            continue
    return pids


def test_killed_worker_restarts_from_the_last_checkpoint(dataset, tmp_path):
    cfg = config(dataset, tmp_path / "runs", **{"name": "killed", "train.epochs": 4, "train.steps_per_epoch": 10})
    ray_tmp = Path("/tmp") / f"ray-killed-{os.getpid()}"  # short: Ray's socket paths have a length limit
    proc = run_job("jobs.pretrain", cfg, tmp_path, env={"RAY_TMPDIR": str(ray_tmp)}, wait=False)
    run_dir = tmp_path / "runs" / "killed"
    deadline = time.time() + 300
    killed = None
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    while time.time() < deadline and proc.poll() is None:
        # kill once Ray Train has registered a checkpoint (its snapshot lists one), not merely
        # once the files exist: the controller registers reports asynchronously
        try:
            registered = bool(json.loads(snapshot.read_text()).get("checkpoint_results"))
        except (OSError, ValueError):
            registered = False
        if registered and _train_workers(ray_tmp):
            killed = _train_workers(ray_tmp)[0]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.1)
    out, _ = proc.communicate(timeout=600)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert killed is not None, out
    assert proc.returncode == 0, out
    assert "resumed from the checkpoint at step" in out, out
    m = last_metrics(run_dir)
    assert m["step"] == 40 and m["epoch"] == 4 and m["restarts"] >= 1


@pytest.fixture(scope="module")
def relaunched_on_s3(forecast_shards, tmp_path_factory, moto_s3, ray_local):
    """One run with ``storage_path`` on S3 (moto server), 2 epochs, then relaunched with the same name
    and 3 epochs (in-process, through the job's own ``fit``, on the session's local Ray): the relaunch
    and the S3 checkpoint tests both read it."""
    import s3fs

    from jobs.train import TrainConfig, fit

    fs = s3fs.S3FileSystem(**moto_s3)
    fs.mkdir("climax-runs")
    tmp = tmp_path_factory.mktemp("relaunch")
    cfg = config(forecast_shards, tmp, **{"name": "resumed", "storage_path": "s3://climax-runs/runs",
                                          "storage_options": moto_s3, "train.epochs": 2})
    first = fit(TrainConfig.model_validate(cfg))
    first_found = fs.glob("climax-runs/runs/resumed/checkpoint_*/model.pt")
    first_model = tmp / "first-model.pt"  # copied before the relaunch, whose checkpoints replace these
    if first_found:
        fs.get(first_found[-1], str(first_model))
    cfg["train"]["epochs"] = 3
    second = fit(TrainConfig.model_validate(cfg))
    return SimpleNamespace(fs=fs, tmp=tmp, first=first, first_found=first_found, first_model=first_model,
                           second=second)


def test_relaunch_with_the_same_name_resumes(relaunched_on_s3):
    """Relaunching with the same name and storage_path continues the step counter and the schedule."""
    first, second, fs = relaunched_on_s3.first, relaunched_on_s3.second, relaunched_on_s3.fs
    assert first.metrics["step"] == 10 and first.metrics["restarts"] == 0
    assert second.metrics["step"] == 15 and second.metrics["epoch"] == 3 and second.metrics["restarts"] == 1
    # the schedule was rebuilt at step 10 of 15, not restarted: the last learning rate is the end of the cosine
    assert second.metrics["lr"] == pytest.approx(0.0, abs=1e-12)
    # the newest checkpoint in the bucket (by step) is the relaunch's last one
    steps = []
    for i, key in enumerate(fs.glob("climax-runs/runs/resumed/checkpoint_*/model.pt")):
        local = relaunched_on_s3.tmp / f"model-{i}.pt"
        fs.get(key, str(local))
        steps.append(torch.load(local, map_location="cpu", weights_only=True)["metrics"]["step"])
    assert max(steps) == 15, steps


def test_original_checkpoint_finetunes_on_another_grid(dataset, tmp_path, ray_local):
    """Our model saved as an original Lightning-style dict (``net.`` keys, no config) at 8 x 16,
    finetuned on the 16 x 32 data with fixed leads and a new output variable."""
    from climax import ClimaX, load_model

    torch.manual_seed(0)
    old_vars = VARS[:-1]  # temperature_850 is new to the checkpoint
    small = ClimaX(old_vars, img_size=(8, 16), **TINY)
    ckpt = tmp_path / "original.ckpt"
    torch.save({"epoch": 3, "global_step": 100, "pytorch-lightning_version": "1.9.0",
                "state_dict": {f"net.{k}": v for k, v in small.state_dict().items()}}, ckpt)
    cfg = config(dataset, tmp_path / "runs", **{
        "name": "finetune", "init_checkpoint": str(ckpt), "ckpt_vars": old_vars,
        "data.leads": {"random": False, "hours": [6, 12]}, "train.epochs": 1, "train.steps_per_epoch": 4})
    out = run_job("jobs.finetune", cfg, tmp_path, env={"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address})
    assert "interpolated" in out and "pos_embed" in out, out
    assert "temperature_850" in out, out  # reported as new (initialised)
    run_dir = tmp_path / "runs" / "finetune"
    m = last_metrics(run_dir)
    assert m["step"] == 4 and "val_rmse/temperature_850@6h" in m and "val_rmse/temperature_850@12h" in m
    model, _ = load_model(checkpoints(run_dir)[-1])
    assert model.img_size == (16, 32) and "temperature_850" in model.default_vars


def test_regional_orientation(tmp_path):
    """A field warm only in the northern hemisphere stays north after cropping and prediction."""
    from climax import ClimaX
    from climax.metrics import lat_weighted_mse
    from climax.regions import Region

    lat = np.linspace(-84.375, 84.375, 16)  # south to north, as the shards
    lon = np.arange(32) * 11.25
    region = Region.from_box(lat, lon, -40, 40, 90, 200, patch_size=2)
    field = np.where(lat[:, None] > 0, 1.0, -1.0) * np.ones((16, 32))  # warm north, cold south
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = ClimaX(["t"], img_size=(16, 32), **TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rlat = torch.from_numpy(region.lat(lat))
    assert np.all(np.diff(region.lat(lat)) > 0)
    for _ in range(60):  # learn to persist the field, on the region only
        x = torch.from_numpy(field + 0.1 * rng.standard_normal((8, 1, 16, 32))).float()
        xr = region.crop(x)
        loss = lat_weighted_mse(model(xr, torch.full((8,), 6.0), ["t"], ["t"], region=region), xr, rlat)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(field[None, None]).float()
        pred = model(region.crop(x), torch.tensor([6.0]), ["t"], ["t"], region=region)[0, 0].numpy()
    north, south = pred[region.lat(lat) > 0], pred[region.lat(lat) < 0]
    assert north.mean() > 0.5 and south.mean() < -0.5, (north.mean(), south.mean())


def test_checkpoints_to_s3(relaunched_on_s3):
    """storage_path on S3 (moto server): checkpoints land in the bucket and load back (the first launch
    of ``relaunched_on_s3``)."""
    from climax import load_model

    result, found = relaunched_on_s3.first, relaunched_on_s3.first_found
    assert result.error is None and result.metrics["step"] == 10
    assert found, relaunched_on_s3.fs.find("climax-runs")
    model, report = load_model(relaunched_on_s3.first_model)
    assert model.img_size == (16, 32) and report.exact


def test_a_run_from_a_checkpoint_takes_its_model_unless_the_config_sets_one(tmp_path):
    """"Set by the user" is pydantic's model_fields_set (also after the trip to the workers), not a
    comparison with the default: an explicit model, even the default file, goes on top of the
    checkpoint's recorded configuration; an unset one leaves the checkpoint's."""
    from climax.checkpoint import save_checkpoint
    from climax.model import ClimaX
    from climax.tasks import model_config
    from jobs.train import TrainConfig

    net = ClimaX(["t", "u"], img_size=(8, 16), **TINY)
    save_checkpoint(net, tmp_path / "model.pt")
    base = {"data": {"datasets": [{"root": "unused"}]}, "init_checkpoint": str(tmp_path / "model.pt")}
    unset = TrainConfig.model_validate(base)
    shipped = TrainConfig.model_validate(unset.model_dump(mode="json", exclude_unset=True))  # as build_trainer
    assert "model" not in shipped.model_fields_set
    assert model_config(shipped, net.config).embed_dim == TINY["embed_dim"]
    explicit = TrainConfig.model_validate({**base, "model": "configs/model/climax-5.625.yaml"})
    mcfg = model_config(explicit, net.config)
    assert mcfg.embed_dim == 1024 and mcfg.default_vars == ["t", "u"]  # the checkpoint's variables stay
    assert model_config(TrainConfig.model_validate({**base, "model": {"depth": 3}}), net.config).depth == 3
