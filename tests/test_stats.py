"""Mergeable statistics: any split into parts gives numpy's answer."""

import numpy as np
import pytest

from pipelines.stats import ClimatologyAccumulator, Moments, climatology_slots, merge_all


def test_merged_moments_equal_numpy_whatever_the_split():
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((100, 8, 16)) * 5 + 1e4).astype(np.float32)  # large mean, small spread
    whole = a.astype(np.float64)
    for cuts in ([100], [1, 99], [13, 40, 47], [7] * 14 + [2]):
        parts, k = [], 0
        for n in cuts:
            parts.append(Moments.of(a[k:k + n], block=333))
            k += n
        m = merge_all(parts)
        assert m.count == a.size
        assert m.mean == pytest.approx(whole.mean(), rel=1e-12)
        assert m.std == pytest.approx(whole.std(), rel=1e-9)
    d = Moments.of_diffs(a[0], a[1:])
    assert d.std == pytest.approx(np.diff(whole, axis=0).std(), rel=1e-9)
    assert merge_all([Moments(), Moments.of(a)]) == Moments.of(a)


def test_climatology_slots_and_accumulator():
    times = np.array(["2015-03-01T06", "2016-02-29T18", "2016-03-01T06", "2016-12-31T00"], dtype="datetime64[ns]")
    doy, hour = climatology_slots(times)
    assert doy.tolist() == [60, 60, 61, 366] and hour.tolist() == [6, 18, 6, 0]
    acc = ClimatologyAccumulator((2, 3))
    fields = np.arange(4 * 6, dtype=np.float32).reshape(4, 2, 3)
    acc.add(times[:2], fields[:2])
    acc.add(times[2:], fields[2:])
    d, h, n, clim, mean = acc.result()
    assert list(zip(d.tolist(), h.tolist())) == [(60, 6), (60, 18), (61, 6), (366, 0)]
    np.testing.assert_array_equal(clim[0], fields[0])
    np.testing.assert_allclose(mean, fields.mean(0))
