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
