"""Streaming training data: shards in, normalised forecast batches out.

* ``ShardDataset``: one preprocessed dataset (``manifest.json`` + shards, a local folder or
  ``s3://bucket/prefix``): raw reads of time steps by index, statistics, climatology, time mean.
* ``ForecastLoader``: (x at t, y at t + lead) batches of one split for one rank, in the order of
  ``climax.sampling.ForecastSampler`` (the one home of lead-time sampling), read in the background.
* ``MixedLoader``: several ``ForecastLoader`` (e.g. five CMIP6 datasets) mixed by weight.

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

Shards are opened lazily (an LRU of open ``ParquetFile`` objects, their parsed footers cached), so
the first batch does not wait for every shard's footer.

Imports neither Ray nor ``pipelines``.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from climax import shards as S
from climax.regions import Region
from climax.sampling import ForecastSampler, TimeAxis, block_layout

__all__ = ["ShardDataset", "ShardReadError", "Batch", "ForecastLoader", "MixedLoader"]

_F32 = np.float32


# ----------------------------------------------------------------------------- storage
def _split_endpoint(url: str) -> tuple[str, str]:
    """'http://host:port' -> ('host:port', 'http')."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return rest.rstrip("/"), scheme
    return url.rstrip("/"), "https"


_S3_KEYS = {"key", "secret", "token", "anon", "endpoint_url", "client_kwargs", "region", "use_ssl"}


def _s3_filesystem(opts: dict) -> pafs.FileSystem | None:
    """pyarrow's native S3 from s3fs-style storage_options; None when an option has no mapping."""
    ck = dict(opts.get("client_kwargs") or {})
    if set(opts) - _S3_KEYS or set(ck) - {"endpoint_url", "region_name"}:
        return None
    kw: dict[str, Any] = {}
    endpoint = opts.get("endpoint_url") or ck.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        kw["endpoint_override"], kw["scheme"] = _split_endpoint(endpoint)
    if opts.get("anon"):
        kw["anonymous"] = True
    else:
        if opts.get("key") is not None:
            kw["access_key"], kw["secret_key"] = opts.get("key"), opts.get("secret")
        if opts.get("token") is not None:
            kw["session_token"] = opts["token"]
    region = opts.get("region") or ck.get("region_name")
    if region:
        kw["region"] = region
    elif endpoint:
        kw["region"] = "us-east-1"  # a custom endpoint: no region lookup
    return pafs.S3FileSystem(**kw)


def _filesystem(root: str, storage_options: dict | None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, base path) for a local folder or URL."""
    if "://" not in root or root.startswith("file://"):
        path = root[len("file://"):] if root.startswith("file://") else root
        return pafs.LocalFileSystem(), os.path.abspath(path)
    proto, rest = root.split("://", 1)
    opts = dict(storage_options or {})
    if proto in ("s3", "s3a"):
        fs = _s3_filesystem(opts)
        if fs is not None:
            return fs, rest.rstrip("/")
    import fsspec  # any other protocol, or s3 options pyarrow does not know: through fsspec

    return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(proto, **opts))), rest.rstrip("/")


def tensor_column(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if not isinstance(col, pa.FixedShapeTensorArray):
        raise TypeError(f"column {name!r} is {col.type}, not a fixed_shape_tensor; is this a ClimaX shard?")
    return col.to_numpy_ndarray()


# ----------------------------------------------------------------------------- dataset
ShardReadError = S.ShardReadError  # a shard that does not decode or is not the manifest's: not retried


#: pyarrow's words for a file that is not what its footer says (network errors are OSErrors too: those retry)
_CORRUPTION = ("deserializ", "corrupt", "magic bytes", "unexpected end of", "decompress", "snappy", "zstd",
               "page header", "out of bounds", "truncated", "malformed")


def is_corruption(exc: BaseException) -> bool:
    """Whether a pyarrow error says the file's bytes are bad (rather than the path or the network)."""
    if isinstance(exc, FileNotFoundError):
        return False
    if isinstance(exc, pa.ArrowInvalid):
        return True
    text = str(exc).lower()
    return isinstance(exc, OSError) and any(w in text for w in _CORRUPTION)


