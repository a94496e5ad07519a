"""A catalogue of bad inputs (issue 16): each one is run through the real entry point a user runs
(``jobs.preprocess``, ``jobs.pretrain``, ``jobs.evaluate``, in this process; a subprocess only for
the disk that fills up) and must give

* a non-zero exit code (1 for a failure while running, 2 for a bad configuration);
* ONE ``error:`` line that names the file, variable or time step and says what to do;
* nothing that looks finished: no ``manifest.json``, no checkpoint, no ``metrics.json``.

Inputs are tiny (an 8 x 16 grid, 22.5 degrees, two days of 6-hourly steps) so the whole catalogue
runs in well under a minute on 2 cores. The kinds are listed in docs/design.md ("Bad inputs").
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # a local Ray, one small training run, one job in a subprocess

RES = 22.5  # 8 x 16
GRIB_VARS = ["land_sea_mask", "orography", "2m_temperature", "temperature_850"]
TIME = {"start": "2015-01-01", "end": "2015-01-02T18:00", "step": "6h"}
TIMES = np.arange(np.datetime64("2015-01-01T00", "ns"), np.datetime64("2015-01-03T00", "ns"),
                  np.timedelta64(6, "h"))
TINY = {"patch_size": 2, "embed_dim": 32, "depth": 1, "decoder_depth": 1, "num_heads": 2, "mlp_ratio": 2.0,
        "drop_path": 0.0, "drop_rate": 0.0}
# what a message must say to do (one of these verbs, as an instruction)
TODO = (r"(?i)\b(re-download|re-run|remove|set|add|check|give|narrow|regrid|free|evaluate on|write|use|fix|"
        r"replace|drop|convert)\b")


@dataclass
class Case:
    """A bad input, ready to run: ``run()`` gives (exit code, everything printed)."""

    run: object
    code: int
    names: list[str]  # what the error line must name (file, variable, time, key)
    todo: str  # what it must say to do (a regex)
    unfinished: list[Path] = field(default_factory=list)  # must not exist afterwards (glob patterns)


# ----------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """ecCodes-written GRIB 2 (pressure-level and surface files) of 2015 and 2016, two days each."""
    from pipelines.sample_data import generate

    out = tmp_path_factory.mktemp("raw")
    grib = generate(out, years=(2015, 2016), resolution=RES, step_hours=6, variables=GRIB_VARS,
                    formats=("grib",), progress=False, max_days=2)["grib"]
    return grib


def grib_copy(raw: Path, dst: Path, years=(2015,)) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for y in years:
        for kind in ("pl", "sfc"):
            shutil.copy(raw / f"era5_{kind}_{y}.grib", dst)
    return dst


def recipe(sources: list[dict], output: Path | str, **kw) -> dict:
    d = {"sources": sources, "variables": GRIB_VARS, "grid": {"resolution": RES, "method": "bilinear"},
         "time": dict(TIME), "splits": {"train": [2015, 2015]}, "output": str(output)}
    d.update(kw)
    return d


def t2m_truth() -> np.ndarray:
    from pipelines import sample_data as sd

    lat, lon = sd.grid(RES)
    return sd.fields(TIMES, lat, lon, ["2m_temperature"])["2m_temperature"].astype(np.float32)


def write_nc(path: Path, values: np.ndarray | None = None, *, units: str = "K", lat=None, lon=None) -> Path:
    """ERA5-style NetCDF 4 (CDS names: t2m on time/latitude/longitude), written by xarray, with no
    _FillValue or missing_value attribute (a fill value must be found by its value alone)."""
    import xarray as xr

    from pipelines import sample_data as sd

    glat, glon = sd.grid(RES)
    lat = glat[::-1] if lat is None else np.asarray(lat, np.float64)
    lon = glon if lon is None else np.asarray(lon, np.float64)
    if values is None:
        values = t2m_truth()[:, ::-1]
    ds = xr.Dataset({"t2m": (("time", "latitude", "longitude"), values, {"units": units})},
                    coords={"time": TIMES, "latitude": lat, "longitude": lon})
    ds.to_netcdf(path, engine="h5netcdf", encoding={"t2m": {"_FillValue": None}})
    return path


def write_grib(path: Path, sample: str, short_name: str = "t", level: int = 850) -> Path:
    """One field per time step on the sample's grid (reduced Gaussian, rotated lat-lon), ecCodes-written."""
    import eccodes

    with open(path, "wb") as f:
        for t in TIMES:
            h = eccodes.codes_grib_new_from_samples(sample)
            try:
                day = str(t.astype("datetime64[D]")).replace("-", "")
                hour = int((t - t.astype("datetime64[D]")) / np.timedelta64(1, "h"))
                for k, v in (("shortName", short_name), ("typeOfLevel", "isobaricInhPa"), ("level", level),
                             ("dataDate", int(day)), ("dataTime", hour * 100)):
                    eccodes.codes_set(h, k, v)
                n = eccodes.codes_get(h, "numberOfValues")
                eccodes.codes_set_values(h, np.full(n, 250.0))
                eccodes.codes_write(h, f)
            finally:
                eccodes.codes_release(h)
    return path


