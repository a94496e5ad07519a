"""The preprocessing build: recipe in, shards + statistics + climatology + manifest out, on Ray.

Stages (plain Ray tasks, so the same code runs on one machine or a cluster; every task writes its
own output and returns only metadata; docs/design.md says why not Ray Data):

1. scan: one task per source file reads its metadata (variables, valid times, grid, fingerprint).
   The driver checks coverage (every variable at every time step, no duplicates, one grid per
   variable, a grid the regridder accepts) before any data is decoded.
2. shards, in one pass: training years are cut by windows of day-of-year x hour slots; one task
   per window decodes, checks, regrids (a few steps of one variable at a time, within
   ``max_task_mb``) and writes that window's shards for every training year, its climatology part
   (the slots at ``climatology_hours`` and the mean of all its steps) and returns float64 partial
   statistics (also kept in each shard's footer, so a re-run that skips it still merges them).
   Validation/test shards and the constants are one task each. Files are written under a
   temporary name, then renamed.
3. the driver merges statistics in chunk order and the time mean from the parts, and writes
   ``manifest.json`` last. No stage reads the shards again.

A re-run skips every shard whose footer records the same recipe and source fingerprints and code
version, so a crashed run resumes and yields byte-identical shards; ``overwrite`` rebuilds everything.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import re
from collections import OrderedDict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from climax import shards as S
from climax.redact import redact
from climax.storage import write_bytes
from pipelines import lease, node_cache, regrid, storage
from pipelines.recipe import Recipe
from pipelines.sources import SourceError, is_zarr_path, list_files, open_source
from pipelines.sources.weatherbench import file_year
from pipelines.stats import Moments, merge_all
from pipelines.names import check_range
# the plan's home is pipelines.plan; BuildError, plan_chunks and calendar_times stay importable from here
from pipelines.plan import BuildError, calendar_times, iso, plan_chunks, slot_keys  # noqa: F401

log = logging.getLogger("pipelines.build")

__all__ = ["build", "BuildError", "plan_chunks"]

# ----------------------------------------------------------------------------- small helpers
def fingerprint_file(path: str, storage_options: dict | None) -> str:
    """Size and modification time (local) or ETag and size (object storage): cheap and stable.
    A Zarr store (a folder of objects) by its metadata object (see sources.zarr.metadata_path)."""
    if is_zarr_path(path):
        from pipelines.sources.zarr import metadata_path

        path = metadata_path(path, storage_options)
    fs, p = storage.filesystem(path, storage_options)
    info = fs.info(p)
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return hashlib.sha256(f"{info.get('size')}|{tag}".encode()).hexdigest()[:16]


def write_atomic(path: str, data: bytes | memoryview, storage_options: dict | None, *, durable: bool = False,
                 owner: str | None = None) -> None:
    """Local: temporary name in the same folder, then rename. Object storage: one PUT, which is
    atomic (the object appears whole or not at all).

    ``owner``: the build's lease token, part of the temporary name (``.<name>.<token>.<random>.tmp``)
    so that a build removes only its own and dead owners' temporaries (``_remove_stale``).

    ``durable`` also fsyncs before the rename (the manifest). Shards skip it: a crash never leaves
    a half-written shard under its name either way, a re-run checks every footer, and forcing
    3.5 GB of writes through fsync cost the 2-core build a quarter of its speed (RESULTS.md)."""
    fs, p = storage.filesystem(path, storage_options)
    if storage.is_remote(path):
        try:
            fs.pipe_file(p, bytes(data))
        except Exception as exc:  # e.g. a missing bucket: name it, the endpoint and what to check
            raise storage.explain(exc, path, storage_options) from None
        return
    try:
        write_bytes(p, data, tag=owner or "", durable=durable)
    except OSError as exc:
        if exc.errno in _FULL:  # the disk, a quota or a file-size limit: say which file and what to do
            raise OSError(exc.errno, f"no space left writing {p} ({exc.strerror}, {len(data)} bytes); free "
                                     "space there or set output to a folder with room (a re-run resumes: "
                                     "finished shards are kept)") from None
        raise


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def table_bytes(table: pa.Table, variables: list[str], compression_level: int) -> memoryview:
    """The Parquet file as one buffer (hashed and written as is, without a copy)."""
    sink = pa.BufferOutputStream()
    shape = table.schema.field(variables[0]).type.shape if variables else None
    pq.write_table(table, sink, **S.write_options(variables, compression_level, shape))
    return memoryview(sink.getvalue())


def _grid_of(ds) -> regrid.Grid:
    return regrid.Grid(np.asarray(ds["lat"].values, np.float64), np.asarray(ds["lon"].values, np.float64))


# ----------------------------------------------------------------------------- 1. scan
def expand_sources(recipe: Recipe) -> list[dict]:
    """One item per source file: path, format, member, storage options."""
    items = []
    for src in recipe.sources:
        fmt = src.format
        local_dir = not storage.is_remote(src.path) and os.path.isdir(src.path)
        if local_dir and (fmt == "weatherbench" or fmt == "auto" and not is_zarr_path(src.path)):
            # yearly files of the recipe's years only (constants have no year)
            files = [f for fs in list_files(src.path, recipe.variables).values() for f in fs
                     if file_year(f) is None or recipe.split_of(file_year(f)) is not None]
            fmt = "weatherbench"
        else:
            files = storage.expand_paths(src.path, src.storage_options)
        items += [dict(path=f, format=fmt, member=src.member, storage_options=src.storage_options)
                  for f in files]
    return items


def scan_file(item: dict, variables: list[str]) -> dict:
    """Metadata of one source file (runs as a Ray task)."""
    ds = open_source(item["path"], item["format"], member=item["member"],
                     storage_options=item["storage_options"] or None)
    wanted = [v for v in ds.data_vars if v in variables]
    meta = {
        "variables": {v: {"units": ds[v].attrs.get("units", ""), "source_name": ds[v].attrs.get("source_name", ""),
                          "constant": "time" not in ds[v].dims} for v in wanted},
        "times": [int(t) for t in np.asarray(ds["time"].values, "datetime64[ns]").astype(np.int64)]
        if "time" in ds.coords and ds["time"].ndim == 1 else [],
        "lat": [float(x) for x in ds["lat"].values],
        "lon": [float(x) for x in ds["lon"].values],
        "calendar": ds.attrs.get("calendar", "standard"),
        "fingerprint": fingerprint_file(item["path"], item["storage_options"] or None),
    }
    ds.close()
    return {**item, **meta}


# ----------------------------------------------------------------------------- 3. work (2. plan: pipelines/plan.py)
def _sources_fingerprint(chunk: dict, files: list[dict]) -> str:
    ids = sorted({r["file"] for r in chunk["reads"]})
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


def _chunk_arrays(chunk: dict, ctx: dict, dst: regrid.Grid) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The chunk's fields on the target grid (float32 (n, H, W) per variable), and the step before
    it (for differences across chunk edges)."""
    files = ctx["files"]
    n = len(chunk["times"])
    index = {t: k for k, t in enumerate(chunk["times"])}
    h, w = dst.shape
    arrays = {v: np.empty((n, h, w), np.float32) for v in ctx["time_vars"]}
    prev: dict[str, np.ndarray] = {}

    def put(v: str, times: list[int], block: np.ndarray) -> None:
        for t, field_ in zip(times, block):
            if t == chunk["prev"]:
                prev[v] = np.array(field_, np.float32)
            else:
                arrays[v][index[t]] = field_

    for r in chunk["reads"]:
        _read_into(files[r["file"]], r["variables"], r["times"], put, dst, ctx["method"], ctx["regrid_cache"],
                   ctx["block_bytes"], ctx.get("ranges"))
    return arrays, prev


