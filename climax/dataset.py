"""One preprocessed dataset: ``manifest.json`` + shards (a local folder or ``s3://bucket/prefix``).

``ShardDataset`` reads time steps by index (raw physical float32), checks each file's row count
against the manifest (and its sha256 with ``verify``), and serves the statistics, the day-of-year x
hour climatology and the time mean. Shards are opened lazily (an LRU of open ``ParquetFile``
objects, their parsed footers cached), so the first batch does not wait for every shard's footer.
The loaders that stream batches from it are in ``climax.data``.

Imports neither Ray nor ``pipelines``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from climax import shards as S
from climax.sampling import TimeAxis
from climax.storage import arrow_filesystem

__all__ = ["ShardDataset", "ShardReadError", "tensor_column", "is_corruption"]

_F32 = np.float32


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
                 max_open_files: int = 64, *, verify: bool = False):
        self.root = str(root).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.name = name or self.root.rsplit("/", 1)[-1]
        self.max_open_files = max(1, int(max_open_files))
        self.verify = bool(verify)
        self.fs, self._base = arrow_filesystem(self.root, self.storage_options)
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
        self.fs, _ = arrow_filesystem(self.root, self.storage_options)
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

    def _read_table(self, split: str, shard: int, rows: np.ndarray, columns: Sequence[str], *,
                    use_threads: bool = True) -> pa.Table:
        """Rows (sorted, unique, within the shard) of some columns of one shard, in one read; a shard
        that does not decode raises ShardReadError naming it (not retried: see ShardReadError)."""
        try:
            return self._read_rows(split, shard, rows, columns, use_threads=use_threads)
        except (pa.ArrowInvalid, OSError) as exc:
            if not is_corruption(exc):
                raise
            rel = self.manifest.shards(split)[shard]["path"]
            raise ShardReadError(
                f"dataset {self.name}: shard {self._path(rel)} is corrupt or truncated ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:200]}); rebuild it: re-run jobs.preprocess with the dataset's "
                "recipe (it rewrites shards that do not read back), or copy the dataset again") from None

    def _read_rows(self, split: str, shard: int, rows: np.ndarray, columns: Sequence[str], *,
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