class ShardDataset:
    """One preprocessed dataset: manifest + shards, local path or s3://bucket/prefix.

    Args:
        root: the build's output folder or URL (holding ``manifest.json``).
        storage_options: s3fs-style options for object storage (``key``, ``secret``, ``token``,
            ``anon``, ``endpoint_url`` or ``client_kwargs={"endpoint_url": ..., "region_name": ...}``);
            ``AWS_ENDPOINT_URL`` is honoured. Read through pyarrow's S3 client, or fsspec for other
            protocols and options.
        name: a label for batches and messages (default: the root's last path component).
        max_open_files: bound of the LRU of open shards (parsed footers are kept apart, so reopening
            costs no footer parse).
        verify: also check each file's sha256 against the manifest's, once per file per process
            (one extra read of it). The row count of every file is checked always (from its footer).
    """

    def __init__(self, root: str, storage_options: dict | None = None, name: str | None = None,
                 max_open_files: int = 64, verify: bool = False):
        self.root = str(root).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.name = name or self.root.rsplit("/", 1)[-1]
        self.max_open_files = max(1, int(max_open_files))
        self.verify = bool(verify)
        self.fs, self._base = _filesystem(self.root, self.storage_options)
        self._remote = not isinstance(self.fs, pafs.LocalFileSystem)
        mpath = self._path(S.MANIFEST)
        try:
            missing = self.fs.get_file_info(mpath).type == pafs.FileType.NotFound
        except OSError as exc:
            raise OSError(f"dataset {self.root}: cannot list {S.MANIFEST}: {exc}") from None
        if missing:
            raise FileNotFoundError(f"{self.root}: no {S.MANIFEST}; not a finished dataset: run jobs.preprocess "
                                    "(a build writes manifest.json last, so a partial build has none)")
        with self.fs.open_input_stream(mpath) as f:
            self.manifest = S.Manifest.from_json(f.read().decode())
        self.lat: np.ndarray = self.manifest.lat
        self.lon: np.ndarray = self.manifest.lon
        self.variables: list[str] = self.manifest.variables
        self.constants: list[str] = self.manifest.constants
        self.step_hours: float = self.manifest.step_hours
        self.shape: tuple[int, int] = (len(self.lat), len(self.lon))
        self._lock = threading.Lock()
        self._files: OrderedDict[str, tuple[pq.ParquetFile, threading.Lock]] = OrderedDict()
        self._footers: dict[str, pq.FileMetaData] = {}
        self._axes: dict[str, TimeAxis] = {}
        self._const: dict[str, np.ndarray] | None = None
        self._clim: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._time_mean: dict[str, np.ndarray] | None = None
        self.statistics: dict[str, tuple[float, float]] = {}  # overrides of the manifest's (use_statistics)

    def __getstate__(self) -> dict:
        """Picklable (e.g. sent to Ray workers): open files, locks and caches are left behind."""
        state = self.__dict__.copy()
        for k in ("_lock", "_files", "_footers", "_axes", "_const", "_clim", "_time_mean", "fs"):
            state.pop(k)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.fs, _ = _filesystem(self.root, self.storage_options)
        self._lock = threading.Lock()
        self._files, self._footers, self._axes, self._clim = OrderedDict(), {}, {}, {}
        self._const = self._time_mean = None

    def __repr__(self) -> str:
        return (f"ShardDataset({self.root!r}, name={self.name!r}, grid={self.shape}, "
                f"{len(self.variables)} variables + {len(self.constants)} constants)")

    # -- paths and files
    def _path(self, rel: str) -> str:
        return f"{self._base}/{rel}"

    def _open(self, rel: str) -> tuple[pq.ParquetFile, threading.Lock]:
        with self._lock:
            hit = self._files.get(rel)
            if hit is not None:
                self._files.move_to_end(rel)
                return hit
            footer = self._footers.get(rel)
        try:
            if footer is None:
                self._verify(rel)
            src = self.fs.open_input_file(self._path(rel))
            pf = pq.ParquetFile(src, metadata=footer, pre_buffer=self._remote)
        except FileNotFoundError:
            raise FileNotFoundError(f"dataset {self.name} ({self.root}): shard {rel} is listed in the manifest "
                                    "but missing; rebuild with jobs.preprocess") from None
        if footer is None:  # first open: the footer's row count against the manifest's
            S.check_rows(self._path(rel), pf.metadata.num_rows, self.manifest.file_info(rel), self.name)
        entry = (pf, threading.Lock())
        with self._lock:
            entry = self._files.setdefault(rel, entry)
            self._files.move_to_end(rel)
            self._footers[rel] = entry[0].metadata
            while len(self._files) > self.max_open_files:
                self._files.popitem(last=False)  # closed when the last reader drops it
        return entry

    def _verify(self, rel: str) -> None:
        """``verify``: the file's sha256 against the manifest's (once per file per process)."""
        if self.verify:
            path = self._path(rel)
            S.verify_sha256(path, self.manifest.file_info(rel), lambda: self.fs.open_input_stream(path), self.name)

    def _read_whole(self, rel: str, columns: Sequence[str] | None = None) -> pa.Table:
        # ParquetFile, not pq.read_table: that one imports pyarrow.dataset and pandas (about 1 s)
        self._verify(rel)
        with self.fs.open_input_file(self._path(rel)) as f:
            pf = pq.ParquetFile(f)
            S.check_rows(self._path(rel), pf.metadata.num_rows, self.manifest.file_info(rel), self.name)
            return pf.read(columns=columns)

    def open_files(self) -> int:
        """How many shards are open now (the LRU's size)."""
        return len(self._files)

    def _read_table(self, split: str, shard: int, rows: np.ndarray, columns: Sequence[str],
                    use_threads: bool = True) -> pa.Table:
        """Rows (sorted, unique, within the shard) of some columns of one shard, in one read; a shard
        that does not decode raises ShardReadError naming it (not retried: see ShardReadError)."""
        try:
            return self._read_rows(split, shard, rows, columns, use_threads)
        except (pa.ArrowInvalid, OSError) as exc:
            if not is_corruption(exc):
                raise
            rel = self.manifest.shards(split)[shard]["path"]
            raise ShardReadError(
                f"dataset {self.name}: shard {self._path(rel)} is corrupt or truncated ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:200]}); rebuild it: re-run jobs.preprocess with the dataset's "
                "recipe (it rewrites shards that do not read back), or copy the dataset again") from None

    def _read_rows(self, split: str, shard: int, rows: np.ndarray, columns: Sequence[str],
                   use_threads: bool = True) -> pa.Table:
        rel = self.manifest.shards(split)[shard]["path"]
        pf, lock = self._open(rel)
        names = pf.schema_arrow.names
        lacking = [c for c in columns if c not in names]
        if lacking:
            raise KeyError(f"dataset {self.name}: shard {rel} has no column(s) {lacking}; rebuild the dataset")
        md = pf.metadata
        # the time column comes along (8 bytes a row): the rows read must be the times the axis says
        columns = [S.TIME, *columns] if S.TIME in names and S.TIME not in columns else list(columns)
        if md.num_row_groups == md.num_rows:  # one time step per row group (finer grids)
            with lock:
                table = pf.read_row_groups(rows.tolist(), columns=list(columns), use_threads=use_threads)
            return self._checked(split, shard, rows, rel, table)
        with lock:
            # several steps per row group: read the groups that hold the rows, then take the rows
            sizes = np.array([md.row_group(i).num_rows for i in range(md.num_row_groups)])
            ends = np.cumsum(sizes)
            group = np.searchsorted(ends, rows, side="right")
            groups = np.unique(group)
            table = pf.read_row_groups(groups.tolist(), columns=list(columns), use_threads=use_threads)
        offset = np.concatenate([[0], np.cumsum(sizes[groups])[:-1]])  # of each read group in the table
        local = offset[np.searchsorted(groups, group)] + rows - (ends - sizes)[group]
        return self._checked(split, shard, rows, rel, table.take(pa.array(local)))

    def _checked(self, split: str, shard: int, rows: np.ndarray, rel: str, table: pa.Table) -> pa.Table:
        """``table`` after checking its stored times against the split's time axis."""
        if S.TIME not in table.column_names:
            return table
        axis = self.axis(split)
        first = int(np.searchsorted(axis.shard, shard))  # the axis lists shards in order
        want = axis.times[first + np.asarray(rows, np.int64)]
        got = table.column(S.TIME).to_numpy().astype("datetime64[ns]")
        if not np.array_equal(got, want):
            k = int(np.flatnonzero(got != want)[0])
            raise ValueError(f"dataset {self.name}: shard {rel} holds {got[k]} where the manifest puts {want[k]}; "
                             "the manifest and the shard disagree, rebuild the dataset with jobs.preprocess")
        return table

    # -- variables
    def check_variables(self, variables: Sequence[str], role: str = "variable") -> None:
        unknown = [v for v in variables if v not in self.manifest.raw["variables"]]
        if unknown:
            raise ValueError(f"dataset {self.name!r} ({self.root}) has no {role}(s) {unknown}; it has time-varying "
                             f"{self.variables} and constants {self.constants}")

    def axis(self, split: str) -> TimeAxis:
        """The split's time axis (cached)."""
        if split not in self._axes:
            splits = self.manifest.raw.get("splits", {})
            if split not in splits:
                raise ValueError(f"dataset {self.name!r} has no split {split!r}; it has {sorted(splits)}")
            self._axes[split] = TimeAxis.from_manifest(self.manifest.raw, split, self._stored_times)
        return self._axes[split]

    def _stored_times(self, rel: str) -> np.ndarray:
        """A shard's time column (the truth when the manifest's start/step/rows do not describe it)."""
        pf, lock = self._open(rel)
        with lock:
            return pf.read(columns=[S.TIME]).column(S.TIME).to_numpy().astype("datetime64[ns]")

    def constant_fields(self) -> dict[str, np.ndarray]:
        """Raw constant fields (H, W) from constants.parquet (cached)."""
        if self._const is None:
            if not self.constants:
                self._const = {}
            else:
                rel = self.manifest.raw.get("constants", {}).get("path", S.CONSTANTS)
                table = self._read_whole(rel)
                self._const = {c: tensor_column(table, c)[0].astype(_F32, copy=False) for c in self.constants}
        return self._const

    def read(self, split: str, idx: np.ndarray, variables: Sequence[str]) -> np.ndarray:
        """float32 (n, V, H, W) raw values of the split's time steps ``idx`` (indices into
        ``axis(split)``; any order, duplicates allowed), variables in the order given; constants
        are broadcast over time."""
        variables = list(variables)
        self.check_variables(variables)
        axis = self.axis(split)
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(axis)):
            raise IndexError(f"dataset {self.name}: split {split!r} has {len(axis)} time steps, asked for "
                             f"indices {idx.min()}..{idx.max()}")
        out = np.empty((len(idx), len(variables), *self.shape), _F32)
        consts = set(self.constants)
        tv = list(dict.fromkeys(v for v in variables if v not in consts))
        if tv and len(idx):
            uniq, inv = np.unique(idx, return_inverse=True)
            buf = np.empty((len(tv), len(uniq), *self.shape), _F32)
            shard = axis.shard[uniq]
            bounds = np.flatnonzero(np.diff(shard)) + 1
            for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(uniq)]):
                table = self._read_table(split, int(shard[lo]), axis.row[uniq[lo:hi]], tv)
                for j, v in enumerate(tv):
                    buf[j, lo:hi] = tensor_column(table, v)
            for j, v in enumerate(variables):
                if v not in consts:
                    np.take(buf[tv.index(v)], inv, axis=0, out=out[:, j], mode="clip")
        if len(idx):
            for j, v in enumerate(variables):
                if v in consts:
                    out[:, j] = self.constant_fields()[v]
        return out

    def normalizer(self, variables: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """float32 (mean, std) per variable: the statistics set by ``use_statistics`` (a checkpoint's)
        where given, else the manifest's (constants too)."""
        self.check_variables(variables)
        mean, std = self.manifest.mean_std(list(variables))
        for j, v in enumerate(variables):
            if v in self.statistics:
                mean[j], std[j] = self.statistics[v]
        return mean.astype(_F32), std.astype(_F32)

    def use_statistics(self, statistics: dict[str, tuple[float, float]]) -> None:
        """Normalise these variables with the given (mean, std) instead of the manifest's (a
        checkpoint's statistics: ``climax.normalization``). Set before building loaders."""
        self.statistics = {v: (float(m), float(s)) for v, (m, s) in statistics.items()}

    # -- climatology
    def _clim_of(self, var: str) -> tuple[np.ndarray, np.ndarray]:
        """(lookup (367, 24) -> row, rows (slots + 1, H, W), the last row the time mean)."""
        with self._lock:
            hit = self._clim.get(var)
        if hit is not None:
            return hit
        info = self.manifest.raw.get("climatology") or {}
        if "parts" in info:  # one part per window of slots, every variable a column (issue 14)
            table = S.climatology_rows(pa.concat_tables([self._read_whole(rel, columns=["dayofyear", "hour", var])
                                                         for rel in info["parts"]]))
        else:  # datasets built before one-pass climatology: one file per variable
            table = self._read_whole(f"{info.get('path', S.CLIMATOLOGY_DIR)}/{var}.parquet")
        doy = table.column("dayofyear").to_numpy().astype(np.int64)
        hour = table.column("hour").to_numpy().astype(np.int64)
        fields = np.concatenate([tensor_column(table, var), self.time_mean([var])[0][None]]).astype(_F32, copy=False)
        mean_row = len(doy)
        lookup = np.full((367, 24), mean_row, np.int64)
        days = np.arange(1, 367)
        stored = sorted(set(hour.tolist()))
        for h in stored:
            have = np.flatnonzero(hour == h)
            d = np.abs(days[:, None] - doy[have][None, :])
            circ = np.minimum(d, 366 - d)
            # nearest day of year (circular), ties to the nearer day in plain distance, then the earlier
            best = np.lexsort((doy[have][None, :].repeat(len(days), 0), d, circ), axis=1)[:, 0]
            lookup[1:, h] = have[best]
        for h in set(range(24)) - set(stored):
            if stored:  # an hour not stored (climatology_hours): the nearest stored hour, ties to the earlier
                near = min(stored, key=lambda s: (min((h - s) % 24, (s - h) % 24), (h - s) % 24))
                lookup[:, h] = lookup[:, near]
        with self._lock:
            self._clim[var] = (lookup, fields)
        return lookup, fields

    def climatology(self, variables: Sequence[str], times: np.ndarray) -> np.ndarray:
        """float32 (n, V, H, W): each time's (day of year, hour) slot of the training climatology.

        A slot the training years lack (day 366 in non-leap years) falls back to the nearest day of
        year with that hour; an hour not stored (recipe ``climatology_hours``) to the nearest stored
        hour, ties to the earlier one; the time mean only when nothing is stored.
        Constants are their own climatology."""
        variables = list(variables)
        self.check_variables(variables)
        doy, hour = S.climatology_slots(np.asarray(times).reshape(-1))
        out = np.empty((len(doy), len(variables), *self.shape), _F32)
        for j, v in enumerate(variables):
            if v in self.constants:
                out[:, j] = self.constant_fields()[v]
                continue
            lookup, fields = self._clim_of(v)
            np.take(fields, lookup[doy, hour], axis=0, out=out[:, j], mode="clip")
        return out

    def time_mean(self, variables: Sequence[str]) -> np.ndarray:
        """float32 (V, H, W) training-period mean of each variable (constants: the field itself)."""
        variables = list(variables)
        self.check_variables(variables)
        if self._time_mean is None and any(v not in self.constants for v in variables):
            rel = self.manifest.raw.get("climatology", {}).get("time_mean", f"{S.CLIMATOLOGY_DIR}/time_mean.parquet")
            table = self._read_whole(rel)
            self._time_mean = {c: tensor_column(table, c)[0].astype(_F32, copy=False) for c in table.column_names}
        return np.stack([self.constant_fields()[v] if v in self.constants else self._time_mean[v]
                         for v in variables]) if variables else np.empty((0, *self.shape), _F32)


# ----------------------------------------------------------------------------- batches
@dataclass
class Batch:
    x: torch.Tensor  # (B, len(in_vars), H, W) float32, normalised
    y: torch.Tensor  # (B, len(out_vars), H, W) float32, normalised
    lead_hours: torch.Tensor  # (B,) float32
    in_vars: list[str]
    out_vars: list[str]
    input_time: np.ndarray  # (B,) datetime64[ns]
    dataset: str

    def __len__(self) -> int:
        return len(self.x)

    @property
    def target_time(self) -> np.ndarray:
        return self.input_time + (self.lead_hours.numpy().astype(np.float64) * 3.6e12).astype("timedelta64[ns]")

    def to(self, device, non_blocking: bool = True) -> Batch:
        return Batch(self.x.to(device, non_blocking=non_blocking), self.y.to(device, non_blocking=non_blocking),
                     self.lead_hours.to(device, non_blocking=non_blocking), self.in_vars, self.out_vars,
                     self.input_time, self.dataset)


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


@dataclass
class _Pending:
    """A batch being filled: its arrays and tensors."""

    x_t: torch.Tensor
    x: np.ndarray
    y_t: torch.Tensor
    y: np.ndarray
    lead: np.ndarray
    times: np.ndarray


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
    """

    def __init__(self, dataset: ShardDataset, split: str, in_vars: Sequence[str], out_vars: Sequence[str],
                 leads: Sequence[float], *, random_lead: bool, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, drop_last: bool = True, region: Region | None = None,
                 prefetch: int = 2, max_batches: int | None = None, cache_mb: float = 1024.0,
                 superbatch_mb: float = 256.0, pin_memory: bool = False, shuffle_mode: str = "auto",
                 block_steps: int | None = None, window_blocks: int = 4, window_mb: float = 4096.0,
                 decode_threads: int | None = None):
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
        off = leads[(leads <= 0) | (np.abs(leads / dataset.step_hours - np.round(leads / dataset.step_hours)) > 1e-9)]
        if len(leads) == 0 or len(off):
            raise ValueError(f"lead times {off.tolist() or leads.tolist()} h of dataset {dataset.name!r}: leads must be "
                             f"positive multiples of its {dataset.step_hours} h step")
        if region is not None and tuple(region.grid_shape) != dataset.shape:
            raise ValueError(f"region {region.name!r} is for a {region.grid_shape} grid, dataset {dataset.name!r} "
                             f"has {dataset.shape}")
        self.leads, self.random_lead, self.seed = leads, bool(random_lead), seed
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.shuffle, self.drop_last, self.region = shuffle, drop_last, region
        self.prefetch, self.max_batches, self.pin_memory = int(prefetch), max_batches, pin_memory
        self.axis = dataset.axis(split)
        self.sampler = ForecastSampler(self.axis, leads, random_lead, seed)
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
        self.block_steps, self.window_blocks = block_layout(
            self.sampler.halo_steps, window_mb * 2**20 / self._row_bytes, block_steps, window_blocks,
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
        tgt = triples[:, 1].astype(np.int64)
        rows = np.concatenate([inp, tgt])
        uniq, inv = np.unique(rows, return_inverse=True)
        need = np.zeros(len(uniq), np.uint8)
        if self._in_tv:  # inputs made of constants only need no row
            np.bitwise_or.at(need, inv[:len(inp)], 1)
        np.bitwise_or.at(need, inv[len(inp):], 2)
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
            def read(lo: int, hi: int, use_threads: bool) -> None:
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
                    for f in [pool.submit(read, lo, hi, False) for lo, hi in lo_hi]:
                        f.result()
            else:
                for lo, hi in lo_hi:
                    read(lo, hi, True)
            pos[todo] = np.arange(len(todo))
        if resident:
            return _Super(buf, inp, tgt, triples, pieces)
        return _Super(buf, pos[inv[:len(inp)]], pos[inv[len(inp):]], triples, pieces)

    def _empty(self, n: int, v: int) -> tuple[torch.Tensor, np.ndarray]:
        shape = (n, v, *self.shape)
        if self.pin_memory:
            t = torch.empty(shape, dtype=torch.float32, pin_memory=True)
            return t, t.numpy()
        # from Arrow's pool (mimalloc), which keeps freed pages: batch after batch reuses the same
        # memory instead of page-faulting fresh pages in (measured: up to 5x faster cutting)
        a = np.frombuffer(pa.allocate_buffer(4 * int(np.prod(shape))), dtype=_F32).reshape(shape)
        return torch.from_numpy(a), a

    def _pending(self, n: int) -> _Pending:
        x_t, x = self._empty(n, len(self.in_vars))
        y_t, y = self._empty(n, len(self.out_vars))
        return _Pending(x_t, x, y_t, y, np.empty(n, _F32), np.empty(n, "datetime64[ns]"))

    def _fill(self, sb: _Super, lo: int, hi: int, p: _Pending, off: int) -> None:
        """Samples lo:hi of a super-batch into rows off:off + hi - lo of a pending batch."""
        xi, yi = sb.inp[lo:hi], sb.tgt[lo:hi]
        rows = slice(off, off + hi - lo)
        x, y = p.x[rows], p.y[rows]
        for j, v in enumerate(self.in_vars):
            x[:, j] = self._const[v] if v in self._const else sb.buf[self._slot[v]][xi]
        for j, v in enumerate(self.out_vars):
            y[:, j] = sb.buf[self._slot[v]][yi]
        tr = sb.triples[lo:hi]
        p.lead[rows] = tr[:, 2]
        p.times[rows] = self.axis.times[tr[:, 0].astype(np.int64)]

    def _batch(self, p: _Pending) -> Batch:
        return Batch(p.x_t, p.y_t, torch.from_numpy(p.lead), self.in_vars, self.out_vars, p.times, self.dataset.name)

    def _plan(self, n: int, start: int, end: int, windows: np.ndarray | None) -> list[tuple[int, int]]:
        """Super-batches as sample ranges covering start:end. Global shuffle: 1, 2, 4, ... batches
        up to the memory bound (the first batch comes quickly). Block shuffle: the windows."""
        B = self.batch_size
        if windows is not None:
            return [(max(a, start), min(b, end)) for a, b in zip(windows[:-1], windows[1:])
                    if min(b, end) > max(a, start)]
        cap = max(1, int(self.superbatch_mb * 2**20 // (2 * B * self._row_bytes)))
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


class MixedLoader:
    """Several ForecastLoaders (e.g. five CMIP6 datasets) mixed by weight in one run.

    Each step draws which loader gives the batch from ``rng(seed, epoch)``: the same draw on every
    rank, so DDP ranks use the same variable set each step. Each loader's batches form one endless
    stream over its own epochs 0, 1, 2, ...; a loader that runs out restarts on its next epoch, and
    where a mixed epoch starts in each stream follows from the draws of the earlier epochs, so
    ``set_epoch`` resumes exactly. ``weights`` default to the loaders' lengths (each loader then
    passes through about one of its epochs per mixed epoch).
    """

    def __init__(self, loaders: Sequence[ForecastLoader], weights: Sequence[float] | None = None, seed: int = 0):
        self.loaders = list(loaders)
        if not self.loaders:
            raise ValueError("MixedLoader needs at least one loader")
        self.lengths = [len(l) for l in self.loaders]
        empty = [l.dataset.name for l, n in zip(self.loaders, self.lengths) if n == 0]
        if empty:
            raise ValueError(f"loader(s) of {empty} have no batch in an epoch")
        w = np.asarray(self.lengths if weights is None else weights, dtype=np.float64)
        if w.shape != (len(self.loaders),) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be {len(self.loaders)} non-negative numbers, not all zero; got {weights}")
        self.weights = w / w.sum()
        self.seed, self.epoch = seed, 0
        self._consumed: dict[int, np.ndarray] = {0: np.zeros(len(self.loaders), np.int64)}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return sum(self.lengths)

    def draws(self, epoch: int) -> np.ndarray:
        """Which loader gives each step of ``epoch`` (the same on every rank)."""
        return np.random.default_rng([self.seed, epoch]).choice(len(self.loaders), size=len(self), p=self.weights)

    def _start(self, epoch: int) -> np.ndarray:
        """Batches each loader's stream gave before ``epoch``."""
        e = max(k for k in self._consumed if k <= epoch)
        acc = self._consumed[e].copy()
        for k in range(e, epoch):
            acc += np.bincount(self.draws(k), minlength=len(self.loaders))
            self._consumed[k + 1] = acc.copy()
        return acc

    def __iter__(self) -> Iterator[Batch]:
        draws = self.draws(self.epoch)
        pos = self._start(self.epoch)
        iters: list[Iterator[Batch] | None] = [None] * len(self.loaders)
        try:
            for i in draws:
                while True:
                    if iters[i] is None:
                        ep, off = divmod(int(pos[i]), self.lengths[i])
                        iters[i] = self.loaders[i].iterate(ep, off)
                    batch = next(iters[i], None)
                    if batch is not None:
                        break
                    iters[i] = None  # this loader's epoch ended: the next one starts
                    pos[i] = -(-pos[i] // self.lengths[i]) * self.lengths[i]
                pos[i] += 1
                yield batch
        finally:
            for it in iters:
                if it is not None:
                    it.close()
