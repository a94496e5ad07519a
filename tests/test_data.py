"""The streaming training-data reader on a real dataset built by the real preprocessing."""

from __future__ import annotations

import pickle
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from climax import shards as S
from climax.data import Batch, ForecastLoader, MixedLoader, ShardDataset
from climax.regions import Region
from climax.sampling import ForecastSampler

TIME_VARS = ["2m_temperature", "geopotential_500", "temperature_850"]
CONSTS = ["land_sea_mask", "orography", "latitude"]


@pytest.fixture(scope="module")
def root(ray_local, tmp_path_factory) -> Path:
    """Two years of 12-hourly 11.25-degree data: train 2014, val 2015, several shards a year."""
    from pipelines.build import build
    from pipelines.recipe import Recipe
    from pipelines.sample_data import generate

    archive = tmp_path_factory.mktemp("archive")
    generate(archive, years=(2014, 2015), resolution=11.25, step_hours=12,
             variables=["land_sea_mask", "orography", *TIME_VARS], formats=("weatherbench",), progress=False)
    out = tmp_path_factory.mktemp("shards")
    build(Recipe.model_validate({
        "sources": [{"path": str(archive / "weatherbench")}],
        "variables": CONSTS + TIME_VARS,
        "grid": {"resolution": 11.25, "method": "bilinear"},
        "time": {"start": "2014-01-01", "end": "2015-12-31T12:00", "step": "12h"},
        "splits": {"train": [2014, 2014], "val": [2015, 2015]},
        "output": str(out),
        "shard_bytes": 500_000,  # ~80 rows: 9 shards a year
    }))
    return out


@pytest.fixture(scope="module")
def ds(root) -> ShardDataset:
    return ShardDataset(str(root), name="era5-test")


def raw_rows(root: Path, ds: ShardDataset, split: str, idx, variables) -> np.ndarray:
    """Reference: the rows straight from the shards with climax.shards.read_shard, one at a time."""
    axis = ds.axis(split)
    out = []
    for i in np.asarray(idx, dtype=np.int64):
        rel = ds.manifest.shards(split)[axis.shard[i]]["path"]
        times, arrays = S.read_shard(str(root / rel), variables, [int(axis.row[i])])
        assert times[0] == axis.times[i]
        out.append(np.stack([arrays[v][0] for v in variables]))
    return np.stack(out)


def normalise(ds, raw, variables):
    mean, std = ds.manifest.mean_std(variables)
    return (raw - mean[None, :, None, None]) / std[None, :, None, None]


def loader(ds, **kw) -> ForecastLoader:
    args = dict(split="train", in_vars=CONSTS + TIME_VARS, out_vars=TIME_VARS, leads=[12, 24, 36, 48, 72],
                random_lead=True, batch_size=16)
    args.update(kw)
    return ForecastLoader(ds, **args)


def test_dataset_basics(ds, root):
    assert ds.name == "era5-test" and ds.shape == (16, 32) and ds.step_hours == 12
    assert ds.variables == TIME_VARS and ds.constants == CONSTS
    assert len(ds.manifest.shards("train")) >= 6 and len(ds.axis("train")) == 730
    assert np.all(np.diff(ds.lat) > 0)  # south to north
    assert ShardDataset(str(root)).name == root.name
    copy = pickle.loads(pickle.dumps(ds))  # e.g. sent to a Ray worker
    np.testing.assert_array_equal(copy.read("train", [3, 400], TIME_VARS), ds.read("train", [3, 400], TIME_VARS))


def test_read_equals_shard_rows_any_order_duplicates_constants(ds, root):
    axis = ds.axis("train")
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.integers(0, len(axis), 20), [5, 5, len(axis) - 1, 0]])
    variables = ["temperature_850", "land_sea_mask", "2m_temperature", "temperature_850"]
    got = ds.read("train", idx, variables)
    assert got.dtype == np.float32 and got.shape == (len(idx), 4, 16, 32)
    tv = ["temperature_850", "2m_temperature"]
    ref = raw_rows(root, ds, "train", idx, tv)
    np.testing.assert_array_equal(got[:, 0], ref[:, 0])
    np.testing.assert_array_equal(got[:, 2], ref[:, 1])
    np.testing.assert_array_equal(got[:, 3], ref[:, 0])
    _, consts = S.read_shard(str(root / S.CONSTANTS))
    np.testing.assert_array_equal(got[:, 1], np.broadcast_to(consts["land_sea_mask"][0], (len(idx), 16, 32)))
    assert ds.read("train", np.array([], dtype=int), variables).shape == (0, 4, 16, 32)


