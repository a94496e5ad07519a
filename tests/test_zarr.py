"""Zarr sources (WeatherBench 2 / ARCO-ERA5 layout) read locally, from S3 (moto) and from GCS
(gcp-storage-emulator), both servers on 127.0.0.1; and the WeatherBench layouts people have.

The store is written by xarray from the sample generator (pipelines.sample_data, format zarr), in
WB2's layout: latitude north to south, ``level`` in hPa, ``geopotential_at_surface``. Every chunk
the recipe does not need (variables not in it, other levels, time steps after its end) is then
overwritten with garbage: a build that read any of them would fail to decode it.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from pipelines.recipe import Recipe

RES = 5.625
VARS = ["land_sea_mask", "orography", "2m_temperature", "geopotential_500", "temperature_850"]
# in the store but not asked for: whole variables and other levels of the requested ones
EXTRA = ["10m_v_component_of_wind", "geopotential_850", "temperature_500", "specific_humidity_850"]
STEPS_PER_CHUNK = 4  # one day of 6-hourly steps per time chunk
DAYS = 4  # the store holds 4 days; the recipe asks for the first 3
BUCKET = "wb2-test"
G = 9.80665


# ------------------------------------------------------------------------------------------ helpers
def recipe(path: str, output, **source) -> Recipe:
    return Recipe.model_validate({
        "sources": [{"path": str(path), **source}],
        "variables": VARS,
        "grid": {"resolution": RES, "method": "bilinear"},
        "time": {"start": "2016-01-01", "end": "2016-01-03T18:00", "step": "6h"},
        "splits": {"train": [2016, 2016]},
        "output": str(output),
    })


def _corrupt_unrequested(store: Path) -> int:
    """Overwrite every chunk the recipe must not read; returns how many."""
    keep = {"2m_temperature": None, "geopotential": 0, "temperature": 1,  # level index (500, 850)
            "land_sea_mask": None, "geopotential_at_surface": None}
    n = 0
    for var_dir in store.iterdir():
        meta = var_dir / ".zarray"
        if not meta.is_file():
            continue
        dims = json.loads((var_dir / ".zattrs").read_text())["_ARRAY_DIMENSIONS"]
        if dims in (["time"], ["level"], ["latitude"], ["longitude"]):
            continue  # coordinates
        for chunk in var_dir.iterdir():
            if chunk.name.startswith("."):
                continue
            idx = dict(zip(dims, map(int, chunk.name.split("."))))
            wanted = (var_dir.name in keep and idx.get("time", 0) < DAYS - 1
                      and (keep[var_dir.name] is None or idx["level"] == keep[var_dir.name]))
            if not wanted:
                chunk.write_bytes(b"not a compressed chunk" * 8)
                n += 1
    return n


def _data_pages(path: Path | bytes) -> bytes:
    """A Parquet file up to its footer (magic + every column chunk's pages). The footer holds the
    key-value metadata, whose recipe and source fingerprints name the source paths."""
    raw = path if isinstance(path, bytes) else Path(path).read_bytes()
    footer = int.from_bytes(raw[-8:-4], "little")
    assert raw[-4:] == b"PAR1"
    return raw[: len(raw) - 8 - footer]


def _shards(root: Path, manifest: dict) -> list[str]:
    from climax import shards as S

    return [s["path"] for s in manifest["splits"]["train"]["shards"]] + [S.CONSTANTS]


def _assert_same_build(a_root, a_manifest, b_root, b_manifest, b_fs=None):
    """Same shards (data pages byte for byte), same statistics."""
    paths = _shards(a_root, a_manifest)
    assert paths == _shards(b_root, b_manifest)
    for rel in paths:
        b = b_fs.cat_file(f"{b_root}/{rel}") if b_fs is not None else (Path(b_root) / rel).read_bytes()
        assert _data_pages((Path(a_root) / rel).read_bytes()) == _data_pages(b), rel
    assert a_manifest["statistics"] == b_manifest["statistics"]
    assert a_manifest["splits"]["train"]["rows"] == b_manifest["splits"]["train"]["rows"] == 3 * STEPS_PER_CHUNK


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def wb2(tmp_path_factory) -> dict:
    """The WB2-layout store (unrequested chunks corrupted) and the same data as one NetCDF file."""
    from pipelines.sample_data import generate

    out = tmp_path_factory.mktemp("wb2")
    store = generate(out, years=(2016,), resolution=RES, step_hours=6, variables=VARS + EXTRA,
                     formats=("zarr",), progress=False, max_days=DAYS,
                     zarr_time_chunk=STEPS_PER_CHUNK)["zarr"]
    nc = out / "era5_wb2.nc"
    with xr.open_zarr(store, chunks=None) as ds:
        ds = ds.load()
        for v in ds.variables.values():
            v.encoding = {}  # Zarr's (compressors, chunks) mean nothing to NetCDF
        ds.to_netcdf(nc, engine="h5netcdf")
    assert _corrupt_unrequested(store) > 0
    return {"store": store, "netcdf": nc}


@pytest.fixture(scope="module")
def gcs():
    """A real GCS JSON API: gcp-storage-emulator on 127.0.0.1. Yields gcsfs storage_options."""
    pytest.importorskip("gcp_storage_emulator")
    from gcp_storage_emulator.server import create_server

    for name in ("gcp_storage_emulator", "gcp_storage_emulator.server", "gcp_storage_emulator.handlers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with socket.socket() as s:  # a free port (the emulator's API takes a fixed one)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    yield {"endpoint_url": f"http://127.0.0.1:{port}"}  # token: anon is the default
    server.stop()


@pytest.fixture(scope="module")
def built_netcdf(wb2, ray_local, tmp_path_factory):
    from pipelines.build import build

    out = tmp_path_factory.mktemp("nc-shards")
    return out, build(recipe(wb2["netcdf"], out))


@pytest.fixture(scope="module")
def built_zarr(wb2, ray_local, tmp_path_factory):
    from pipelines.build import build

    out = tmp_path_factory.mktemp("zarr-shards")
    return out, build(recipe(wb2["store"], out))


# ------------------------------------------------------------------------------------------ reader
def test_sample_store_has_the_wb2_layout(wb2):
    store = wb2["store"]
    assert (store / ".zmetadata").is_file()  # consolidated, Zarr v2 as WeatherBench 2's stores
    with xr.open_zarr(store, chunks=None) as ds:
        assert ds["geopotential"].dims == ("time", "level", "latitude", "longitude")
        assert ds["land_sea_mask"].dims == ("latitude", "longitude")
        assert ds["latitude"].values[0] > ds["latitude"].values[-1]  # north to south
        assert ds["level"].values.tolist() == [500, 850]
        assert "geopotential_at_surface" in ds and "orography" not in ds
        assert ds.sizes["time"] == DAYS * STEPS_PER_CHUNK


def test_open_source_reads_only_what_is_asked(wb2):
    from pipelines import sample_data as sd
    from pipelines.sources import SourceError, detect_format, open_source

    store = str(wb2["store"])
    assert detect_format(store) == "zarr"
    ds = open_source(store, variables=VARS)  # format auto: *.zarr
    assert ds.attrs["source_format"] == "zarr"
    assert ds["geopotential_500"].dims == ("time", "lat", "lon")
    assert ds["orography"].dims == ("lat", "lon") and ds["orography"].attrs["units"] == "m"
    part = ds.isel(time=slice(2, 10)).load()  # reads chunks 0-2 of the requested fields only
    lat, lon = part["lat"].values, part["lon"].values
    assert lat[0] > lat[-1]  # as in the store; the build regrids to south-to-north
    np.testing.assert_array_equal(lat[::-1], sd.grid(RES)[0])
    truth = sd.fields(part["time"].values, lat[::-1], lon, VARS)  # the generator's grid: south first
    for v in ("2m_temperature", "geopotential_500", "temperature_850", "land_sea_mask"):
        np.testing.assert_array_equal(part[v].values, truth[v][..., ::-1, :], err_msg=v)
    # orography was stored as float32 geopotential (times g) and divided by g on reading
    np.testing.assert_allclose(part["orography"].values, truth["orography"][::-1], rtol=1e-6, atol=1e-3)
    # the garbage is real: asking for a corrupted chunk fails
    with pytest.raises(Exception):  # noqa: B017  the codec library raises, its error type varies by version
        open_source(store, variables=["specific_humidity_850"]).load()
    with pytest.raises(Exception):  # noqa: B017  as above: the codec's error, not ours
        ds["2m_temperature"].isel(time=slice(12, 13)).load()  # the fourth day: corrupted
    with pytest.raises(SourceError, match="not found"):
        open_source(store, variables=["relative_humidity_850"])


def test_wb2_240x121_layout_lon_lat_order_with_poles(tmp_path):
    """WB2's 1.5-degree stores are (time, level, longitude, latitude), latitude -90..90 with poles."""
    from pipelines.sources import open_source

    lat = np.linspace(-90, 90, 13)
    lon = np.arange(0, 360, 15.0)
    t = np.arange("2016-01-01", "2016-01-02", np.timedelta64(6, "h"), dtype="datetime64[ns]")
    rng = np.random.default_rng(0)
    z = (rng.normal(54000, 500, (len(t), 2, len(lon), len(lat)))).astype(np.float32)
    zs = rng.uniform(0, 30000, (len(lon), len(lat))).astype(np.float32)
    ds = xr.Dataset({"geopotential": (("time", "level", "longitude", "latitude"), z),
                     "geopotential_at_surface": (("longitude", "latitude"), zs)},
                    coords={"time": t, "level": [500, 850], "longitude": lon, "latitude": lat})
    store = tmp_path / "1959-2023_01_10-6h-13x24_equiangular_with_poles_conservative.zarr"
    ds.to_zarr(store, zarr_format=2, consolidated=True,
               encoding={"geopotential": {"chunks": (1, 2, 24, 13)}})  # no units: WB2's are assumed
    got = open_source(str(store), "zarr", variables=["geopotential_850", "orography"]).load()
    np.testing.assert_array_equal(got["geopotential_850"].values, z[:, 1].transpose(0, 2, 1))
    np.testing.assert_allclose(got["orography"].values, zs.T / G, rtol=1e-6)
    np.testing.assert_array_equal(got["lat"].values, lat)


# ------------------------------------------------------------------------------------------ builds
@pytest.mark.slow
def test_zarr_build_equals_netcdf_build(built_netcdf, built_zarr):
    (n_root, n_man), (z_root, z_man) = built_netcdf, built_zarr
    _assert_same_build(n_root, n_man, z_root, z_man)
    assert z_man["sources"][0]["path"].endswith(".zarr") and n_man["sources"][0]["path"].endswith(".nc")
    assert n_man["variables"]["orography"]["source_names"] == ["geopotential_at_surface"]
    assert z_man["variables"]["orography"] == n_man["variables"]["orography"]


@pytest.mark.slow
def test_zarr_from_s3(wb2, built_zarr, moto_s3, ray_local, tmp_path):
    from pipelines import storage
    from pipelines.build import build

    fs, _ = storage.filesystem(f"s3://{BUCKET}", moto_s3)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    fs.put(str(wb2["store"]), f"{BUCKET}/era5/era5.zarr", recursive=True)
    manifest = build(recipe(f"s3://{BUCKET}/era5/era5.zarr", tmp_path / "out", format="zarr",
                            storage_options=moto_s3))
    _assert_same_build(*built_zarr, tmp_path / "out", manifest)
    assert manifest["sources"][0]["path"] == f"s3://{BUCKET}/era5/era5.zarr"


@pytest.mark.slow
def test_zarr_from_gcs(wb2, built_zarr, gcs, ray_local, tmp_path):
    from pipelines import storage
    from pipelines.build import build
    from pipelines.sources import SourceError

    fs, _ = storage.filesystem(f"gs://{BUCKET}", gcs)
    # one request at a time: the emulator serves concurrent uploads very slowly (~0.5 s a file)
    fs.put(str(wb2["store"]), f"{BUCKET}/datasets/era5/store.zarr", recursive=True, batch_size=1)
    path = f"gs://{BUCKET}/datasets/era5/store.zarr"  # format auto: *.zarr is enough
    manifest = build(recipe(path, tmp_path / "out", storage_options=gcs))
    _assert_same_build(*built_zarr, tmp_path / "out", manifest)
    assert manifest["sources"][0]["format"] == "auto" and manifest["sources"][0]["path"] == path

    # errors name the store and say what to check
    with pytest.raises(SourceError, match="no-such-bucket"):
        build(recipe("gs://no-such-bucket/era5.zarr", tmp_path / "x", storage_options=gcs))
    with pytest.raises(SourceError, match="not-there.zarr"):
        build(recipe(f"gs://{BUCKET}/not-there.zarr", tmp_path / "y", storage_options=gcs))


def test_gcs_storage_options():
    from pipelines import storage

    assert storage.storage_options_for("gs://weatherbench2/x.zarr") == {"token": "anon"}
    opts = storage.storage_options_for("gs://b/x", {"client_kwargs": {"endpoint_url": "http://h:1"}})
    assert opts == {"endpoint_url": "http://h:1", "token": "anon"}
    assert storage.storage_options_for("gs://b/x", {"token": "google_default"})["token"] == "google_default"
    fs, p = storage.filesystem("gs://weatherbench2/datasets/era5/a.zarr")
    assert p == "weatherbench2/datasets/era5/a.zarr" and fs.protocol[0] in ("gs", "gcs")
    msg = str(storage.explain(PermissionError("403 Forbidden"), "gs://private/x.zarr",
                              {"token": "/secret/sa.json"}))
    assert "token" in msg and "/secret/sa.json" not in msg  # says what to set, never echoes it


# ------------------------------------------------------------------------------------------ WeatherBench layouts
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["constants.nc", "constants/constants_5.625deg.nc"])
def test_weatherbench_constants_layouts(layout, ray_local, tmp_path):
    """ClimaX's preprocessing reads <root>/constants.nc; WeatherBench's download has
    <root>/constants/constants_<res>deg.nc. Both build, to the same constants."""
    from climax import shards as S
    from pipelines import sample_data as sd
    from pipelines.build import build

    variables = ["land_sea_mask", "orography", "latitude", "2m_temperature"]
    root = sd.generate(tmp_path / "src", years=(2016,), resolution=RES, variables=variables[:2] + variables[3:],
                       formats=("weatherbench",), progress=False, max_days=1)["weatherbench"]
    if layout == "constants.nc":
        shutil.move(root / "constants" / "constants_5.625deg.nc", root / "constants.nc")
        (root / "constants").rmdir()
    r = Recipe.model_validate({
        "sources": [{"path": str(root)}], "variables": variables,
        "grid": {"resolution": RES}, "time": {"start": "2016-01-01", "end": "2016-01-01T18:00", "step": "6h"},
        "splits": {"train": [2016, 2016]}, "output": str(tmp_path / "out"),
    })
    manifest = build(r)
    _, consts = S.read_shard(str(tmp_path / "out" / S.CONSTANTS))
    lat, lon = sd.grid(RES)
    truth = sd.fields(np.array(["2016-01-01"], dtype="datetime64[ns]"), lat, lon, ["land_sea_mask", "orography"])
    np.testing.assert_allclose(consts["land_sea_mask"][0], truth["land_sea_mask"], atol=1e-6)
    np.testing.assert_allclose(consts["orography"][0], truth["orography"], atol=1e-3)
    assert manifest["splits"]["train"]["rows"] == 4


