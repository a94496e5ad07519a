"""Regridding weights: values, orderings, caching and errors (pipelines.regrid)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from pipelines import regrid
from pipelines.regrid import Grid, Regridder, RegridError, get_regridder, target_grid

# Source grids as they come from the archives.
ERA5_3DEG = Grid(lat=np.linspace(90.0, -90.0, 61), lon=np.arange(120) * 3.0)  # north-first, poles
GFS_2P5 = Grid(lat=np.linspace(90.0, -90.0, 73), lon=np.arange(144) * 2.5)
COARSE_10 = Grid(lat=np.linspace(-90.0, 90.0, 19), lon=np.arange(36) * 10.0)
ERA5_QUARTER = Grid(lat=np.linspace(90.0, -90.0, 721), lon=np.arange(1440) * 0.25)
T5625 = target_grid(5.625)


def _areas(grid: Grid) -> np.ndarray:
    """Independent cell areas: edges midway between centres, outer edges clipped to +-90
    (valid for the test grids, whose longitudes are evenly spaced and global)."""
    lat = grid.lat
    mid = 0.5 * (lat[:-1] + lat[1:])
    first = lat[0] - (mid[0] - lat[0])
    last = lat[-1] + (lat[-1] - mid[-1])
    edges = np.clip(np.concatenate([[first], mid, [last]]), -90.0, 90.0)
    band = np.abs(np.diff(np.sin(np.deg2rad(edges))))
    return np.outer(band, np.full(grid.lon.size, 1.0 / grid.lon.size))


def _mean(grid: Grid, field: np.ndarray) -> float:
    a = _areas(grid)
    return float((a * field).sum() / a.sum())


def _smooth_field(grid: Grid, seed: int = 0) -> np.ndarray:
    lat, lon = np.meshgrid(np.deg2rad(grid.lat), np.deg2rad(grid.lon), indexing="ij")
    rng = np.random.default_rng(seed)
    return 2.0 + np.cos(lat) * np.sin(3 * lon) + 0.5 * np.sin(2 * lat) + 0.3 * rng.random(lat.shape)


# ---------------------------------------------------------------------------- target grids


def test_target_grid_5625_and_140625():
    g = target_grid(5.625)
    assert g.shape == (32, 64)
    np.testing.assert_array_equal(g.lat, np.linspace(-87.1875, 87.1875, 32))
    np.testing.assert_array_equal(g.lon, np.arange(64) * 5.625)
    g = target_grid(1.40625)
    assert g.shape == (128, 256)
    assert g.lat[0] == -89.296875 and g.lat[-1] == 89.296875
    assert np.all(np.diff(g.lat) > 0) and g.lon[0] == 0.0 and g.lon[-1] == 360 - 1.40625
    assert target_grid(0.25).shape == (720, 1440)
    assert g.lat.dtype == np.float64


@pytest.mark.parametrize("bad", [7.0, 0.0, -5.625, float("nan"), 400.0])
def test_target_grid_rejects_resolutions_that_do_not_tile(bad):
    with pytest.raises(ValueError, match="resolution"):
        target_grid(bad)


def test_grid_fingerprint_equality_and_hash():
    a, b = target_grid(5.625), Grid(np.linspace(-87.1875, 87.1875, 32), np.arange(64) * 5.625)
    assert a == b and hash(a) == hash(b) and a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 64
    flipped = Grid(a.lat[::-1], a.lon)
    assert flipped != a and flipped.fingerprint() != a.fingerprint()
    assert not a.lat.flags.writeable
    assert abs(a.cell_areas().sum() - 1.0) < 1e-12


# ---------------------------------------------------------------------------- bilinear


@pytest.mark.parametrize("src", [ERA5_3DEG, GFS_2P5], ids=["era5-3deg", "gfs-2.5deg"])
@pytest.mark.parametrize("res", [5.625, 1.40625])
def test_bilinear_reproduces_linear_field(src, res):
    dst = target_grid(res)
    r = Regridder(src, dst, "bilinear")
    slat, slon = np.meshgrid(src.lat, src.lon, indexing="ij")
    dlat, dlon = np.meshgrid(dst.lat, dst.lon, indexing="ij")
    # Linear in lon is discontinuous at the 0/360 seam: judge points well away from it.
    # Latitude: the sources include the pole rows, so every target row is interpolated.
    away = (dlon > 5.0) & (dlon < 350.0)
    for a, b, c in [(2.0, 0.5, 300.0), (0.0, 1.0, 0.0), (-1.5, 0.0, 10.0)]:
        out = r(a * slat + b * slon + c)
        want = a * dlat + b * dlon + c
        assert out.dtype == np.float32 and out.shape == dst.shape
        np.testing.assert_allclose(out[away], want[away], rtol=1e-5, atol=1e-4)
    # A field of latitude alone is reproduced everywhere, seam included.
    np.testing.assert_allclose(r(slat), dlat, rtol=1e-5, atol=1e-4)


def test_bilinear_is_periodic_across_the_seam():
    src = GFS_2P5
    r = Regridder(src, T5625, "bilinear")
    # cos(lon) is smooth across 0/360; bilinear error ~ (2.5 deg)^2/8 curvature.
    f = np.cos(np.deg2rad(src.lon))[None, :].repeat(src.lat.size, 0)
    out = r(f)
    np.testing.assert_allclose(out, np.cos(np.deg2rad(T5625.lon))[None, :].repeat(32, 0), atol=3e-4)
    # A target point between the last source column (357.5) and 360: half way between
    # columns 143 and 0.
    g = Grid(lat=T5625.lat, lon=np.array([0.0, 358.75]))
    out = Regridder(src, g, "bilinear")(np.arange(144.0)[None, :].repeat(73, 0))
    np.testing.assert_allclose(out[:, 1], 0.5 * (143.0 + 0.0))


def test_bilinear_polar_rows_use_nearest_source_row():
    # Cell-centred 2-deg source: rows at -89 and 89; the 1.40625 grid has rows at +-89.296875.
    src = Grid(lat=np.linspace(-89.0, 89.0, 90), lon=np.arange(180) * 2.0)
    dst = target_grid(1.40625)
    rng = np.random.default_rng(1)
    f = rng.random(src.shape)
    out = Regridder(src, dst, "bilinear")(f)
    # Constant extrapolation: the outermost target rows equal the outermost source row
    # interpolated in longitude only; check against a 1-row bilinear in lon.
    lon_only = Regridder(Grid(np.array([0.0, 1.0]), src.lon), Grid(np.array([0.0, 1.0]), dst.lon), "bilinear")
    south = lon_only(np.stack([f[0], f[0]]))[0]
    north = lon_only(np.stack([f[-1], f[-1]]))[0]
    np.testing.assert_allclose(out[0], south, rtol=1e-6)
    np.testing.assert_allclose(out[-1], north, rtol=1e-6)


# ---------------------------------------------------------------------------- conservative


@pytest.mark.parametrize(
    "src", [ERA5_3DEG, GFS_2P5, COARSE_10, ERA5_QUARTER], ids=["era5-3deg", "gfs-2.5", "10deg", "era5-0.25"]
)
def test_conservative_constant_and_global_mean(src):
    r = Regridder(src, T5625, "conservative")
    rows = np.asarray(r.weights.sum(axis=1)).ravel()
    assert np.abs(rows - 1.0).max() < 1e-12
    assert r.weights.min() >= 0.0
    np.testing.assert_array_equal(r(np.full(src.shape, 273.15)), np.float32(273.15))
    f = _smooth_field(src)
    out = r(f)
    assert abs(_mean(T5625, out.astype(np.float64)) - _mean(src, f)) < 1e-6
    # Weight columns: every source cell's area is handed out in full (area conservation).
    a_src, a_dst = _areas(src).ravel(), _areas(T5625).ravel()
    handed = r.weights.T @ a_dst
    np.testing.assert_allclose(handed / a_src.sum(), a_src / a_src.sum(), atol=1e-12)


def test_conservative_large_source_to_140625():
    dst = target_grid(1.40625)
    r = Regridder(ERA5_QUARTER, dst, "conservative")
    assert r.weights.shape == (dst.size, ERA5_QUARTER.size)
    assert np.abs(np.asarray(r.weights.sum(axis=1)).ravel() - 1.0).max() < 1e-12
    f = _smooth_field(ERA5_QUARTER, seed=3)
    assert abs(_mean(dst, r(f).astype(np.float64)) - _mean(ERA5_QUARTER, f)) < 1e-6


def test_conservative_overlaps_of_the_5625_and_140625_grids():
    # 1.40625 -> 5.625. Latitude edges nest (4 fine bands per coarse band); longitude cells
    # are centred on multiples of the spacing on both grids, so coarse cell j covers fine
    # cells 4j-2 .. 4j+2, the two outer ones by half.
    fine = target_grid(1.40625)
    f = _smooth_field(fine, seed=5)
    out = Regridder(fine, T5625, "conservative")(f)
    a = _areas(fine)
    lon_frac = np.array([0.5, 1.0, 1.0, 1.0, 0.5])
    for i, j in [(3, 10), (0, 0), (31, 63), (16, 32)]:
        rows = np.arange(4 * i, 4 * i + 4)
        cols = np.arange(4 * j - 2, 4 * j + 3) % 256  # wraps for j = 0
        w = a[np.ix_(rows, cols)] * lon_frac
        want = (w * f[np.ix_(rows, cols)]).sum() / w.sum()
        assert abs(out[i, j] - want) < 1e-6, (i, j)
    # Coarse -> fine: a fine cell centred on a coarse centre lies inside that coarse cell,
    # and a field of latitude alone is copied onto the 4 fine bands of each coarse band.
    coarse = _smooth_field(T5625, seed=6)
    up = Regridder(T5625, fine, "conservative")(coarse)
    np.testing.assert_allclose(up[:, ::4], np.repeat(coarse, 4, axis=0).astype(np.float32), rtol=1e-6)
    bands = np.repeat(coarse[:, :1], 64, axis=1)
    up = Regridder(T5625, fine, "conservative")(bands)
    np.testing.assert_allclose(up, np.repeat(bands[:, :1], 4, axis=0).repeat(256, 1), rtol=1e-6)


def test_conservative_source_short_of_the_poles_fills_polar_cells():
    # 3-deg cell-centred rows at +-87: natural outer edges +-88.5; the outermost source
    # bands are extended to the poles (like bilinear's nearest row), so no target cell is
    # left partly empty.
    src = Grid(lat=np.linspace(87.0, -87.0, 59), lon=np.arange(120) * 3.0)
    r = Regridder(src, target_grid(1.40625), "conservative")
    assert np.abs(np.asarray(r.weights.sum(axis=1)).ravel() - 1.0).max() < 1e-12
    f = np.repeat(np.arange(59.0)[:, None], 120, axis=1)  # row number, north-first
    out = r(f)
    np.testing.assert_array_equal(out[0], 58.0)  # southernmost target row: southernmost band
    np.testing.assert_array_equal(out[-1], 0.0)


def test_regridder_pickles():
    import pickle

    r = Regridder(GFS_2P5, T5625, "bilinear")
    r2 = pickle.loads(pickle.dumps(r))
    f = _smooth_field(GFS_2P5)
    np.testing.assert_array_equal(r2(f), r(f))
    assert r2.src == GFS_2P5 and r2.dst == T5625


# ---------------------------------------------------------------------------- orderings


@pytest.mark.parametrize("method", regrid.METHODS)
@pytest.mark.parametrize("grid", [T5625, ERA5_3DEG], ids=["5.625", "era5-3deg"])
def test_identity_is_exact(method, grid):
    r = Regridder(grid, grid, method)
    diff = r.weights - sp.identity(grid.size, format="csr")
    assert r.weights.nnz == grid.size and diff.count_nonzero() == 0
    f = np.random.default_rng(2).normal(280.0, 20.0, size=(3,) + grid.shape)
    np.testing.assert_array_equal(r(f), f.astype(np.float32))
    f32 = f.astype(np.float32)
    np.testing.assert_array_equal(r(f32), f32)


@pytest.mark.parametrize("method", regrid.METHODS)
def test_latitude_order_of_source_does_not_matter(method):
    north_first = ERA5_3DEG
    south_first = Grid(lat=north_first.lat[::-1], lon=north_first.lon)
    f = _smooth_field(north_first)
    a = Regridder(north_first, T5625, method)(f)
    b = Regridder(south_first, T5625, method)(f[::-1])
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", regrid.METHODS)
def test_longitude_convention_of_source_does_not_matter(method):
    # [-180, 180) is [0, 360) rolled by half a turn.
    src360 = GFS_2P5
    src180 = Grid(lat=src360.lat, lon=np.arange(-180.0, 180.0, 2.5))
    f360 = _smooth_field(src360)
    f180 = np.roll(f360, 72, axis=-1)
    assert src180.lon[0] == -180.0 and np.allclose(np.mod(src180.lon, 360), np.roll(src360.lon, 72))
    a = Regridder(src360, T5625, method)(f360)
    b = Regridder(src180, T5625, method)(f180)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
    # Any rotation, and descending longitudes, too.
    rot = Grid(lat=src360.lat, lon=np.roll(src360.lon, 17))
    np.testing.assert_allclose(Regridder(rot, T5625, method)(np.roll(f360, 17, -1)), a, rtol=1e-6)
    desc = Grid(lat=src360.lat, lon=src360.lon[::-1])
    np.testing.assert_allclose(Regridder(desc, T5625, method)(f360[:, ::-1]), a, rtol=1e-6)


def test_batch_dimensions_are_kept():
    r = Regridder(GFS_2P5, T5625, "conservative")
    f = np.stack([[_smooth_field(GFS_2P5, s) for s in range(3)] for _ in range(2)])
    out = r(f)
    assert out.shape == (2, 3, 32, 64) and out.dtype == np.float32
    np.testing.assert_array_equal(out[1, 2], r(f[1, 2]))
    with pytest.raises(RegridError, match="source grid shape"):
        r(f[..., :-1])


def test_regional_source_to_regional_target():
    src = Grid(lat=np.arange(65.0, 34.99, -0.25), lon=np.arange(-10.0, 40.01, 0.25))
    dst = Grid(lat=np.arange(40.0, 60.01, 1.0), lon=np.arange(-5.0, 35.01, 1.0))
    slat, slon = np.meshgrid(src.lat, src.lon, indexing="ij")
    dlat, dlon = np.meshgrid(dst.lat, dst.lon, indexing="ij")
    out = Regridder(src, dst, "bilinear")(3.0 * slat - 2.0 * slon)
    np.testing.assert_allclose(out, 3.0 * dlat - 2.0 * dlon, rtol=1e-5, atol=1e-4)
    r = Regridder(src, dst, "conservative")
    np.testing.assert_allclose(r(np.full(src.shape, 5.0)), 5.0, rtol=1e-7)
    # The same target in 0..360 longitudes.
    dst360 = Grid(lat=dst.lat, lon=np.mod(dst.lon, 360.0))
    out360 = Regridder(src, dst360, "bilinear")(3.0 * slat - 2.0 * slon)
    np.testing.assert_allclose(out360, out, rtol=1e-6)
    # A target reaching beyond the source is refused.
    too_far = Grid(lat=np.arange(20.0, 60.01, 1.0), lon=dst.lon)
    with pytest.raises(RegridError, match="beyond the source grid"):
        Regridder(src, too_far, "bilinear")


# ---------------------------------------------------------------------------- caching


def test_memory_cache_returns_the_same_object():
    regrid.clear_memory_cache()
    a = get_regridder(ERA5_3DEG, T5625, "bilinear")
    b = get_regridder(Grid(ERA5_3DEG.lat.copy(), ERA5_3DEG.lon.copy()), target_grid(5.625), "bilinear")
    assert a is b
    c = get_regridder(ERA5_3DEG, T5625, "conservative")
    assert c is not a and c.method == "conservative"


def test_disk_cache_round_trips(tmp_path, monkeypatch):
    regrid.clear_memory_cache()
    built = get_regridder(GFS_2P5, T5625, "conservative", cache_dir=tmp_path / "w")
    files = sorted((tmp_path / "w").iterdir())
    assert [p.suffix for p in files] == [".npz"]  # no temporary left behind
    regrid.clear_memory_cache()

    def no_build(*args, **kwargs):
        raise AssertionError("weights were rebuilt instead of read from disk")

    monkeypatch.setattr(regrid, "_build_weights", no_build)
    loaded = get_regridder(GFS_2P5, T5625, "conservative", cache_dir=tmp_path / "w")
    assert loaded is not built
    assert isinstance(loaded.weights, sp.csr_matrix)
    assert (loaded.weights != built.weights).nnz == 0
    f = _smooth_field(GFS_2P5)
    np.testing.assert_array_equal(loaded(f), built(f))
    assert get_regridder(GFS_2P5, T5625, "conservative", cache_dir=tmp_path / "w") is loaded


def test_corrupt_disk_cache_is_rebuilt(tmp_path):
    regrid.clear_memory_cache()
    get_regridder(COARSE_10, T5625, "bilinear", cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not a zip file")
    regrid.clear_memory_cache()
    r = get_regridder(COARSE_10, T5625, "bilinear", cache_dir=tmp_path)
    assert r.weights.shape == (T5625.size, COARSE_10.size)
    assert sp.load_npz(path).shape == r.weights.shape  # replaced with a good file


# ---------------------------------------------------------------------------- errors


def test_regional_source_to_global_target_names_the_extent():
    src = Grid(lat=np.arange(65.0, 34.99, -0.25), lon=np.arange(-10.0, 40.01, 0.25))
    with pytest.raises(RegridError) as e:
        get_regridder(src, T5625, "bilinear")
    msg = str(e.value)
    assert "source grid covers lat 35.0..65.0, lon -10.0..40.0" in msg
    assert "not global" in msg and "5.625 deg" in msg and "crop the target" in msg
    # The same box given in 0..360 longitudes reads across the seam.
    src360 = Grid(lat=src.lat, lon=np.mod(src.lon, 360.0))
    with pytest.raises(RegridError, match=r"lat 35\.0\.\.65\.0, lon 350\.0\.\.40\.0: not global"):
        get_regridder(src360, T5625, "conservative")


def test_source_missing_longitudes_is_not_global():
    # Half the globe in longitude, all latitudes.
    src = Grid(lat=np.linspace(90, -90, 73), lon=np.arange(0.0, 180.0, 2.5))
    with pytest.raises(RegridError, match=r"lon 0\.0\.\.177\.5: not global"):
        Regridder(src, T5625, "conservative")


@pytest.mark.parametrize(
    "lat, lon, match",
    [
        (np.array([10.0]), np.arange(36) * 10.0, "at least 2"),
        (np.linspace(-90, 90, 19), np.array([0.0]), "at least 2"),
        (np.array([0.0, 10.0, 5.0, 20.0]), np.arange(36) * 10.0, "latitudes are not strictly monotonic"),
        (np.linspace(-90, 90, 19), np.array([0.0, 10.0, 5.0, 20.0]), "longitudes are not strictly monotonic"),
        (np.array([0.0, np.nan, 20.0]), np.arange(36) * 10.0, "NaN"),
        (np.linspace(-90, 90, 19), np.r_[np.arange(35) * 10.0, np.nan], "NaN"),
        (np.linspace(-90, 90, 19), np.arange(37) * 10.0, "repeat"),  # both 0 and 360
    ],
)
def test_bad_coordinates_raise(lat, lon, match):
    with pytest.raises(RegridError, match=match) as e:
        Regridder(Grid(lat, lon), T5625, "bilinear")
    assert "source grid" in str(e.value)
    with pytest.raises(RegridError, match="target grid"):
        Regridder(COARSE_10, Grid(lat, lon), "bilinear")


def test_unknown_method():
    with pytest.raises(ValueError, match="method"):
        get_regridder(COARSE_10, T5625, "nearest")


def test_module_imports_no_torch():
    code = "import sys, pipelines.regrid; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(regrid.__file__).resolve().parents[1])
