"""Hardening (issue 16): no secrets in artefacts, no pickle across trust boundaries, failures that
stop at once and exit non-zero.

The secrets test is one small run as a user runs it (``python -m jobs.NAME CONFIG key=value``) with
planted fake credentials: preprocess into a moto bucket, pretrain with checkpoints on S3, a 2-trial
Tune campaign (one trial made to fail: the campaign must exit non-zero and say which), evaluate with
its output in the bucket, forecast. Every file the run wrote (local, in the bucket, Ray's session
logs) and everything it printed is then searched for the credentials.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

VARS = ["land_sea_mask", "orography", "2m_temperature", "geopotential_500"]
TINY = {"patch_size": 2, "embed_dim": 32, "depth": 1, "decoder_depth": 1, "num_heads": 2, "mlp_ratio": 2.0,
        "drop_path": 0.0, "drop_rate": 0.0}
# planted fake credentials: moto accepts any; none of them may be written or printed anywhere
KEY, SECRET, TOKEN = "AKIAPLANTEDKEY7Q3ZX", "planted-secret-Vb93kQ2mW8", "planted-session-token-Zr41xN"
PLANTED = (KEY, SECRET, TOKEN)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """11.25-degree 6-hourly sample data (WeatherBench layout): 2014 and January-February 2015."""
    from pipelines.sample_data import generate

    raw = tmp_path_factory.mktemp("raw")
    generate(raw, years=(2014, 2015), resolution=11.25, step_hours=6, variables=VARS, formats=("weatherbench",),
             progress=False)
    return raw / "weatherbench"


def recipe(raw: Path, output: str, **extra) -> dict:
    return {"sources": [{"path": str(raw)}], "variables": VARS, "grid": {"resolution": 11.25, "method": "bilinear"},
            "time": {"start": "2014-01-01", "end": "2015-02-28T18:00", "step": "6h"},
            "splits": {"train": [2014, 2014], "val": [2015, 2015]}, "output": output, "shard_bytes": 400_000,
            **extra}


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory, raw, ray_local) -> Path:
    from pipelines.build import build
    from pipelines.recipe import Recipe

    out = tmp_path_factory.mktemp("shards")
    build(Recipe.model_validate(recipe(raw, str(out))))
    return out


def env(ray_local, **extra) -> dict:
    """The jobs connect to the tests' local Ray (2 CPUs); token authentication off for it only."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
            "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **extra}


def job(module: str, args: list[str], environ: dict, cwd: Path = ROOT, timeout: float = 600) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def train_config(root: str, storage: str, **kw) -> dict:
    cfg = {"name": "run", "storage_path": storage, "model": dict(TINY),
           "data": {"datasets": [{"root": root}], "batch_size": 4, "max_val_batches": 2,
                    "leads": {"random": False, "hours": [6], "val_hours": [6]}},
           "optim": {"lr": 1e-3, "warmup_steps": 1}, "train": {"epochs": 1, "steps_per_epoch": 2},
           "scaling": {"num_workers": 1}, "max_failures": 2, "checkpoint": {"num_to_keep": 1},
           "observability": {"tensorboard": False}}
    cfg.update(kw)
    return cfg


