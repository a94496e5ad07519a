"""The preprocessing build end to end on a real local Ray cluster, against generated archives."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xarray as xr
import yaml

from climax import shards as S
from pipelines.recipe import Recipe
from tests.helpers import ROOT

pytestmark = pytest.mark.slow

VARS = ["land_sea_mask", "orography", "latitude", "2m_temperature", "geopotential_500", "temperature_850",
        "u_component_of_wind_850"]
TIME_VARS = ["2m_temperature", "geopotential_500", "temperature_850", "u_component_of_wind_850"]
WB = {"2m_temperature": ("2m_temperature", "t2m", None), "geopotential_500": ("geopotential", "z", 500),
      "temperature_850": ("temperature", "t", 850), "u_component_of_wind_850": ("u_component_of_wind", "u", 850)}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """Three years of 12-hourly 11.25-degree WeatherBench-layout NetCDF (years differ)."""
    from pipelines.sample_data import generate

    out = tmp_path_factory.mktemp("archive")
    generate(out, years=(2014, 2015, 2016), resolution=11.25, step_hours=12,
             variables=["land_sea_mask", "orography", *TIME_VARS], formats=("weatherbench",), progress=False)
    # make one year clearly warmer, so that statistics merged per year would be visibly wrong
    path = out / "weatherbench" / "2m_temperature" / "2m_temperature_2015_11.25deg.nc"
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        ds = ds.load()
    ds["t2m"] += np.float32(3.0)
    path.unlink()
    ds.to_netcdf(path, engine="h5netcdf")
    return out / "weatherbench"


def recipe_dict(archive: Path, output: Path, **kw) -> dict:
    d = {
        "sources": [{"path": str(archive)}],
        "variables": VARS,
        "grid": {"resolution": 11.25, "method": "bilinear"},
        "time": {"start": "2014-01-01", "end": "2016-12-31T12:00", "step": "12h"},
        "splits": {"train": [2014, 2015], "val": [2016, 2016]},
        "output": str(output),
        "shard_bytes": 1_000_000,  # ~120 rows: several shards per year
    }
    d.update(kw)
    return d


@pytest.fixture(scope="module")
def built(archive, ray_local, tmp_path_factory):
    from pipelines.build import build

    out = tmp_path_factory.mktemp("shards")
    manifest = build(Recipe.model_validate(recipe_dict(archive, out)))
    return out, manifest


def _truth(archive: Path, var: str, years) -> tuple[np.ndarray, np.ndarray]:
    folder, short, level = WB[var]
    files = sorted((archive / folder).glob("*.nc"))
    das = []
    for f in files:
        with xr.open_dataset(f, engine="h5netcdf") as ds:
            da = ds[short] if level is None else ds[short].sel(level=level)
            da = da.sel(time=da.time.dt.year.isin(list(years))).load()
            das.append(da)
    da = xr.concat(das, "time").transpose("time", "lat", "lon")
    return da.time.values, da.values.astype(np.float32)


def _files_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def test_statistics_are_exact_over_the_training_years(built, archive):
    out, manifest = built
    for var in TIME_VARS:
        times, truth = _truth(archive, var, (2014, 2015))
        assert len(times) == 2 * 730
        stats = manifest["statistics"][var]
        a = truth.astype(np.float64)
        assert stats["count"] == a.size
        assert stats["mean"] == pytest.approx(a.mean(), rel=1e-6)
        assert stats["std"] == pytest.approx(a.std(), rel=1e-6)
        assert stats["diff_std"] == pytest.approx(np.diff(a, axis=0).std(), rel=1e-6)
        if var == "2m_temperature":  # averaging per-year stds (the original's approach) would be off
            per_year_std = np.mean([a[:730].std(), a[730:].std()])
            assert abs(per_year_std - a.std()) > 1e-3 * a.std()


def test_shards_are_plain_parquet_with_tensor_columns(built, archive):
    out, manifest = built
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 4 and sum(s["rows"] for s in shards) == 1460
    first = out / shards[0]["path"]
    schema = pq.read_schema(first)
    assert schema.field(S.TIME).type == pa.timestamp("ns")
    assert set(schema.names) == {S.TIME, *TIME_VARS}  # constants are not repeated per hour
    t = schema.field("2m_temperature").type
    assert isinstance(t, pa.FixedShapeTensorType) and list(t.shape) == [16, 32]
    meta = pq.ParquetFile(first).metadata
    per_group = S.row_group_rows(manifest["grid"]["shape"])  # ~64 KiB per column chunk
    assert meta.num_row_groups == -(-shards[0]["rows"] // per_group)
    col = meta.row_group(0).column(1)
    assert "BYTE_STREAM_SPLIT" in col.encodings and col.compression == "ZSTD"
    # values: identity regrid, so shards equal the input exactly, south-to-north
    table = pq.read_table(first, columns=["geopotential_500"])  # plain pyarrow, one column
    assert table.column_names == ["geopotential_500"]
    got = table.column(0).combine_chunks().to_numpy_ndarray()
    _, truth = _truth(archive, "geopotential_500", (2014,))
    np.testing.assert_array_equal(got, truth[: len(got)])
    assert np.all(np.diff(manifest["grid"]["lat"]) > 0) and manifest["grid"]["lat_order"] == "south_to_north"
    # checksums in the manifest
    for s in shards + manifest["splits"]["val"]["shards"]:
        assert hashlib.sha256((out / s["path"]).read_bytes()).hexdigest() == s["sha256"]
    # one time step alone
    times, arrays = S.read_shard(str(first), ["temperature_850"], rows=[3])
    assert arrays["temperature_850"].shape == (1, 16, 32)


def test_constants_and_climatology(built, archive):
    out, manifest = built
    _, consts = S.read_shard(str(out / S.CONSTANTS))
    assert set(consts) == {"land_sea_mask", "orography", "latitude"} and consts["latitude"].shape == (1, 16, 32)
    np.testing.assert_allclose(consts["latitude"][0, :, 0], manifest["grid"]["lat"])
    assert 0 <= consts["land_sea_mask"].min() and consts["land_sea_mask"].max() <= 1
    times, truth = _truth(archive, "2m_temperature", (2014, 2015))
    clim = S.read_climatology(str(out), "2m_temperature")
    doy, hour = clim.column("dayofyear").to_numpy(), clim.column("hour").to_numpy()
    values = clim.column("2m_temperature").combine_chunks().to_numpy_ndarray()
    k = int(np.flatnonzero((doy == 32) & (hour == 12))[0])  # 1 February 12 UTC of 2014 and 2015
    sel = (xr.DataArray(times).dt.dayofyear.values == 32) & (xr.DataArray(times).dt.hour.values == 12)
    assert sel.sum() == 2 and clim.column("count")[k].as_py() == 2
    np.testing.assert_allclose(values[k], truth[sel].astype(np.float64).mean(0), rtol=1e-6)
    _, mean = S.read_shard(str(out / "climatology" / "time_mean.parquet"))
    np.testing.assert_allclose(mean["2m_temperature"][0], truth.astype(np.float64).mean(0), rtol=1e-6)


def test_rerun_skips_finished_shards_and_overwrite_rebuilds(built, archive):
    from pipelines.build import build

    out, manifest = built
    before = _files_bytes(out)
    mtimes = _mtimes(out)
    again = build(Recipe.model_validate(recipe_dict(archive, out)))
    assert _files_bytes(out) == before and again["statistics"] == manifest["statistics"]
    assert _mtimes(out) == mtimes  # skipped, not rewritten with the same bytes
    rebuilt = build(Recipe.model_validate(recipe_dict(archive, out)), overwrite=True)
    assert _files_bytes(out) == before and rebuilt["splits"] == manifest["splits"]


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*.parquet"))}


def test_a_failed_rerun_never_unpublishes_and_older_code_is_rebuilt(built, archive, tmp_path):
    """A re-run that fails (here: a variable no source has) leaves the published manifest as it
    was; a shard whose footer records another code version is rebuilt, not kept (issue 16)."""
    import shutil

    from pipelines.build import BuildError, build

    out = tmp_path / "published"
    shutil.copytree(built[0], out)
    published = (out / "manifest.json").read_bytes()
    bad = recipe_dict(archive, out)
    bad["variables"] = VARS + ["specific_humidity_700"]
    with pytest.raises(BuildError):
        build(Recipe.model_validate(bad))
    assert (out / "manifest.json").read_bytes() == published

    first = out / json.loads(published)["splits"]["val"]["shards"][0]["path"]
    table = pq.read_table(first)
    meta = json.loads(table.schema.metadata[S.META_KEY])
    meta["code"] = "an-older-version"
    pq.write_table(table.replace_schema_metadata({S.META_KEY: json.dumps(meta).encode()}), first)
    older = _mtimes(out)
    build(Recipe.model_validate(recipe_dict(archive, out)))
    now = _mtimes(out)
    changed = {k for k in now if now[k] != older[k]}
    assert changed == {str(first.relative_to(out))}
    assert _files_bytes(out) == _files_bytes(built[0])


def _run_job(recipe: dict, tmp: Path, *extra, env=None, **popen) -> subprocess.Popen:
    path = tmp / f"recipe-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    e = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "jobs.preprocess", str(path), *extra], cwd=ROOT, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_sigkill_then_rerun_gives_identical_shards(built, archive, tmp_path, ray_local):
    reference, _ = built
    out = tmp_path / "killed"
    recipe = recipe_dict(archive, out)
    proc = _run_job(recipe, tmp_path, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(list(out.rglob("*.parquet"))) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be killed:\n" + proc.stdout.read()
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    assert not (out / "manifest.json").exists()  # nothing half-written looks finished
    done = len(list(out.rglob("*.parquet")))
    finished = _mtimes(out)
    rerun = _run_job(recipe, tmp_path, env={"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address})
    log, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, log
    assert _files_bytes(out) == _files_bytes(reference)
    after = _mtimes(out)
    assert all(after[k] == t for k, t in finished.items())  # finished files were skipped, not rebuilt
    assert not list(out.rglob("*.tmp")) and (out / "manifest.json").exists()
    assert done >= 3


@pytest.mark.parametrize("problem", ["nan", "missing_year", "duplicate", "unknown_variable"])
def test_bad_input_gives_a_clear_error_and_no_manifest(archive, ray_local, tmp_path, problem):
    import shutil

    from pipelines.build import BuildError, build

    src = tmp_path / "wb"
    shutil.copytree(archive, src)
    recipe = recipe_dict(src, tmp_path / "out")
    target = src / "temperature" / "temperature_2015_11.25deg.nc"
    if problem == "nan":
        with xr.open_dataset(target, engine="h5netcdf") as ds:
            ds = ds.load()
        level = int(np.flatnonzero(ds["level"].values == 850)[0])
        ds["t"][5, level, 3, 4] = np.nan  # 2015-01-03T12, 850 hPa
        target.unlink()
        ds.to_netcdf(target, engine="h5netcdf")
        expect = [str(target), "temperature_850", "2015-01-03T12:00:00", "NaN"]
    elif problem == "missing_year":
        target.unlink()
        expect = ["temperature_850", "missing", "2015-01-01T00:00:00", "time.start"]
    elif problem == "duplicate":
        recipe["sources"].append({"path": str(src / "temperature" / "temperature_2015_11.25deg.nc"),
                                  "format": "weatherbench"})
        expect = ["temperature_850", "both", "temperature_2015_11.25deg.nc"]
    else:
        recipe["variables"] = VARS + ["specific_humidity_700"]
        expect = ["specific_humidity_700", "none of the"]
    with pytest.raises(BuildError) as err:
        build(Recipe.model_validate(recipe))
    for word in expect:
        assert word in str(err.value), str(err.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_job_exits_non_zero_with_one_line(archive, tmp_path, ray_local):
    recipe = recipe_dict(archive, tmp_path / "out")
    recipe["variables"] = VARS + ["specific_humidity_700"]
    proc = _run_job(recipe, tmp_path, env={"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address})
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, log
    last = log.strip().splitlines()[-1]
    assert last.startswith("error: BuildError:") and "specific_humidity_700" in last, log


def test_recipe_errors_name_the_key(tmp_path):
    recipe = recipe_dict(tmp_path, tmp_path / "out")
    recipe["grd"] = {"resolution": 5.625}
    recipe["grid"]["method"] = "nearest"
    proc = _run_job(recipe, tmp_path)
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "unknown key 'grd'" in log and "allowed keys here: sources, variables" in log
    assert "grid.method" in log and "nearest" in log
    assert "ray" not in log.lower().split("error:")[0][-200:]  # failed before any Ray work


def test_two_node_cluster_gives_the_same_shards(built, archive, tmp_path):
    from ray.cluster_utils import Cluster

    reference, _ = built
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        out = tmp_path / "two-nodes"
        proc = _run_job(recipe_dict(archive, out), tmp_path, env={"RAY_ADDRESS": cluster.address})
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log
    finally:
        cluster.shutdown()
    assert _files_bytes(out) == _files_bytes(reference)
    a = json.loads((out / "manifest.json").read_text())
    b = json.loads((reference / "manifest.json").read_text())
    assert a["statistics"] == b["statistics"] and a["splits"] == b["splits"]


def _fake_file(path, times, calendar, var="2m_temperature"):
    from pipelines.regrid import target_grid

    g = target_grid(11.25)
    return {"path": path, "format": "netcdf", "member": None, "storage_options": {}, "fingerprint": "f",
            "calendar": calendar, "lat": g.lat.tolist(), "lon": g.lon.tolist(),
            "times": [int(t) for t in np.asarray(times, "datetime64[ns]").astype(np.int64)],
            "variables": {var: {"units": "K", "source_name": "tas", "constant": False}}}


@pytest.mark.parametrize("calendar", ["noleap", "365_day"])
def test_calendars_without_leap_days_plan_without_29_february(tmp_path, calendar):
    from pipelines.build import BuildError, plan_chunks

    days = np.arange(np.datetime64("2016-02-20"), np.datetime64("2016-03-10"), np.timedelta64(1, "D"))
    days = days[days != np.datetime64("2016-02-29")]
    recipe = Recipe.model_validate({
        "sources": [{"path": "x"}], "variables": ["2m_temperature"], "grid": {"resolution": 11.25},
        "time": {"start": "2016-02-20", "end": "2016-03-09", "step": "1D"},
        "splits": {"train": [2016, 2016]}, "output": str(tmp_path)})
    plan = plan_chunks(recipe, [_fake_file("tas_noleap.nc", days, calendar)])
    planned = [t for c in plan.chunks for t in c.times]
    assert len(planned) == len(days) and np.datetime64("2016-02-29", "ns").astype(np.int64) not in planned
    # the standard calendar does not excuse a missing day
    with pytest.raises(BuildError, match="missing at 1 of 19 time steps, first at 2016-02-29"):
        plan_chunks(recipe, [_fake_file("tas.nc", days, "standard")])


def test_climatology_equals_a_two_pass_reference(built, archive):
    """Every (day of year, hour) slot of the one-pass climatology equals numpy over all training
    steps, and the time mean too (issue 14: no second read of the shards)."""
    out, manifest = built
    assert manifest["climatology"]["parts"] and all((out / p).exists() for p in manifest["climatology"]["parts"])
    for var in TIME_VARS:
        times, truth = _truth(archive, var, (2014, 2015))
        doy, hour = S.climatology_slots(times)
        clim = S.read_climatology(str(out), var)
        got = clim.column(var).combine_chunks().to_numpy_ndarray()
        keys = clim.column("dayofyear").to_numpy().astype(int) * 24 + clim.column("hour").to_numpy().astype(int)
        assert len(np.unique(keys)) == len(keys) == len(np.unique(doy * 24 + hour))
        for k, key in enumerate(keys):
            sel = doy * 24 + hour == key
            assert clim.column("count")[k].as_py() == sel.sum()
            np.testing.assert_allclose(got[k], truth[sel].astype(np.float64).mean(0), rtol=1e-6)


def test_climatology_keeps_the_chosen_hours_and_the_time_mean_of_every_step(built, archive, ray_local, tmp_path):
    """``climatology_hours`` stores only those hours of day (default: WB2's 0/6/12/18 UTC where the
    steps have them); the time mean still covers every training step."""
    from pipelines.build import BuildError, build

    assert built[1]["climatology"]["hours"] == [0, 12]  # 12-hourly steps: the synoptic hours they have
    kw = dict(grid={"resolution": 22.5, "method": "bilinear"}, splits={"train": [2014, 2015]},
              time={"start": "2014-01-01", "end": "2015-12-31T12:00", "step": "12h"})
    with pytest.raises(BuildError, match=r"climatology_hours \[3\]: no training step falls at those hours"):
        build(Recipe.model_validate(recipe_dict(archive, tmp_path / "bad", climatology_hours=[3], **kw)))
    assert not (tmp_path / "bad" / S.MANIFEST).exists()
    recipe = Recipe.model_validate(recipe_dict(archive, tmp_path / "noon", climatology_hours=[12], **kw))
    assert recipe.fingerprint() != Recipe.model_validate(recipe_dict(archive, tmp_path, **kw)).fingerprint()
    manifest = build(recipe)
    assert manifest["climatology"]["hours"] == [12]
    out = tmp_path / "noon"
    for var in ("2m_temperature", "geopotential_500"):
        times, _ = _truth(archive, var, (2014, 2015))
        truth = np.concatenate([S.read_shard(str(out / sh["path"]), [var])[1][var]
                                for sh in manifest["splits"]["train"]["shards"]])
        clim = S.read_climatology(str(out), var)
        doy, hour = clim.column("dayofyear").to_numpy(), clim.column("hour").to_numpy()
        assert set(hour.tolist()) == {12} and len(doy) == 365
        tdoy, thour = S.climatology_slots(times)
        got = clim.column(var).combine_chunks().to_numpy_ndarray()
        for k in (0, 31, 200, 364):
            sel = (tdoy == doy[k]) & (thour == 12)
            assert sel.sum() == 2 == clim.column("count")[k].as_py()
            np.testing.assert_allclose(got[k], truth[sel].astype(np.float64).mean(0), rtol=1e-6)
        _, mean = S.read_shard(str(out / "climatology" / "time_mean.parquet"))
        assert len(truth) == len(times) == 2 * 730
        np.testing.assert_allclose(mean[var][0], truth.astype(np.float64).mean(0), rtol=1e-6)


def test_task_budget_below_one_source_chunk_gives_the_same_bytes(archive, ray_local, tmp_path):
    """A memory budget smaller than one chunk at source resolution decodes in sub-blocks of a few
    steps and still writes exactly the bytes of an unconstrained build (regridding included)."""
    from pipelines.build import block_steps, build

    grid = {"resolution": 22.5, "method": "conservative"}
    free = build(Recipe.model_validate(recipe_dict(archive, tmp_path / "free", grid=grid, max_task_mb=4096)))
    tight_recipe = Recipe.model_validate(recipe_dict(archive, tmp_path / "tight", grid=grid, max_task_mb=1))
    rows = max(s["rows"] for s in free["splits"]["train"]["shards"])
    source_chunk = rows * len(TIME_VARS) * 16 * 32 * 4  # 11.25 deg source fields
    assert tight_recipe.max_task_mb * 2**20 < source_chunk
    assert block_steps(16 * 32, tight_recipe.max_task_mb * 2**20 // 4) < rows  # really in sub-blocks
    tight = build(tight_recipe)
    assert _files_bytes(tmp_path / "tight") == _files_bytes(tmp_path / "free")
    assert tight["statistics"] == free["statistics"] and tight["splits"] == free["splits"]
    assert tight_recipe.fingerprint() == Recipe.model_validate(recipe_dict(archive, tmp_path, grid=grid)).fingerprint()
