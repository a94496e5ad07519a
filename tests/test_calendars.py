"""Model calendars and gaps end to end, inputs that lie, self-contained checkpoints (issue 15, items 3-5).

CMIP6-like NetCDF in model calendars (written by ``pipelines.sample_data.write_cmip6`` through
xarray/cftime, ESGF layout, ``plev`` in Pa) go through the jobs as users run them: jobs.preprocess,
jobs.pretrain (a few steps on local Ray), jobs.evaluate and jobs.forecast.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import ROOT

VARS = ["land_sea_mask", "orography", "2m_temperature", "geopotential_500", "temperature_850"]
TINY = {"patch_size": 2, "embed_dim": 32, "depth": 1, "decoder_depth": 1, "num_heads": 2, "mlp_ratio": 2.0,
        "drop_path": 0.0, "drop_rate": 0.0}


def _recipe(root: Path, src: Path, out: Path, **time) -> Path:
    recipe = {"sources": [{"path": str(src / "*.nc"), "format": "netcdf"}], "variables": VARS,
              "grid": {"resolution": 11.25, "method": "bilinear"},
              "time": {"start": "2016-01-01", "end": "2020-12-31T18:00", "step": "6h", **time},
              "splits": {"train": [2016, 2016], "val": [2017, 2017], "test": [2020, 2020]}, "output": str(out)}
    path = root / f"recipe-{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module", params=["noleap", "360_day"])
def model_calendar(request, ray_local, tmp_path_factory):
    """2016 (train), 2017 (val) and 2020 (test) of 6-hourly CMIP6-like data in a model calendar,
    through jobs.preprocess."""
    from jobs import preprocess
    from pipelines.sample_data import write_cmip6

    root = tmp_path_factory.mktemp(f"cal_{request.param}")
    src = write_cmip6(root / "raw", calendar=request.param, years=(2016, 2017, 2020), resolution=11.25,
                      variables=VARS)
    preprocess.main([str(_recipe(root, src, root / "shards"))])
    return request.param, root / "shards"


def _job_yaml(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_model_calendar_builds_trains_evaluates_and_forecasts(model_calendar, tmp_path, capsys, ray_local):
    from climax.data import ShardDataset
    from climax.evaluation import evaluation_inits
    from jobs import evaluate, forecast

    calendar, shards = model_calendar
    capsys.readouterr()
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["time"]["calendar"] == calendar and manifest["time"]["gaps"] == []
    ds = ShardDataset(str(shards))
    six = np.timedelta64(6, "h")
    for split in ("train", "val", "test"):
        t = ds.axis(split).times
        # every shard is regular: the gaps fall between shards, never inside one
        for s in manifest["splits"][split]["shards"]:
            assert np.datetime64(s["start"]) + (s["rows"] - 1) * six == np.datetime64(s["end"])
        if calendar == "noleap":
            assert len(t) == 365 * 4 and not np.any((t.astype("datetime64[D]") == np.datetime64("2016-02-29"))
                                                     | (t.astype("datetime64[D]") == np.datetime64("2020-02-29")))
        else:  # 360 days a year, converted to dates with align_on="year": 5 or 6 whole days absent
            assert len(t) == 360 * 4 and np.sum(np.diff(t) != six) in (5, 6)
    assert len(manifest["splits"]["train"]["shards"]) >= 2  # cut at the gap(s)

    # training: the loader counts the pairs the gaps remove, and the checkpoint is self-contained
    storage = tmp_path / "runs"
    cfg = {"name": "cal", "storage_path": str(storage), "model": dict(TINY),
           "data": {"datasets": [{"root": str(shards)}], "batch_size": 4, "max_val_batches": 2,
                    "leads": {"random": True, "min_hours": 6, "max_hours": 24, "val_hours": [6]}},
           "optim": {"lr": 1e-3, "warmup_steps": 2}, "train": {"epochs": 1, "steps_per_epoch": 3},
           "scaling": {"num_workers": 1}, "max_failures": 0, "observability": {"tensorboard": False}}
    # as users run it, in its own process (the workers' lines reach its output), on the session's Ray
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, "-m", "jobs.pretrain", _job_yaml(tmp_path / "pretrain.yaml", cfg)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert re.search(r"split train: \d+ time steps, \d+ \(input, lead\) pairs; \d+ skipped: their input or target "
                     r"time is missing", out), out
    ckpt = Path(re.search(r"last checkpoint: (\S+)", out).group(1))
    meta = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    assert meta["dataset"]["manifest_fingerprint"] == ds.manifest.fingerprint
    assert meta["dataset"]["calendar"] == calendar
    assert meta["grid"]["lat"] == ds.lat.tolist() and meta["grid"]["lon"] == ds.lon.tolist()
    assert meta["grid"]["lat_order"] == "south_to_north" and meta["variables"] == VARS
    mean, std = ds.normalizer(VARS)
    np.testing.assert_allclose([meta["statistics"][v]["mean"] for v in VARS], mean, rtol=1e-6)
    np.testing.assert_allclose([meta["statistics"][v]["std"] for v in VARS], std, rtol=1e-6)

    # evaluation: only initial times whose targets exist at the exact leads are scored
    df = evaluate.main([_job_yaml(tmp_path / "eval.yaml", {
        "checkpoint": str(ckpt), "data": str(shards), "leads": [6, 24], "rollout_step": 6, "max_samples": 60,
        "batch_size": 16, "output": str(tmp_path / "eval"), "progress": False, "device": "cpu"})])
    out = capsys.readouterr().out
    assert "differ by more than" not in out  # the checkpoint's statistics are the dataset's
    assert re.search(r"note: \d+ initial times skipped: a target time at one of the leads is missing", out), out
    times = ds.axis("test").times
    inits = np.array(df.attrs["init_times"], dtype="datetime64[ns]")
    assert len(inits) == 60 and int(df["samples"].max()) == 60
    assert np.isin(inits + np.timedelta64(24, "h"), times).all() and np.isin(inits + six, times).all()
    every = evaluation_inits(times, [6, 24])
    assert len(every) < len(times) - 4  # pairs across the gaps are not formed
    assert np.isfinite(df["rmse"]).all()

    # a forecast from the first step after a gap
    after = times[np.flatnonzero(np.diff(times) != six)[0] + 1]
    path = forecast.main([_job_yaml(tmp_path / "fc.yaml", {
        "checkpoint": str(ckpt), "data": str(shards), "init_times": [str(after)[:16]], "leads": [6, 24],
        "output": str(tmp_path / "fc.nc"), "progress": False, "device": "cpu"})])
    import xarray as xr

    with xr.open_dataset(path) as fc:
        assert fc.sizes["init_time"] == 1 and np.isfinite(fc["2m_temperature"].values).all()


# ------------------------------------------------------------------ a standard calendar with a gap
@pytest.fixture(scope="module")
def gappy(ray_local, tmp_path_factory):
    """Standard-calendar 6-hourly data for January-March 2016 with 10 March missing from the files."""
    from pipelines.sample_data import write_cmip6

    root = tmp_path_factory.mktemp("gappy")
    src = write_cmip6(root / "raw", calendar="standard", years=(2016,), resolution=11.25, variables=VARS,
                      skip_days=["2016-03-10"])
    return root, src


def _gappy_recipe(root, src, **time):
    from pipelines.recipe import Recipe

    return Recipe.model_validate({
        "sources": [{"path": str(src / "*.nc")}], "variables": VARS, "grid": {"resolution": 11.25},
        "time": {"start": "2016-01-01", "end": "2016-03-31T18:00", "step": "6h", **time},
        "splits": {"train": [2016, 2016]}, "output": str(root / f"shards-{time.get('missing', 'error')}")})


def test_missing_day_is_an_error_by_default(gappy):
    from pipelines.build import BuildError, build

    with pytest.raises(BuildError, match=r"missing at 4 of 364 time steps, first at 2016-03-10T00:00:00.*"
                                         r"time\.missing: allow"):
        build(_gappy_recipe(*gappy))


@pytest.fixture(scope="module")
def gappy_shards(gappy):
    from pipelines.build import build

    recipe = _gappy_recipe(*gappy, missing="allow")
    build(recipe)
    return Path(recipe.output)


def test_missing_day_allowed_is_listed_and_its_samples_skipped(gappy_shards):
    from climax.data import ForecastLoader, ShardDataset

    manifest = json.loads((gappy_shards / "manifest.json").read_text())
    assert manifest["time"]["missing"] == "allow" and manifest["time"]["gaps"] == [["2016-03-10T00:00:00", 4]]
    assert [s["end"] for s in manifest["splits"]["train"]["shards"]][0] == "2016-03-09T18:00:00"
    ds = ShardDataset(str(gappy_shards))
    assert len(ds.axis("train")) == 360
    # 6 h pairs: 5 need a missing step (09T18 -> 10T00, ..., 10T18 -> 11T00); 24 h pairs: 8
    loader = ForecastLoader(ds, "train", VARS, ["2m_temperature"], [6, 24], random_lead=False, batch_size=8,
                            shuffle=False, drop_last=False)
    assert loader.skipped == 5 + 8 and "13 skipped" in loader.report()
    assert len(loader.sampler.all_pairs()) == (359 + 4) - 5 + (359 + 4 - 3) - 8
    seen = 0
    for b in loader:
        assert np.isin(b.target_time, ds.axis("train").times).all()
        assert not np.any(b.input_time.astype("datetime64[D]") == np.datetime64("2016-03-10"))
        seen += len(b)
    assert seen == len(loader.sampler.all_pairs())


def test_stored_times_are_checked_and_read_when_the_manifest_is_irregular(gappy_shards, tmp_path):
    """An older build whose shard spans a gap: the shard's time column is read; a manifest that
    contradicts a shard's stored times is refused on read."""
    import shutil

    from climax.data import ShardDataset

    copy = tmp_path / "copy"
    shutil.copytree(gappy_shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    shards = manifest["splits"]["train"]["shards"]
    # merge the two shards around the gap into one entry, as an older build wrote them
    import pyarrow.parquet as pq

    merged = pq.ParquetFile(copy / shards[0]["path"]).read()
    import pyarrow as pa

    table = pa.concat_tables([merged, pq.ParquetFile(copy / shards[1]["path"]).read()])
    pq.write_table(table, copy / shards[0]["path"], row_group_size=1)
    shards[0] = {**shards[0], "rows": shards[0]["rows"] + shards[1]["rows"], "end": shards[1]["end"]}
    del shards[1]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    ds = ShardDataset(str(copy))
    axis = ds.axis("train")
    np.testing.assert_array_equal(axis.times, ShardDataset(str(gappy_shards)).axis("train").times)
    x = ds.read("train", np.array([200, 300]), ["2m_temperature"])
    y = ShardDataset(str(gappy_shards)).read("train", np.array([200, 300]), ["2m_temperature"])
    np.testing.assert_array_equal(x, y)

    # a manifest that shifts a shard by one step: the stored times refute it
    manifest["splits"]["train"]["shards"] = [{**s, "start": str(np.datetime64(s["start"]) + np.timedelta64(6, "h")),
                                              "end": str(np.datetime64(s["end"]) + np.timedelta64(6, "h"))}
                                             if k == len(shards) - 1 else s for k, s in enumerate(shards)]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    ds = ShardDataset(str(copy))
    with pytest.raises(ValueError, match="manifest and the shard disagree"):
        ds.read("train", np.array([len(ds.axis("train")) - 1]), ["2m_temperature"])


# ------------------------------------------------------------------ inputs that lie
def test_recipe_times_with_a_zone_offset_are_converted_to_utc():
    from pipelines.recipe import Recipe

    base = {"sources": [{"path": "x"}], "variables": ["2m_temperature"], "splits": {"train": [2014, 2015]},
            "output": "o"}
    r = Recipe.model_validate({**base, "time": {"start": "2015-01-01T00:00+06:00", "end": "2015-01-02T00:00Z",
                                                "step": "6h"}})
    assert r.time.start.isoformat() == "2014-12-31T18:00:00" and r.time.end.isoformat() == "2015-01-02T00:00:00"
    assert r.time.times()[0] == np.datetime64("2014-12-31T18:00", "ns") and len(r.time.times()) == 6
    # the same instant written either way is the same recipe
    same = Recipe.model_validate({**base, "time": {"start": "2014-12-31T18:00", "end": "2015-01-02", "step": "6h"}})
    assert same.fingerprint() == r.fingerprint()
    # YAML's own timestamps carry the offset too
    parsed = yaml.safe_load("start: 2015-01-01T00:00:00+06:00\nend: 2015-01-02\nstep: 6h")
    assert Recipe.model_validate({**base, "time": parsed}).time.start.isoformat() == "2014-12-31T18:00:00"
    with pytest.raises(ValueError, match="before time.start"):
        Recipe.model_validate({**base, "time": {"start": "2015-01-01T00:00-06:00", "end": "2015-01-01T03:00Z"}})


def test_physical_ranges_catch_fill_values_without_attributes():
    from pipelines.names import check_range, physical_range

    assert physical_range("geopotential_500") == pytest.approx((40_000.0, 62_000.0))
    assert physical_range("temperature_850") == (150.0, 350.0) and physical_range("specific_humidity_850")[1] == 0.05
    field = np.full((3, 4, 8), 280.0, np.float32) + np.random.default_rng(0).random((3, 4, 8), np.float32)
    times = ["2016-01-01T00:00:00", "2016-01-01T06:00:00", "2016-01-01T12:00:00"]
    check_range(field, "2m_temperature", "f.nc", times, physical_range("2m_temperature"))
    for fill, what in ((-9999.0, "ranges -9999"), (9.999e20, r"9\.999e\+20")):
        bad = field.copy()
        bad[1, 2, 3] = fill
        with pytest.raises(ValueError, match=rf"f\.nc: variable 2m_temperature at 2016-01-01T06:00:00 .*{what}"):
            check_range(bad, "2m_temperature", "f.nc", times, physical_range("2m_temperature"))
    wind = np.random.default_rng(1).normal(0, 5, (3, 4, 8)).astype(np.float32)
    wind[2] = 0.0  # a whole field of 0: in range, but a fill
    with pytest.raises(ValueError, match="at 2016-01-01T12:00:00 is 0 over the whole field"):
        check_range(wind, "10m_u_component_of_wind", "f.nc", times, physical_range("10m_u_component_of_wind"))
    z = np.full((1, 4, 8), 20_000.0, np.float32)  # geopotential in m at 500 hPa: units mix-up
    with pytest.raises(ValueError, match="outside its physical range 40000 .. 62000"):
        check_range(z, "geopotential_500", "z.nc", times[:1], physical_range("geopotential_500"))


def test_fill_values_stop_the_build_naming_file_variable_and_time_unless_overridden(ray_local, tmp_path):
    import xarray as xr

    from pipelines.build import BuildError, build
    from pipelines.recipe import Recipe
    from pipelines.sample_data import write_cmip6

    src = write_cmip6(tmp_path / "raw", calendar="standard", years=(2016,), resolution=11.25,
                      variables=["2m_temperature"])
    path = next(src.glob("tas_*.nc"))
    with xr.open_dataset(path, decode_times=xr.coders.CFDatetimeCoder(use_cftime=True)) as f:
        ds = f.load()
    ds["tas"][5, 3, 4] = -9999.0  # no _FillValue / missing_value attribute says so
    ds.to_netcdf(path.with_suffix(".tmp"), engine="h5netcdf",
                 encoding={"time": {"units": "hours since 1850-01-01", "calendar": "standard"}})
    path.with_suffix(".tmp").replace(path)
    recipe = {"sources": [{"path": str(src / "tas_*.nc")}], "variables": ["2m_temperature"],
              "grid": {"resolution": 11.25}, "time": {"start": "2016-01-01", "end": "2016-01-10T18:00", "step": "6h"},
              "splits": {"train": [2016, 2016]}, "output": str(tmp_path / "out")}
    with pytest.raises(BuildError, match=rf"{path.name}: variable 2m_temperature at 2016-01-02T06:00:00 ranges "
                                         r"-9999 .. .* outside its physical range 170 .. 350 K.*valid_range"):
        build(Recipe.model_validate(recipe))
    manifest = build(Recipe.model_validate({**recipe, "valid_range": {"2m_temperature": [-10000, 400]}}))
    assert manifest["statistics"]["2m_temperature"]["count"] == 40 * 16 * 32
    with pytest.raises(ValueError, match="not among variables"):
        Recipe.model_validate({**recipe, "valid_range": {"geopotential_500": None}})


# ------------------------------------------------------------------ checkpoint statistics
def test_checkpoint_statistics_take_precedence_and_differences_are_named(gappy_shards, tmp_path):
    from climax.data import ForecastLoader, ShardDataset
    from climax.normalization import apply_statistics, checkpoint_statistics, release_statistics

    ds = ShardDataset(str(gappy_shards))
    mean, std = ds.manifest.mean_std(VARS)
    stats = {v: (float(m), float(s)) for v, m, s in zip(VARS, mean, std)}
    stats["2m_temperature"] = (stats["2m_temperature"][0] + 0.05 * stats["2m_temperature"][1],
                               stats["2m_temperature"][1])  # the mean off by 5 % of a std
    stats["temperature_850"] = (stats["temperature_850"][0], stats["temperature_850"][1] * 1.005)  # within 1 %
    stats["unknown_var"] = (0.0, 1.0)  # a variable the dataset lacks is ignored
    said = []
    diff = apply_statistics(ds, stats, "checkpoint c.pt", warn=said.append)
    assert diff == ["2m_temperature"] and len(said) == 1
    assert "2m_temperature" in said[0] and "temperature_850" not in said[0] and "c.pt" in said[0]
    m, s = ds.normalizer(["2m_temperature", "temperature_850", "orography"])
    np.testing.assert_allclose(m, [stats["2m_temperature"][0], stats["temperature_850"][0], stats["orography"][0]],
                               rtol=1e-6)
    np.testing.assert_allclose(s[1], stats["temperature_850"][1], rtol=1e-6)
    loader = ForecastLoader(ds, "train", ["2m_temperature"], ["2m_temperature"], [6], random_lead=False,
                            batch_size=2, shuffle=False, max_batches=1)
    batch = next(iter(loader))
    raw = ds.read("train", np.array([0, 1]), ["2m_temperature"])
    np.testing.assert_allclose(batch.x.numpy(), (raw - stats["2m_temperature"][0]) / stats["2m_temperature"][1],
                               rtol=1e-5, atol=1e-5)

    # an original release's normalize_mean.npz / normalize_std.npz, as its preprocessing writes them
    np.savez(tmp_path / "normalize_mean.npz", **{"2m_temperature": np.array([278.5]), "lattitude": np.array([0.0]),
                                                 "geopotential_500": np.array([54000.0])})
    np.savez(tmp_path / "normalize_std.npz", **{"2m_temperature": np.array([21.3]), "lattitude": np.array([52.0]),
                                                "geopotential_500": np.array([3300.0])})
    rel = release_statistics(tmp_path)
    assert rel == {"2m_temperature": (278.5, 21.3), "latitude": (0.0, 52.0), "geopotential_500": (54000.0, 3300.0)}
    assert checkpoint_statistics({"statistics": {"lattitude": {"mean": 1, "std": 2}}}) == {"latitude": (1.0, 2.0)}
    with pytest.raises(FileNotFoundError, match="normalize_mean.npz"):
        release_statistics(tmp_path / "nowhere")


def test_finetuning_statistics_precedence(gappy_shards, tmp_path):
    """Finetuning: the checkpoint's recorded statistics, else the release files given by
    ckpt_statistics; statistics=dataset keeps the dataset's."""
    from climax.data import ShardDataset
    from climax.tasks.forecast import init_statistics
    from jobs.train import TrainConfig

    ds_stats = ShardDataset(str(gappy_shards)).manifest.mean_std(["2m_temperature"])
    np.savez(tmp_path / "normalize_mean.npz", **{"2m_temperature": np.array([111.0]), "orography": np.array([7.0])})
    np.savez(tmp_path / "normalize_std.npz", **{"2m_temperature": np.array([11.0]), "orography": np.array([3.0])})
    recorded = {"statistics": {"2m_temperature": {"mean": 222.0, "std": 22.0}}}

    def run(meta, **kw):
        cfg = TrainConfig.model_validate({"data": {"datasets": [{"root": str(gappy_shards)}]},
                                          "init_checkpoint": "c.pt", **kw})
        ds, said = ShardDataset(str(gappy_shards)), []
        init_statistics(cfg, [ds], meta, log=said.append)
        return ds.normalizer(["2m_temperature", "orography"]), " ".join(said)

    (m, s), said = run(recorded)
    assert m[0] == 222.0 and s[0] == 22.0 and "differ by more than 1 %" in said and "2m_temperature" in said
    (m, s), said = run({}, ckpt_statistics=str(tmp_path))
    assert (m.tolist(), s.tolist()) == ([111.0, 7.0], [11.0, 3.0])
    assert "2m_temperature, orography" in said
    (m, s), _ = run(recorded, ckpt_statistics=str(tmp_path))  # recorded ones win, the release fills the rest
    assert (m.tolist(), s.tolist()) == ([222.0, 7.0], [22.0, 3.0])
    (m, s), said = run(recorded, statistics="dataset")
    np.testing.assert_allclose(m[0], ds_stats[0][0], rtol=1e-6)
    (m, s), said = run({})
    np.testing.assert_allclose(m[0], ds_stats[0][0], rtol=1e-6)
    assert "records no normalisation statistics" in said


# ------------------------------------------------------------------ sample files and plans in model calendars
@pytest.mark.parametrize("calendar,steps", [("360_day", 360 * 4), ("all_leap", 365 * 4), ("noleap", 365 * 4)])
def test_write_cmip6_reads_back_as_the_fields_at_the_converted_dates(tmp_path, calendar, steps):
    from pipelines import sample_data as sd
    from pipelines.sources import open_source

    src = sd.write_cmip6(tmp_path, calendar=calendar, years=(2015,), resolution=11.25,
                         variables=["geopotential_500", "2m_temperature", "land_sea_mask"])
    names = sorted(p.name for p in src.glob("*.nc"))
    last_day = 0 if calendar == "360_day" else 1
    assert names == ["sftlf_fx_SAMPLE-ESM_historical_r1i1p1f1_gn.nc",
                     f"tas_6hrPlevPt_SAMPLE-ESM_historical_r1i1p1f1_gn_201501010000-2015123{last_day}1800.nc",
                     f"zg_6hrPlevPt_SAMPLE-ESM_historical_r1i1p1f1_gn_201501010000-2015123{last_day}1800.nc"]
    z = open_source(str(next(src.glob("zg_*.nc"))))
    assert z.attrs["calendar"] == calendar and z.sizes["time"] == steps  # all_leap: 29 Feb 2015 has no date
    t = z["time"].values
    truth = sd.fields(t, *sd.grid(11.25), ["geopotential_500"])["geopotential_500"]
    np.testing.assert_allclose(z["geopotential_500"].values, truth, rtol=1e-5)  # zg in m, times g on reading
    lsm = open_source(str(next(src.glob("sftlf_*.nc"))))["land_sea_mask"].values  # % -> fraction
    assert lsm.min() >= 0 and lsm.max() <= 1


def _fake(times, calendar):
    from pipelines.regrid import target_grid

    g = target_grid(11.25)
    return {"path": f"tas_{calendar}.nc", "format": "netcdf", "member": None, "storage_options": {}, "fingerprint": "f",
            "calendar": calendar, "lat": g.lat.tolist(), "lon": g.lon.tolist(),
            "times": [int(x) for x in np.asarray(times, "datetime64[ns]").astype(np.int64)],
            "variables": {"2m_temperature": {"units": "K", "source_name": "tas", "constant": False}}}


@pytest.mark.parametrize("calendar", ["360_day", "all_leap"])
def test_plan_knows_a_calendars_days_from_a_real_gap(tmp_path, calendar):
    import xarray as xr

    from pipelines.build import BuildError, calendar_times, plan_chunks
    from pipelines.recipe import Recipe
    from pipelines.sources.netcdf import convert_times

    recipe = Recipe.model_validate({
        "sources": [{"path": "x"}], "variables": ["2m_temperature"], "grid": {"resolution": 11.25},
        "time": {"start": "2015-01-01", "end": "2016-12-31T18:00", "step": "6h"},
        "splits": {"train": [2015, 2015], "test": [2016, 2016]}, "output": str(tmp_path)})
    cf = xr.date_range("2015-01-01", f"2016-12-{30 if calendar == '360_day' else 31}T18:00", freq="6h",
                       calendar=calendar, use_cftime=True)
    times, _ = convert_times(np.asarray(cf), calendar, "x")
    np.testing.assert_array_equal(calendar_times(recipe.time, calendar), times)
    plan = plan_chunks(recipe, [_fake(times, calendar)])
    assert plan.calendar == calendar and plan.gaps == []
    planned = np.array([t for c in plan.chunks for t in c.times])
    np.testing.assert_array_equal(planned, times.astype(np.int64))
    for c in plan.chunks:  # regular shards
        assert set(np.diff(c.times).tolist()) <= {6 * 3600 * 10**9}
    lost = times[(times < np.datetime64("2016-05-03")) | (times >= np.datetime64("2016-05-04"))]
    with pytest.raises(BuildError, match="missing at 4 of .* first at 2016-05-03T00:00:00"):
        plan_chunks(recipe, [_fake(lost, calendar)])
    allowed = recipe.model_copy(update={"time": recipe.time.model_copy(update={"missing": "allow"})})
    assert plan_chunks(allowed, [_fake(lost, calendar)]).gaps == [["2016-05-03T00:00:00", 4]]
