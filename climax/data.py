"""Streaming training data: shards in, normalised forecast batches out.

* ``ShardDataset`` (``climax.dataset``, re-exported here): one preprocessed dataset, raw reads of
  time steps by index, statistics, climatology, time mean.
* ``ForecastLoader``: (x at t, y at t + lead) batches of one split for one rank, in the order of
  ``climax.sampling.ForecastSampler`` (the one home of lead-time sampling), read in the background.
* ``MixedLoader`` (``climax.mixing``, re-exported here): several ``ForecastLoader`` (e.g. five
  CMIP6 datasets) mixed by weight.

How a ``ForecastLoader`` reads (``docs/design.md``, "Training data"): it takes the next k batches of
its epoch's triples (a "super-batch"; k starts at 1 so that the first batch comes quickly, then
doubles up to a memory bound), gathers the unique time steps they need, reads them with one
``read_row_groups`` per shard and column set (inputs need the input variables, targets the output
ones) into one float32 buffer, normalises it in bulk and cuts the batches out of it by indexing,
in the sampler's order. A reader thread decodes the next super-batch while a second thread cuts the
current one into a queue of ``prefetch`` batches, so decoding overlaps the training step (pyarrow and
numpy release the GIL). When the split's needed variables fit in ``cache_mb``, decoded rows are kept
(normalised) and never decoded again: after the first epoch the loader only copies.

When they do not fit, the epoch's order is by default the block shuffle of
``ForecastSampler.block_epoch`` (``shuffle_mode``): each window of a few blocks of contiguous time
is one super-batch, decoded once (its inputs and the targets up to the longest lead past each
block), so each row is decoded about once per epoch instead of about twice with a global shuffle;
a batch that straddles two windows is assembled from both. ``loader.stats`` counts the rows
decoded and the samples yielded.

It stays one module (about 560 lines): ``ForecastLoader`` is one class (about 420 of them) whose
plan, buffers, cache and two threads share its state, and splitting it would pass that state across
modules; ``Batch`` and the queue helpers are the small pieces only it and its callers use.

Imports neither Ray nor ``pipelines``.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

# the dataset's home is climax.dataset; these names stay importable from here
from climax.dataset import ShardDataset, ShardReadError, tensor_column  # noqa: F401
from climax.mixing import MixedLoader  # noqa: F401  (its home is climax.mixing)
from climax.regions import Region
from climax.sampling import ForecastSampler, block_layout, check_history, not_step_multiples

__all__ = ["ShardDataset", "ShardReadError", "Batch", "ForecastLoader", "MixedLoader"]

_F32 = np.float32


# ----------------------------------------------------------------------------- batches
@dataclass
class Batch:
    x: torch.Tensor  # (B, len(in_vars), H, W) float32, normalised; (B, T, len(in_vars), H, W) with T history steps
    y: torch.Tensor  # (B, len(out_vars), H, W) float32, normalised
    lead_hours: torch.Tensor  # (B,) float32
    in_vars: list[str]
    out_vars: list[str]
    input_time: np.ndarray  # (B,) datetime64[ns]
    dataset: str
    #: rollout finetuning (``rollout_steps`` k > 1): the targets of steps 2..k, (B, k - 1, len(out_vars), H, W),
    #: at 2 * lead, ..., k * lead (``y`` is step 1's); None otherwise
    y_steps: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.x)

    @property
    def target_time(self) -> np.ndarray:
        return self.input_time + (self.lead_hours.numpy().astype(np.float64) * 3.6e12).astype("timedelta64[ns]")

    def to(self, device, *, non_blocking: bool = True) -> Batch:
        return Batch(self.x.to(device, non_blocking=non_blocking), self.y.to(device, non_blocking=non_blocking),
                     self.lead_hours.to(device, non_blocking=non_blocking), self.in_vars, self.out_vars,
                     self.input_time, self.dataset,
                     None if self.y_steps is None else self.y_steps.to(device, non_blocking=non_blocking))


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event):
    while not stop.is_set():
        try:
            return q.get(timeout=0.05)
        except queue.Empty:
            continue
    return _END


@dataclass
class _Super:
    """A decoded super-batch: buffer (V, R, h, w) and where each sample's input/target row lies.

    ``pieces``: (lo, hi, offset, length): samples lo:hi of this super-batch fill rows
    offset:offset + hi - lo of a batch of ``length`` samples (a batch may span super-batches)."""

    buf: np.ndarray
    inp: np.ndarray
    tgt: np.ndarray
    triples: np.ndarray
    pieces: list[tuple[int, int, int, int]]
    more: np.ndarray | None = None  # (n, k - 1) rows of rollout steps 2..k's targets (rollout_steps > 1)


@dataclass
class _Pending:
    """A batch being filled: its arrays and tensors."""

    x_t: torch.Tensor
    x: np.ndarray
    y_t: torch.Tensor
    y: np.ndarray
    lead: np.ndarray
    times: np.ndarray
    ys_t: torch.Tensor | None = None  # rollout steps 2..k's targets
    ys: np.ndarray | None = None


class ForecastLoader:
    """Normalised (x at t, y at t + lead) batches of one split for one rank, streamed from shards.

    Args:
        dataset, split: where the data come from.
        in_vars: input variables (time-varying and constants, in the model's order);
        out_vars: output variables (time-varying only).
        leads, random_lead, seed: passed to ``ForecastSampler`` (leads in hours, multiples of the
            data's step).
        batch_size, drop_last: batches of an epoch; the last partial one is kept unless drop_last.
        rank, world_size: this worker's disjoint part of each epoch.
        shuffle: True: the sampler's seeded permutation; False (evaluation): time order (every
            (input, lead) pair, or with random_lead one draw per input), split into contiguous
            blocks among ranks (every pair once; block sizes may differ by one).
        region: crop x and y (and constants) to a ``climax.regions.Region``.
        prefetch: batches kept ready by the background threads.
        max_batches: stop an epoch after this many batches.
        cache_mb: keep decoded (normalised) rows when the split's needed variables fit in this many
            MiB (0: never); rows are then decoded once per loader, not once per epoch.
        superbatch_mb: bound of one super-batch's decode buffer (global shuffle).
        pin_memory: allocate batches in page-locked memory (for ``Batch.to(cuda, non_blocking)``).
        shuffle_mode: order of a shuffled epoch: "global" (``ForecastSampler.epoch``: any sample
            beside any other; about two rows decoded per sample when rows are not resident),
            "block" (``ForecastSampler.block_epoch``: windows of blocks of contiguous time, each
            row decoded about once per epoch) or "auto" (default): global when the split's rows
            fit ``cache_mb`` (decoded once per run anyway), block otherwise.
        block_steps, window_blocks: the block shuffle's block length in time steps (None: the
            shortest whose halo of targets past the block costs at most 0.1 rows per sample, about
            4x the longest lead with random leads, see ``climax.sampling.block_layout``) and the
            most blocks per window (windows ramp up 1, 2, 4, ... blocks at the start of an epoch).
        window_mb: bound of one window's decoded rows (block shuffle); two windows are held at a
            time (one being cut into batches, the next being decoded).
        decode_threads: shards of a super-batch or window decoded side by side.
        rollout_steps: k > 1 (rollout finetuning, one fixed lead L, ``random_lead`` false): each
            sample also carries the targets at 2L, ..., kL (``Batch.y_steps``); only inputs whose k
            targets all exist are samples.
        history: input times in hours relative to each input time (``data.history_hours``: <= 0,
            oldest first, ending at 0, multiples of the data's step). Default [0]: x is (B, V, H, W)
            as always; with T > 1 steps x is (B, T, V, H, W) and only inputs whose every history
            step is on the split's time axis are sampled.
    """

    def __init__(self, dataset: ShardDataset, split: str, in_vars: Sequence[str], out_vars: Sequence[str],
                 leads: Sequence[float], *, random_lead: bool, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, drop_last: bool = True, region: Region | None = None,
                 prefetch: int = 2, max_batches: int | None = None, cache_mb: float = 1024.0,
                 superbatch_mb: float = 256.0, pin_memory: bool = False, shuffle_mode: str = "auto",
                 block_steps: int | None = None, window_blocks: int = 4, window_mb: float = 4096.0,
                 decode_threads: int | None = None, rollout_steps: int = 1, history: Sequence[float] = (0.0,)):
        self.dataset, self.split = dataset, split
        self.in_vars, self.out_vars = list(in_vars), list(out_vars)
        if not self.in_vars or not self.out_vars:
            raise ValueError("in_vars and out_vars must each name at least one variable")
        dataset.check_variables(self.in_vars, "input variable")
        dataset.check_variables(self.out_vars, "output variable")
        consts = set(dataset.constants)
        bad = [v for v in self.out_vars if v in consts]
        if bad:
            raise ValueError(f"output variable(s) {bad} of dataset {dataset.name!r} are constants (time-free): a "
                             f"forecast target must vary in time; its time-varying variables are {dataset.variables}")
        if batch_size < 1 or prefetch < 1:
            raise ValueError(f"batch_size and prefetch must be >= 1, got {batch_size}, {prefetch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        leads = np.asarray(leads, dtype=np.float64)
        off = leads[(leads <= 0) | np.isin(leads, not_step_multiples(leads, dataset.step_hours))]
        if len(leads) == 0 or len(off):
            raise ValueError(f"lead times {off.tolist() or leads.tolist()} h of dataset {dataset.name!r}: leads "
                             f"must be positive multiples of its {dataset.step_hours} h step")
        if region is not None and tuple(region.grid_shape) != dataset.shape:
            raise ValueError(f"region {region.name!r} is for a {region.grid_shape} grid, dataset {dataset.name!r} "
                             f"has {dataset.shape}")
        rollout_steps = int(rollout_steps)
        if rollout_steps < 1:
            raise ValueError(f"rollout_steps must be >= 1, got {rollout_steps}")
        if rollout_steps > 1 and (random_lead or len(leads) != 1):
            raise ValueError(f"rollout_steps={rollout_steps} needs one fixed lead (random_lead false, one lead); got "
                             f"random_lead={bool(random_lead)}, leads {leads.tolist()} h")
        self.rollout_steps = rollout_steps
        self.leads, self.random_lead, self.seed = leads, bool(random_lead), seed
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.shuffle, self.drop_last, self.region = shuffle, drop_last, region
        self.prefetch, self.max_batches, self.pin_memory = int(prefetch), max_batches, pin_memory
        self.history = check_history(history, dataset.step_hours,
                                     f"history_hours {list(history)} (dataset {dataset.name!r})")
        self.axis = dataset.axis(split)
        self.sampler = ForecastSampler(self.axis, leads, random_lead=random_lead, seed=seed,
                                       rollout_steps=rollout_steps, history=self.history)
        #: (input, lead) pairs of the split that a gap removes (their input or target step is missing)
        self.skipped = self.sampler.skipped
        self.epoch = 0

        # variables: time-varying ones decoded into buffer slots; constants broadcast
        self.tv_vars = list(dict.fromkeys([v for v in self.in_vars if v not in consts] + self.out_vars))
        self._slot = {v: i for i, v in enumerate(self.tv_vars)}
        self._in_tv = [v for v in dict.fromkeys(self.in_vars) if v not in consts]
        mean, std = dataset.normalizer(self.tv_vars)
        self._mean, self._inv_std = mean, (1.0 / std.astype(np.float64)).astype(_F32)
        self.shape = region.shape if region is not None else dataset.shape
        self._const: dict[str, np.ndarray] = {}
        for v in dict.fromkeys(v for v in self.in_vars if v in consts):
            m, s = dataset.normalizer([v])
            self._const[v] = self._crop((dataset.constant_fields()[v] - m[0]) / s[0]).astype(_F32)
        # column sets by need: 1 = input row, 2 = target row, 3 = both
        self._cols = {1: self._in_tv, 2: self.out_vars,
                      3: list(dict.fromkeys(self._in_tv + self.out_vars))}
        # what reading a column set provides: reading the inputs' columns covers the targets' too
        # when the outputs are among the inputs
        self._provides = {c: np.uint8(sum(b for b in (1, 2) if set(self._cols[b]) <= set(self._cols[c])))
                          for c in (1, 2, 3)}
        self._row_bytes = len(self.tv_vars) * self.shape[0] * self.shape[1] * 4
        self.superbatch_mb = superbatch_mb
        resident = cache_mb > 0 and self._row_bytes * len(self.axis) <= cache_mb * 2**20
        self._store: np.ndarray | None = None
        self._loaded: np.ndarray | None = None
        self.resident = resident
        self._store_lock = threading.Lock()
        if shuffle_mode not in ("auto", "global", "block"):
            raise ValueError(f"shuffle_mode must be auto, global or block, got {shuffle_mode!r}")
        self.shuffle_mode = ("global" if resident else "block") if shuffle_mode == "auto" else shuffle_mode
        # random leads: about 0.37 of the halo rows are targets (docs/design.md, "Block shuffle")
        # the history rows before a block widen its halo (by the oldest offset, in steps)
        hist_steps = int(round(-self.history[0] / dataset.step_hours))
        self.block_steps, self.window_blocks = block_layout(
            self.sampler.halo_steps + hist_steps, window_mb * 2**20 / self._row_bytes, block_steps, window_blocks,
            halo_used=0.4 if self.random_lead else 1.0,
            samples_per_step=1.0 if self.random_lead else float(len(self.leads)))
        self._counts = {"rows_decoded": 0, "bytes_decoded": 0, "samples": 0}
        self._count_lock = threading.Lock()
        self.decode_threads = max(1, int(decode_threads if decode_threads is not None else min(4, os.cpu_count() or 1)))

    # -- sizes and order
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def stats(self) -> dict[str, float]:
        """Counters since construction (or ``reset_stats``): time steps decoded from shards
        (``rows_decoded``; a step read again by a later super-batch or window counts again, a step
        read for targets only counts as one), float32 bytes decoded, samples yielded, and
        ``rows_per_sample``."""
        c = dict(self._counts)
        c["rows_per_sample"] = c["rows_decoded"] / c["samples"] if c["samples"] else float("nan")
        return c

    def reset_stats(self) -> None:
        self._counts.update(rows_decoded=0, bytes_decoded=0, samples=0)

    @property
    def block_shuffle(self) -> bool:
        return self.shuffle and self.shuffle_mode == "block"

    def _num_samples(self) -> int:
        if self.shuffle:
            total = int(self.sampler.valid.any(axis=1).sum()) if self.random_lead else int(self.sampler.valid.sum())
            return total // self.world_size
        total = int(self.sampler.valid.any(axis=1).sum()) if self.random_lead else int(self.sampler.valid.sum())
        return len(np.array_split(np.arange(total), self.world_size)[self.rank])

    def _num_batches(self, n: int) -> int:
        nb = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return nb if self.max_batches is None else min(nb, int(self.max_batches))

    def __len__(self) -> int:
        return self._num_batches(self._num_samples())

    def report(self) -> str:
        """One line: the split's pairs, and those skipped because a time step they need is missing."""
        pairs = int(self.sampler.valid.sum())
        gaps = (f"; {self.skipped} skipped: their input or target time is missing (calendar or data gaps)"
                if self.skipped else "")
        return (f"dataset {self.dataset.name} split {self.split}: {len(self.axis)} time steps, {pairs} (input, lead) "
                f"pairs{gaps}")

    def triples(self, epoch: int | None = None) -> np.ndarray:
        """This rank's (input index, target index, lead hours) triples of an epoch, in batch order."""
        return self._order(self.epoch if epoch is None else epoch)[0]

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(triples in batch order, window starts of a block shuffle or None)."""
        if self.block_shuffle:
            return self.sampler.block_epoch(epoch, self.rank, self.world_size, self.block_steps, self.window_blocks)
        if self.shuffle:
            return self.sampler.epoch(epoch, self.rank, self.world_size), None
        if self.random_lead:
            t = self.sampler.epoch(epoch, 0, 1)
            t = t[np.lexsort((t[:, 2], t[:, 0]))]
        else:
            t = self.sampler.all_pairs()
        return np.array_split(t, self.world_size)[self.rank], None

    def _crop(self, a: np.ndarray) -> np.ndarray:
        return a if self.region is None else self.region.crop(a)

    # -- reading
    def _load(self, triples: np.ndarray, pieces: list[tuple[int, int, int, int]]) -> _Super:
        """Decode and normalise the unique rows a super-batch needs."""
        inp = triples[:, 0].astype(np.int64)
        if len(self.history) > 1:  # (n, T) rows of every history step (the last is the input itself)
            inp = self.sampler.history_rows[inp]
        tgt = triples[:, 1].astype(np.int64)
        # rollout finetuning: the targets of steps 2..k are target rows too
        more = self.sampler.rollout_targets(triples)[:, 1:].astype(np.int64) if self.rollout_steps > 1 else None
        rows = np.concatenate([inp.reshape(-1), tgt] if more is None else [inp.reshape(-1), tgt, more.reshape(-1)])
        uniq, inv = np.unique(rows, return_inverse=True)
        need = np.zeros(len(uniq), np.uint8)
        if self._in_tv:  # inputs made of constants only need no row
            np.bitwise_or.at(need, inv[:inp.size], 1)
        np.bitwise_or.at(need, inv[inp.size:], 2)
        if self._cols[1] == self._cols[2]:
            need[:] = 3
        resident = self.resident
        if resident:
            with self._store_lock:
                if self._store is None:
                    # anonymous mmap, not np.empty: numpy asks for huge pages on large arrays, and the
                    # first rows written would then fault in (and zero) most of the store at once;
                    # with 4 KiB pages memory is touched only as rows are loaded
                    shape = (len(self.tv_vars), len(self.axis), *self.shape)
                    self._store = np.frombuffer(mmap.mmap(-1, max(1, 4 * int(np.prod(shape)))),
                                                dtype=_F32, count=int(np.prod(shape))).reshape(shape)
                    self._loaded = np.zeros(len(self.axis), np.uint8)
            missing = need & ~self._loaded[uniq]
            todo = np.flatnonzero(missing)
            buf = self._store
        else:
            missing = need
            todo = np.flatnonzero(missing)
            buf = np.empty((len(self.tv_vars), len(uniq), *self.shape), _F32)
        # groups of rows with the same shard and column set; buffer rows follow the group order
        shard = self.axis.shard[uniq[todo]]
        order = np.lexsort((uniq[todo], missing[todo], shard))
        todo, shard = todo[order], shard[order]
        code = missing[todo]
        pos = np.empty(len(uniq), np.int64)
        if len(todo):
            cut = np.flatnonzero((np.diff(shard) != 0) | (np.diff(code) != 0)) + 1
            full = self.dataset.shape[0] * self.dataset.shape[1] * 4
            lo_hi = []
            for lo, hi in zip(np.r_[0, cut], np.r_[cut, len(todo)]):
                # reads of at most ~64 MiB: a window of large rows is not decoded into one Arrow table
                step = max(1, int(64 * 2**20 // (len(self._cols[int(code[lo])]) * full)))
                lo_hi += [(a, min(a + step, hi)) for a in range(lo, hi, step)]
            def read(lo: int, hi: int, *, use_threads: bool) -> None:
                sel = todo[lo:hi]
                cols = self._cols[int(code[lo])]
                table = self.dataset._read_table(self.split, int(shard[lo]), self.axis.row[uniq[sel]], cols,
                                                 use_threads=use_threads)
                with self._count_lock:
                    self._counts["rows_decoded"] += len(sel)
                    self._counts["bytes_decoded"] += len(sel) * len(cols) * full
                if resident:
                    r = uniq[sel]
                    # a run of consecutive steps (often: a whole shard) is written in place
                    dest = slice(int(r[0]), int(r[-1]) + 1) if r[-1] - r[0] == len(r) - 1 else r
                else:
                    dest = slice(lo, hi)
                tmp = None
                for v in cols:
                    j = self._slot[v]
                    a = self._crop(tensor_column(table, v))
                    if isinstance(dest, slice):
                        np.subtract(a, self._mean[j], out=buf[j, dest])
                        buf[j, dest] *= self._inv_std[j]
                    else:
                        tmp = np.subtract(a, self._mean[j], out=tmp)
                        tmp *= self._inv_std[j]
                        buf[j, dest] = tmp
                if resident:
                    with self._store_lock:
                        self._loaded[uniq[sel]] |= self._provides[int(code[lo])]

            if len(lo_hi) > 1 and self.decode_threads > 1:
                # several reads (shards) decoded side by side, each on one thread: pyarrow's own
                # column parallelism costs ~20 % more CPU per row (measured on 2 cores) for small
                # column chunks; a lone read still uses it
                with ThreadPoolExecutor(min(self.decode_threads, len(lo_hi)), "climax-decode") as pool:
                    for f in [pool.submit(read, lo, hi, use_threads=False) for lo, hi in lo_hi]:
                        f.result()
            else:
                for lo, hi in lo_hi:
                    read(lo, hi, use_threads=True)
            pos[todo] = np.arange(len(todo))
        if resident:
            return _Super(buf, inp, tgt, triples, pieces, more)
        at = pos[inv]
        n_in, n = inp.size, len(tgt)
        return _Super(buf, at[:n_in].reshape(inp.shape), at[n_in:n_in + n], triples, pieces,
                      None if more is None else at[n_in + n:].reshape(more.shape))

    def _empty(self, n: int, v: int, steps: int = 1) -> tuple[torch.Tensor, np.ndarray]:
        shape = (n, v, *self.shape) if steps == 1 else (n, steps, v, *self.shape)
        if self.pin_memory:
            t = torch.empty(shape, dtype=torch.float32, pin_memory=True)
            return t, t.numpy()
        # from Arrow's pool (mimalloc), which keeps freed pages: batch after batch reuses the same
        # memory instead of page-faulting fresh pages in (measured: up to 5x faster cutting)
        a = np.frombuffer(pa.allocate_buffer(4 * int(np.prod(shape))), dtype=_F32).reshape(shape)
        return torch.from_numpy(a), a

    def _pending(self, n: int) -> _Pending:
        x_t, x = self._empty(n, len(self.in_vars), len(self.history))
        y_t, y = self._empty(n, len(self.out_vars))
        p = _Pending(x_t, x, y_t, y, np.empty(n, _F32), np.empty(n, "datetime64[ns]"))
        if self.rollout_steps > 1:
            ys_t, ys = self._empty(n, (self.rollout_steps - 1) * len(self.out_vars))
            p.ys_t = ys_t.view(n, self.rollout_steps - 1, len(self.out_vars), *self.shape)
            p.ys = ys.reshape(n, self.rollout_steps - 1, len(self.out_vars), *self.shape)
        return p

    def _fill(self, sb: _Super, lo: int, hi: int, p: _Pending, off: int) -> None:
        """Samples lo:hi of a super-batch into rows off:off + hi - lo of a pending batch."""
        xi, yi = sb.inp[lo:hi], sb.tgt[lo:hi]
        rows = slice(off, off + hi - lo)
        x, y = p.x[rows], p.y[rows]
        xj = x if xi.ndim == 1 else x.swapaxes(1, 2)  # (n, V, [T,] H, W) views: x[:, j] is one variable
        for j, v in enumerate(self.in_vars):
            xj[:, j] = self._const[v] if v in self._const else sb.buf[self._slot[v]][xi]
        for j, v in enumerate(self.out_vars):
            y[:, j] = sb.buf[self._slot[v]][yi]
        if sb.more is not None:
            ys = p.ys[rows]
            for s in range(sb.more.shape[1]):
                for j, v in enumerate(self.out_vars):
                    ys[:, s, j] = sb.buf[self._slot[v]][sb.more[lo:hi, s]]
        tr = sb.triples[lo:hi]
        p.lead[rows] = tr[:, 2]
        p.times[rows] = self.axis.times[tr[:, 0].astype(np.int64)]

    def _batch(self, p: _Pending) -> Batch:
        return Batch(p.x_t, p.y_t, torch.from_numpy(p.lead), self.in_vars, self.out_vars, p.times, self.dataset.name,
                     p.ys_t)

    def _plan(self, n: int, start: int, end: int, windows: np.ndarray | None) -> list[tuple[int, int]]:
        """Super-batches as sample ranges covering start:end. Global shuffle: 1, 2, 4, ... batches
        up to the memory bound (the first batch comes quickly). Block shuffle: the windows."""
        B = self.batch_size
        if windows is not None:
            return [(max(a, start), min(b, end)) for a, b in zip(windows[:-1], windows[1:])
                    if min(b, end) > max(a, start)]
        batch_bytes = (len(self.history) + self.rollout_steps) * B * self._row_bytes
        cap = max(1, int(self.superbatch_mb * 2**20 // batch_bytes))
        plan, s, k = [], start, 1
        while s < end:
            plan.append((s, min(end, s + k * B)))
            s, k = s + k * B, min(cap, 2 * k)
        return plan

    def _pieces(self, s0: int, s1: int, end: int) -> list[tuple[int, int, int, int]]:
        """The (lo, hi, offset, length) of the batches (of ``batch_size``; the last ends at
        ``end``) that samples s0:s1 of the epoch fill, lo and hi relative to s0."""
        B, out = self.batch_size, []
        for b in range(s0 // B, -(-s1 // B)):
            lo, hi = max(s0, b * B), min(s1, (b + 1) * B)
            out.append((lo - s0, hi - s0, lo - b * B, min((b + 1) * B, end) - b * B))
        return out

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from batch ``start_batch`` on (resuming mid-epoch costs nothing)."""
        triples, windows = self._order(epoch)
        n, B = len(triples), self.batch_size
        nb = self._num_batches(n)
        end = min(n, nb * B)
        plan = self._plan(n, min(start_batch * B, end), end, windows)
        stop = threading.Event()
        sb_q: queue.Queue = queue.Queue(maxsize=1)
        out_q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        # block shuffle: at most two windows decoded at a time (the one being cut, the next)
        slots = threading.Semaphore(2) if windows is not None else None

        def reader():
            try:
                for s0, s1 in plan:
                    if slots is not None:
                        while not slots.acquire(timeout=0.05):
                            if stop.is_set():
                                return
                    if not _put(sb_q, self._load(triples[s0:s1], self._pieces(s0, s1, end)), stop):
                        return
                _put(sb_q, _END, stop)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                _put(sb_q, _Failure(exc), stop)

        def cutter():
            try:
                pending = None
                while True:
                    sb = _get(sb_q, stop)
                    if sb is _END or isinstance(sb, _Failure):
                        _put(out_q, sb, stop)
                        return
                    for lo, hi, off, length in sb.pieces:
                        if off == 0:
                            pending = self._pending(length)
                        self._fill(sb, lo, hi, pending, off)
                        if off + hi - lo == length and not _put(out_q, self._batch(pending), stop):
                            return
                    del sb
                    if slots is not None:
                        slots.release()
            except BaseException as exc:  # noqa: BLE001
                _put(out_q, _Failure(exc), stop)

        threads = [threading.Thread(target=f, name=f"climax-loader-{f.__name__}", daemon=True)
                   for f in (reader, cutter)]
        for t in threads:
            t.start()
        try:
            while True:
                item = out_q.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                self._counts["samples"] += len(item)
                yield item
        finally:
            stop.set()  # the threads see it within 50 ms of their next step and exit

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate(self.epoch)