def test_open_shards_are_bounded_and_lazy(root):
    small = ShardDataset(str(root), max_open_files=2)
    assert small.open_files() == 0  # nothing opened up front
    axis = small.axis("train")
    idx = np.flatnonzero(np.r_[True, np.diff(axis.shard) != 0])  # the first row of every shard
    first = small.read("train", idx, ["2m_temperature"])
    assert small.open_files() == 2
    np.testing.assert_array_equal(small.read("train", idx, ["2m_temperature"]), first)
    np.testing.assert_array_equal(first[:, 0], raw_rows(root, small, "train", idx, ["2m_temperature"])[:, 0])


def test_shards_with_larger_row_groups_read_the_same(root, tmp_path):
    """A shard written with several steps per row group (not our format, but valid Parquet) still reads right."""
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    ds = ShardDataset(str(copy))
    rel = ds.manifest.shards("train")[1]["path"]
    table = pq.read_table(copy / rel)
    pq.write_table(table, copy / rel, row_group_size=7)
    axis = ds.axis("train")
    idx = np.flatnonzero(axis.shard == 1)[[0, 3, 8, 9, 20, -1, 3]]
    np.testing.assert_array_equal(ds.read("train", idx, TIME_VARS), raw_rows(root, ds, "train", idx, TIME_VARS))


def test_normaliser_from_manifest(ds):
    mean, std = ds.normalizer(["orography", "2m_temperature"])
    assert mean.dtype == std.dtype == np.float32
    stats = ds.manifest.raw["statistics"]
    assert mean[1] == pytest.approx(stats["2m_temperature"]["mean"])
    assert std[0] == pytest.approx(stats["orography"]["std"])


def test_every_batch_is_the_normalised_raw_pair(ds, root):
    """A whole epoch: x at t and y at t + lead equal the raw shard rows, normalised with the manifest."""
    ld = loader(ds, batch_size=64)
    triples = ld.triples(0)
    np.testing.assert_array_equal(
        triples, ForecastSampler(ds.axis("train"), [12, 24, 36, 48, 72], random_lead=True, seed=0).epoch(0))
    seen = 0
    for b in ld:
        assert isinstance(b, Batch) and b.dataset == "era5-test"
        assert b.x.dtype == b.y.dtype == b.lead_hours.dtype == torch.float32
        assert b.x.shape == (64, 6, 16, 32) and b.y.shape == (64, 3, 16, 32)
        t = triples[seen:seen + len(b)]
        seen += len(b)
        np.testing.assert_array_equal(b.lead_hours.numpy(), t[:, 2])
        np.testing.assert_array_equal(b.input_time, ds.axis("train").times[t[:, 0].astype(int)])
        assert np.all(b.target_time == ds.axis("train").times[t[:, 1].astype(int)])
        raw_x = ds.read("train", t[:, 0], CONSTS + TIME_VARS)
        raw_y = ds.read("train", t[:, 1], TIME_VARS)
        np.testing.assert_allclose(b.x.numpy(), normalise(ds, raw_x, CONSTS + TIME_VARS), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b.y.numpy(), normalise(ds, raw_y, TIME_VARS), rtol=1e-5, atol=1e-5)
    assert seen == len(ld) * 64 == len(triples) // 64 * 64