def test_long_names_map_to_climax_bases():
    from pipelines import names as V

    n = V.netcdf_base
    assert n("geopotential", True) == "geopotential" and n("specific_humidity", True) == "specific_humidity"
    assert n("2m_temperature", False) == "2m_temperature"
    assert n("10m_u_component_of_wind", False) == "10m_u_component_of_wind"
    assert n("land_sea_mask", False) == "land_sea_mask"
    assert n("geopotential_at_surface", False) == "orography"
    assert n("temperature", False) is None  # a pressure-level base needs its level axis
    assert n("CO2", False) is None and n("tas", False) == "2m_temperature"  # ClimateBench names stay its own
    assert V.long_name_units("geopotential_at_surface", "orography") == "m**2 s**-2"
    assert V.long_name_units("temperature", "temperature") == "K"
    assert V.long_name_units("t", "temperature") is None


def test_auto_format_and_expand_sources(wb2, tmp_path):
    from pipelines.build import expand_sources

    items = expand_sources(recipe(wb2["store"], tmp_path / "out"))
    assert [(i["path"], i["format"]) for i in items] == [(str(wb2["store"]), "auto")]
    bare = tmp_path / "store-without-suffix"  # a store named otherwise: found by its metadata
    shutil.copytree(wb2["store"], bare)
    from pipelines.sources import detect_format

    assert detect_format(str(bare)) == "zarr"
    assert [i["path"] for i in expand_sources(recipe(bare, tmp_path / "out"))] == [str(bare)]
