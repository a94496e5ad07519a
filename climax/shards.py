"""The shard format: one home for its schema, its manifest and reading it back.

Written by ``pipelines`` (which imports this module without torch), read by training.

Layout under the output root (a local folder or ``s3://bucket/prefix``)::

    manifest.json                      written last: its presence means the dataset is complete
    constants.parquet                  one row: land_sea_mask, orography, latitude, ... (time-free)
    climatology/<window>.parquet       rows (dayofyear, hour, count) of the training years at the
                                       stored hours, one column per variable, one file per window
                                       of slots; a last row (0, -1, steps) holds the window's mean
    climatology/time_mean.parquet      the time mean of each variable over the training years
    <split>/<year>/<start>.parquet     one row per time step

A shard is a Parquet file with a ``time`` column (timestamp[ns], UTC, naive) and one column per
variable of Arrow's canonical ``arrow.fixed_shape_tensor`` extension type (float32, shape
[lat, lon], latitude south to north, longitude 0..360 east), so pyarrow, pandas or DuckDB read it
without this project, and a reader of 5 variables out of 48 reads only those columns. Row groups
hold about 64 KiB per column (8 steps at 5.625 deg, one step at 1.40625 deg), so a step is fetched
with little more than itself. Tensor columns are stored with
BYTE_STREAM_SPLIT encoding and zstd compression (chosen by measurement: benchmarks/RESULTS.md).
Values are raw, in physical units; the manifest's statistics normalise them at load time.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "FORMAT", "TIME", "MANIFEST", "CONSTANTS", "CLIMATOLOGY_DIR", "Manifest", "tensor_type",
    "shard_schema", "table_from_arrays", "arrays_from_table", "read_shard", "read_climatology", "climatology_rows",
    "write_options", "climatology_slots", "ShardReadError", "check_rows", "verify_sha256",
]

FORMAT = "climax-shards/1"
TIME = "time"
MANIFEST = "manifest.json"
CONSTANTS = "constants.parquet"
CLIMATOLOGY_DIR = "climatology"
LAT_ORDER = "south_to_north"
#: Key-value metadata stored in each shard's footer (fingerprints and partial statistics).
META_KEY = b"climax"


class ShardReadError(RuntimeError):
    """A shard that does not decode or is not the file the manifest lists (truncated, overwritten,
    another build's, bit rot). Retrying cannot help, so the training job stops at once instead of
    restarting its workers (``jobs.train.StopOnDataError``)."""

    retryable = False


def check_rows(path: str, num_rows: int, expected: dict | None, dataset: str = "") -> None:
    """Compare a file's footer row count (``ParquetFile.metadata.num_rows``: already parsed, so
    free) with the manifest's ``rows`` for it; raise ShardReadError naming the file otherwise."""
    if expected is None or expected.get("rows") is None or int(expected["rows"]) == int(num_rows):
        return
    raise ShardReadError(
        f"{f'dataset {dataset}: ' if dataset else ''}shard {path} has {num_rows} rows where the manifest lists "
        f"{expected['rows']}; the shard and the manifest come from different builds: rebuild the dataset "
        "(re-run jobs.preprocess with its recipe) or copy the whole dataset again")


#: (file path, sha256) already verified by this process: a shard is hashed once per process.
_VERIFIED: set[tuple[str, str]] = set()
_VERIFIED_LOCK = threading.Lock()
_HASHING: dict[str, threading.Lock] = {}


def sha256_of_stream(stream: Any) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: stream.read(1 << 22), b""):
        h.update(block)
    return h.hexdigest()


def verify_sha256(path: str, expected: dict | None, open_stream: Any, dataset: str = "") -> None:
    """``verify: true``: the file's sha256 against the manifest's, once per file per process.
    ``open_stream()`` opens the file for one sequential read (a context manager)."""
    want = (expected or {}).get("sha256")
    if not want:
        return
    with _VERIFIED_LOCK:
        if (path, want) in _VERIFIED:
            return
        lock = _HASHING.setdefault(path, threading.Lock())
    with lock:  # loader threads opening the same shard: one hashes it, the others wait
        if (path, want) in _VERIFIED:
            return
        with open_stream() as f:
            got = sha256_of_stream(f)
        if got != want:
            raise ShardReadError(
                f"{f'dataset {dataset}: ' if dataset else ''}shard {path} has sha256 {got[:16]}... where the "
                f"manifest lists {want[:16]}...; the file changed after the build (overwritten, copied in part, "
                "bit rot): rebuild the dataset (re-run jobs.preprocess with its recipe) or copy the whole "
                "dataset again")
        with _VERIFIED_LOCK:
            _VERIFIED.add((path, want))