def test_pair_across_a_shard_boundary_equals_shard_rows(ds, root):
    """Fixed 24 h lead, time order: the pair whose input is a shard's last row and target the next shard's second."""
    ld = loader(ds, leads=[24], random_lead=False, shuffle=False, drop_last=False, batch_size=50)
    axis = ds.axis("train")
    edge = int(np.flatnonzero(np.diff(axis.shard) != 0)[2])  # last row of the third shard
    batches = list(ld)
    assert sum(len(b) for b in batches) == len(axis) - 2 and len(batches) == len(ld)
    times = np.concatenate([b.input_time for b in batches])
    assert np.all(np.diff(times) > np.timedelta64(0))  # time order
    k = int(np.flatnonzero(times == axis.times[edge])[0])
    b, i = batches[k // 50], k % 50
    assert axis.shard[edge + 2] == axis.shard[edge] + 1
    raw_x = raw_rows(root, ds, "train", [edge], TIME_VARS)
    raw_y = raw_rows(root, ds, "train", [edge + 2], TIME_VARS)
    np.testing.assert_allclose(b.x[i, 3:].numpy(), normalise(ds, raw_x, TIME_VARS)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b.y[i].numpy(), normalise(ds, raw_y, TIME_VARS)[0], rtol=1e-5, atol=1e-5)
    assert b.lead_hours[i] == 24


def test_cache_modes_and_column_sets_agree(ds):
    """Resident rows, streamed super-batches, inputs and targets with different columns: same batches."""
    kw = dict(in_vars=["orography", "temperature_850", "2m_temperature"],
              out_vars=["geopotential_500", "2m_temperature"], batch_size=8, max_batches=12, superbatch_mb=0.05)
    a = [b for e in (0, 1) for b in loader(ds, cache_mb=1024, **kw).iterate(e)]
    b = [b for e in (0, 1) for b in loader(ds, cache_mb=0, shuffle_mode="global", **kw).iterate(e)]
    assert len(a) == len(b) == 24
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p.x.numpy(), q.x.numpy())
        np.testing.assert_array_equal(p.y.numpy(), q.y.numpy())
    # the block shuffle, streamed or with rows resident, in several windows per batch range
    c = [b for e in (0, 1) for b in loader(ds, cache_mb=0, **kw).iterate(e)]
    d = [b for e in (0, 1) for b in loader(ds, cache_mb=1024, shuffle_mode="block", **kw).iterate(e)]
    assert len(c) == len(d) == 24
    for p, q in zip(c, d):
        np.testing.assert_array_equal(p.x.numpy(), q.x.numpy())
        np.testing.assert_array_equal(p.y.numpy(), q.y.numpy())
    raw = ds.read("train", np.searchsorted(ds.axis("train").times, a[5].input_time), ["temperature_850"])
    np.testing.assert_allclose(a[5].x[:, 1].numpy(), normalise(ds, raw, ["temperature_850"])[:, 0],
                               rtol=1e-5, atol=1e-5)


def test_same_seed_same_order_and_epochs_differ(ds):
    a, b = loader(ds, seed=7, max_batches=5), loader(ds, seed=7, max_batches=5)

    def order(ld):
        return np.concatenate([np.stack([x.input_time.astype(np.int64), x.lead_hours.numpy()], 1) for x in ld])

    first = order(a)
    np.testing.assert_array_equal(first, order(b))
    np.testing.assert_array_equal(first, order(a))  # an epoch repeats until set_epoch
    a.set_epoch(1)
    assert not np.array_equal(first, order(a))
    assert not np.array_equal(first, order(loader(ds, seed=8, max_batches=5)))
    assert len(a) == 5


def test_ranks_get_disjoint_equal_parts(ds):
    parts = []
    for r in range(3):
        ld = loader(ds, rank=r, world_size=3, batch_size=32)
        parts.append({(int(t), float(lead)) for b in ld
                      for t, lead in zip(b.input_time.astype(np.int64), b.lead_hours.numpy())})
        assert len(parts[-1]) == len(ld) * 32
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    evals = [loader(ds, rank=r, world_size=3, shuffle=False, random_lead=False, leads=[24], drop_last=False)
             for r in range(3)]
    times = [np.concatenate([b.input_time for b in ld]) for ld in evals]
    assert sum(map(len, times)) == len(ds.axis("train")) - 2  # every evaluation pair once
    assert times[0][-1] < times[1][0] < times[2][0]  # contiguous blocks in time order


