"""Exact, mergeable statistics: per-variable mean, standard deviation and time-difference spread.

Each preprocessing task summarises its chunk as float64 (count, mean, M2) triples; the driver merges
them with Chan et al.'s pairwise formula, which is exact up to float64 rounding whatever the split
into tasks and nodes (unlike averaging per-file means, or ClimaX's original averaging of per-shard
standard deviations). Merging always happens in chunk order, so results are reproducible.

Climatology (by day of year and hour, for ACC) and the time mean are float64 sums per slot.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from climax.shards import climatology_slots  # one home: the slots the loader looks up

__all__ = ["Moments", "merge_all", "climatology_slots", "ClimatologyAccumulator"]


@dataclass(frozen=True)
class Moments:
    """Count, mean and sum of squared deviations of a sample, in float64."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @classmethod
    def of(cls, values: np.ndarray, block: int = 1 << 20) -> Moments:
        """Moments of all elements: two passes (mean, then squared deviations) over float64
        blocks of ``block`` elements, merged with Chan's formula (bounded memory)."""
        a = np.asarray(values).reshape(-1)
        buf = np.empty(min(block, a.size), np.float64)
        total = cls()
        for k in range(0, a.size, block):
            x = buf[:min(block, a.size - k)]
            np.copyto(x, a[k:k + block], casting="same_kind")
            total = total.merge(cls._of_scratch(x))
        return total

    @classmethod
    def _of_scratch(cls, x: np.ndarray) -> Moments:
        """Moments of a float64 array that may be overwritten (no copy)."""
        x = x.reshape(-1)
        mean = float(x.sum() / x.size)
        x -= mean
        return cls(int(x.size), mean, float(np.dot(x, x)))

    @classmethod
    def of_diffs(cls, first: np.ndarray | None, values: np.ndarray, block: int = 1 << 20) -> Moments:
        """Moments of the differences between consecutive fields of ``values`` (axis 0), preceded
        by ``first`` when given, in float64, a block of fields at a time.

        The differences are computed straight into one float64 scratch buffer (no concatenated
        or cast copies of the input); each block of fields is one Chan part, as before."""
        v = np.asarray(values)
        n = len(v) + (first is not None)  # fields in the virtual sequence [first, *values]
        if n < 2:
            return cls()
        field = v.shape[1:]
        size = int(np.prod(field)) if field else 1
        per = max(1, block // max(1, size))
        buf = np.empty((min(per, n - 1), *field), np.float64)
        off = 1 if first is not None else 0  # virtual index j is values[j - off]
        total = cls()
        for k in range(0, n - 1, per):
            m = min(per, n - 1 - k)
            out = buf[:m]
            lo = k
            if off and k == 0:  # the first difference is values[0] - first
                np.subtract(v[:1], np.asarray(first)[None], out=out[:1], dtype=np.float64)
                out, lo = out[1:], 1
            if len(out):
                a, b = lo - off, k + m - off  # differences v[a+1:b+1] - v[a:b]
                np.subtract(v[a + 1:b + 1], v[a:b], out=out, dtype=np.float64)
            total = total.merge(cls._of_scratch(buf[:m]))
        return total

    def merge(self, other: Moments) -> Moments:
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / n
        m2 = self.m2 + other.m2 + delta * delta * self.count * other.count / n
        return Moments(n, mean, m2)

    @property
    def std(self) -> float:
        """Population standard deviation (numpy's default, ddof=0)."""
        return float(np.sqrt(self.m2 / self.count)) if self.count else float("nan")

    def to_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_dict(cls, d: dict) -> Moments:
        return cls(int(d["count"]), float(d["mean"]), float(d["m2"]))


def merge_all(parts: Iterable[Moments]) -> Moments:
    total = Moments()
    for part in parts:
        total = total.merge(part)
    return total


class ClimatologyAccumulator:
    """float64 sums and counts per (day of year, hour) slot, for one variable."""

    def __init__(self, shape: tuple[int, int]):
        self.shape = shape
        self.sums: dict[tuple[int, int], np.ndarray] = {}
        self.counts: dict[tuple[int, int], int] = {}
        self.total = np.zeros(shape, dtype=np.float64)
        self.n = 0

    def add(self, times: np.ndarray, fields: np.ndarray) -> None:
        doy, hour = climatology_slots(times)
        for d, h, f in zip(doy, hour, fields):
            key = (int(d), int(h))
            if key not in self.sums:
                self.sums[key] = np.zeros(self.shape, dtype=np.float64)
                self.counts[key] = 0
            self.sums[key] += f
            self.counts[key] += 1
        self.total += fields.sum(axis=0, dtype=np.float64)
        self.n += len(fields)

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(dayofyear, hour, count, climatology (slots, H, W) float32, time mean (H, W) float32)."""
        keys = sorted(self.sums)
        doy = np.array([k[0] for k in keys], dtype=np.int16)
        hour = np.array([k[1] for k in keys], dtype=np.int8)
        counts = np.array([self.counts[k] for k in keys], dtype=np.int32)
        clim = np.stack([self.sums[k] / self.counts[k] for k in keys]).astype(np.float32) if keys else \
            np.zeros((0, *self.shape), np.float32)
        return doy, hour, counts, clim, (self.total / max(self.n, 1)).astype(np.float32)