# ----------------------------------------------------------------------------- secrets
def test_redact_keys_urls_and_models():
    from pydantic import BaseModel, SecretStr

    from climax.redact import REDACTED, is_secret_key, redact, without_redacted

    for name in ("key", "secret", "token", "password", "session_token", "credentials", "aws_secret_access_key",
                 "api_key", "accessKey", "client_secret"):
        assert is_secret_key(name), name
    for name in ("lr", "root", "endpoint_url", "monkey", "tokens_per_patch", "keep", "storage_path"):
        assert not is_secret_key(name), name

    class Opts(BaseModel):
        root: str
        storage_options: dict
        password: SecretStr | None = None

    cfg = Opts(root="s3://bucket/x", password=SecretStr("pw-1"),
               storage_options={"key": KEY, "secret": SECRET, "token": None, "session_token": TOKEN,
                                "client_kwargs": {"endpoint_url": "http://user:pass-9@127.0.0.1:9000/?x-token=t0&a=1"}})
    out = redact({"runs": [cfg, ("http://u:p@h",)]})
    text = json.dumps(out)
    for s in (*PLANTED, "pw-1", "pass-9", "user:", "t0"):
        assert s not in text, (s, text)
    so = out["runs"][0]["storage_options"]
    assert so["key"] == so["secret"] == so["session_token"] == REDACTED and so["token"] is None
    assert so["client_kwargs"]["endpoint_url"] == f"http://{REDACTED}@127.0.0.1:9000/?x-token={REDACTED}&a=1"
    assert out["runs"][0]["root"] == "s3://bucket/x" and out["runs"][0]["password"] == REDACTED
    # read back from a stored configuration: the placeholders go, the rest stays
    assert without_redacted(so) == {"token": None, "client_kwargs": so["client_kwargs"]}


def test_redact_argv():
    from climax.redact import REDACTED, redact_argv

    argv = ["python -m jobs.forecast", "configs/forecast.yaml", f"storage_options.secret={SECRET}",
            f"storage_options={{key: {KEY}, client_kwargs: {{endpoint_url: 'http://127.0.0.1:1'}}}}",
            "data=s3://bucket/shards", "output=http://me:pw-2@host/fc.nc", "leads=[6, 12]"]
    out = " ".join(redact_argv(argv))
    assert KEY not in out and SECRET not in out and "pw-2" not in out, out
    assert f"storage_options.secret={REDACTED}" in out and "data=s3://bucket/shards" in out and "leads=[6, 12]" in out
    assert "endpoint_url: 'http://127.0.0.1:1'" in out


def test_effective_configuration_and_errors_are_printed_without_secrets(capsys):
    from jobs.config import parse_args
    from jobs.train import TrainConfig

    parse_args(TrainConfig, "", ["configs/pretrain.yaml", f"storage_options.key={KEY}",
                                 f"storage_options.secret={SECRET}", "storage_path=s3://b/runs"])
    printed = capsys.readouterr().out
    assert "effective configuration" in printed and "<redacted>" in printed
    assert KEY not in printed and SECRET not in printed, printed
    with pytest.raises(SystemExit):  # a bad value inside a section holding credentials
        parse_args(TrainConfig, "", ["configs/pretrain.yaml",
                                     f"data.datasets=[{{root: x, weight: -1, storage_options: {{secret: {SECRET}}}}}]"])
    err = capsys.readouterr().err
    assert "weight" in err and SECRET not in err, err


def test_mlflow_parameters_hold_no_secrets(tmp_path):
    from jobs.observability import MLflowCallback, callbacks, flatten
    from jobs.train import TrainConfig

    cfg = TrainConfig.model_validate({
        "name": "r", "storage_path": "s3://bucket/runs", "storage_options": {"key": KEY, "secret": SECRET},
        "data": {"datasets": [{"root": "s3://bucket/shards", "storage_options": {"token": TOKEN}}]},
        "observability": {"tensorboard": False, "mlflow_tracking_uri": str(tmp_path / "mlruns")}})
    [cb] = [c for c in callbacks(cfg) if isinstance(c, MLflowCallback)]
    params = flatten(cb.params)  # what the callback logs as the run's parameters
    assert params["storage_options.key"] == "<redacted>" and params["storage_path"] == "s3://bucket/runs"
    assert not [k for k, v in params.items() if any(s in v for s in PLANTED)], params
    assert cfg.storage_options["key"] == KEY  # the configuration in memory keeps them for the code that needs them