def tensor_type(shape: Sequence[int]) -> pa.DataType:
    return pa.fixed_shape_tensor(pa.float32(), list(shape))


def shard_schema(variables: Sequence[str], shape: Sequence[int], metadata: dict | None = None) -> pa.Schema:
    fields = [pa.field(TIME, pa.timestamp("ns"), nullable=False)]
    fields += [pa.field(v, tensor_type(shape), nullable=False) for v in variables]
    meta = {META_KEY: json.dumps(metadata, sort_keys=True).encode()} if metadata is not None else None
    return pa.schema(fields, metadata=meta)


def table_from_arrays(times: np.ndarray | None, arrays: dict[str, np.ndarray],
                      metadata: dict | None = None) -> pa.Table:
    """Build a shard table; ``times`` None gives a time-free table (constants, one row)."""
    first = next(iter(arrays.values()))
    shape = first.shape[-2:]
    columns, fields = [], []
    if times is not None:
        columns.append(pa.array(np.asarray(times, dtype="datetime64[ns]"), type=pa.timestamp("ns")))
        fields.append(pa.field(TIME, pa.timestamp("ns"), nullable=False))
    for name, a in arrays.items():
        if a.ndim == 2:
            a = a[None]
        # a fresh C-ordered copy when needed: Arrow wants canonical strides, and numpy gives size-1
        # axes (a[None]) a zero stride
        if not a.flags.c_contiguous or a.dtype != np.float32 or 0 in a.strides:
            a = np.array(a, dtype=np.float32, order="C", copy=True)
        columns.append(pa.FixedShapeTensorArray.from_numpy_ndarray(a))
        fields.append(pa.field(name, tensor_type(shape), nullable=False))
    meta = {META_KEY: json.dumps(metadata, sort_keys=True).encode()} if metadata is not None else None
    return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=meta))


def arrays_from_table(table: pa.Table) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    times = table.column(TIME).to_numpy().astype("datetime64[ns]") if TIME in table.column_names else None
    arrays = {}
    for name in table.column_names:
        if name == TIME:
            continue
        col = table.column(name).combine_chunks()
        if not isinstance(col, pa.FixedShapeTensorArray):
            raise TypeError(f"column {name!r} is {col.type}, not a fixed_shape_tensor; is this a ClimaX shard?")
        arrays[name] = col.to_numpy_ndarray()
    return times, arrays


