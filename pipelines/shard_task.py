"""The build's shard task: one Ray task writes one unit of the plan (``pipelines.plan.Unit``).

A "window" unit decodes, checks and regrids (a few steps of one variable at a time, within the
task's memory budget) the training shards of one window of climatology slots for every training
year, writes them and the window's climatology part, and returns float64 partial statistics (also
kept in each shard's footer, so a re-run that skips it still merges them). A "shard" unit writes
one validation/test shard, a "constants" unit the constants. Each task writes its own files and
returns only metadata (``pipelines.build`` runs them and merges).

A file whose footer records the same recipe and source fingerprints, :data:`CODE_VERSION` and
shard format is kept as it is (``BuildContext.overwrite`` rebuilds it): a crashed run resumes and
yields byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from climax import shards as S
from pipelines import regrid, storage
from pipelines.names import check_range
from pipelines.output import join, table_bytes, write_atomic
from pipelines.plan import Chunk, Unit, iso, slot_keys
from pipelines.sources import SourceError, open_source
from pipelines.stats import Moments

__all__ = ["BuildContext", "CODE_VERSION", "run_unit", "run_chunk", "run_window", "block_steps"]


@dataclass(frozen=True, kw_only=True)
class BuildContext:
    """What every shard task needs besides its unit: the same for all tasks (one ``ray.put``)."""

    recipe_fp: str  # the recipe's fingerprint, recorded in every footer
    output: str
    storage_options: dict | None
    files: tuple[dict, ...]  # the scanned source files (``pipelines.scan``), without their time lists
    lat: tuple[float, ...]  # the target grid
    lon: tuple[float, ...]
    method: str  # regridding method
    regrid_cache: str | None
    time_vars: tuple[str, ...]
    compression_level: int
    block_bytes: int  # memory for one decode sub-block (``block_steps``)
    ranges: dict | None = None  # {variable: (min, max) or None}; None: no range check
    owner: str | None = None  # the build's lease token, in its temporary file names
    overwrite: bool = False  # rebuild files that a re-run would keep

    def grid(self) -> regrid.Grid:
        return regrid.Grid(np.asarray(self.lat), np.asarray(self.lon))


def _grid_of(ds) -> regrid.Grid:
    return regrid.Grid(np.asarray(ds["lat"].values, np.float64), np.asarray(ds["lon"].values, np.float64))


def _sources_fingerprint(chunk: Chunk, files) -> str:
    ids = sorted({r.file for r in chunk.reads})
    text = "|".join(f"{files[i]['path']}:{files[i]['fingerprint']}" for i in ids)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: Version of the code that writes shards and climatology parts, kept in every footer: bump it when
#: a change alters what is written, so that a re-run rebuilds files of older code instead of keeping
#: them (the shard format's own version, ``climax.shards.FORMAT``, is checked alike).
CODE_VERSION = "2026.12-clim-hours"


def _existing(path: str, recipe_fp: str, sources_fp: str, storage_options) -> dict | None:
    """The footer metadata of a finished file made from the same recipe and sources by this version
    of the code and format, else None."""
    fs, p = storage.filesystem(path, storage_options)
    if not fs.exists(p):
        return None
    try:
        with fs.open(p, "rb") as f:
            meta = json.loads(pq.read_schema(f).metadata[S.META_KEY])
    except Exception:  # unreadable or foreign file: rebuild it
        return None
    if (meta.get("recipe") == recipe_fp and meta.get("sources") == sources_fp
            and meta.get("code") == CODE_VERSION and meta.get("format") == S.FORMAT):
        return meta
    return None


def _sha256_of(path: str, storage_options) -> str:
    fs, p = storage.filesystem(path, storage_options)
    h = hashlib.sha256()
    with fs.open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


_OPEN: OrderedDict[tuple, Any] = OrderedDict()
_OPEN_MAX = 16  # a chunk reads a handful of files; more open handles only cost memory


def _open_cached(f: dict):
    """A lazy Dataset of every recipe variable in file ``f``, kept open in this worker process.

    Ray reuses worker processes across tasks, and consecutive chunks read the same files: opening
    a NetCDF or indexing a GRIB costs far more than reading one chunk from it.
    """
    key = (f["path"], f["fingerprint"], f["member"], tuple(sorted(f["variables"])))
    if key in _OPEN:
        _OPEN.move_to_end(key)
        return _OPEN[key]
    ds = open_source(f["path"], f["format"], variables=sorted(f["variables"]), member=f["member"],
                     storage_options=f["storage_options"] or None)
    _OPEN[key] = ds
    while len(_OPEN) > _OPEN_MAX:
        _OPEN.popitem(last=False)[1].close()
    return ds


#: Bytes a task holds per source grid point and time step while decoding and regridding one
#: sub-block: the decoded float32/float64 values, the float64 copy and its transpose that the
#: sparse product takes. Measured on GRIB and NetCDF inputs (benchmarks/RESULTS.md).
_BYTES_PER_SOURCE_POINT = 32


def block_steps(src_points: int, budget_bytes: int) -> int:
    """Time steps decoded at once so that one sub-block stays within ``budget_bytes``."""
    return max(1, int(budget_bytes // max(1, src_points * _BYTES_PER_SOURCE_POINT)))


def _runs(idx: np.ndarray, k: int):
    """(start, count, selection) of consecutive groups of at most ``k`` positions of ``idx``, each
    selection a slice when contiguous (HDF5 and GRIB readers are much faster on slices)."""
    for a in range(0, len(idx), k):
        part = idx[a:a + k]
        if len(part) > 1 and bool(np.all(np.diff(part) == 1)):
            yield a, len(part), slice(int(part[0]), int(part[-1]) + 1)
        else:
            yield a, len(part), part


def _check_finite(values: np.ndarray, path: str, v: str, times: list[int] | None) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        where_ = "" if times is None else f" at {iso(times[int(np.argwhere(bad)[0][0])])}"
        raise SourceError(
            f"{path}: variable {v}{where_} has {int(bad.sum())} NaN/Inf values; the file is "
            "damaged or masked (e.g. a sea-only field); fix or replace it, or drop the variable")


def _check_range(values: np.ndarray, v: str, path: str, times: list[int] | None, ranges: dict | None) -> None:
    """Fill values without an attribute (-9999, 9.999e20, 0 over a whole field): a physical range
    per variable (pipelines/names.py), or the recipe's ``valid_range`` override."""
    if ranges is None:
        return
    try:
        check_range(values, v, path, None if times is None else [iso(t) for t in times], ranges.get(v))
    except ValueError as e:
        raise SourceError(str(e)) from None