def test_secrets_appear_nowhere_after_a_full_run(tmp_path, raw, moto_s3, ray_local):
    """preprocess -> pretrain (checkpoints on S3) -> tune (2 trials, one fails) -> evaluate (to S3) -> forecast."""
    import s3fs
    import xarray as xr

    endpoint = moto_s3["client_kwargs"]["endpoint_url"]
    opts = {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": endpoint}}
    data_opts = {**opts, "token": TOKEN}
    fs = s3fs.S3FileSystem(**moto_s3)
    fs.mkdir("hardening")
    work = tmp_path / "work"
    work.mkdir()
    inputs = tmp_path / "inputs"  # the user's own files: they hold the credentials by design
    inputs.mkdir()
    e = env(ray_local)
    outputs = []

    def run(module, cfg: dict | None, *args, expect=0):
        argv = list(args)
        if cfg is not None:
            path = inputs / f"{module}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            argv.insert(0, str(path))
        code, out = job(module, argv, e, cwd=work)
        outputs.append(out)
        assert code == expect, out
        return out

    shards = "s3://hardening/shards"
    run("jobs.preprocess", recipe(raw, shards, storage_options=data_opts))
    assert fs.exists("hardening/shards/manifest.json")
    dataset = {"root": shards, "storage_options": data_opts}
    run("jobs.pretrain", train_config(shards, "s3://hardening/runs", storage_options=opts,
                                      data={**train_config("", "")["data"], "datasets": [dataset]}))
    assert fs.glob("hardening/runs/run/checkpoint_*/train_state.pt")

    campaign = {
        "name": "campaign", "storage_path": "s3://hardening/tune", "storage_options": opts,
        "output": str(work / "report"), "search": "random", "num_samples": 2, "seed": 0,
        "max_concurrent_trials": 1, "trial_max_failures": 0, "scheduler": {"type": "fifo"},
        "base": {"config": "configs/finetune/global.yaml", "model": dict(TINY),
                 "data": {"datasets": [dataset], "batch_size": 4, "max_val_batches": 2,
                          "leads": {"random": False, "hours": [6], "val_hours": [6]}},
                 "optim.warmup_steps": 1, "train": {"epochs": 1, "steps_per_epoch": 2},
                 "checkpoint.num_to_keep": 1, "observability.tensorboard": False},
        "search_space": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-3}}}
    e["CLIMAX_TUNE_TEST_FAIL_ONCE"] = str(tmp_path / "fail-once")  # the first trial fails, for good
    out = run("tests.tune_fail_once", campaign, expect=1)  # jobs.tune, its first trial failing
    del e["CLIMAX_TUNE_TEST_FAIL_ONCE"]
    assert "1 of 2 trials errored" in out, out
    summary = json.loads((work / "report" / "summary.json").read_text())
    assert summary["errored"] == 1 and summary["finished"] == 1 and len(summary["errored_trials"]) == 1
    table = (work / "report" / "trials.csv").read_text()
    assert "error: RuntimeError: injected failure" in table, table
    best = work / "report" / "best_checkpoint"
    assert (best / "model.pt").is_file()

    arg_opts = f"storage_options={{key: {KEY}, secret: {SECRET}, client_kwargs: {{endpoint_url: '{endpoint}'}}}}"
    run("jobs.evaluate", None, f"checkpoint={best}", f"data={shards}", arg_opts, "split=val", "leads=[6]",
        "rollout_step=null", "max_samples=4", "device=cpu", "progress=false", "output=s3://hardening/eval")
    assert fs.exists("hardening/eval/metrics.csv") and fs.exists("hardening/eval/metrics.json")
    assert not any(p.name.startswith("s3") for p in work.rglob("*")), sorted(work.rglob("*"))
    run("jobs.forecast", None, f"checkpoint={best}", f"data={shards}", arg_opts, f"storage_options.token={TOKEN}",
        "init_times=['2015-01-02T00:00']", "leads=[6]", "device=cpu", "progress=false",
        f"output={work / 'fc.nc'}")
    with xr.open_dataset(work / "fc.nc") as ds:
        assert "jobs.forecast" in ds.attrs["history"] and "<redacted>" in ds.attrs["history"]

    # everything written: local files, bucket objects, Ray's logs of this session; everything printed
    found = []
    written = [p for p in tmp_path.rglob("*") if p.is_file() and inputs not in p.parents]
    from ray._private.worker import _global_node  # the tests' Ray: where its session logs are

    session = Path(_global_node.get_session_dir_path())
    written += [p for p in session.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_size < 50e6]
    for p in written:
        try:
            blob = p.read_bytes()
        except OSError:
            continue
        found += [(str(p), s) for s in PLANTED if s.encode() in blob]
    objects = fs.find("hardening")
    assert len(objects) > 20, objects
    for key in objects:
        blob = fs.cat_file(key)
        found += [(f"s3://{key}", s) for s in PLANTED if s.encode() in blob]
    for i, out in enumerate(outputs):
        found += [(f"output of job {i}", s) for s in PLANTED if s in out]
    assert not found, found