def _chunk_stats(chunk: dict, arrays: dict[str, np.ndarray], prev: dict[str, np.ndarray]) -> dict:
    if chunk.get("split") != "train":
        return {}
    return {v: {"values": Moments.of(a).to_dict(), "diffs": Moments.of_diffs(prev.get(v), a).to_dict()}
            for v, a in arrays.items()}


def _write_table(path: str, table: pa.Table, variables: list[str], ctx: dict) -> str:
    data = table_bytes(table, variables, ctx["compression_level"])
    write_atomic(path, data, ctx["storage_options"], owner=ctx.get("owner"))
    digest = hashlib.sha256(data).hexdigest()
    del data
    return digest


def run_chunk(chunk: dict, ctx: dict, *, keep_arrays: bool = False) -> dict:
    """Write one shard (or the constants) and return its metadata. With ``keep_arrays`` the
    result also holds the chunk's fields (``arrays``, from the shard itself when it is skipped)."""
    recipe_fp, files, out, so = ctx["recipe_fp"], ctx["files"], ctx["output"], ctx["storage_options"]
    dst = regrid.Grid(np.asarray(ctx["lat"]), np.asarray(ctx["lon"]))
    sources_fp = _sources_fingerprint(chunk, files)
    path = _join(out, chunk["path"])
    if not ctx["overwrite"]:
        meta = _existing(path, recipe_fp, sources_fp, so)
        if meta is not None:
            res = {**_summary(chunk), "rows": meta["rows"], "stats": meta["stats"], "sha256": _sha256_of(path, so),
                   "skipped": True}
            if keep_arrays:
                fs, p = storage.filesystem(path, so)
                with fs.open(p, "rb") as fh:
                    res["arrays"] = S.arrays_from_table(pq.read_table(fh))[1]
            return res

    if chunk["kind"] == "constants":
        arrays: dict[str, np.ndarray] = {}
        for r in chunk["reads"]:
            arrays.update(_read_constants(files[r["file"]], r["variables"], dst, ctx["method"], ctx["regrid_cache"],
                                          ctx.get("ranges")))
        if "latitude" in chunk["variables"]:
            arrays["latitude"] = np.repeat(dst.lat[:, None], dst.shape[1], axis=1).astype(np.float32)
        arrays = {v: arrays[v] for v in chunk["variables"]}
        stats = {v: {"values": Moments.of(a).to_dict(), "diffs": Moments().to_dict()} for v, a in arrays.items()}
        times = None
        rows = 1
    else:
        arrays, prev = _chunk_arrays(chunk, ctx, dst)
        stats = _chunk_stats(chunk, arrays, prev)
        times = np.asarray(chunk["times"], dtype="int64").astype("datetime64[ns]")
        rows = len(chunk["times"])
    meta = {"recipe": recipe_fp, "sources": sources_fp, "rows": rows, "stats": stats, "code": CODE_VERSION,
            "format": S.FORMAT}
    digest = _write_table(path, S.table_from_arrays(times, arrays, metadata=meta), list(arrays), ctx)
    res = {**_summary(chunk), "rows": rows, "stats": stats, "sha256": digest, "skipped": False}
    if keep_arrays:
        res["arrays"] = arrays
    return res


