"""End to end as on a cluster: a real head (`ray start --head` on 127.0.0.1), the four jobs submitted
with `ray job submit --working-dir .`, each awaited until SUCCEEDED, their artefacts checked.

The head gets free ports of its own and its own temporary folder, and is stopped by ending exactly
the processes it started: a bare `ray stop` would end every Ray instance of this user on the
machine, other people's test clusters included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
VARS = ["land_sea_mask", "orography", "2m_temperature", "geopotential_500", "temperature_850"]
TINY = {"patch_size": 2, "embed_dim": 32, "depth": 1, "decoder_depth": 1, "num_heads": 2, "mlp_ratio": 2.0,
        "drop_path": 0.0, "drop_rate": 0.0}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _own_processes(session: int, marker: str) -> list[int]:
    """Processes of our head: in the session of `ray start`, or naming our temporary folder."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            stat = (d / "stat").read_text()
            state, *_, sid = stat[stat.rindex(")") + 2:].split()[:4]
            sid = int(sid)
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            continue
        if state == "Z":  # exited, not yet reaped (`ray start` itself, until proc.wait): nothing to stop
            continue
        if sid == session or marker in cmd:
            pids.append(int(d.name))
    return pids


def _stop(proc: subprocess.Popen, marker: str) -> None:
    # SIGTERM, then SIGKILL what is left after 1 s (the raylet and its runtime-env agent take ~13 s to
    # exit gracefully after a run, longer than any wait here; nothing of the head outlives the test:
    # its temp dir is removed)
    for sig, wait in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
        pids = _own_processes(proc.pid, marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline and _own_processes(proc.pid, marker):
            time.sleep(0.2)
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def head():
    """A Ray head on 127.0.0.1 with free ports; yields the job API address (http://...)."""
    from ray._private.utils import get_dashboard_dependency_error

    if (missing := get_dashboard_dependency_error()) is not None:
        pytest.skip(f"`ray job submit` needs the dashboard of ray[default] ({missing}); `make venv` installs it "
                    "(requirements.lock)")
    temp_dir = tempfile.mkdtemp(prefix="rjs", dir="/tmp")  # short: Unix socket paths stay under 108 bytes
    gcs, dash, agent, agent_grpc, metrics, rtenv, nm, om = _free_ports(8)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # `python` of jobs = ours
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={rtenv}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
         "--num-cpus=2", "--num-gpus=0", "--object-store-memory=300000000", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                log_text = (Path(temp_dir) / "ray-start.log").read_text()
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log_text}")
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline:
                    pytest.fail(f"the job API at {address} did not come up:\n"
                                f"{(Path(temp_dir) / 'ray-start.log').read_text()}")
                time.sleep(1)
        yield {"address": address, "temp_dir": Path(temp_dir), "env": env}
    finally:
        try:
            from ray.job_submission import JobSubmissionClient

            client_ = JobSubmissionClient(address)
            for job in client_.list_jobs():
                if str(job.status) not in TERMINAL and job.submission_id:
                    client_.stop_job(job.submission_id)
        except Exception:  # noqa: BLE001 - the head may be gone already
            pass
        _stop(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(head: dict, submission_id: str, *entrypoint: str) -> None:
    """`ray job submit --working-dir . --no-wait -- ENTRYPOINT` from the project root."""
    deadline = time.time() + 120
    while True:
        out = subprocess.run([RAY, "job", "submit", "--address", head["address"], "--submission-id", submission_id,
                              "--working-dir", ".", "--no-wait", "--", *entrypoint],
                             cwd=ROOT, env=head["env"], capture_output=True, text=True, timeout=180)
        # A fresh head answers the job API before its job agent is up: Ray then says
        # "No available agent to submit job, please try again later" (status 500). Retry that only.
        if out.returncode == 0 or "No available agent" not in out.stdout + out.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert out.returncode == 0, out.stdout + out.stderr


def wait(head: dict, submission_id: str, timeout: float = 600) -> tuple[str, str]:
    """(final status, logs) of a submitted job."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head["address"])
    deadline = time.time() + timeout
    while str(status := client.get_job_status(submission_id)) not in TERMINAL:
        if time.time() > deadline:
            client.stop_job(submission_id)
            pytest.fail(f"{submission_id} still {status} after {timeout} s:\n{client.get_job_logs(submission_id)}")
        time.sleep(0.25)
    return str(status), client.get_job_logs(submission_id)


def run(head: dict, submission_id: str, *entrypoint: str, timeout: float = 600) -> str:
    submit(head, submission_id, *entrypoint)
    status, logs = wait(head, submission_id, timeout)
    assert status == "SUCCEEDED", f"{submission_id}: {status}\n{logs}"
    assert "effective configuration:" in logs, logs
    return logs


def write(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def test_preprocess_pretrain_finetune_evaluate_through_ray_job_submit(head, tmp_path):
    from pipelines.sample_data import generate

    t0 = time.time()
    # a submission with a bad key fails fast, naming the key, before any Ray work
    bad = write(tmp_path / "bad.yaml", {"name": "x", "data": {"datasets": [{"root": "x"}]}, "optim": {"lrr": 1}})
    submit(head, "bad-key", "python", "-m", "jobs.pretrain", bad)

    generate(tmp_path / "raw", years=(2014, 2015, 2016), resolution=11.25, step_hours=6, variables=VARS,
             formats=("weatherbench",), progress=False)
    shards = tmp_path / "shards"
    recipe = write(tmp_path / "recipe.yaml", {
        "sources": [{"path": str(tmp_path / "raw" / "weatherbench"), "format": "weatherbench"}], "variables": VARS,
        "grid": {"resolution": 11.25, "method": "bilinear"},
        "time": {"start": "2014-01-01", "end": "2016-12-31T18:00", "step": "6h"},
        "splits": {"train": [2014, 2014], "val": [2015, 2015], "test": [2016, 2016]},
        "output": str(shards), "shard_bytes": 2_000_000})
    logs = run(head, "preprocess", "python", "-m", "jobs.preprocess", recipe)
    assert "manifest:" in logs, logs

    status, logs = wait(head, "bad-key", 120)
    assert status == "FAILED" and "unknown key 'optim.lrr'" in logs and "Traceback" not in logs, (status, logs)

    # what `--working-dir .` uploaded: the project's sources, not .venv, demo_output or .git
    pkgs = [p for p in (head["temp_dir"] / "session_latest" / "runtime_resources" / "working_dir_files").iterdir()
            if p.is_dir()]
    assert pkgs, "no working_dir package on the head"
    for pkg in pkgs:
        assert (pkg / "jobs" / "preprocess.py").is_file() and (pkg / "climax").is_dir()
        for ignored in (".venv", "demo_output", ".git", "runs"):
            assert not (pkg / ignored).exists(), f"{ignored} was uploaded with the working dir"
        size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
        assert size < 20e6, f"working dir package is {size / 1e6:.0f} MB"

    # shards
    manifest = json.loads((shards / "manifest.json").read_text())
    assert set(manifest["splits"]) == {"train", "val", "test"}
    for split in manifest["splits"].values():
        assert split["shards"] and all((shards / s["path"] if isinstance(s, dict) else shards / s).exists()
                                       for s in split["shards"])
    assert (shards / "constants.parquet").is_file()
    assert list((shards / "climatology").glob("*.parquet")), "no climatology"

    # pretrain (random leads) then finetune (fixed leads) from its checkpoint
    runs = tmp_path / "runs"
    common = {"storage_path": str(runs), "model": TINY,
              "optim": {"lr": 1e-3, "warmup_steps": 2}, "scaling": {"num_workers": 1}, "max_failures": 0}
    pre = write(tmp_path / "pretrain.yaml", {
        "name": "pre", **common,
        "data": {"datasets": [{"root": str(shards)}], "batch_size": 8, "max_val_batches": 2,
                 "leads": {"random": True, "min_hours": 6, "max_hours": 24, "val_hours": [6]}},
        "train": {"epochs": 2, "steps_per_epoch": 3}})
    logs = run(head, "pretrain", "python", "-m", "jobs.pretrain", pre)
    assert "epoch 2/2 step 6/6 loss" in logs and "samples/s ETA" in logs, logs
    pre_ckpts = sorted((runs / "pre").glob("checkpoint_*/model.pt"))
    assert pre_ckpts and all((p.parent / "train_state.pt").is_file() for p in pre_ckpts)
    from tests.test_observability import read_tensorboard_scalars

    tb = read_tensorboard_scalars(runs / "pre" / "tensorboard")
    assert [s for s, _ in tb["train_loss"]] == [3, 6] and "val_rmse/2m_temperature_6h" in tb, sorted(tb)

    ft = write(tmp_path / "finetune.yaml", {
        "name": "ft", **common, "init_checkpoint": str(pre_ckpts[-1]),
        "data": {"datasets": [{"root": str(shards)}], "batch_size": 8, "max_val_batches": 2,
                 "leads": {"random": False, "hours": [6, 24]}},
        "train": {"epochs": 1, "steps_per_epoch": 3}})
    logs = run(head, "finetune", "python", "-m", "jobs.finetune", ft)
    assert "loaded " in logs and "epoch 1/1" in logs, logs
    ft_ckpts = sorted((runs / "ft").glob("checkpoint_*/model.pt"))
    assert ft_ckpts

    # evaluate the finetuned checkpoint on the test split
    out = tmp_path / "eval"
    ev = write(tmp_path / "evaluate.yaml", {
        "checkpoint": str(ft_ckpts[-1].parent), "data": str(shards), "leads": [6, 24], "rollout_step": 6,
        "max_samples": 6, "batch_size": 6, "device": "cpu", "output": str(out), "progress": False})
    logs = run(head, "evaluate", "python", "-m", "jobs.evaluate", ev)
    # the printed tables: WeatherBench 2's RMSE, the ClimaX paper's per-sample mean, bias, ACC (global)
    assert "RMSE (WeatherBench 2) (global):" in logs and "RMSE_SAMPLE_MEAN" in logs and "ACC (global):" in logs, logs
    metrics = json.loads((out / "metrics.json").read_text())
    methods = {m["method"] for m in metrics["metrics"]}
    assert {"persistence", "climatology"} <= methods and len(methods) >= 3, methods
    assert (out / "metrics.csv").is_file()
    for plot in ["rmse_vs_lead.png", "acc_vs_lead.png"] + [f"maps_{v}.png" for v in metrics["out_vars"]]:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
    print(f"four jobs through ray job submit in {time.time() - t0:.0f} s")
