"""Forecast sampling: reachability across shard edges, disjoint workers, reproducible epochs."""

import numpy as np
import pytest

from climax.sampling import ForecastSampler, TimeAxis, lead_hours


def manifest(rows_per_shard=(5, 3, 7), step_hours=6, start="2015-01-01T00"):
    shards, t = [], np.datetime64(start, "ns")
    step = np.timedelta64(step_hours, "h")
    for k, n in enumerate(rows_per_shard):
        end = t + step * (n - 1)
        shards.append({"path": f"train/{k}.parquet", "rows": n, "start": str(t), "end": str(end)})
        t = end + step
    return {"time": {"step_seconds": step_hours * 3600}, "splits": {"train": {"shards": shards}}}


def test_time_axis_from_manifest():
    axis = TimeAxis.from_manifest(manifest(), "train")
    assert len(axis) == 15 and axis.shard.tolist()[4:6] == [0, 1] and axis.row.tolist()[5:8] == [0, 1, 2]
    assert np.all(np.diff(axis.times) == np.timedelta64(6, "h"))
    bad = manifest()
    bad["splits"]["train"]["shards"][1]["rows"] = 4
    with pytest.raises(ValueError, match="disagree"):
        TimeAxis.from_manifest(bad, "train")


def test_lead_hours():
    assert lead_hours(6, 168, 6).tolist() == list(range(6, 169, 6))
    with pytest.raises(ValueError, match="multiples"):
        lead_hours(6, 20, 6)


def test_every_valid_pair_is_reachable_and_none_lost_at_shard_edges():
    axis = TimeAxis.from_manifest(manifest(), "train")
    sampler = ForecastSampler(axis, lead_hours(6, 24, 6), random_lead=True, seed=1)
    expected = {(i, i + k, 6.0 * k) for i in range(15) for k in range(1, 5) if i + k < 15}
    assert {tuple(p) for p in sampler.all_pairs().tolist()} == expected
    seen = set()
    for epoch in range(200):
        triples = sampler.epoch(epoch)
        assert len(triples) == 14  # every input with at least one valid target, once per epoch
        assert np.all(axis.times[triples[:, 1].astype(int)] - axis.times[triples[:, 0].astype(int)]
                      == (triples[:, 2] * 3600e9).astype("timedelta64[ns]"))
        seen |= {tuple(p) for p in triples.tolist()}
    assert seen == expected  # pairs across shard boundaries (e.g. row 4 -> row 5) included


def test_workers_are_disjoint_and_epochs_reproducible():
    axis = TimeAxis.from_manifest(manifest((40, 40, 41)), "train")
    sampler = ForecastSampler(axis, [6.0, 12.0, 24.0], random_lead=False, seed=3)
    parts = [sampler.epoch(2, rank=r, world_size=3) for r in range(3)]
    assert len({len(p) for p in parts}) == 1
    keys = [tuple(p) for part in parts for p in part.tolist()]
    assert len(keys) == len(set(keys))  # disjoint
    assert len(keys) >= len(sampler.all_pairs()) - 2
    np.testing.assert_array_equal(sampler.epoch(2, 1, 3), parts[1])  # same seed, same order
    assert not np.array_equal(sampler.epoch(3, 1, 3), parts[1])  # a new shuffle each epoch
    other = ForecastSampler(axis, [6.0, 12.0, 24.0], random_lead=False, seed=4)
    assert not np.array_equal(other.epoch(2, 1, 3), parts[1])


def test_leads_longer_than_the_split_are_refused():
    axis = TimeAxis.from_manifest(manifest((3,)), "train")
    with pytest.raises(ValueError, match="no lead time"):
        ForecastSampler(axis, [72.0])


def test_block_epoch_same_samples_as_the_global_shuffle_in_windows():
    axis = TimeAxis.from_manifest(manifest((400, 300, 500)), "train")
    sampler = ForecastSampler(axis, lead_hours(6, 60, 6), random_lead=True, seed=2)
    assert sampler.halo_steps == 10
    triples, starts = sampler.block_epoch(3, block_steps=40, window_blocks=3)
    glob = sampler.epoch(3)
    key = lambda t: t[np.lexsort((t[:, 2], t[:, 0]))]  # noqa: E731
    np.testing.assert_array_equal(key(triples), key(glob))  # the same draws, another order
    assert starts[0] == 0 and starts[-1] == len(triples) and np.all(np.diff(starts) > 0)
    assert np.all(axis.times[triples[:, 1].astype(int)] - axis.times[triples[:, 0].astype(int)]
                  == (triples[:, 2] * 3600e9).astype("timedelta64[ns]"))
    rows = 0
    for a, b in zip(starts[:-1], starts[1:]):
        w = triples[a:b]
        span = np.unique(w[:, 0])
        # at most 3 blocks of 40 inputs, targets at most 10 steps past each block
        assert len(span) <= 120 and len(np.unique(w[:, :2])) <= 3 * 50
        rows += len(np.unique(w[:, :2]))
    assert rows / len(triples) <= 1.2
    again, _ = sampler.block_epoch(3, block_steps=40, window_blocks=3)
    np.testing.assert_array_equal(again, triples)
    assert not np.array_equal(sampler.block_epoch(4, block_steps=40, window_blocks=3)[0], triples)


def test_block_epoch_ranks_disjoint_and_equal():
    axis = TimeAxis.from_manifest(manifest((401, 300)), "train")
    sampler = ForecastSampler(axis, [6.0, 24.0], random_lead=False, seed=0)
    parts = [sampler.block_epoch(1, r, 4, block_steps=50, window_blocks=2)[0] for r in range(4)]
    assert len({len(p) for p in parts}) == 1
    keys = [tuple(p) for part in parts for p in part.tolist()]
    assert len(keys) == len(set(keys)) >= len(sampler.all_pairs()) - 3
    with pytest.raises(ValueError, match="rank"):
        sampler.block_epoch(0, 4, 4)


def test_block_layout():
    from climax.sampling import block_layout

    assert block_layout(28, 1e9, halo_used=0.4) == (112, 4)  # 6-hourly data, leads up to 168 h
    assert block_layout(24, 1e9, samples_per_step=1.0) == (240, 4)  # one fixed lead: the whole halo is read
    assert block_layout(168, 2000, halo_used=0.4) == (672, 2)  # hourly: two blocks fit 2000 rows
    assert block_layout(168, 500, halo_used=0.4) == (332, 1)  # not even one: shorter blocks
    assert block_layout(5, 100, block_steps=7, window_blocks=2) == (7, 2)