def _summary(chunk: dict) -> dict:
    """What the driver keeps of a finished chunk: not its time lists and reads (memory per year)."""
    out = {k: chunk[k] for k in ("kind", "index", "path", "split", "year") if k in chunk}
    if chunk["kind"] == "shard":
        out["start"], out["end"] = iso(chunk["times"][0]), iso(chunk["times"][-1])
    return out


def _window_fingerprint(chunks: list[dict], ctx: dict) -> str:
    text = "|".join([ctx["recipe_fp"], *(f"{c['path']}:{_sources_fingerprint(c, ctx['files'])}" for c in chunks)])
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


def run_window(unit: dict, ctx: dict) -> dict:
    """Write the training shards of one window of climatology slots (every training year) and the
    window's climatology part; return each chunk's metadata and the window's float64 time sums.

    Every step of a slot falls in this window, so the day-of-year x hour means are complete here:
    the climatology needs no second read of the shards (issue 14)."""
    path = _join(ctx["output"], unit["path"])
    variables = ctx["time_vars"]
    chunks = unit["chunk_list"]
    fp = _window_fingerprint(chunks, ctx)
    if not ctx["overwrite"] and _existing(path, ctx["recipe_fp"], fp, ctx["storage_options"]) is not None:
        results = [run_chunk(c, ctx) for c in chunks]
        if not any(not r["skipped"] for r in results):  # everything there: take the part as it is
            fs, p = storage.filesystem(path, ctx["storage_options"])
            with fs.open(p, "rb") as fh:
                table = pq.read_table(fh)
            sums, n = _part_time_sums(table, variables)
            part = {"path": unit["path"], "rows": table.num_rows, "sha256": _sha256_of(path, ctx["storage_options"])}
            return {"chunks": results, "time_sums": sums, "count": n, "skipped": True, "part": part}
    slots = np.asarray(unit["slots"], dtype=np.int64)  # the window's slots at the climatology hours
    pos = {int(s): k for k, s in enumerate(slots)}
    h, w = len(ctx["lat"]), len(ctx["lon"])
    acc = {v: np.zeros((len(slots), h, w), np.float64) for v in variables}
    total = {v: np.zeros((h, w), np.float64) for v in variables}  # every step, for the time mean
    counts = np.zeros(len(slots), np.int64)
    steps = 0
    results = []
    for chunk in chunks:
        res = run_chunk(chunk, ctx, keep_arrays=True)
        arrays = res.pop("arrays")
        keys = slot_keys(np.asarray(chunk["times"]))
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
                     metadata={S.META_KEY: json.dumps({"recipe": ctx["recipe_fp"], "sources": fp, "code": CODE_VERSION,
                                                       "format": S.FORMAT}).encode()})
    del clim
    part = {"path": unit["path"], "rows": table.num_rows, "sha256": _write_table(path, table, variables, ctx)}
    sums, n = _part_time_sums(table, variables)
    pa.default_memory_pool().release_unused()  # give the encoder's buffers back between tasks
    return {"chunks": results, "time_sums": sums, "count": n, "skipped": False, "part": part}