# ----------------------------------------------------------------------------- trust boundaries
def test_planted_pickle_in_train_state_is_refused(tmp_path):
    import torch

    from climax.optim import build_optimizer
    from climax.training import TrainState, UnsafeCheckpointError, load_train_state, save_train_state
    from tests.helpers import tiny_model

    model = tiny_model(["2m_temperature", "geopotential_500"])
    optimizer = build_optimizer(model, 1e-3, 1e-5, (0.9, 0.95))
    save_train_state(tmp_path, model, optimizer, None, TrainState(step=7, history=[{"step": 7}]))
    # what is saved loads with weights_only=True: tensors and plain containers only
    assert torch.load(tmp_path / "train_state.pt", weights_only=True)["state"]["step"] == 7
    assert load_train_state(tmp_path, model, optimizer).step == 7

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(tmp_path / "train_state.pt", "wb") as f:
        torch.save({"state": {"step": 1}, "optimizer": Payload()}, f, pickle_module=pickle)
    with pytest.raises(UnsafeCheckpointError, match=r"train_state.pt holds Python objects .* refused.*storage_path"):
        load_train_state(tmp_path, model, optimizer)
    assert not marker.exists()


def test_projection_state_loads_with_weights_only(tmp_path):
    import torch

    from climax.tasks.projection import load_state
    from climax.training import UnsafeCheckpointError
    from tests.helpers import tiny_model

    model = tiny_model(["2m_temperature"])
    torch.save({"state_dict": model.state_dict()}, tmp_path / "model.pt")

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled",))

    torch.save({"state": {}, "optimizer": Payload()}, tmp_path / "train_state.pt")
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_state(tmp_path, model)