def nc_recipe(path: Path | str, out: Path, **kw) -> dict:
    return recipe([{"path": str(path)}], out, variables=["2m_temperature"], **kw)


# ----------------------------------------------------------------------------- running the jobs
def in_process(main, argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out + out.err


def preprocess(tmp: Path, rec: dict, capsys, *args: str):
    from jobs import preprocess as job

    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(rec))
    return lambda: in_process(job.main, [str(path), *args], capsys)


def manifest_of(rec: dict) -> list[Path]:
    """What a finished (or half-written) build would leave: the manifest, temporaries."""
    out = rec["output"]
    return [] if "://" in out else [Path(out) / "manifest.json", Path(out) / "**" / ".*.tmp"]


# ----------------------------------------------------------------------------- the catalogue
CASES: dict = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


@case
def grib_truncated(t):
    src = grib_copy(t.raw, t.tmp / "grib")
    bad = src / "era5_pl_2015.grib"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2 + 100])
    rec = recipe([{"path": str(src / "*.grib")}], t.tmp / "out")
    return Case(preprocess(t.tmp, rec, t.capsys), 1, [str(bad)], r"re-download", manifest_of(rec))


@case
def grib_corrupt(t):
    """The second message's header overwritten: the file has the right size, its bytes are wrong."""
    src = grib_copy(t.raw, t.tmp / "grib")
    bad = src / "era5_pl_2015.grib"
    data = bytearray(bad.read_bytes())
    second = data.index(b"GRIB", 4)
    data[second:second + 64] = b"\x00" * 64
    bad.write_bytes(bytes(data))
    rec = recipe([{"path": str(src / "*.grib")}], t.tmp / "out")
    return Case(preprocess(t.tmp, rec, t.capsys), 1, [str(bad), "not GRIB"], r"re-download", manifest_of(rec))


@case
def netcdf_truncated(t):
    bad = write_nc(t.tmp / "t2m.nc")
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    rec = nc_recipe(bad, t.tmp / "out")
    return Case(preprocess(t.tmp, rec, t.capsys), 1, [str(bad)], r"re-download", manifest_of(rec))


@case
def netcdf_corrupt(t):
    """A valid HDF5 signature followed by garbage."""
    bad = write_nc(t.tmp / "t2m.nc")
    data = bytearray(bad.read_bytes())
    rng = np.random.default_rng(0)
    data[64:] = rng.integers(0, 256, len(data) - 64, dtype=np.uint8).tobytes()
    bad.write_bytes(bytes(data))
    rec = nc_recipe(bad, t.tmp / "out")
    return Case(preprocess(t.tmp, rec, t.capsys), 1, [str(bad)], r"re-download", manifest_of(rec))


@case
def empty_file(t):
    src = grib_copy(t.raw, t.tmp / "grib")
    bad = src / "era5_extra_2015.grib"
    bad.write_bytes(b"")
    rec = recipe([{"path": str(src / "*.grib")}], t.tmp / "out")
    return Case(preprocess(t.tmp, rec, t.capsys), 1, [str(bad), "empty"], r"re-download|remove", manifest_of(rec))


