"""Forecast sampling: which (input time, target time, lead time) triples a training epoch visits.

One home for the lead-time sampling. Pretraining draws, for every input time, a lead time uniformly
among the configured leads (default 6 h to 168 h in steps of the data's time step) whose target
exists in the split; finetuning uses fixed lead times, every (input, lead) pair once per epoch.
Pairs are formed on the split's whole time axis, so none is lost at shard edges. Each epoch visits
the same kind of sample set in one of two orders, both seeded by (seed, epoch), each worker taking a
disjoint, equally long part:

* ``epoch``: a global shuffle (any sample next to any other; a streaming reader decodes about two
  rows per sample, one for the input and one for the target);
* ``block_epoch``: blocks of contiguous time, permuted and dealt to the workers, samples shuffled
  inside windows of a few blocks; a reader that decodes each window once decodes about one row per
  sample (``docs/design.md``, "Block shuffle").

The time axis is the shards' stored times (``docs/design.md``, "Time axis"): a build cuts shards at
every gap (29 February of a noleap year, the days a 360_day calendar lacks, steps allowed missing by
``time.missing: allow``), so each shard is regular and the manifest's start, end and rows describe
its times exactly; a shard that is not (an older build) has its time column read instead. A pair
exists only when both of its times are on the axis at the exact lead; the pairs a gap removes are
counted (``ForecastSampler.skipped``).

Pure numpy: the reader that turns triples into tensors lives beside the training loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["TimeAxis", "lead_hours", "not_step_multiples", "check_history", "history_rows", "ForecastSampler",
           "block_layout"]


def not_step_multiples(hours: Sequence[float], step_hours: float) -> list[float]:
    """The values of ``hours`` that are not whole multiples of the data's time step (the one check of
    lead times and history offsets against the step)."""
    h = np.asarray(hours, dtype=np.float64)
    return h[np.abs(h / step_hours - np.round(h / step_hours)) > 1e-9].tolist()


@dataclass(frozen=True)
class TimeAxis:
    """The time steps of one split, in order, with the shard and row that hold each."""

    times: np.ndarray  # datetime64[ns], strictly increasing
    shard: np.ndarray  # int, index into the manifest's shard list of the split
    row: np.ndarray  # int, row within that shard

    step: np.timedelta64 | None = None  # the data's time step, when known (gaps are counted against it)

    @classmethod
    def from_manifest(cls, manifest: dict, split: str,
                      read_times: Callable[[str], np.ndarray] | None = None) -> TimeAxis:
        """A split's time axis from the manifest: each shard's ``rows`` steps from ``start`` at the
        data's step, which must end at ``end``. A shard whose times are not regular (an older build
        across a gap) has its stored time column read with ``read_times(path)`` when given."""
        step = np.timedelta64(int(manifest["time"]["step_seconds"]), "s").astype("timedelta64[ns]")
        times, shard, row = [], [], []
        for k, s in enumerate(manifest["splits"][split]["shards"]):
            start = np.datetime64(s["start"], "ns")
            t = start + step * np.arange(s["rows"])
            if t[-1] != np.datetime64(s["end"], "ns"):
                stored = None if read_times is None else np.asarray(read_times(s["path"]), "datetime64[ns]")
                if stored is None or len(stored) != s["rows"] or stored[0] != start or \
                        stored[-1] != np.datetime64(s["end"], "ns"):
                    raise ValueError(f"shard {s['path']}: {s['rows']} rows from {s['start']} at a {step} step do not "
                                     f"end at {s['end']}; the manifest and the shard disagree, rebuild the dataset")
                t = stored
            times.append(t)
            shard.append(np.full(s["rows"], k))
            row.append(np.arange(s["rows"]))
        if not times:
            raise ValueError(f"split {split!r} has no shards")
        axis = cls(np.concatenate(times), np.concatenate(shard), np.concatenate(row), step)
        if np.any(np.diff(axis.times) <= np.timedelta64(0, "ns")):
            raise ValueError(f"split {split!r}: shard times are not strictly increasing")
        return axis

    def __len__(self) -> int:
        return len(self.times)


def lead_hours(min_hours: float, max_hours: float, step_hours: float) -> np.ndarray:
    """Every lead time from ``min_hours`` to ``max_hours`` in steps of the data's time step."""
    if min_hours <= 0 or max_hours < min_hours:
        raise ValueError(f"need 0 < min_hours <= max_hours, got {min_hours}, {max_hours}")
    if not_step_multiples([min_hours, max_hours], step_hours):
        raise ValueError(f"lead times {min_hours}..{max_hours} h are not multiples of the data's "
                         f"{step_hours} h step")
    return np.arange(min_hours, max_hours + step_hours / 2, step_hours)