def test_jobs_keep_ray_token_authentication(tmp_path):
    """A job's local Ray runs with token authentication (Ray's default): nothing turns it off."""
    environ = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    environ.update(PYTHONPATH=str(ROOT), RAY_AUTH_TOKEN="hardening-test-token-" + "x" * 32,
                   RAY_USAGE_STATS_ENABLED="0")
    code = ("import os, ray\nfrom jobs.common import init_ray\ninit_ray(num_cpus=1)\n"
            "print('mode', os.environ.get('RAY_AUTH_MODE'))\n"
            "print('ran', ray.get(ray.remote(lambda: 41).remote()) + 1)\nray.shutdown()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=environ, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "mode disabled" not in out and "ran 42" in out, out
    assert "Token authentication is enabled" in out, out
    # and the Makefile exports nothing that disables it (only `make test` passes it to pytest)
    makefile = (ROOT / "Makefile").read_text()
    assert "export RAY_AUTH_MODE" not in makefile
    assert "RAY_AUTH_MODE=disabled $(PY) -m pytest" in makefile


# ----------------------------------------------------------------------------- failures
def test_rayignore_leaves_data_and_secrets_out():
    # the matcher `ray job submit --working-dir .` applies to .rayignore (internal to Ray: its packaging)
    from ray._private.runtime_env.packaging import _get_ignore_file

    excluded = _get_ignore_file(ROOT, ".rayignore")
    for path in ("shards/train/2014-000.parquet", "x.parquet", "raw/era5.grib", "raw/era5.grib2", "a.grb2",
                 "fc.nc", "data.zarr", "data.zarr/.zgroup", ".env", "configs/.env", "certs/client.pem",
                 "demo_output/x.yaml", "demo_output/shards/train/a.parquet"):
        assert excluded(ROOT / path), path
    for path in ("jobs/train.py", "configs/pretrain.yaml", "climax/model.py", "README.md"):
        assert not excluded(ROOT / path), path


def test_atomic_write_replaces_whole_files(tmp_path):
    from climax.storage import staged_output, write_atomic

    target = tmp_path / "out" / "metrics.json"
    write_atomic(target, "old")
    write_atomic(target, b"new")
    assert target.read_text() == "new" and [p.name for p in target.parent.iterdir()] == ["metrics.json"]
    with staged_output(tmp_path / "folder") as d:
        assert d == tmp_path / "folder" and d.is_dir()


def test_evaluate_to_a_missing_bucket_is_refused_up_front(tmp_path, moto_s3):
    endpoint = moto_s3["client_kwargs"]["endpoint_url"]
    opts = f"storage_options={{key: k, secret: s, client_kwargs: {{endpoint_url: '{endpoint}'}}}}"
    code, out = job("jobs.evaluate", [f"checkpoint={tmp_path / 'none.pt'}", f"data={tmp_path}", opts,
                                      "output=s3://no-such-bucket/eval"],
                    {**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path, timeout=300)
    assert code == 1 and "bucket 'no-such-bucket' does not exist" in out, out
    assert not (tmp_path / "s3:").exists()


def test_corrupt_shard_is_named(local_shards, tmp_path):
    import numpy as np

    from climax.data import ShardDataset, ShardReadError

    root = tmp_path / "ds"
    shutil.copytree(local_shards, root)
    ds = ShardDataset(str(root))
    rel = ds.manifest.shards("train")[0]["path"]
    blob = (root / rel).read_bytes()
    (root / rel).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ShardReadError, match=rf"shard .*{rel} is corrupt or truncated.*re-run jobs.preprocess"):
        ShardDataset(str(root)).read("train", np.array([0]), ["2m_temperature"])


def test_corrupt_shard_stops_training_at_once(local_shards, tmp_path, ray_local):
    """Every training shard truncated: the run ends at the first read with the shard's name, exit 1,
    and is not restarted max_failures times."""
    from climax.data import ShardDataset

    root = tmp_path / "ds"
    shutil.copytree(local_shards, root)
    for shard in ShardDataset(str(root)).manifest.shards("train"):
        p = root / shard["path"]
        p.write_bytes(p.read_bytes()[:1000])
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(train_config(str(root), str(tmp_path / "runs"), max_failures=2)))
    code, out = job("jobs.pretrain", [str(path)], env(ray_local))
    assert code == 1, out
    assert "ShardReadError" in out and f"{root}/train/" in out and "re-run jobs.preprocess" in out, out
    assert "RETRY" not in out, out  # Ray Train's failure policy did not restart the workers
    assert not list((tmp_path / "runs").rglob("model.pt"))


def test_bad_validation_split_fails_before_the_first_step(local_shards, tmp_path, ray_local):
    cfg = train_config(str(local_shards), str(tmp_path / "runs"), max_failures=0)
    cfg["data"]["val_split"] = "validation"
    cfg["train"]["log_every"] = 1
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out = job("jobs.pretrain", [str(path)], env(ray_local))
    assert code == 1 and "has no split 'validation'" in out, out
    assert "step 1/" not in out, out  # no training step was taken


# ----------------------------------------------------------------------------- readers check what they read
def _rewrite(path: Path, transform) -> None:
    """Rewrite a Parquet file as the build writes it (same schema and footer metadata), transformed."""
    import pyarrow.parquet as pq

    from climax import shards as S

    table = pq.ParquetFile(path).read()
    table = transform(table)
    variables = [n for n in table.column_names if n not in (S.TIME, "dayofyear", "hour", "count")]
    pq.write_table(table, path, **S.write_options(variables, 3, table.schema.field(variables[0]).type.shape))