@case
def directory_instead_of_file(t):
    src = grib_copy(t.raw, t.tmp / "grib")
    bad = src / "era5_extra_2015.grib"
    bad.mkdir()
    rec = recipe([{"path": str(src / "*.grib")}], t.tmp / "out")
    return Case(preprocess(t.tmp, rec, t.capsys), 1, [str(bad), "directory"], r"narrow|remove", manifest_of(rec))


@case
def missing_variable(t):
    src = grib_copy(t.raw, t.tmp / "grib")
    rec = recipe([{"path": str(src / "*.grib")}], t.tmp / "out", variables=GRIB_VARS + ["10m_u_component_of_wind"])
    return Case(preprocess(t.tmp, rec, t.capsys), 1, ["10m_u_component_of_wind", str(src)], r"add a source",
                manifest_of(rec))


@case
def missing_level(t):
    src = grib_copy(t.raw, t.tmp / "grib")
    rec = recipe([{"path": str(src / "*.grib")}], t.tmp / "out", variables=GRIB_VARS + ["temperature_500"])
    return Case(preprocess(t.tmp, rec, t.capsys), 1, ["temperature_500", str(src)], r"level", manifest_of(rec))


@case
def unit_mismatch(t):
    bad = write_nc(t.tmp / "t2m.nc", units="degF")
    rec = nc_recipe(bad, t.tmp / "out")
    return Case(preprocess(t.tmp, rec, t.capsys), 1, [str(bad), "t2m", "degF"], TODO, manifest_of(rec))


def _with_value(t, value):
    v = t2m_truth()[:, ::-1].copy()
    v[3, 2, 5] = value
    bad = write_nc(t.tmp / "t2m.nc", v)
    rec = nc_recipe(bad, t.tmp / "out")
    return Case(preprocess(t.tmp, rec, t.capsys), 1, [str(bad), "2m_temperature", "2015-01-01T18:00:00"], TODO,
                manifest_of(rec))


@case
def nan_values(t):
    return _with_value(t, np.nan)


@case
def inf_values(t):
    return _with_value(t, np.inf)


@case
def fill_value_without_attribute(t):
    return _with_value(t, 9999.0)


@case
def duplicate_times(t):
    src = grib_copy(t.raw, t.tmp / "grib")
    shutil.copy(src / "era5_pl_2015.grib", src / "era5_pl_2015_copy.grib")
    rec = recipe([{"path": str(src / "*.grib")}], t.tmp / "out")
    return Case(preprocess(t.tmp, rec, t.capsys), 1,
                ["temperature_850", "2015-01-01T00:00:00", "era5_pl_2015_copy.grib"], r"remove the duplicate",
                manifest_of(rec))


@case
def missing_times(t):
    src = grib_copy(t.raw, t.tmp / "grib")
    rec = recipe([{"path": str(src / "*.grib")}], t.tmp / "out", time={**TIME, "end": "2015-01-04T18:00"})
    return Case(preprocess(t.tmp, rec, t.capsys), 1, ["2015-01-03T00:00:00"], r"add the files|time\.end",
                manifest_of(rec))


@case
def wrong_calendar_step(t):
    src = grib_copy(t.raw, t.tmp / "grib")
    rec = recipe([{"path": str(src / "*.grib")}], t.tmp / "out", time={**TIME, "step": "1h"})
    return Case(preprocess(t.tmp, rec, t.capsys), 1, ["2015-01-01T01:00:00"], r"time\.step: 6h", manifest_of(rec))


@case
def mixed_grids(t):
    from pipelines.sample_data import generate

    src = grib_copy(t.raw, t.tmp / "grib")
    coarse = generate(t.tmp / "coarse", years=(2015,), resolution=45.0, step_hours=6, variables=["temperature_850"],
                      formats=("grib",), progress=False, max_days=1)["grib"] / "era5_pl_2015.grib"
    rec = recipe([{"path": str(src / "*.grib")}, {"path": str(coarse)}], t.tmp / "out")
    return Case(preprocess(t.tmp, rec, t.capsys), 1, ["temperature_850", str(coarse)], r"give one source",
                manifest_of(rec))