def _read_into(f: dict, variables: list[str], times: list[int], put, dst: regrid.Grid, method: str,
               cache_dir: str | None, budget_bytes: int, ranges: dict | None = None) -> None:
    """Decode, check and regrid ``variables`` of file ``f`` at ``times`` in sub-blocks of a few
    steps of one variable, handing each regridded block to ``put(variable, times, block)``.

    Memory is bounded by ``budget_bytes`` whatever the source resolution: a 0.25 deg field is
    never held for more steps than the budget allows (issue 14)."""
    ds = _open_cached(f)
    idx = ds.get_index("time").get_indexer(np.asarray(times, dtype="int64").astype("datetime64[ns]"))
    if (idx < 0).any():
        raise SourceError(f"{f['path']}: time {iso(times[int(np.argmax(idx < 0))])} was listed when the "
                          "file was scanned but is gone now; was the file replaced during the run?")
    rg = regrid.get_regridder(_grid_of(ds), dst, method, cache_dir=cache_dir)
    k = block_steps(rg.src.size, budget_bytes)
    for v in variables:
        da = ds[v].transpose("time", "lat", "lon")
        for a, n, sel in _runs(idx, k):
            block_times = times[a:a + n]
            values = np.asarray(da.isel(time=sel).values, dtype=np.float32)
            _check_finite(values, f["path"], v, block_times)
            _check_range(values, v, f["path"], block_times, ranges)
            put(v, block_times, rg(values, copy=False))
            del values


def _read_constants(f: dict, variables: list[str], dst: regrid.Grid, method: str,
                    cache_dir: str | None, ranges: dict | None = None) -> dict[str, np.ndarray]:
    ds = _open_cached(f)
    rg = regrid.get_regridder(_grid_of(ds), dst, method, cache_dir=cache_dir)
    out = {}
    for v in variables:
        values = np.asarray(ds[v].transpose("lat", "lon").values, dtype=np.float32)
        _check_finite(values, f["path"], v, None)
        _check_range(values, v, f["path"], None, ranges)
        out[v] = rg(values)
    return out