def test_readers_check_row_counts_against_the_manifest(local_shards, tmp_path):
    """A shard or climatology part with fewer rows than the manifest lists (another build's file)
    is refused by every reader, naming the file and what to do; the rows it has would read fine."""
    import numpy as np

    from climax import shards as S
    from climax.data import ShardDataset, ShardReadError

    root = tmp_path / "ds"
    shutil.copytree(local_shards, root)
    ds = ShardDataset(str(root))
    entry = ds.manifest.shards("train")[0]
    _rewrite(root / entry["path"], lambda t: t.slice(0, entry["rows"] // 2))
    with pytest.raises(ShardReadError, match=rf"shard {root}/{entry['path']} has {entry['rows'] // 2} rows where "
                                             rf"the manifest lists {entry['rows']}.*rebuild the dataset"):
        ShardDataset(str(root)).read("train", np.array([0]), ["2m_temperature"])

    part = ds.manifest.raw["climatology"]["parts"][0]
    assert ds.manifest.file_info(part)["rows"] > 1
    _rewrite(root / part, lambda t: t.slice(0, 1))
    with pytest.raises(ShardReadError, match=rf"shard {root}/{part} has 1 rows .*rebuild"):
        ShardDataset(str(root)).climatology(["2m_temperature"], np.array(["2015-01-01T00"], "datetime64[ns]"))
    with pytest.raises(ShardReadError, match=rf"{part} has 1 rows"):
        S.read_climatology(str(root), "2m_temperature")


def test_verify_checks_sha256_once_per_shard_per_process(local_shards, tmp_path, monkeypatch):
    import numpy as np

    from climax import shards as S
    from climax.data import ShardDataset, ShardReadError
    from jobs.evaluate import EvaluateConfig, open_dataset
    from jobs.train import DatasetSpec

    hashed = []
    real = S.sha256_of_stream
    monkeypatch.setattr(S, "sha256_of_stream", lambda f: hashed.append(1) or real(f))
    monkeypatch.setattr(S, "_VERIFIED", set())
    root = tmp_path / "ds"
    shutil.copytree(local_shards, root)
    # off (the default): no extra read
    ShardDataset(str(root)).read("train", np.array([0, 1]), ["2m_temperature"])
    assert hashed == []
    # on: each file once per process, whichever dataset object reads it
    for _ in range(2):
        ds = ShardDataset(str(root), verify=True)
        ds.read("train", np.array([0, 1]), ["2m_temperature"])
    assert len(hashed) == 1
    ds.climatology(["2m_temperature", "land_sea_mask"], np.array(["2014-03-01T00"], "datetime64[ns]"))
    assert len(hashed) == 1 + len(ds.manifest.raw["climatology"]["parts"]) + 2  # + time mean + constants

    # same rows, one value changed: only verify notices
    entry = ds.manifest.shards("val")[0]

    def bump(t):
        import pyarrow as pa

        a = S.arrays_from_table(t)[1]["2m_temperature"].copy()
        a[0, 0, 0] += 1.0
        return t.set_column(t.column_names.index("2m_temperature"), "2m_temperature",
                            pa.FixedShapeTensorArray.from_numpy_ndarray(a))

    _rewrite(root / entry["path"], bump)
    ShardDataset(str(root)).read("val", np.array([0]), ["2m_temperature"])
    with pytest.raises(ShardReadError, match=rf"shard {root}/{entry['path']} has sha256 .* the manifest.*rebuild"):
        ShardDataset(str(root), verify=True).read("val", np.array([0]), ["2m_temperature"])
    # the option's homes: a training dataset entry and the evaluate/forecast jobs
    assert DatasetSpec(root=str(root), verify=True).verify
    assert EvaluateConfig(checkpoint="c", data=str(root), verify=True).verify
    assert open_dataset(str(root), None, verify=True).verify


# ----------------------------------------------------------------------------- one build per output
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_build_refuses_naming_the_first(raw, tmp_path):
    from pipelines.build import build
    from pipelines.lease import LEASE, LeaseError, acquire
    from pipelines.recipe import Recipe

    out = tmp_path / "out"
    first = acquire(str(out))  # a live build of this process
    try:
        before = (out / LEASE).read_bytes()
        with pytest.raises(LeaseError) as e:
            build(Recipe.model_validate(recipe(raw, str(out))))
        msg = str(e.value)
        assert "\n" not in msg and f"{out} is being built by another build" in msg, msg
        assert f"pid {os.getpid()}" in msg and f"delete {out}/{LEASE}" in msg, msg
        assert (out / LEASE).read_bytes() == before and sorted(p.name for p in out.iterdir()) == [LEASE]
    finally:
        first.release()
    assert not out.exists()  # released: the lease and the folder it made are gone


def test_stale_leases_are_taken_over_live_ones_are_not(tmp_path):
    import socket
    import time

    from pipelines.lease import LEASE, LeaseError, acquire

    out = tmp_path / "out"
    out.mkdir()
    path = out / LEASE
    host, now = socket.gethostname(), time.time()

    def plant(**rec):
        path.write_text(json.dumps({"token": "f" * 32, "created": now - 60, "dead": ["e" * 32], **rec}))

    for live in ({"host": host, "pid": os.getpid(), "expires": now + 300},  # this host, process alive
                 {"host": "elsewhere", "pid": 1, "expires": now + 300}):  # another host, not expired
        plant(**live)
        with pytest.raises(LeaseError, match=f"host {live['host']}, pid {live['pid']}"):
            acquire(str(out))
        assert json.loads(path.read_text())["token"] == "f" * 32
    for stale in ({"host": host, "pid": _dead_pid(), "expires": now + 300},  # owner's process is gone
                  {"host": "elsewhere", "pid": 1, "expires": now - 1}):  # not refreshed: expired
        plant(**stale)
        lease = acquire(str(out))
        rec = json.loads(path.read_text())
        assert rec["token"] == lease.token and rec["pid"] == os.getpid() and rec["host"] == host
        assert rec["expires"] > now + 200 and set(rec["dead"]) == {"e" * 32, "f" * 32}
        assert lease.owns_temporary("f" * 32) and lease.owns_temporary(lease.token)
        assert not lease.owns_temporary("a" * 32)
        lease.refresh()
        assert json.loads(path.read_text())["expires"] >= rec["expires"]
        lease.release()
        assert not path.exists()
    # taken over while building: refreshing notices, and the build stops before publishing
    lease = acquire(str(out))
    plant(host="elsewhere", pid=7, expires=now + 300)
    lease.refresh()
    with pytest.raises(LeaseError, match="taken over by another build .*host elsewhere, pid 7"):
        lease.check()
    lease.release()
    assert json.loads(path.read_text())["pid"] == 7  # not ours: left alone
    (tmp_path / "a-file").write_text("")
    with pytest.raises(LeaseError, match=r"cannot write the build lease .*a-file/out/\.build-lease\.json"):
        acquire(str(tmp_path / "a-file" / "out"))


def test_remove_stale_keeps_a_live_writers_temporaries(raw, tmp_path):
    from pipelines.build import remove_stale
    from pipelines.lease import acquire
    from pipelines.recipe import Recipe

    out = tmp_path / "out"
    folder = out / "train" / "2014"
    folder.mkdir(parents=True)
    (out / ".build-lease.json").write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "d" * 32,
                                                       "created": 0, "expires": 0}))
    lease = acquire(str(out))  # takes over the dead owner "ddd..."
    names = {"mine": f".a.parquet.{lease.token}.0000000a.tmp", "dead": f".b.parquet.{'d' * 32}.0000000b.tmp",
             "live": f".c.parquet.{'1' * 32}.0000000c.tmp", "legacy": ".d.parquet.0000000d.tmp",
             "kept": "2014-000.parquet", "stale": "2014-999.parquet"}
    for name in names.values():
        (folder / name).write_bytes(b"x")
    remove_stale(Recipe.model_validate(recipe(raw, str(out))), {"train/2014/2014-000.parquet"}, lease)
    lease.release()
    assert sorted(p.name for p in folder.iterdir()) == sorted([names["live"], names["kept"]])


