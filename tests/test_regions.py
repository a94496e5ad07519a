"""Regional boxes: patch-aligned crops, position ids, orientation, wrap across 0 deg."""

import numpy as np
import pytest
import torch

from climax.regions import NAMED_REGIONS, Region
from tests.helpers import tiny_model

LAT = np.linspace(-87.1875, 87.1875, 32)  # south to north, as the shards
LON = np.arange(64) * 5.625


def test_box_is_patch_aligned_and_holds_the_box():
    r = Region.from_box(LAT, LON, 30, 65, 0, 40, patch_size=2)
    assert r.shape[0] % 2 == 0 and r.shape[1] % 2 == 0
    lat, lon = r.lat(LAT), r.lon(LON)
    assert lat.min() <= 30 + 5.625 and lat.max() >= 65 - 5.625 and np.all(np.diff(lat) > 0)
    assert lon[0] == 0 and lon[-1] >= 40 - 5.625


def test_whole_globe_is_identity():
    r = Region.from_box(LAT, LON, -90, 90, 0, 360, patch_size=2)
    a = np.arange(32 * 64).reshape(32, 64)
    assert np.array_equal(r.crop(a), a)
    assert np.array_equal(r.patch_ids(), np.arange(16 * 32))


def test_patch_ids_match_cropped_global_patches():
    r = Region.from_box(LAT, LON, -20, 45, 100, 170, patch_size=4)
    ids = np.arange(8 * 16).reshape(8, 16)  # patch index map of the global 32x64 grid, p = 4
    pix = np.repeat(np.repeat(ids, 4, axis=0), 4, axis=1)
    assert np.array_equal(r.crop(pix)[::4, ::4].reshape(-1), r.patch_ids())


def test_wrap_across_greenwich():
    r = Region.from_box(LAT, LON, 30, 65, 330, 30, patch_size=2)
    lon = r.lon(LON)
    assert lon[0] >= 320 and lon[-1] <= 40 and 0.0 in lon
    a = np.tile(np.arange(64), (32, 1))
    t = torch.from_numpy(a)
    assert np.array_equal(r.crop(a), r.crop(t).numpy())


def test_named_and_errors():
    for name in NAMED_REGIONS:
        assert Region.named(name, LAT, LON, 2).shape[0] > 0
    with pytest.raises(ValueError, match="named regions"):
        Region.named("Atlantis", LAT, LON, 2)
    with pytest.raises(ValueError, match="holds no grid point"):
        Region.from_box(LAT, LON, 88, 89.9, 0, 10, 2)


def test_model_runs_on_a_region_with_its_position_embeddings():
    torch.manual_seed(0)
    m = tiny_model(["a", "b"], img_size=(32, 64)).eval()
    r = Region.from_box(LAT, LON, 10, 60, 200, 300, patch_size=2)
    x = torch.randn(2, 2, 32, 64)
    y = m(r.crop(x), torch.tensor([6.0, 12.0]), ["a", "b"], ["b"], region=r)
    assert y.shape == (2, 1, *r.shape)
    with pytest.raises(ValueError, match="does not match region"):
        m(x, torch.tensor([6.0, 6.0]), ["a", "b"], region=r)
    # the encoder sees the region's own position embeddings: moving the box changes the output
    r2 = Region.from_box(LAT, LON, -60, -10, 200, 300, patch_size=2)
    assert r2.shape == r.shape
    y2 = m(r.crop(x), torch.tensor([6.0, 12.0]), ["a", "b"], ["b"], region=r2)
    assert not torch.allclose(y, y2)