def _chunk_arrays(chunk: Chunk, ctx: BuildContext,
                  dst: regrid.Grid) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The chunk's fields on the target grid (float32 (n, H, W) per variable), and the step before
    it (for differences across chunk edges)."""
    files = ctx.files
    n = len(chunk.times)
    index = {t: k for k, t in enumerate(chunk.times)}
    h, w = dst.shape
    arrays = {v: np.empty((n, h, w), np.float32) for v in ctx.time_vars}
    prev: dict[str, np.ndarray] = {}

    def put(v: str, times: list[int], block: np.ndarray) -> None:
        for t, field_ in zip(times, block):
            if t == chunk.prev:
                prev[v] = np.array(field_, np.float32)
            else:
                arrays[v][index[t]] = field_

    for r in chunk.reads:
        _read_into(files[r.file], r.variables, r.times, put, dst, ctx.method, ctx.regrid_cache,
                   ctx.block_bytes, ctx.ranges)
    return arrays, prev


def _chunk_stats(chunk: Chunk, arrays: dict[str, np.ndarray], prev: dict[str, np.ndarray]) -> dict:
    if chunk.split != "train":
        return {}
    return {v: {"values": Moments.of(a).to_dict(), "diffs": Moments.of_diffs(prev.get(v), a).to_dict()}
            for v, a in arrays.items()}


def _write_table(path: str, table: pa.Table, variables, ctx: BuildContext) -> str:
    data = table_bytes(table, variables, ctx.compression_level)
    write_atomic(path, data, ctx.storage_options, owner=ctx.owner)
    digest = hashlib.sha256(data).hexdigest()
    del data
    return digest


def run_chunk(chunk: Chunk, ctx: BuildContext, *, keep_arrays: bool = False) -> dict:
    """Write one shard (or the constants) and return its metadata. With ``keep_arrays`` the
    result also holds the chunk's fields (``arrays``, from the shard itself when it is skipped)."""
    recipe_fp, files, out, so = ctx.recipe_fp, ctx.files, ctx.output, ctx.storage_options
    dst = ctx.grid()
    sources_fp = _sources_fingerprint(chunk, files)
    path = join(out, chunk.path)
    if not ctx.overwrite:
        meta = _existing(path, recipe_fp, sources_fp, so)
        if meta is not None:
            res = {**_summary(chunk), "rows": meta["rows"], "stats": meta["stats"], "sha256": _sha256_of(path, so),
                   "skipped": True}
            if keep_arrays:
                fs, p = storage.filesystem(path, so)
                with fs.open(p, "rb") as fh:
                    res["arrays"] = S.arrays_from_table(pq.read_table(fh))[1]
            return res

    if chunk.kind == "constants":
        arrays: dict[str, np.ndarray] = {}
        for r in chunk.reads:
            arrays.update(_read_constants(files[r.file], r.variables, dst, ctx.method, ctx.regrid_cache,
                                          ctx.ranges))
        if "latitude" in chunk.variables:
            arrays["latitude"] = np.repeat(dst.lat[:, None], dst.shape[1], axis=1).astype(np.float32)
        arrays = {v: arrays[v] for v in chunk.variables}
        stats = {v: {"values": Moments.of(a).to_dict(), "diffs": Moments().to_dict()} for v, a in arrays.items()}
        times = None
        rows = 1
    else:
        arrays, prev = _chunk_arrays(chunk, ctx, dst)
        stats = _chunk_stats(chunk, arrays, prev)
        times = np.asarray(chunk.times, dtype="int64").astype("datetime64[ns]")
        rows = len(chunk.times)
    meta = {"recipe": recipe_fp, "sources": sources_fp, "rows": rows, "stats": stats, "code": CODE_VERSION,
            "format": S.FORMAT}
    digest = _write_table(path, S.table_from_arrays(times, arrays, metadata=meta), list(arrays), ctx)
    res = {**_summary(chunk), "rows": rows, "stats": stats, "sha256": digest, "skipped": False}
    if keep_arrays:
        res["arrays"] = arrays
    return res


def _summary(chunk: Chunk) -> dict:
    """What the driver keeps of a finished chunk: not its time lists and reads (memory per year)."""
    out = {"kind": chunk.kind, "index": chunk.index, "path": chunk.path}
    if chunk.kind == "shard":
        out.update(split=chunk.split, year=chunk.year, start=iso(chunk.times[0]), end=iso(chunk.times[-1]))
    return out