def test_leases_on_s3_are_conditional_puts(moto_s3):
    import time

    import s3fs

    from pipelines.lease import LEASE, LeaseError, acquire

    fs = s3fs.S3FileSystem(**moto_s3)
    fs.mkdir("leases")
    out = "s3://leases/shards"
    first = acquire(out, moto_s3)
    with pytest.raises(LeaseError, match=rf"{out} is being built by another build \(host .*, pid {os.getpid()}"):
        acquire(out, moto_s3)
    first.refresh()
    assert first.lost is None
    first.release()
    assert not fs.exists(f"leases/shards/{LEASE}")
    # an expired record is replaced only if unchanged since it was read (If-Match)
    fs.pipe_file(f"leases/shards/{LEASE}", json.dumps({"host": "elsewhere", "pid": 1, "token": "c" * 32,
                                                       "created": 0, "expires": time.time() - 1}).encode())
    second = acquire(out, moto_s3)
    assert json.loads(fs.cat_file(f"leases/shards/{LEASE}"))["token"] == second.token and second.dead == ["c" * 32]
    second.release()
    with pytest.raises(Exception, match="bucket no-such-lease-bucket does not exist"):
        acquire("s3://no-such-lease-bucket/x", moto_s3)
    assert not fs.exists("no-such-lease-bucket")