def run_unit(unit: dict, ctx: dict) -> dict:
    """One Ray task: a window of training shards + its climatology part, or one shard."""
    if unit["kind"] == "window":
        return run_window(unit, ctx)
    res = run_chunk(unit["chunk_list"][0], ctx)
    pa.default_memory_pool().release_unused()
    return {"chunks": [res], "time_sums": None, "count": 0, "skipped": res["skipped"]}


# ----------------------------------------------------------------------------- driver
def _guarded(fn, *args):
    """Errors travel back as data: the message names the file, variable and time step, and the
    driver raises it once as a BuildError instead of a Ray traceback per task."""
    try:
        return {"ok": fn(*args)}
    except Exception as e:  # noqa: BLE001 - re-raised in the driver
        return {"error": f"{type(e).__name__}: {e}"}


def _run_tasks(fn, items: list, ctx: Any, name: str, *, memory: int | None = None,
               progress: bool = True, on_result=None) -> list:
    """Run ``fn(item, ctx)`` for every item as plain Ray tasks; results in input order.

    Plain tasks rather than Ray Data: our stages are independent items that write their own
    output and return small metadata; no data flows between them, so Ray Data's operators, its
    two internal actors (~400 MB) and its start-up (8-12 s on 2 cores) bought nothing (measured,
    benchmarks/RESULTS.md). ``memory`` is Ray's logical memory resource per task (the recipe's
    ``max_task_mb``), so a node never runs more tasks at once than its memory holds.
    ``on_result(i, result)`` is called in input order as results arrive (to merge and free them)."""
    import ray
    from tqdm.auto import tqdm

    if not items:
        return []
    ctx_ref = ray.put(ctx)
    opts: dict[str, Any] = {"num_cpus": 1, "max_retries": 3}
    if memory:
        opts["memory"] = int(memory)
    task = ray.remote(_guarded).options(name=f"build.{name}", **opts)
    refs = [task.remote(fn, it, ctx_ref) for it in items]
    order = {r: i for i, r in enumerate(refs)}
    done: dict[int, Any] = {}
    out: list[Any] = [None] * len(items)
    next_i = 0
    errors: list[str] = []
    pending = list(refs)
    with tqdm(total=len(items), desc=name, unit="task", disable=not progress, leave=False) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=None)
            for r in ready:
                got = ray.get(r)
                bar.update(1)
                if "error" in got:
                    errors.append(got["error"])
                    continue
                done[order[r]] = got["ok"]
            if errors:
                for r in pending:
                    ray.cancel(r)
                more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
                raise BuildError(f"{name} stage failed: {sorted(errors)[0]}{more}")
            while next_i in done:  # hand results over in input order (determinism)
                res = done.pop(next_i)
                out[next_i] = on_result(next_i, res) if on_result else res
                next_i += 1
    return out


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("climax-ray", "numpy", "pyarrow", "xarray", "cfgrib", "eccodes", "ray", "scipy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def build(recipe: Recipe, overwrite: bool = False, *, progress: bool = True,
          timings: dict[str, float] | None = None) -> dict:
    """Run the whole build on the connected Ray cluster; return the manifest.

    ``timings``, when given, receives the wall time of each stage (for benchmarks)."""
    # one build at a time per output: a second one refuses naming the first, before touching
    # anything (pipelines.lease); the lease goes at the end, on error too
    owner = lease.acquire(recipe.output, recipe.storage_options or None)
    try:
        # local copies of remote sources (only formats that cannot be streamed): those a killed run
        # left are removed first, this run's when it ends (one task per node; pipelines.node_cache)
        node_cache.cleanup_nodes()
        try:
            return _build(recipe, overwrite, progress=progress, timings=timings, owner=owner)
        finally:
            node_cache.cleanup_nodes()
    finally:
        owner.release()