def check_history(hours: Sequence[float] | None, step_hours: float | None = None,
                  what: str = "history_hours") -> list[float]:
    """History input times in hours relative to the initial time: each <= 0, strictly increasing (so
    unique and sorted, oldest first), ending at 0, and with ``step_hours`` multiples of the data's time
    step. None means [0] (one input time). Raises ValueError naming ``what``."""
    if hours is None:
        return [0.0]
    h = [float(x) for x in hours]
    if not h or h[-1] != 0 or any(x > 0 for x in h) or any(b <= a for a, b in zip(h, h[1:])):
        raise ValueError(f"{what} {h}: give input times in hours relative to the initial time, each <= 0, sorted "
                         "oldest first, without repeats, ending at 0 (e.g. [-12, -6, 0]; [0] is one input time)")
    if step_hours is not None:
        off = not_step_multiples(h, step_hours)
        if off:
            raise ValueError(f"{what}: {off} h are not multiples of the data's {step_hours:g} h time step")
    return h


def history_rows(times: np.ndarray, history: Sequence[float], rows: np.ndarray | None = None) -> np.ndarray:
    """(n, T) rows of ``times`` at each history offset (hours, <= 0) of ``rows`` (default: every row);
    -1 where that time is not on the axis (before its start, or in a gap)."""
    t = np.asarray(times, dtype="datetime64[ns]").astype(np.int64)
    rows = np.arange(len(t)) if rows is None else np.asarray(rows, dtype=np.int64)
    want = t[rows][:, None] + np.round(np.asarray(history, dtype=np.float64) * 3.6e12).astype(np.int64)[None, :]
    pos = np.searchsorted(t, want)
    pos_c = np.minimum(pos, len(t) - 1)
    return np.where((pos < len(t)) & (t[pos_c] == want), pos_c, -1)