def test_constant_inputs_broadcast(ds, root):
    b = next(iter(loader(ds, in_vars=["2m_temperature", "land_sea_mask", "orography"], max_batches=1)))
    _, consts = S.read_shard(str(root / S.CONSTANTS))
    for j, c in ((1, "land_sea_mask"), (2, "orography")):
        mean, std = ds.manifest.mean_std([c])
        want = (consts[c][0] - mean[0]) / std[0]
        for i in range(len(b)):
            np.testing.assert_allclose(b.x[i, j].numpy(), want, rtol=1e-5, atol=1e-5)


def test_region_crops_inputs_and_targets(ds):
    region = Region.from_box(ds.lat, ds.lon, -30, 30, 330, 30, patch_size=2, name="across-0")
    assert list(region.cols) != sorted(region.cols)  # wraps across 0 deg
    full = next(iter(loader(ds, max_batches=1, seed=3)))
    crop = next(iter(loader(ds, max_batches=1, seed=3, region=region)))
    assert crop.x.shape == (16, 6, *region.shape) and crop.y.shape == (16, 3, *region.shape)
    np.testing.assert_array_equal(crop.x.numpy(), region.crop(full.x.numpy()))
    np.testing.assert_array_equal(crop.y.numpy(), region.crop(full.y.numpy()))
    other = Region.from_box(np.arange(8), np.arange(16) * 22.5, 0, 4, 0, 90, patch_size=2)
    with pytest.raises(ValueError, match="grid"):
        loader(ds, region=other)


def test_climatology_lookup_and_fallbacks(ds, root):
    times = np.array(["2014-03-01T12", "2016-02-29T00", "2016-12-31T00", "2015-06-01T06", "2014-01-01T00"],
                     dtype="datetime64[ns]")
    got = ds.climatology(["temperature_850", "orography"], times)
    assert got.shape == (5, 2, 16, 32) and got.dtype == np.float32
    table = S.read_climatology(str(root), "temperature_850")
    doy, hour = table.column("dayofyear").to_numpy(), table.column("hour").to_numpy()
    clim = table.column("temperature_850").combine_chunks().to_numpy_ndarray()

    def row(d, h):
        return clim[int(np.flatnonzero((doy == d) & (hour == h))[0])]

    assert not np.any(doy == 366)  # the training year 2014 has no day 366
    np.testing.assert_array_equal(got[0, 0], row(60, 12))  # 1 March 2014
    np.testing.assert_array_equal(got[1, 0], row(60, 0))  # 29 February: day 60, as the build counts
    np.testing.assert_array_equal(got[2, 0], row(365, 0))  # day 366: the nearest day with that hour
    np.testing.assert_array_equal(got[3, 0], row(152, 0))  # 06 h not stored: the nearest hour, ties earlier
    np.testing.assert_array_equal(got[4, 0], row(1, 0))
    _, consts = S.read_shard(str(root / S.CONSTANTS))
    np.testing.assert_array_equal(got[:, 1], np.broadcast_to(consts["orography"][0], (5, 16, 32)))
    _, tm = S.read_shard(str(root / "climatology" / "time_mean.parquet"))
    np.testing.assert_array_equal(ds.time_mean(["2m_temperature", "temperature_850"]),
                                  np.stack([tm["2m_temperature"][0], tm["temperature_850"][0]]))


def test_mixed_loader_draws_by_weight_the_same_on_every_rank(ds, root):
    other = ShardDataset(str(root), name="other")
    def mixed(rank):
        a = loader(ds, rank=rank, world_size=2, batch_size=8, max_batches=30)
        b = ForecastLoader(other, "val", ["2m_temperature"], ["2m_temperature"], [12], random_lead=False, batch_size=8,
                           rank=rank, world_size=2, max_batches=4)
        return MixedLoader([a, b], weights=[3, 1], seed=5)
    m0, m1 = mixed(0), mixed(1)
    assert len(m0) == 34
    names0 = [b.dataset for b in m0]
    names1 = [b.dataset for b in m1]
    assert names0 == names1 and len(names0) == 34
    share = names0.count("other") / 34
    draws = np.concatenate([m0.draws(e) for e in range(50)])
    assert abs(np.mean(draws == 1) - 0.25) < 0.03 and 0 < share < 0.6
    # the small loader ran out and restarted on its next epoch; resuming at an epoch is exact
    m0.set_epoch(1)
    e1 = [(b.dataset, tuple(b.input_time.astype(np.int64))) for b in m0]
    fresh = mixed(0)
    fresh.set_epoch(1)
    assert [(b.dataset, tuple(b.input_time.astype(np.int64))) for b in fresh] == e1
    vals = [t for name, t in e1 if name == "other"]
    assert len(vals) > 4 and len(set(vals)) == len(vals)  # more than one epoch of `other`, no batch repeated
    with pytest.raises(ValueError, match="weights"):
        MixedLoader([m0.loaders[0]], weights=[-1])