def climatology_slots(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The climatology's slot of each time: (day of year 1..366, hour 0..23); 29 February is day 60
    and 31 December of a leap year day 366, as in pandas' ``dayofyear``. Written by the pipeline,
    looked up by training and evaluation: one home for both."""
    t = np.asarray(times, dtype="datetime64[ns]")
    days = t.astype("datetime64[D]")
    doy = (days - days.astype("datetime64[Y]")).astype(np.int64) + 1
    hour = ((t - days) // np.timedelta64(1, "h")).astype(np.int64)
    return doy, hour


#: Target bytes of one column chunk (one variable, one row group): at 5.625 deg (8 KiB a field)
#: 8 steps per row group; at 1.40625 deg and finer one step. Measured (benchmarks/RESULTS.md):
#: 8-step groups encode 2.3x faster than 1-step ones at 5.625 deg, are 9 % smaller, and one
#: group still reads in under 3 ms; below ~64 KiB Parquet's per-column-chunk overhead dominates.
ROW_GROUP_BYTES = 64 * 2**10


def row_group_rows(shape: Sequence[int]) -> int:
    """Time steps per row group for fields of ``shape`` (float32)."""
    return max(1, ROW_GROUP_BYTES // (4 * int(np.prod(shape))))


def write_options(variables: Sequence[str], compression_level: int = 3, shape: Sequence[int] | None = None
                  ) -> dict[str, Any]:
    """``pyarrow.parquet.write_table`` options of a shard (one place, used by the writer)."""
    return dict(
        row_group_size=row_group_rows(shape) if shape is not None else 1,
        compression="zstd",
        compression_level=compression_level,
        use_dictionary=False,
        # the float leaves of the tensor columns; the time column keeps its default encoding
        use_byte_stream_split=[f"{v}.list.element" for v in variables],
        write_statistics=[TIME],
        store_schema=True,
    )


def read_shard(path: str, columns: Sequence[str] | None = None, rows: Sequence[int] | None = None,
               filesystem: Any = None) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    """Read a shard (or only some columns / rows, reading only the row groups that hold them)."""
    cols = None if columns is None else [TIME] + [c for c in columns if c != TIME]
    pf = pq.ParquetFile(path, filesystem=filesystem) if filesystem is not None else pq.ParquetFile(path)
    if cols is not None and TIME not in pf.schema_arrow.names:
        cols = [c for c in cols if c != TIME]
    if rows is None:
        return arrays_from_table(pf.read(columns=cols))
    rows = np.asarray(list(rows), dtype=np.int64)
    md = pf.metadata
    ends = np.cumsum([md.row_group(i).num_rows for i in range(md.num_row_groups)])
    group = np.searchsorted(ends, rows, side="right")  # the row group holding each row
    groups = np.unique(group)
    table = pf.read_row_groups(groups.tolist(), columns=cols)
    starts = np.concatenate([[0], ends[:-1]])
    offset = np.concatenate([[0], np.cumsum(ends[groups] - starts[groups])[:-1]])  # of each group read
    return arrays_from_table(table.take(pa.array(offset[np.searchsorted(groups, group)] + rows - starts[group])))


def read_climatology(root: str, variable: str, filesystem: Any = None, *, verify: bool = False) -> pa.Table:
    """Rows (dayofyear, hour, count, ``variable``) of a dataset's training climatology, from its
    parts (one per window of slots, every variable a column) as the manifest lists them. Each
    part's row count is checked against the manifest; ``verify`` also checks its sha256."""
    import pyarrow.fs as pafs

    fs, base = (filesystem, root.rstrip("/")) if filesystem is not None else pafs.FileSystem.from_uri(
        root if "://" in root else os.path.abspath(root))
    with fs.open_input_file(f"{base}/{MANIFEST}") as f:
        manifest = Manifest.from_json(f.read().decode())
    tables = []
    for rel in manifest.raw["climatology"]["parts"]:
        path, expected = f"{base}/{rel}", manifest.file_info(rel)
        if verify:
            verify_sha256(path, expected, lambda path=path: fs.open_input_stream(path))
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            check_rows(path, pf.metadata.num_rows, expected)
            tables.append(pf.read(columns=["dayofyear", "hour", "count", variable]))
    return climatology_rows(pa.concat_tables(tables))


def climatology_rows(table: pa.Table) -> pa.Table:
    """The (day of year, hour) rows of climatology parts: without each part's last row (hour -1),
    the mean of all the window's steps, from which the build merges the time mean."""
    import pyarrow.compute as pc

    return table.filter(pc.greater_equal(table.column("hour"), 0))


def shard_metadata(path: str, filesystem: Any = None) -> dict | None:
    """The JSON metadata stored in a shard's footer, or None when it has none."""
    pf = pq.ParquetFile(path, filesystem=filesystem) if filesystem is not None else pq.ParquetFile(path)
    meta = pf.schema_arrow.metadata or {}
    return json.loads(meta[META_KEY]) if META_KEY in meta else None


@dataclass
class Manifest:
    """``manifest.json`` as a thin typed view; ``raw`` is the whole document."""

    raw: dict

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        if raw.get("format") != FORMAT:
            raise ValueError(f"not a ClimaX shard manifest (format {raw.get('format')!r}, expected {FORMAT!r})")
        return cls(raw)

    @property
    def lat(self) -> np.ndarray:
        return np.asarray(self.raw["grid"]["lat"], dtype=np.float64)

    @property
    def lon(self) -> np.ndarray:
        return np.asarray(self.raw["grid"]["lon"], dtype=np.float64)

    @property
    def variables(self) -> list[str]:
        return [v for v, spec in self.raw["variables"].items() if not spec.get("constant")]

    @property
    def constants(self) -> list[str]:
        return [v for v, spec in self.raw["variables"].items() if spec.get("constant")]

    @property
    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the manifest's content (keys sorted): names this exact dataset."""
        import hashlib

        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def step_hours(self) -> float:
        return self.raw["time"]["step_seconds"] / 3600

    def file_info(self, rel: str) -> dict | None:
        """What the manifest records of the file ``rel`` (``rows``, ``sha256``), or None: shards,
        constants, and climatology files (``climatology.files``; absent in datasets built before)."""
        files = self.__dict__.get("_files")
        if files is None:
            files = {}
            for split in self.raw.get("splits", {}).values():
                files.update({s["path"]: s for s in split.get("shards", [])})
            const = self.raw.get("constants")
            if const:
                files[const.get("path", CONSTANTS)] = {"rows": 1, **const}
            for entry in (self.raw.get("climatology") or {}).get("files", []):
                files[entry["path"]] = entry
            self.__dict__["_files"] = files
        return files.get(rel)

    def shards(self, split: str) -> list[dict]:
        return self.raw["splits"][split]["shards"]

    def mean_std(self, variables: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        stats = self.raw["statistics"]
        return (np.array([stats[v]["mean"] for v in variables]), np.array([stats[v]["std"] for v in variables]))