def block_layout(halo_steps: int, max_rows: float, block_steps: int | None = None, window_blocks: int = 4,
                 halo_used: float = 1.0, samples_per_step: float = 1.0, overhead: float = 0.1) -> tuple[int, int]:
    """(block_steps, window_blocks) of a block shuffle whose window holds at most ``max_rows`` rows.

    A window of W blocks of L steps decodes at most W * (L + halo) rows, where the halo is the
    longest lead in steps (the targets past each block). Of a block's halo, ``halo_used`` is the
    share that are targets (all of them with a fixed lead; about 0.37 with a random lead per input
    among leads every step up to the halo), and each step gives ``samples_per_step`` samples (one
    per lead with fixed leads). Auto (``block_steps=None``): the shortest L (at least 16) whose
    halo costs at most ``overhead`` extra rows per sample; then as many of the ``window_blocks``
    as fit the budget, then shorter blocks when even one does not fit.
    """
    halo = max(int(halo_steps), 0)
    if window_blocks < 1:
        raise ValueError(f"window_blocks must be >= 1, got {window_blocks}")
    if block_steps is not None:
        if block_steps < 1:
            raise ValueError(f"block_steps must be >= 1, got {block_steps}")
        return int(block_steps), int(window_blocks)
    rows = max(int(max_rows), 1)
    L = max(16, int(np.ceil(halo * halo_used / (overhead * samples_per_step))))
    W = min(int(window_blocks), rows // (L + halo))
    if W >= 1:
        return L, W
    return max(rows - halo, 1), 1


class ForecastSampler:
    """Triples (input index, target index, lead hours) on a ``TimeAxis``.

    Args:
        axis: the split's time axis.
        leads: candidate lead times in hours.
        random_lead: True (pretraining): one lead per input time, drawn uniformly among the leads
            whose target exists; False (finetuning): every (input, lead) pair.
        seed: the same seed gives the same epochs.
        rollout_steps: k > 1 (rollout finetuning, one fixed lead L): a pair exists only where the
            targets at L, 2L, ..., kL all exist; ``target`` is the first (at L), ``rollout_target``
            (inputs, leads, k) holds all k (-1 where missing).
        history: input times in hours relative to the input time (<= 0, oldest first, ending at 0;
            ``climax.model.check_history``); an input exists only where every one of them is on
            the axis. ``history_rows`` (inputs, T) gives their rows.
    """

    def __init__(self, axis: TimeAxis, leads: Sequence[float], *, random_lead: bool = True, seed: int = 0,
                 rollout_steps: int = 1, history: Sequence[float] = (0.0,)):
        self.axis, self.random_lead, self.seed = axis, random_lead, seed
        self.leads = np.asarray(leads, dtype=np.float64)
        self.history = np.asarray(history, dtype=np.float64)
        self.rollout_steps = k = int(rollout_steps)
        if k < 1:
            raise ValueError(f"rollout_steps must be >= 1, got {rollout_steps}")
        t = axis.times.astype(np.int64)
        lead_ns = (self.leads * 3.6e12).astype(np.int64)
        # (inputs, leads, k): the target time steps L, 2L, ..., kL after each input
        target_times = t[:, None, None] + lead_ns[None, :, None] * np.arange(1, k + 1)[None, None, :]
        pos = np.searchsorted(t, target_times)
        pos_c = np.minimum(pos, len(t) - 1)
        found = (pos < len(t)) & (t[pos_c] == target_times)
        self.valid = found.all(axis=2)  # (inputs, leads): every step's target exists
        #: (inputs, T) rows of each input's history steps (-1: not on the axis; then no pair)
        self.history_rows = history_rows(axis.times, self.history)
        if len(self.history) > 1:
            self.valid &= (self.history_rows >= 0).all(axis=1)[:, None]
        self.rollout_target = np.where(self.valid[..., None], pos_c, -1)
        self.target = self.rollout_target[..., 0]
        if not self.valid.any():
            extra = f" with history {self.history.tolist()} h" if len(self.history) > 1 else ""
            raise ValueError(f"no lead time in {self.leads.tolist()} h fits inside the split's "
                             f"{len(t)} time steps{extra}; use shorter leads or a longer split")
        #: (input, lead) pairs inside the split's span that a gap removes: the input, a history step or
        #: the target time is missing (a model calendar's absent days, or steps a build allowed missing)
        self.skipped = 0
        if axis.step is not None and len(t):
            step = int(np.timedelta64(axis.step, "ns").astype(np.int64))
            span = t[-1] - t[0] + int(np.round(self.history.min() * 3.6e12))  # history before the first input
            reach = lead_ns * k  # the furthest target a pair needs
            regular = np.where(reach <= span, (span - reach) // step + 1, 0)
            self.skipped = int(max(0, regular.sum() - self.valid.sum()))

    def all_pairs(self) -> np.ndarray:
        """Every valid (input, target, lead) triple, (n, 3) float64."""
        i, k = np.nonzero(self.valid)
        return np.stack([i, self.target[i, k], self.leads[k]], axis=1)

    def rollout_targets(self, triples: np.ndarray) -> np.ndarray:
        """(n, k) target indices of the k rollout steps of each (input, target, lead) triple."""
        inputs = triples[:, 0].astype(np.int64)
        k = np.argmax(np.isclose(triples[:, 2:3], self.leads[None, :]), axis=1)
        return self.rollout_target[inputs, k]

    @property
    def halo_steps(self) -> int:
        """The longest valid lead in time steps (index distance from input to its furthest target,
        the last rollout step's)."""
        i, k = np.nonzero(self.valid)
        return int((self.rollout_target[i, k, -1] - i).max())

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        """The epoch's samples, sorted by input then lead: one random lead per input, or every pair."""
        if self.random_lead:
            inputs = np.flatnonzero(self.valid.any(axis=1))
            # a uniform choice among each input's valid leads: random keys, masked, argmax
            keys = rng.random((len(inputs), len(self.leads)))
            k = np.argmax(np.where(self.valid[inputs], keys, -1.0), axis=1)
            return np.stack([inputs, self.target[inputs, k], self.leads[k]], axis=1)
        return self.all_pairs()

    def epoch(self, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """This worker's triples for ``epoch``: (n, 3) with columns input, target, lead hours.

        Every worker gets the same number of samples (DDP steps in lockstep); the few left over
        by the division are dropped for this epoch and come back in another order next epoch.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        rng = np.random.default_rng([self.seed, epoch])
        triples = self._draw(rng)
        triples = triples[rng.permutation(len(triples))]
        per_worker = len(triples) // world_size
        return triples[rank * per_worker:(rank + 1) * per_worker]

    def block_epoch(self, epoch: int, rank: int = 0, world_size: int = 1, block_steps: int = 112,
                    window_blocks: int = 4) -> tuple[np.ndarray, np.ndarray]:
        """This worker's triples for ``epoch`` in block-shuffle order, and where its windows start.

        The samples are those of ``epoch`` (one lead per input drawn the same way, or every pair);
        only their order differs:

        1. the time axis is cut into blocks of ``block_steps`` inputs, the grid shifted by a random
           offset each epoch (block edges move between epochs);
        2. the blocks are put in a seeded random order and their samples (in time order within a
           block) concatenated; worker r takes the r-th of ``world_size`` equal slices (a block at
           a slice edge is shared by two workers; the remainder is dropped, as in ``epoch``);
        3. the worker's (parts of) blocks are grouped into windows of 1, 2, 4, ... blocks up to
           ``window_blocks`` (a reader's first batch of an epoch waits for one block, not for a
           whole window), and the samples of each window are shuffled.

        A window's rows are its blocks' inputs plus their targets, which lie at most
        ``halo_steps`` past each block: a reader that holds one window decodes each row about once.

        Returns ``(triples, starts)``: triples (n, 3) as ``epoch``; ``starts`` the index in
        ``triples`` where each window begins, with n appended.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if block_steps < 1 or window_blocks < 1:
            raise ValueError(f"block_steps and window_blocks must be >= 1, got {block_steps}, {window_blocks}")
        rng = np.random.default_rng([self.seed, epoch])
        triples = self._draw(rng)
        n = len(triples)
        offset = int(rng.integers(0, block_steps))
        block = (triples[:, 0].astype(np.int64) + offset) // block_steps
        nblocks = int(block.max()) + 1 if n else 0
        place = np.empty(nblocks, np.int64)
        place[rng.permutation(nblocks)] = np.arange(nblocks)  # where each block goes in the epoch
        keys = rng.random(n)  # the shuffle inside windows, drawn for all samples so ranks agree
        order = np.argsort(place[block], kind="stable")  # blocks permuted, time order within each
        per_worker = n // world_size
        mine = order[rank * per_worker:(rank + 1) * per_worker]
        if not len(mine):
            return triples[:0], np.zeros(1, np.int64)
        b = place[block[mine]]
        ordinal = np.cumsum(np.r_[0, np.diff(b) != 0])  # 0, 0, ..., 1, 1, ...: blocks of this worker
        sizes = [1]
        while sum(sizes) <= ordinal[-1]:
            sizes.append(min(2 * sizes[-1], window_blocks))
        window = np.searchsorted(np.cumsum(np.minimum(sizes, window_blocks)), ordinal, side="right")
        mine = mine[np.lexsort((keys[mine], window))]
        starts = np.r_[0, np.flatnonzero(np.diff(window)) + 1, len(mine)]
        return triples[mine], starts.astype(np.int64)
