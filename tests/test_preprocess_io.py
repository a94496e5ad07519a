"""The preprocessing build against GRIB archives, s3:// input and output (moto), and the real
sample files in ../shared/data: values, byte-identical shards across storages, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from climax import shards as S
from pipelines.recipe import Recipe

pytestmark = pytest.mark.slow

RES = 5.625
GRIB_VARS = ["land_sea_mask", "orography", "2m_temperature", "geopotential_500", "temperature_850"]
GRIB_TIME_VARS = ["2m_temperature", "geopotential_500", "temperature_850"]
BUCKET = "climax-io"
MEMBERS = "era5/era5-levels-members"


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def grib_dir(tmp_path_factory) -> Path:
    """Six days of 6-hourly 5.625-degree GRIB 2 (pressure-level and surface files of 2015)."""
    from pipelines.sample_data import generate

    out = tmp_path_factory.mktemp("archive")
    return generate(out, years=(2015,), resolution=RES, step_hours=6, variables=GRIB_VARS,
                    formats=("grib",), progress=False, max_days=6)["grib"]


def grib_recipe(sources, output, **kw) -> dict:
    d = {
        "sources": sources,
        "variables": GRIB_VARS,
        "grid": {"resolution": RES, "method": "bilinear"},
        "time": {"start": "2015-01-01", "end": "2015-01-06T18:00", "step": "6h"},
        "splits": {"train": [2015, 2015]},
        "output": str(output),
    }
    d.update(kw)
    return d


@pytest.fixture(scope="module")
def built_grib(grib_dir, ray_local, tmp_path_factory):
    from pipelines.build import build

    out = tmp_path_factory.mktemp("grib-shards")
    manifest = build(Recipe.model_validate(grib_recipe([{"path": str(grib_dir / "*.grib")}], out)))
    return out, manifest


@pytest.fixture(scope="module")
def s3(moto_s3):
    from pipelines import storage

    fs, _ = storage.filesystem(f"s3://{BUCKET}", moto_s3)
    fs.mkdir(BUCKET)
    return fs, moto_s3


def _read(path: Path | str, filesystem=None):
    return S.read_shard(str(path), filesystem=filesystem)


def _all_shards(root: Path, manifest: dict, split: str = "train"):
    """(times, {variable: array}) of a split, concatenated in manifest order."""
    times, arrays = [], {}
    for s in manifest["splits"][split]["shards"]:
        t, a = _read(root / s["path"])
        times.append(t)
        for v, x in a.items():
            arrays.setdefault(v, []).append(x)
    return np.concatenate(times), {v: np.concatenate(x) for v, x in arrays.items()}


def _files_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def _packing_tol(a: np.ndarray) -> float:
    """GRIB simple packing at 16 bits: at most (max - min) / 2**17 per message; bound it loosely."""
    return float(a.max() - a.min()) * 2.0**-15 + 1e-12


def _area_weights(lat: np.ndarray, nlon: int) -> np.ndarray:
    """Exact cell areas (fractions of the sphere) of a regular global lat/lon grid, any lat order.

    Cell edges lie midway between centres, the outer ones at the poles: on a grid with points at
    the poles those are half cells, which plain cos(lat) weights would give zero area."""
    order = np.argsort(lat)
    s = lat[order]
    edges = np.concatenate([[-90.0], (s[1:] + s[:-1]) / 2, [90.0]])
    band = np.empty_like(s)
    band[order] = np.diff(np.sin(np.deg2rad(edges))) / 2  # sums to 1
    return np.repeat(band[:, None] / nlon, nlon, axis=1)


# ------------------------------------------------------------------------------ 1. GRIB end to end
def test_grib_end_to_end_values(built_grib):
    from pipelines import sample_data as sd

    out, manifest = built_grib
    lat, lon = sd.grid(RES)
    assert manifest["grid"]["shape"] == [32, 64] and manifest["grid"]["lat_order"] == "south_to_north"
    np.testing.assert_allclose(manifest["grid"]["lat"], lat)
    np.testing.assert_allclose(manifest["grid"]["lon"], lon)
    assert sorted(manifest["variables"]) == sorted(GRIB_VARS)
    assert manifest["variables"]["orography"]["constant"] and not manifest["variables"]["2m_temperature"]["constant"]
    want_times = np.arange(np.datetime64("2015-01-01T00", "ns"), np.datetime64("2015-01-07T00", "ns"),
                           np.timedelta64(6, "h"))
    assert manifest["splits"]["train"]["rows"] == want_times.size == 24
    times, got = _all_shards(out, manifest)
    np.testing.assert_array_equal(times, want_times)
    assert set(got) == set(GRIB_TIME_VARS)

    truth = sd.fields(want_times, lat, lon, GRIB_VARS)
    for v in GRIB_TIME_VARS:
        assert got[v].shape == (24, 32, 64) and got[v].dtype == np.float32
        np.testing.assert_allclose(got[v], truth[v], rtol=0, atol=_packing_tol(truth[v]), err_msg=v)
        # south to north: row 0 is the southernmost latitude, not the file's north-first order
        north_first = truth[v][:, ::-1]
        assert np.abs(got[v] - north_first).max() > 100 * _packing_tol(truth[v]), v
        stats = manifest["statistics"][v]
        assert stats["count"] == got[v].size
        assert stats["mean"] == pytest.approx(got[v].astype(np.float64).mean(), rel=1e-6)

    _, consts = _read(out / S.CONSTANTS)
    assert set(consts) == {"land_sea_mask", "orography"}
    assert manifest["variables"]["orography"]["units"] == "m"
    for v in ("land_sea_mask", "orography"):
        assert consts[v].shape == (1, 32, 64)
        np.testing.assert_allclose(consts[v][0], truth[v], rtol=0, atol=_packing_tol(truth[v]), err_msg=v)
    lsm = consts["land_sea_mask"]
    assert lsm.min() >= 0.0 and lsm.max() <= 1.0 and lsm.min() < 0.01 and lsm.max() > 0.99
    orog = consts["orography"]  # metres (surface geopotential / g), not m2 s-2
    assert -100 < orog.min() and 1000 < orog.max() < 9000


# ------------------------------------------------------------------------- 2. s3:// input and output
def test_s3_input_and_output_match_local(grib_dir, built_grib, s3, tmp_path):
    import pyarrow.fs as pafs

    from pipelines.build import build

    fs, opts = s3
    for f in sorted(grib_dir.glob("*.grib")):
        fs.put(str(f), f"{BUCKET}/era5/{f.name}")
    sources = [{"path": f"s3://{BUCKET}/era5/*.grib", "storage_options": opts}]
    remote = Recipe.model_validate(grib_recipe(sources, f"s3://{BUCKET}/shards", storage_options=opts))
    local = Recipe.model_validate(grib_recipe(sources, tmp_path / "local"))
    assert remote.fingerprint() == local.fingerprint()

    m_remote = build(remote)
    m_local = build(local)

    # the manifest and every shard are in the bucket
    listed = sorted(p.split(f"{BUCKET}/shards/", 1)[1] for p in fs.find(f"{BUCKET}/shards"))
    assert "manifest.json" in listed and S.CONSTANTS in listed
    shard_paths = [s["path"] for s in m_remote["splits"]["train"]["shards"]]
    assert shard_paths and set(shard_paths) <= set(listed)
    assert not [p for p in listed if p.endswith(".tmp")]
    with fs.open(f"{BUCKET}/shards/manifest.json", "rb") as fh:
        stored = json.loads(fh.read())
    assert stored["recipe_fingerprint"] == m_local["recipe_fingerprint"] == local.fingerprint()
    assert stored["splits"] == m_local["splits"] and stored["statistics"] == m_local["statistics"]
    assert all(src["path"].startswith(f"s3://{BUCKET}/era5/") for src in stored["sources"])

    # byte-identical to the local output of the same recipe
    out = tmp_path / "local"
    for rel in shard_paths + [S.CONSTANTS, *stored["climatology"]["parts"]]:
        assert fs.cat_file(f"{BUCKET}/shards/{rel}") == (out / rel).read_bytes(), rel

    # plain pyarrow reads the shards straight from the bucket
    endpoint = opts["client_kwargs"]["endpoint_url"]
    pfs = pafs.S3FileSystem(endpoint_override=endpoint.split("://", 1)[1], scheme="http",
                            access_key="testing", secret_key="testing")
    times, arrays = _read(f"{BUCKET}/shards/{shard_paths[0]}", filesystem=pfs)
    ref_times, ref = _read(out / shard_paths[0])
    np.testing.assert_array_equal(times, ref_times)
    for v in GRIB_TIME_VARS:
        np.testing.assert_array_equal(arrays[v], ref[v])
    # and the values equal those read from local GRIB (test 1)
    _, from_local_grib = _all_shards(built_grib[0], built_grib[1])
    _, from_s3 = _all_shards(out, m_local)
    for v in GRIB_TIME_VARS:
        np.testing.assert_array_equal(from_s3[v], from_local_grib[v])


def test_s3_missing_buckets_are_named(grib_dir, s3, ray_local, tmp_path):
    from pipelines.build import build
    from pipelines.sources import SourceError

    fs, opts = s3
    # input bucket that does not exist: fails while listing sources, naming the bucket
    sources = [{"path": "s3://no-such-input/era5/*.grib", "storage_options": opts}]
    with pytest.raises(SourceError) as e:
        build(Recipe.model_validate(grib_recipe(sources, tmp_path / "out")))
    msg = str(e.value)
    assert "no-such-input" in msg and "does not exist" in msg, msg

    # output bucket that does not exist: a clear error naming it, and nothing written
    local = [{"path": str(grib_dir / "*.grib")}]
    with pytest.raises(SourceError) as e:
        build(Recipe.model_validate(grib_recipe(local, "s3://no-such-output/shards", storage_options=opts)))
    msg = str(e.value)
    assert "no-such-output" in msg and "does not exist" in msg, msg
    assert not fs.exists("no-such-output")


# ------------------------------------------------------------------------ 3. real files (shared data)
def members_recipe(source: Path, output: Path, member: int | None = 0) -> dict:
    src = {"path": str(source)} | ({"member": member} if member is not None else {})
    return {
        "sources": [src],
        "variables": ["geopotential_500", "temperature_850"],
        "grid": {"resolution": RES, "method": "conservative"},
        "time": {"start": "2017-01-01", "end": "2017-01-02T12:00", "step": "12h"},
        "splits": {"train": [2017, 2017]},
        "output": str(output),
    }


@pytest.fixture(scope="module")
def built_members(shared_data, ray_local, tmp_path_factory):
    from pipelines.build import build

    out = {}
    for ext in ("grib", "nc"):
        root = tmp_path_factory.mktemp(f"members-{ext}")
        manifest = build(Recipe.model_validate(members_recipe(shared_data / f"{MEMBERS}.{ext}", root)))
        out[ext] = (root, manifest)
    return out


def test_era5_members_conservative_preserves_global_mean(shared_data, built_members):
    from pipelines.sources import open_source

    root, manifest = built_members["grib"]
    times, got = _all_shards(root, manifest)
    assert manifest["grid"]["method"] == "conservative" and manifest["grid"]["shape"] == [32, 64]
    src = open_source(str(shared_data / f"{MEMBERS}.grib"), member=0,
                      variables=["geopotential_500", "temperature_850"])
    assert src.sizes == {"time": 4, "lat": 61, "lon": 120} and src.lat.values[0] == 90.0
    np.testing.assert_array_equal(times, src.time.values)
    w_src = _area_weights(src.lat.values, src.sizes["lon"])
    w_dst = _area_weights(np.asarray(manifest["grid"]["lat"]), 64)
    assert w_src.sum() == pytest.approx(1.0) and w_dst.sum() == pytest.approx(1.0)
    for v in ("geopotential_500", "temperature_850"):
        a = src[v].transpose("time", "lat", "lon").values.astype(np.float64)
        mean_src = (a * w_src).sum(axis=(1, 2))
        mean_dst = (got[v].astype(np.float64) * w_dst).sum(axis=(1, 2))
        np.testing.assert_allclose(mean_dst, mean_src, rtol=1e-5, err_msg=v)
        # the fields are regridded, not flat: a plain (unweighted) mean would differ
        assert np.abs(got[v].mean(axis=(1, 2)) - mean_dst).max() > 1e-4 * np.abs(mean_dst).max()
        # south to north: the target's southernmost row is near the source's last (south pole) row
        assert abs(got[v][0, 0].mean() - a[0, -2:].mean()) < abs(got[v][0, 0].mean() - a[0, :2].mean())


def test_era5_members_netcdf_equals_grib(built_members):
    (g_root, g_manifest), (n_root, n_manifest) = built_members["grib"], built_members["nc"]
    g_times, g = _all_shards(g_root, g_manifest)
    n_times, n = _all_shards(n_root, n_manifest)
    np.testing.assert_array_equal(g_times, n_times)
    assert set(g) == set(n) == {"geopotential_500", "temperature_850"}
    for v in g:
        np.testing.assert_allclose(n[v], g[v], rtol=1e-6, atol=0, err_msg=v)
    assert n_manifest["variables"]["geopotential_500"]["units"] == g_manifest["variables"]["geopotential_500"]["units"]


def test_era5_members_without_member_fails_naming_member(shared_data, ray_local, tmp_path):
    from pipelines.build import BuildError, build

    path = shared_data / f"{MEMBERS}.grib"
    with pytest.raises(BuildError) as e:
        build(Recipe.model_validate(members_recipe(path, tmp_path / "out", member=None)))
    msg = str(e.value)
    assert "member" in msg and str(path) in msg, msg
    assert not (tmp_path / "out" / S.MANIFEST).exists()


@pytest.mark.parametrize("which", ["cmip6-patch", "era5-regional"])
def test_non_global_sources_are_refused(shared_data, ray_local, tmp_path, which):
    from pipelines.build import BuildError, build

    if which == "cmip6-patch":  # a 2 x 2 patch of AWI-ESM-1-1-LR daily ta
        path = sorted((shared_data / "cmip6").rglob("ta_day_AWI-ESM-1-1-LR_*_20020101-20021231.nc"))[0]
        var, method, time = "temperature_850", "bilinear", ("2002-01-01T12:00", "2002-01-05T12:00", "1D")
    else:  # ERA5 t2m over Europe, 0.25 deg
        path = shared_data / "era5/era5-single-level-scalar-time.grib"
        var, method, time = "2m_temperature", "conservative", ("2017-01-01T12:00", "2017-01-01T12:00", "1h")
    recipe = {
        "sources": [{"path": str(path)}],
        "variables": [var],
        "grid": {"resolution": RES, "method": method},
        "time": dict(zip(("start", "end", "step"), time)),
        "splits": {"train": [int(time[0][:4])] * 2},
        "output": str(tmp_path / "out"),
    }
    with pytest.raises(BuildError) as e:
        build(Recipe.model_validate(recipe))
    msg = str(e.value)
    assert "not global" in msg and str(path) in msg, msg
    assert not (tmp_path / "out" / S.MANIFEST).exists()


# ------------------------------------------------------------------------------ 4. mixed grids
def test_mixed_grids_for_one_variable_refused(grib_dir, ray_local, tmp_path):
    from pipelines.build import BuildError, build
    from pipelines.sample_data import generate

    coarse = generate(tmp_path / "coarse", years=(2015,), resolution=11.25, step_hours=6,
                      variables=["temperature_850"], formats=("grib",), progress=False, max_days=1)["grib"]
    recipe = grib_recipe([{"path": str(grib_dir / "era5_pl_2015.grib")},
                          {"path": str(coarse / "era5_pl_2015.grib")}], tmp_path / "out",
                         variables=["temperature_850"])
    with pytest.raises(BuildError) as e:
        build(Recipe.model_validate(recipe))
    msg = str(e.value)
    assert "grid" in msg and "temperature_850" in msg, msg
    assert str(coarse / "era5_pl_2015.grib") in msg and str(grib_dir / "era5_pl_2015.grib") in msg, msg
    assert not (tmp_path / "out" / S.MANIFEST).exists()