# ----------------------------------------------------------------------------- faults under load
def test_killed_worker_mid_shard_task_is_retried_with_identical_output(raw, local_shards, tmp_path, monkeypatch,
                                                                       ray_local):
    """SIGKILL one Ray worker (not the driver) after its task wrote a training shard and before it wrote
    its climatology part: Ray retries the task, and the dataset is byte for byte the uninterrupted one."""
    import signal
    import threading
    import time

    import pipelines.build as B
    from pipelines.recipe import Recipe

    marker = str(tmp_path / "paused-worker.pid")
    real_run_unit = B.run_unit

    def run_unit_pausing_once(unit, ctx):  # pickled by value into the worker: a test wrapper, not a hook
        import os as _os
        import time as _time

        import pipelines.shard_task as wb  # where run_window looks up run_chunk

        if unit.kind == "window":
            try:  # the first window task to claim the marker pauses in its middle, once
                fd = _os.open(marker + ".claim", _os.O_CREAT | _os.O_EXCL | _os.O_WRONLY)
                _os.close(fd)
            except FileExistsError:
                return real_run_unit(unit, ctx)
            real_chunk = wb.run_chunk

            def chunk_then_pause(chunk, c, **kw):
                res = real_chunk(chunk, c, **kw)  # the shard is written
                with open(marker + ".tmp", "w") as f:
                    f.write(str(_os.getpid()))
                _os.replace(marker + ".tmp", marker)
                _time.sleep(120)  # killed here, before the climatology part
                return res

            wb.run_chunk = chunk_then_pause
        return real_run_unit(unit, ctx)

    monkeypatch.setattr(B, "run_unit", run_unit_pausing_once)
    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not os.path.exists(marker):
            time.sleep(0.05)
        if os.path.exists(marker):
            pid = int(Path(marker).read_text())
            assert pid != os.getpid()
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    out = tmp_path / "out"
    manifest = B.build(Recipe.model_validate(recipe(raw, str(out))), progress=False)
    thread.join(timeout=5)
    assert killed, "no worker paused in a shard task"
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)  # that worker is gone: the task ran again elsewhere

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
                and p.name != "manifest.json"}

    assert files(out) == files(local_shards) and len(files(out)) > 5
    reference = json.loads((local_shards / "manifest.json").read_text())
    for key in ("splits", "statistics", "climatology", "constants", "grid", "time", "variables"):
        assert manifest[key] == reference[key], key