@case
def non_global(t):
    from pipelines import sample_data as sd

    lat, lon = sd.grid(RES)
    bad = write_nc(t.tmp / "t2m.nc", t2m_truth()[:, 5:7], lat=lat[5:7])
    rec = nc_recipe(bad, t.tmp / "out")
    return Case(preprocess(t.tmp, rec, t.capsys), 1, [str(bad), "not global"], TODO, manifest_of(rec))


@case
def reduced_gaussian(t):
    bad = write_grib(t.tmp / "rgg.grib2", "reduced_gg_pl_grib2")
    rec = recipe([{"path": str(bad)}], t.tmp / "out", variables=["temperature_850"])
    return Case(preprocess(t.tmp, rec, t.capsys), 1, [str(bad), "reduced_gg"], r"regrid", manifest_of(rec))


@case
def rotated_grid(t):
    bad = write_grib(t.tmp / "rot.grib2", "rotated_ll_pl_grib2")
    rec = recipe([{"path": str(bad)}], t.tmp / "out", variables=["temperature_850"])
    return Case(preprocess(t.tmp, rec, t.capsys), 1, [str(bad), "rotated_ll"], r"regrid", manifest_of(rec))


@case
def time_zone_name_in_recipe(t):
    src = grib_copy(t.raw, t.tmp / "grib")
    rec = recipe([{"path": str(src / "*.grib")}], t.tmp / "out",
                 time={**TIME, "start": "2015-01-01T00:00 Europe/Paris"})
    return Case(preprocess(t.tmp, rec, t.capsys), 2, ["time.start", "Europe/Paris"],
                r"write a UTC offset instead: 2015-01-01T00:00\+01:00", manifest_of(rec))


@case
def missing_bucket(t):
    opts = t.request.getfixturevalue("moto_s3")
    rec = recipe([{"path": "s3://no-such-bucket-bi/era5/*.grib", "storage_options": opts}], t.tmp / "out")
    return Case(preprocess(t.tmp, rec, t.capsys), 1, ["no-such-bucket-bi"], r"check the bucket name", manifest_of(rec))


@case
def missing_credentials(t):
    opts = t.request.getfixturevalue("moto_s3")
    mp = t.request.getfixturevalue("monkeypatch")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
              "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
              "AWS_CONTAINER_CREDENTIALS_FULL_URI"):  # every place botocore looks for credentials
        mp.delenv(k, raising=False)
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(t.tmp / "none"))
    mp.setenv("AWS_CONFIG_FILE", str(t.tmp / "none"))
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    src = {"path": "s3://climax-bad-inputs/era5/*.grib", "storage_options": {"client_kwargs": opts["client_kwargs"]}}
    rec = recipe([src], t.tmp / "out")
    return Case(preprocess(t.tmp, rec, t.capsys), 1, ["s3://climax-bad-inputs/era5/*.grib", "no credentials"],
                r"set AWS_ACCESS_KEY_ID", manifest_of(rec))


@case
def unreachable_endpoint(t):
    src = {"path": "s3://climax-bad-inputs/era5/*.grib",
           "storage_options": {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}}
    rec = recipe([src], t.tmp / "out")
    return Case(preprocess(t.tmp, rec, t.capsys), 1, ["http://127.0.0.1:9", "not reachable"],
                r"check storage_options", manifest_of(rec))