def _window_fingerprint(chunks, ctx: BuildContext) -> str:
    text = "|".join([ctx.recipe_fp, *(f"{c.path}:{_sources_fingerprint(c, ctx.files)}" for c in chunks)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _part_time_sums(table: pa.Table, variables: list[str]) -> tuple[dict[str, np.ndarray], int]:
    """float64 sum over the window's steps of each variable, from its climatology part's last row
    (hour -1: count = every step of the window, the float32 window mean): the same numbers whether
    the part was just written or read back."""
    k = int(np.flatnonzero(table.column("hour").to_numpy() < 0)[0])
    n = int(table.column("count")[k].as_py())
    sums = {v: table.column(v).combine_chunks().to_numpy_ndarray()[k].astype(np.float64) * n for v in variables}
    return sums, n


def _as_index(idx: np.ndarray):
    """A slice when ``idx`` is an arithmetic progression (a view, no gather), else ``idx``."""
    if len(idx) == 1:
        return slice(int(idx[0]), int(idx[0]) + 1)
    if len(idx) > 1:
        d = np.diff(idx)
        if d[0] > 0 and (d == d[0]).all():
            return slice(int(idx[0]), int(idx[-1]) + 1, int(d[0]))
    return idx


def run_window(unit: Unit, ctx: BuildContext) -> dict:
    """Write the training shards of one window of climatology slots (every training year) and the
    window's climatology part; return each chunk's metadata and the window's float64 time sums.

    Every step of a slot falls in this window, so the day-of-year x hour means are complete here:
    the climatology needs no second read of the shards (issue 14)."""
    path = join(ctx.output, unit.path)
    variables = ctx.time_vars
    chunks = unit.chunks
    fp = _window_fingerprint(chunks, ctx)
    if not ctx.overwrite and _existing(path, ctx.recipe_fp, fp, ctx.storage_options) is not None:
        results = [run_chunk(c, ctx) for c in chunks]
        if not any(not r["skipped"] for r in results):  # everything there: take the part as it is
            fs, p = storage.filesystem(path, ctx.storage_options)
            with fs.open(p, "rb") as fh:
                table = pq.read_table(fh)
            sums, n = _part_time_sums(table, variables)
            part = {"path": unit.path, "rows": table.num_rows, "sha256": _sha256_of(path, ctx.storage_options)}
            return {"chunks": results, "time_sums": sums, "count": n, "skipped": True, "part": part}
    slots = np.asarray(unit.slots, dtype=np.int64)  # the window's slots at the climatology hours
    pos = {int(s): k for k, s in enumerate(slots)}
    h, w = len(ctx.lat), len(ctx.lon)
    acc = {v: np.zeros((len(slots), h, w), np.float64) for v in variables}
    total = {v: np.zeros((h, w), np.float64) for v in variables}  # every step, for the time mean
    counts = np.zeros(len(slots), np.int64)
    steps = 0
    results = []
    for chunk in chunks:
        res = run_chunk(chunk, ctx, keep_arrays=True)
        arrays = res.pop("arrays")
        keys = slot_keys(np.asarray(chunk.times))
        keep = np.flatnonzero(np.isin(keys, slots))
        at = np.array([pos[int(keys[i])] for i in keep], dtype=np.int64)
        counts[at] += 1  # a slot occurs once per year, so `at` has no repeats
        # a year's steps of a window are usually regular: add in place through views, no gather
        src, dst = _as_index(keep), _as_index(at)
        for v in variables:
            total[v] += arrays[v].sum(axis=0, dtype=np.float64)
            if len(at):
                acc[v][dst] += arrays[v][src]
        steps += len(keys)
        del arrays
        results.append(res)
    used = counts > 0
    doy, hour = slots[used] // 24 + 1, slots[used] % 24
    # one row per stored slot, then the window's mean over all its steps (day 0, hour -1), from which
    # the driver merges the time mean (climax.shards.climatology_rows drops it for readers)
    clim = {v: np.concatenate([acc[v][used] / counts[used][:, None, None], (total[v] / max(steps, 1))[None]])
            .astype(np.float32) for v in variables}
    del acc, total
    table = pa.table({"dayofyear": np.r_[doy, 0].astype(np.int16), "hour": np.r_[hour, -1].astype(np.int8),
                      "count": np.r_[counts[used], steps].astype(np.int32),
                      **{v: pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(clim[v]))
                         for v in variables}},
                     metadata={S.META_KEY: json.dumps({"recipe": ctx.recipe_fp, "sources": fp, "code": CODE_VERSION,
                                                       "format": S.FORMAT}).encode()})
    del clim
    part = {"path": unit.path, "rows": table.num_rows, "sha256": _write_table(path, table, variables, ctx)}
    sums, n = _part_time_sums(table, variables)
    pa.default_memory_pool().release_unused()  # give the encoder's buffers back between tasks
    return {"chunks": results, "time_sums": sums, "count": n, "skipped": False, "part": part}


def run_unit(unit: Unit, ctx: BuildContext) -> dict:
    """One Ray task: a window of training shards + its climatology part, or one shard."""
    if unit.kind == "window":
        return run_window(unit, ctx)
    res = run_chunk(unit.chunks[0], ctx)
    pa.default_memory_pool().release_unused()
    return {"chunks": [res], "time_sums": None, "count": 0, "skipped": res["skipped"]}