def test_errors_name_the_variable_and_dataset(ds, tmp_path):
    with pytest.raises(ValueError, match=r"era5-test.*no input variable.*'2m_temp'.*2m_temperature"):
        loader(ds, in_vars=["2m_temp"])
    with pytest.raises(ValueError, match=r"output variable.*\['orography'\].*constants"):
        loader(ds, out_vars=["2m_temperature", "orography"])
    with pytest.raises(ValueError, match="split 'test'.*train"):
        loader(ds, split="test")
    with pytest.raises(ValueError, match="multiples"):
        loader(ds, leads=[6])
    with pytest.raises(FileNotFoundError, match="not a finished dataset: run jobs.preprocess"):
        ShardDataset(str(tmp_path))


def test_early_stop_ends_threads_and_errors_reach_the_consumer(ds, root, tmp_path):
    before = threading.active_count()
    for _ in range(3):
        it = iter(loader(ds, batch_size=4))
        next(it)
        it.close()
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before
    copy = tmp_path / "broken"
    shutil.copytree(root, copy)
    broken = ShardDataset(str(copy), name="broken")
    for p in (copy / "train").rglob("*.parquet"):
        p.unlink()
    with pytest.raises(FileNotFoundError, match="broken.*missing"):
        next(iter(loader(broken)))


def test_s3_dataset_reads_like_local(ds, root, moto_s3):
    import s3fs

    fs = s3fs.S3FileSystem(**moto_s3)
    fs.mkdir("climax-data")
    fs.put(str(root), "climax-data/ds", recursive=True)
    remote = ShardDataset("s3://climax-data/ds", storage_options=moto_s3)
    assert remote.name == "ds" and remote.variables == ds.variables
    idx = np.array([3, 200, 3, 700])
    np.testing.assert_array_equal(remote.read("train", idx, ["land_sea_mask", *TIME_VARS]),
                                  ds.read("train", idx, ["land_sea_mask", *TIME_VARS]))
    a, b = next(iter(loader(remote, max_batches=1))), next(iter(loader(ds, max_batches=1)))
    np.testing.assert_array_equal(a.x.numpy(), b.x.numpy())
    np.testing.assert_array_equal(remote.climatology(["2m_temperature"], a.input_time),
                                  ds.climatology(["2m_temperature"], a.input_time))
    with pytest.raises(FileNotFoundError, match="not a finished dataset"):
        ShardDataset("s3://climax-data/nothing-here", storage_options=moto_s3)


# ----------------------------------------------------------------------------- block shuffle
def pairs_of(batches) -> list[tuple[int, float]]:
    return [(int(t), float(lead)) for b in batches
            for t, lead in zip(b.input_time.astype(np.int64), b.lead_hours.numpy())]


def test_block_shuffle_is_the_default_when_rows_do_not_fit(ds):
    assert loader(ds).shuffle_mode == "global"  # 730 small rows fit the default cache_mb
    ld = loader(ds, cache_mb=0)
    assert ld.shuffle_mode == "block" and ld.block_shuffle
    assert loader(ds, cache_mb=0, shuffle_mode="global").shuffle_mode == "global"
    assert loader(ds, shuffle_mode="block").shuffle_mode == "block"
    with pytest.raises(ValueError, match="shuffle_mode"):
        loader(ds, shuffle_mode="blocks")