def _build(recipe: Recipe, overwrite: bool = False, *, progress: bool = True,
           timings: dict[str, float] | None = None, owner: lease.Lease | None = None) -> dict:
    import time as _time

    timings = {} if timings is None else timings
    so = recipe.storage_options or None
    fs, root = storage.filesystem(recipe.output, so)
    manifest_path = _join(recipe.output, S.MANIFEST)
    _, mp = storage.filesystem(manifest_path, so)
    # The manifest of an earlier build stays published until this build's replaces it atomically:
    # a re-run with a typo or expired credentials must never unpublish a good dataset (issue 16).
    budget = recipe.max_task_mb * 2**20

    t = _time.perf_counter()
    items = expand_sources(recipe)
    log.info("scanning %d source files", len(items))
    files = _run_tasks(scan_file, items, recipe.variables, "scan", progress=progress)
    timings["scan"] = _time.perf_counter() - t
    t = _time.perf_counter()
    plan = plan_chunks(recipe, files)
    h, w = plan.dst.shape
    # what a task holds besides its decode sub-blocks: the chunk's fields, the window's float64
    # climatology sums (twice the chunk) and the encoded shard
    chunk_bytes = max((len(c.get("times", [1])) for c in plan.chunks), default=1) * max(1, len(plan.time_vars)) * h * w * 4
    block_bytes = max(budget - 4 * chunk_bytes, budget // 4)
    ctx = {
        "recipe_fp": recipe.fingerprint(), "output": recipe.output, "storage_options": so,
        "files": [{k: v for k, v in f.items() if k != "times"} for f in files],
        "lat": plan.dst.lat.tolist(), "lon": plan.dst.lon.tolist(), "method": recipe.grid.method,
        "regrid_cache": recipe.regrid_cache, "time_vars": plan.time_vars, "overwrite": overwrite,
        "compression_level": recipe.compression_level, "block_bytes": block_bytes,
        "ranges": {v: recipe.value_range(v) for v in recipe.variables},
        "owner": owner.token if owner else None,
    }
    timings["plan"] = _time.perf_counter() - t
    t = _time.perf_counter()
    log.info("writing %d shards in %d tasks", len(plan.chunks), len(plan.units))

    results: list[dict] = []
    part_files: list[dict] = []  # rows and sha256 of each climatology file, for the readers' checks
    time_sum = {v: np.zeros((h, w), np.float64) for v in plan.time_vars}
    time_count = 0
    windows_done = 0

    def take(_i: int, res: dict) -> None:
        nonlocal time_count, windows_done
        results.extend(res["chunks"])
        if res.get("part"):
            part_files.append(res["part"])
        if res["time_sums"] is not None:
            for v, s in res["time_sums"].items():
                time_sum[v] += s
            time_count += res["count"]
            windows_done += 1

    # each task carries its own chunks (time lists, reads); the shared context stays small
    units = [{**u, "chunk_list": [plan.chunks[i] for i in u["chunks"]]} for u in plan.units]
    _run_tasks(run_unit, units, ctx, "shards", memory=budget, progress=progress, on_result=take)
    del units
    results.sort(key=lambda r: r["index"])
    timings["shards"] = _time.perf_counter() - t
    t = _time.perf_counter()

    parts = [u["path"] for u in plan.units if u["kind"] == "window"]
    if parts:
        mean = {v: (time_sum[v] / max(time_count, 1)).astype(np.float32) for v in plan.time_vars}
        data = table_bytes(S.table_from_arrays(None, mean), list(mean), recipe.compression_level)
        tm_path = _join(recipe.output, S.CLIMATOLOGY_DIR, "time_mean.parquet")
        fs_tm, p_tm = storage.filesystem(tm_path, so)
        if overwrite or not fs_tm.exists(p_tm) or fs_tm.cat_file(p_tm) != bytes(data):  # a resumed run rewrites nothing
            write_atomic(tm_path, data, so, owner=ctx["owner"])
        part_files.append({"path": f"{S.CLIMATOLOGY_DIR}/time_mean.parquet", "rows": 1,
                           "sha256": hashlib.sha256(data).hexdigest()})

    statistics = {}
    for v in recipe.variables:
        parts_v = [r["stats"][v] for r in results if v in r.get("stats", {})]
        values = merge_all(Moments.from_dict(p["values"]) for p in parts_v)
        diffs = merge_all(Moments.from_dict(p["diffs"]) for p in parts_v)
        statistics[v] = {"mean": values.mean, "std": values.std, "count": values.count,
                         "diff_std": diffs.std if diffs.count else None}

    var_meta: dict[str, dict] = {}
    for f in files:
        for v, spec in f["variables"].items():
            entry = var_meta.setdefault(v, {"units": spec["units"], "source_names": [], "constant": spec["constant"]})
            if spec["source_name"] and spec["source_name"] not in entry["source_names"]:
                entry["source_names"].append(spec["source_name"])
    if "latitude" in recipe.variables:
        var_meta["latitude"] = {"units": "degrees_north", "source_names": [], "constant": True}
    variables = {v: {**var_meta.get(v, {}), "constant": v in plan.const_vars} for v in recipe.variables}

    splits = {}
    for name in recipe.splits:
        rs = [r for r in results if r["kind"] == "shard" and r["split"] == name]
        rs.sort(key=lambda r: r["start"])  # training shards are planned by window, listed by time
        splits[name] = {
            "years": list(recipe.splits[name]),
            "start": rs[0]["start"] if rs else None,
            "end": rs[-1]["end"] if rs else None,
            "rows": sum(r["rows"] for r in rs),
            "shards": [{"path": r["path"], "rows": r["rows"], "start": r["start"], "end": r["end"],
                        "sha256": r["sha256"]} for r in rs],
        }
    const = [r for r in results if r["kind"] == "constants"]
    manifest = {
        "format": S.FORMAT,
        "grid": {"resolution": recipe.grid.resolution, "method": recipe.grid.method, "lat_order": S.LAT_ORDER,
                 "shape": list(plan.dst.shape), "lat": plan.dst.lat.tolist(), "lon": plan.dst.lon.tolist()},
        "time": {"step": recipe.time.step, "step_seconds": recipe.time.step_ns // 10**9, "calendar": plan.calendar,
                 "missing": recipe.time.missing, "gaps": plan.gaps or []},
        "variables": variables,
        "normalized": False,
        "constants": {"path": S.CONSTANTS, "rows": 1, "sha256": const[0]["sha256"]} if const else None,
        "splits": splits,
        "statistics": statistics,
        "climatology": {"path": S.CLIMATOLOGY_DIR, "over": "train", "slots": "dayofyear x hour",
                        "hours": plan.clim_hours,
                        "parts": parts, "time_mean": f"{S.CLIMATOLOGY_DIR}/time_mean.parquet",
                        # rows and sha256 of each file, checked by the readers (climax.shards.check_rows)
                        "files": sorted(part_files, key=lambda f: f["path"])} if parts else None,
        "recipe": redact(recipe),  # no storage credentials in the published manifest (climax.redact)
        "recipe_fingerprint": recipe.fingerprint(),
        "versions": _versions(),
        "sources": [{"path": f["path"], "format": f["format"], "fingerprint": f["fingerprint"],
                     "calendar": f["calendar"]} for f in files],
    }
    if owner is not None:
        owner.check()  # never publish over a build that took the output over
    write_atomic(manifest_path, json.dumps(manifest, indent=1).encode(), so, durable=True, owner=ctx["owner"])
    _remove_stale(recipe, {r["path"] for r in results} | set(parts), owner)  # after: never listed by a manifest
    timings["driver"] = _time.perf_counter() - t
    log.info("wrote %s (%d shards, %d skipped)", manifest_path, len(results),
             sum(r.get("skipped", False) for r in results))
    return manifest


#: ``.<name>.<owner token>.<random>.tmp`` (write_atomic); older code wrote ``.<name>.<random>.tmp``
_TMP = re.compile(r"^\..+?(?:\.([0-9a-f]{32}))?\.[0-9a-f]{8}\.tmp$")


def _tmp_owner(name: str) -> str | None:
    m = _TMP.match(name)
    return m.group(1) if m else None


def _remove_stale(recipe: Recipe, keep: set[str], owner: lease.Lease | None = None) -> None:
    """Delete shards and climatology parts of an earlier recipe that this plan does not produce,
    and leftover temporaries of this build or of owners whose lease it took over: never those of
    another live writer (their names carry its lease token)."""
    so = recipe.storage_options or None
    fs, root = storage.filesystem(recipe.output, so)
    for sub in ("train", "val", "test", S.CLIMATOLOGY_DIR):
        base = f"{root.rstrip('/')}/{sub}"
        if not fs.exists(base):
            continue
        for p in fs.find(base):
            rel = p[len(root.rstrip("/")) + 1:]
            if rel == f"{S.CLIMATOLOGY_DIR}/time_mean.parquet":
                continue
            if p.endswith(".tmp"):
                if owner is None or owner.owns_temporary(_tmp_owner(p.rsplit("/", 1)[-1])):
                    fs.rm(p)
            elif rel not in keep and p.endswith(".parquet"):
                fs.rm(p)