@case
def disk_full(t):
    """A real full disk: a 64 KiB tmpfs mounted in a user namespace (no root needed where the
    kernel allows unprivileged user namespaces), holding the output. The build runs as a user runs
    it, in that namespace with its own local Ray, so the shard writes of its workers get ENOSPC."""
    probe = t.tmp / "probe"
    probe.mkdir()
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-Urm", "mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(probe)],
            capture_output=True).returncode:
        pytest.skip("no unprivileged user namespace with a tmpfs mount here (needed for a tiny full disk)")
    src = grib_copy(t.raw, t.tmp / "grib")
    disk = t.tmp / "disk"
    disk.mkdir()
    out = disk / "out"
    rec = recipe([{"path": str(src / "*.grib")}], out)
    path = t.tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(rec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    # the tmpfs lives as long as the namespace: what the build left there is listed from inside
    script = (f"mount -t tmpfs -o size=64k tmpfs {disk} && mkdir {out} && "
              f"head -c 60000 /dev/zero > {disk}/filler || exit 99; "
              f"{sys.executable} -m jobs.preprocess {path}; rc=$?; "
              f"echo \"left on the full disk: $(cd {out} && find . -type f | sort | tr '\\n' ' ')\"; exit $rc")

    def run():
        p = subprocess.run(["unshare", "-Urm", "sh", "-c", script], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
        return p.returncode, p.stdout + p.stderr

    def run_and_list():
        code, text = run()
        left = [line for line in text.splitlines() if line.startswith("left on the full disk:")]
        assert len(left) == 1 and "manifest.json" not in left[0] and ".tmp" not in left[0], text
        return code, text

    return Case(run_and_list, 1, [str(out), "no space left"], r"free space")


# ----------------------------------------------------------------------------- training and evaluation
@pytest.fixture(scope="module")
def shards(raw, ray_local, tmp_path_factory) -> Path:
    """The good GRIB built into shards: 2015 train, 2016 val."""
    from pipelines.build import build
    from pipelines.recipe import Recipe

    out = tmp_path_factory.mktemp("shards")
    rec = recipe([{"path": str(raw / "*.grib")}], out, time={**TIME, "end": "2016-01-02T18:00", "missing": "allow"},
                 splits={"train": [2015, 2015], "val": [2016, 2016]})
    build(Recipe.model_validate(rec), progress=False)
    return out


@case
def corrupt_shard_at_training_time(t):
    from climax.data import ShardDataset
    from jobs import pretrain

    root = t.tmp / "ds"
    shutil.copytree(t.request.getfixturevalue("shards"), root)
    bad = root / ShardDataset(str(root)).manifest.shards("train")[0]["path"]
    bad.write_bytes(bad.read_bytes()[:600])
    runs = t.tmp / "runs"
    cfg = {"name": "run", "storage_path": str(runs), "model": dict(TINY),
           "data": {"datasets": [{"root": str(root)}], "batch_size": 2, "max_val_batches": 1,
                    "leads": {"random": False, "hours": [6], "val_hours": [6]}},
           "optim": {"lr": 1e-3, "warmup_steps": 1}, "train": {"epochs": 1, "steps_per_epoch": 2},
           "scaling": {"num_workers": 1}, "max_failures": 2, "checkpoint": {"num_to_keep": 1},
           "observability": {"tensorboard": False}}
    path = t.tmp / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Case(lambda: in_process(pretrain.main, [str(path)], t.capsys), 1, [str(bad)], r"re-run jobs\.preprocess",
                [runs / "**" / "model.pt", runs / "**" / "train_state.pt"])


@case
def mismatched_checkpoint(t):
    """A checkpoint trained on a 16 x 32 grid evaluated on the 8 x 16 dataset."""
    from climax.checkpoint import save_checkpoint
    from jobs import evaluate
    from tests.helpers import tiny_model

    ckpt = save_checkpoint(tiny_model(GRIB_VARS, img_size=(16, 32), **{k: v for k, v in TINY.items()
                                                                        if k != "patch_size"}),
                           t.tmp / "model.pt")
    out = t.tmp / "eval"
    argv = [f"checkpoint={ckpt}", f"data={t.request.getfixturevalue('shards')}", "split=val", "leads=[6]",
            f"output={out}", "progress=false"]
    return Case(lambda: in_process(evaluate.main, argv, t.capsys), 1, [str(ckpt), "(16, 32)", "(8, 16)"],
                r"evaluate on", [out / "metrics.json"])


# ----------------------------------------------------------------------------- the test
@dataclass
class Ctx:
    raw: Path
    tmp: Path
    capsys: object
    request: object


def test_catalogue_is_complete():
    assert len(CASES) >= 20, sorted(CASES)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_bad_input(kind, raw, ray_local, tmp_path, capsys, request):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = CASES[kind](Ctx(raw, tmp_path, capsys, request))
        code, out = c.run()
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == c.code, out
    assert len(errors) == 1 and "Traceback" not in out, out
    line = errors[0]
    for name in c.names:
        assert name in line, line
    assert re.search(c.todo, line), line
    for pattern in c.unfinished:
        assert not glob.glob(str(pattern), recursive=True, include_hidden=True), f"{pattern} exists after a failed run"