def test_block_shuffle_batches_are_the_normalised_raw_pairs_decoding_each_row_about_once(ds, root):
    """A whole streamed epoch (cache_mb=0): every pair valid and equal to the raw rows, every input
    of the split once (random leads), at most 1.2 rows decoded per sample."""
    ld = loader(ds, cache_mb=0, batch_size=16)
    axis = ds.axis("train")
    batches = list(ld)
    assert len(batches) == len(ld) and all(len(b) == 16 for b in batches)
    st = ld.stats
    assert st["samples"] == 16 * len(batches) and 0 < st["rows_per_sample"] <= 1.2, st
    assert st["bytes_decoded"] == st["rows_decoded"] * 3 * 16 * 32 * 4
    x = torch.cat([b.x for b in batches]).numpy()
    y = torch.cat([b.y for b in batches]).numpy()
    t_in = np.concatenate([b.input_time for b in batches])
    lead = torch.cat([b.lead_hours for b in batches]).numpy()
    i = np.searchsorted(axis.times, t_in)
    j = np.searchsorted(axis.times, np.concatenate([b.target_time for b in batches]))
    assert np.all(axis.times[np.minimum(j, len(axis) - 1)] == np.concatenate([b.target_time for b in batches]))
    assert np.isin(lead, [12, 24, 36, 48, 72]).all()
    assert len(np.unique(i)) == len(i) >= len(axis) - 6 - 15  # each input once; the rest of a batch dropped
    np.testing.assert_allclose(x, normalise(ds, ds.read("train", i, CONSTS + TIME_VARS), CONSTS + TIME_VARS),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, normalise(ds, ds.read("train", j, TIME_VARS), TIME_VARS), rtol=1e-5, atol=1e-5)
    # the same samples as the global shuffle of the epoch, in another order
    glob = ld.sampler.epoch(0)
    assert set(pairs_of(batches)) <= {(int(axis.times[int(a)].astype(np.int64)), float(c)) for a, _, c in glob}
    # leads of the epoch are drawn as in the global shuffle: all of them, inputs from the whole split
    assert set(lead.tolist()) == {12.0, 24.0, 36.0, 48.0, 72.0}
    assert i.min() < 20 and i.max() > len(axis) - 30


def test_block_shuffle_fixed_leads_cover_every_pair(ds):
    ld = loader(ds, cache_mb=0, leads=[24, 48], random_lead=False, batch_size=10, drop_last=False)
    pairs = pairs_of(ld)
    n = len(ds.axis("train"))
    assert len(pairs) == len(set(pairs)) == (n - 2) + (n - 4)  # every (input, lead) pair once
    assert ld.stats["rows_per_sample"] <= 0.65  # each row about once, two samples per input row


def test_block_shuffle_ranks_disjoint_equal_and_deterministic(ds):
    parts, lens = [], []
    for r in range(3):
        ld = loader(ds, cache_mb=0, rank=r, world_size=3, batch_size=16, seed=4)
        p = pairs_of(ld)
        assert len(p) == len(ld) * 16
        parts.append(set(p))
        lens.append(len(ld))
        np.testing.assert_array_equal(ld.triples(0), loader(ds, cache_mb=0, rank=r, world_size=3, seed=4).triples(0))
        assert ld.stats["rows_per_sample"] <= 1.3
    assert len(set(lens)) == 1  # DDP lockstep
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    a = loader(ds, cache_mb=0, seed=4)
    assert not np.array_equal(a.triples(0), a.triples(1))  # epochs differ
    assert not np.array_equal(a.triples(0), loader(ds, cache_mb=0, seed=5).triples(0))  # seeds differ


def test_block_shuffle_resumes_at_a_batch(ds):
    ld = loader(ds, cache_mb=0, batch_size=16, block_steps=30, window_blocks=2)
    full = list(ld.iterate(2))
    starts = ld.sampler.block_epoch(2, 0, 1, 30, 2)[1]
    assert len(starts) > 3 and any(s % 16 for s in starts[1:-1])  # batches straddle windows
    for k in (1, int(starts[1]) // 16, len(full) - 1):
        rest = list(loader(ds, cache_mb=0, batch_size=16, block_steps=30, window_blocks=2).iterate(2, k))
        assert len(rest) == len(full) - k
        for p, q in zip(rest, full[k:]):
            np.testing.assert_array_equal(p.x.numpy(), q.x.numpy())
            np.testing.assert_array_equal(p.y.numpy(), q.y.numpy())
            np.testing.assert_array_equal(p.input_time, q.input_time)
