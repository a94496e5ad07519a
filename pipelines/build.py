"""The preprocessing build: recipe in, shards + statistics + climatology + manifest out, on Ray Data.

Stages (each a Ray Data ``map`` over small JSON rows, so the same code runs on one machine or a
cluster; every task writes its own output and returns only metadata):

1. scan: one task per source file reads its metadata (variables, valid times, grid, fingerprint).
   The driver checks coverage (every variable at every time step, no duplicates, one grid per
   variable, a grid the regridder accepts) before any data is decoded.
2. shards: one task per time chunk (a shard of at most ``shard_bytes``, never crossing a year)
   opens the files that hold those times, decodes, checks for NaN/Inf, regrids, writes the shard
   under a temporary name then renames it, and returns its checksum and float64 partial statistics
   (which also live in the shard's footer, so a re-run that skips it still merges them). One more
   task writes the constants.
3. climatology: one task per variable reads that column of the training shards and writes its
   day-of-year x hour climatology and time mean.
4. the driver merges statistics in chunk order and writes ``manifest.json`` last.

A re-run skips every shard whose footer records the same recipe and source fingerprints, so a
crashed run resumes and yields byte-identical shards; ``overwrite`` rebuilds everything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import uuid
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from climax import shards as S
from climax.redact import redact
from pipelines import regrid, storage
from pipelines.recipe import Recipe
from pipelines.sources import SourceError, list_files, open_source
from pipelines.sources.weatherbench import file_year
from pipelines.stats import ClimatologyAccumulator, Moments, merge_all
from pipelines.variables import parse_variable

log = logging.getLogger("pipelines.build")

__all__ = ["build", "BuildError", "plan_chunks"]

COMPUTED = {"latitude"}  # constants derived from the grid, not read


class BuildError(SourceError):
    """A problem with the inputs found while planning; the message says what to do."""


# ----------------------------------------------------------------------------- small helpers
def _ns(t: Any) -> int:
    return int(np.datetime64(t, "ns").astype(np.int64))


def _iso(ns: int) -> str:
    return str(np.datetime64(int(ns), "ns").astype("datetime64[s]"))


def fingerprint_file(path: str, storage_options: dict | None) -> str:
    """Size and modification time (local) or ETag and size (object storage): cheap and stable."""
    fs, p = storage.filesystem(path, storage_options)
    info = fs.info(p)
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return hashlib.sha256(f"{info.get('size')}|{tag}".encode()).hexdigest()[:16]


def write_atomic(path: str, data: bytes | memoryview, storage_options: dict | None) -> None:
    """Local: temporary name in the same folder, then rename. Object storage: one PUT, which is
    atomic (the object appears whole or not at all)."""
    fs, p = storage.filesystem(path, storage_options)
    if storage.is_remote(path):
        try:
            fs.pipe_file(p, bytes(data))
        except Exception as exc:  # e.g. a missing bucket: name it, the endpoint and what to check
            raise storage.explain(exc, path, storage_options) from None
        return
    os.makedirs(os.path.dirname(p), exist_ok=True)
    tmp = os.path.join(os.path.dirname(p), f".{os.path.basename(p)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def table_bytes(table: pa.Table, variables: list[str], compression_level: int) -> memoryview:
    """The Parquet file as one buffer (hashed and written as is, without a copy)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **S.write_options(variables, compression_level))
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
        if local_dir and fmt in ("weatherbench", "auto"):
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


# ----------------------------------------------------------------------------- 2. plan
@dataclass
class Plan:
    chunks: list[dict]
    files: list[dict]
    dst: regrid.Grid
    time_vars: list[str]
    const_vars: list[str]


def plan_chunks(recipe: Recipe, files: list[dict]) -> Plan:
    """Check coverage and cut the time axis into shards. Raises BuildError naming what is wrong."""
    dst = regrid.target_grid(recipe.grid.resolution)
    specs = {v: parse_variable(v) for v in recipe.variables}
    const_vars = [v for v in recipe.variables if specs[v].is_constant]
    time_vars = [v for v in recipe.variables if not specs[v].is_constant]
    times = recipe.time.times()
    # Model calendars without 29 February (noleap, 365_day; their times are converted to the
    # standard calendar when read) cannot have those steps: leave them out rather than call them
    # missing. Recorded in the manifest's sources (calendar per file).
    calendars = {str(f.get("calendar", "standard")).lower() for f in files if f["times"]}
    if calendars and calendars <= {"noleap", "365_day"}:
        days = times.astype("datetime64[D]")
        feb29 = (days - days.astype("datetime64[M]")).astype(int) == 28
        feb29 &= (days.astype("datetime64[M]").astype(int) % 12) == 1
        times = times[~feb29]
    years = times.astype("datetime64[Y]").astype(int) + 1970
    keep = np.array([recipe.split_of(int(y)) is not None for y in years])
    times, years = times[keep], years[keep]
    if not len(times):
        raise BuildError(f"no time step of time {recipe.time.start}..{recipe.time.end} falls in splits "
                         f"{dict(recipe.splits)}; widen the time range or the splits")
    tns = times.astype(np.int64)

    # where each (variable, time) lives
    where: dict[str, dict[int, int]] = {v: {} for v in time_vars}
    const_file: dict[str, int] = {}
    grids: dict[str, tuple[str, int]] = {}
    for i, f in enumerate(files):
        for v, spec in f["variables"].items():
            g = regrid.Grid(np.asarray(f["lat"]), np.asarray(f["lon"])).fingerprint()
            if v in grids and grids[v][0] != g:
                other = files[grids[v][1]]["path"]
                raise BuildError(
                    f"variable {v} comes on a {len(f['lat'])}x{len(f['lon'])} grid in {f['path']} but on a "
                    f"{len(files[grids[v][1]]['lat'])}x{len(files[grids[v][1]]['lon'])} grid in {other}; "
                    "mixed grids for one variable usually mean mixed products: give one source per variable")
            grids.setdefault(v, (g, i))
            if v in const_file or (v in specs and specs[v].is_constant):
                const_file.setdefault(v, i)
                continue
            if v not in where:
                continue
            for t in f["times"]:
                if t in where[v]:
                    raise BuildError(f"variable {v} at {_iso(t)} is in both {files[where[v][t]]['path']} and "
                                     f"{f['path']}; remove the duplicate file or narrow the source glob")
                where[v][t] = i
    for v in const_vars:
        if v not in COMPUTED and v not in const_file:
            raise BuildError(f"constant {v} is in none of the {len(files)} source files; add a source that has it "
                             "(e.g. the ERA5 invariants or WeatherBench constants) or drop it from variables")
    if calendars - {"standard", "gregorian", "proleptic_gregorian", "noleap", "365_day"} and time_vars:
        # 360_day and other model calendars map onto irregular standard dates: take the time
        # steps every variable has, within the recipe's range and split years
        common = set.intersection(*(set(where[v]) for v in time_vars))
        lo, hi = _ns(recipe.time.start.replace(tzinfo=None)), _ns(recipe.time.end.replace(tzinfo=None))
        tns = np.array(sorted(t for t in common if lo <= t <= hi and recipe.split_of(
            int(np.datetime64(t, "ns").astype("datetime64[Y]").astype(int) + 1970)) is not None), dtype=np.int64)
        years = tns.astype("datetime64[ns]").astype("datetime64[Y]").astype(int) + 1970
    for v in time_vars:
        if not where[v]:
            raise BuildError(f"variable {v} is in none of the {len(files)} source files "
                             f"({', '.join(f['path'] for f in files[:3])}{', ...' if len(files) > 3 else ''}); "
                             "check the variable name and level, or add a source that has it")
        missing = [t for t in tns if t not in where[v]]
        if missing:
            raise BuildError(
                f"variable {v} is missing at {len(missing)} of {len(tns)} time steps, first at "
                f"{', '.join(_iso(t) for t in missing[:3])}; add the files covering them, or set time.start/"
                "time.end/time.step to what the sources hold")
    for v, (_, i) in grids.items():  # a grid the regridder refuses fails here, before any decoding
        if v in where or v in const_file:
            try:
                regrid.get_regridder(regrid.Grid(np.asarray(files[i]["lat"]), np.asarray(files[i]["lon"])),
                                     dst, recipe.grid.method, cache_dir=recipe.regrid_cache)
            except regrid.RegridError as e:
                raise BuildError(f"{files[i]['path']} (variable {v}): {e}") from None

    h, w = dst.shape
    rows = max(1, recipe.shard_bytes // max(1, len(time_vars) * h * w * 4))
    step = recipe.time.step_ns
    chunks: list[dict] = []
    tset = set(tns.tolist())
    for year in sorted(set(years.tolist())):
        split = recipe.split_of(year)
        ys = tns[years == year]
        for k in range(0, len(ys), rows):
            part = ys[k:k + rows].tolist()
            prev = part[0] - step
            prev_ok = split == "train" and prev in tset and recipe.split_of(
                int(np.datetime64(prev, "ns").astype("datetime64[Y]").astype(int) + 1970)) == "train"
            reads: dict[int, dict] = defaultdict(lambda: {"variables": set(), "times": set()})
            for v in time_vars:
                for t in part + ([prev] if prev_ok else []):
                    r = reads[where[v][t]]
                    r["variables"].add(v)
                    r["times"].add(t)
            start = np.datetime64(part[0], "ns").astype("datetime64[m]").item()
            chunks.append({
                "kind": "shard", "index": len(chunks), "split": split, "year": year,
                "path": f"{split}/{year}/{start:%Y-%m-%dT%H%M}.parquet",
                "times": part, "prev": prev if prev_ok else None,
                "reads": [{"file": i, "variables": sorted(r["variables"]), "times": sorted(r["times"])}
                          for i, r in sorted(reads.items())],
            })
    consts = list(const_vars)
    if consts:
        chunks.append({"kind": "constants", "index": len(chunks), "path": S.CONSTANTS, "variables": consts,
                       "reads": [{"file": const_file[v], "variables": [v]} for v in consts if v not in COMPUTED]})
    return Plan(chunks, files, dst, time_vars, const_vars)


# ----------------------------------------------------------------------------- 3. work
def _sources_fingerprint(chunk: dict, files: list[dict]) -> str:
    ids = sorted({r["file"] for r in chunk["reads"]})
    text = "|".join(f"{files[i]['path']}:{files[i]['fingerprint']}" for i in ids)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _existing(path: str, recipe_fp: str, sources_fp: str, storage_options) -> dict | None:
    """The footer metadata of a finished shard made from the same recipe and sources, else None."""
    fs, p = storage.filesystem(path, storage_options)
    if not fs.exists(p):
        return None
    try:
        with fs.open(p, "rb") as f:
            meta = json.loads(pq.read_schema(f).metadata[S.META_KEY])
    except Exception:  # unreadable or foreign file: rebuild it
        return None
    if meta.get("recipe") == recipe_fp and meta.get("sources") == sources_fp:
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


def _read_fields(f: dict, variables: list[str], times: list[int] | None, dst: regrid.Grid, method: str,
                 cache_dir: str | None) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Decode, check and regrid ``variables`` of one file at ``times`` (None: constants)."""
    ds = _open_cached(f)
    if times is not None:
        idx = ds.get_index("time").get_indexer(np.asarray(times, dtype="int64").astype("datetime64[ns]"))
        if (idx < 0).any():
            raise SourceError(f"{f['path']}: time {_iso(times[int(np.argmax(idx < 0))])} was listed when the "
                              "file was scanned but is gone now; was the file replaced during the run?")
        # a contiguous run becomes a slice: HDF5/GRIB readers are much faster on slices than on lists
        contiguous = len(idx) > 1 and bool(np.all(np.diff(idx) == 1))
        ds = ds.isel(time=slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx)
    rg = regrid.get_regridder(_grid_of(ds), dst, method, cache_dir=cache_dir)
    out, attrs = {}, {}
    for v in variables:
        da = ds[v].transpose(*(("time",) if times is not None else ()), "lat", "lon")
        values = np.asarray(da.values, dtype=np.float32)
        bad = ~np.isfinite(values)
        if bad.any():
            where_ = "" if times is None else f" at {_iso(times[int(np.argwhere(bad)[0][0])])}"
            raise SourceError(
                f"{f['path']}: variable {v}{where_} has {int(bad.sum())} NaN/Inf values; the file is "
                "damaged or masked (e.g. a sea-only field); fix or replace it, or drop the variable")
        out[v] = rg(values)
        attrs[v] = {"units": da.attrs.get("units", ""), "source_name": da.attrs.get("source_name", "")}
    return out, attrs


def run_chunk(chunk: dict, ctx: dict) -> dict:
    """Write one shard (or the constants) and return its metadata (runs as a Ray task)."""
    recipe_fp, files, out, so = ctx["recipe_fp"], ctx["files"], ctx["output"], ctx["storage_options"]
    dst = regrid.Grid(np.asarray(ctx["lat"]), np.asarray(ctx["lon"]))
    sources_fp = _sources_fingerprint(chunk, files)
    path = _join(out, chunk["path"])
    if not ctx["overwrite"]:
        meta = _existing(path, recipe_fp, sources_fp, so)
        if meta is not None:
            return {**_summary(chunk), "rows": meta["rows"], "stats": meta["stats"], "sha256": _sha256_of(path, so),
                    "skipped": True}

    if chunk["kind"] == "constants":
        arrays: dict[str, np.ndarray] = {}
        for r in chunk["reads"]:
            got, _ = _read_fields(files[r["file"]], r["variables"], None, dst, ctx["method"], ctx["regrid_cache"])
            arrays.update(got)
        if "latitude" in chunk["variables"]:
            arrays["latitude"] = np.repeat(dst.lat[:, None], dst.shape[1], axis=1).astype(np.float32)
        arrays = {v: arrays[v] for v in chunk["variables"]}
        stats = {v: {"values": Moments.of(a).to_dict(), "diffs": Moments().to_dict()} for v, a in arrays.items()}
        times = None
        rows = 1
    else:
        n = len(chunk["times"])
        index = {t: k for k, t in enumerate(chunk["times"])}
        h, w = dst.shape
        arrays = {v: np.empty((n, h, w), np.float32) for v in ctx["time_vars"]}
        prev = {}
        for r in chunk["reads"]:
            got, _ = _read_fields(files[r["file"]], r["variables"], r["times"], dst, ctx["method"],
                                  ctx["regrid_cache"])
            for v, a in got.items():
                for k, t in enumerate(r["times"]):
                    if t == chunk["prev"]:
                        prev[v] = a[k]
                    else:
                        arrays[v][index[t]] = a[k]
        stats = {}
        if chunk["split"] == "train":
            for v, a in arrays.items():
                stats[v] = {"values": Moments.of(a).to_dict(), "diffs": Moments.of_diffs(prev.get(v), a).to_dict()}
        times = np.asarray(chunk["times"], dtype="int64").astype("datetime64[ns]")
        rows = n
    meta = {"recipe": recipe_fp, "sources": sources_fp, "rows": rows, "stats": stats}
    data = table_bytes(S.table_from_arrays(times, arrays, metadata=meta), list(arrays), ctx["compression_level"])
    write_atomic(path, data, so)
    digest = hashlib.sha256(data).hexdigest()
    del data, arrays
    pa.default_memory_pool().release_unused()  # give the encoder's buffers back between tasks
    return {**_summary(chunk), "rows": rows, "stats": stats, "sha256": digest, "skipped": False}


def _summary(chunk: dict) -> dict:
    """What the driver keeps of a finished chunk: not its time lists and reads (memory per year)."""
    out = {k: chunk[k] for k in ("kind", "index", "path", "split", "year") if k in chunk}
    if chunk["kind"] == "shard":
        out["start"], out["end"] = _iso(chunk["times"][0]), _iso(chunk["times"][-1])
    return out


def run_climatology(variable: str, ctx: dict) -> dict:
    """Day-of-year x hour climatology of one variable over the training shards (a Ray task)."""
    fs, _ = storage.filesystem(ctx["output"], ctx["storage_options"])
    acc = ClimatologyAccumulator(tuple(ctx["shape"]))
    for rel in ctx["train_shards"]:
        _, p = storage.filesystem(_join(ctx["output"], rel), ctx["storage_options"])
        with fs.open(p, "rb") as f:
            times, arrays = S.arrays_from_table(pq.read_table(f, columns=[S.TIME, variable]))
        acc.add(times, arrays[variable])
    doy, hour, counts, clim, mean = acc.result()
    table = pa.table({"dayofyear": doy, "hour": hour, "count": counts,
                      variable: pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(clim))})
    write_atomic(_join(ctx["output"], S.CLIMATOLOGY_DIR, f"{variable}.parquet"),
                 table_bytes(table, [variable], ctx["compression_level"]), ctx["storage_options"])
    return {"variable": variable, "slots": int(len(doy)), "time_mean": mean}


# ----------------------------------------------------------------------------- driver
def _ray_map(items: list, fn, ctx: dict, name: str) -> list:
    """Run ``fn(item, ctx)`` for every item as a Ray Data map (streaming, with progress bars)."""
    import ray

    if not items:
        return []
    ctx_ref = ray.put(ctx)

    def apply(row: dict) -> dict:
        # Errors travel back as data: Ray Data wraps task exceptions in a generic
        # UserCodeException that loses the message naming the file, variable and time step.
        try:
            result = fn(json.loads(row["item"]), ray.get(ctx_ref))
        except Exception as e:  # noqa: BLE001 - re-raised in the driver
            return {"order": row["order"], "result": "", "error": f"{type(e).__name__}: {e}"}
        return {"order": row["order"], "result": json.dumps(result, default=_jsonable), "error": ""}

    ds = ray.data.from_items([{"order": i, "item": json.dumps(it)} for i, it in enumerate(items)],
                             override_num_blocks=len(items))
    # Ray Data streams results in completion order; put them back in input order (determinism).
    rows = sorted(ds.map(apply, num_cpus=1).take_all(), key=lambda r: r["order"])
    errors = sorted({r["error"] for r in rows if r["error"]})
    if errors:
        more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
        raise BuildError(f"{name} stage failed: {errors[0]}{more}")
    return [json.loads(r["result"], object_hook=_unjsonable) for r in rows]


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return {"__ndarray__": o.tolist(), "dtype": str(o.dtype)}
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"cannot serialise {type(o)}")


def _unjsonable(d: dict) -> Any:
    if "__ndarray__" in d:
        return np.asarray(d["__ndarray__"], dtype=d["dtype"])
    return d


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("climax-ray", "numpy", "pyarrow", "xarray", "cfgrib", "eccodes", "ray", "scipy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def build(recipe: Recipe, overwrite: bool = False) -> dict:
    """Run the whole build on the connected Ray cluster; return the manifest."""
    so = recipe.storage_options or None
    fs, root = storage.filesystem(recipe.output, so)
    manifest_path = _join(recipe.output, S.MANIFEST)
    _, mp = storage.filesystem(manifest_path, so)
    if fs.exists(mp):  # a stale manifest must not describe shards this run may change
        fs.rm(mp)

    items = expand_sources(recipe)
    log.info("scanning %d source files", len(items))
    files = _ray_map(items, lambda it, c: scan_file(it, c["variables"]), {"variables": recipe.variables}, "scan")
    plan = plan_chunks(recipe, files)
    ctx = {
        "recipe_fp": recipe.fingerprint(), "output": recipe.output, "storage_options": so,
        "files": [{k: v for k, v in f.items() if k != "times"} for f in files],
        "lat": plan.dst.lat.tolist(), "lon": plan.dst.lon.tolist(), "method": recipe.grid.method,
        "regrid_cache": recipe.regrid_cache, "time_vars": plan.time_vars, "overwrite": overwrite,
        "compression_level": recipe.compression_level,
    }
    log.info("writing %d shards", len(plan.chunks))
    results = sorted(_ray_map(plan.chunks, run_chunk, ctx, "shards"), key=lambda r: r["index"])

    train = [r["path"] for r in results if r["kind"] == "shard" and r["split"] == "train"]
    cctx = {"output": recipe.output, "storage_options": so, "shape": list(plan.dst.shape),
            "train_shards": train, "compression_level": recipe.compression_level}
    clim = {c["variable"]: c for c in _ray_map(plan.time_vars, run_climatology, cctx, "climatology")}
    if clim:
        mean_table = S.table_from_arrays(None, {v: np.asarray(c["time_mean"], np.float32) for v, c in clim.items()})
        write_atomic(_join(recipe.output, S.CLIMATOLOGY_DIR, "time_mean.parquet"),
                     table_bytes(mean_table, list(clim), recipe.compression_level), so)

    statistics = {}
    for v in recipe.variables:
        parts = [r["stats"][v] for r in results if v in r.get("stats", {})]
        values = merge_all(Moments.from_dict(p["values"]) for p in parts)
        diffs = merge_all(Moments.from_dict(p["diffs"]) for p in parts)
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
        "time": {"step": recipe.time.step, "step_seconds": recipe.time.step_ns // 10**9},
        "variables": variables,
        "normalized": False,
        "constants": {"path": S.CONSTANTS, "sha256": const[0]["sha256"]} if const else None,
        "splits": splits,
        "statistics": statistics,
        "climatology": {"path": S.CLIMATOLOGY_DIR, "over": "train", "slots": "dayofyear x hour",
                        "time_mean": f"{S.CLIMATOLOGY_DIR}/time_mean.parquet"} if clim else None,
        "recipe": redact(recipe),  # no storage credentials in the published manifest (climax.redact)
        "recipe_fingerprint": recipe.fingerprint(),
        "versions": _versions(),
        "sources": [{"path": f["path"], "format": f["format"], "fingerprint": f["fingerprint"],
                     "calendar": f["calendar"]} for f in files],
    }
    _remove_stale(recipe, {r["path"] for r in results})
    write_atomic(manifest_path, json.dumps(manifest, indent=1).encode(), so)
    log.info("wrote %s (%d shards, %d skipped)", manifest_path, len(results),
             sum(r.get("skipped", False) for r in results))
    return manifest


def _remove_stale(recipe: Recipe, keep: set[str]) -> None:
    """Delete shards of an earlier recipe that this plan does not produce (and leftover temps)."""
    so = recipe.storage_options or None
    fs, root = storage.filesystem(recipe.output, so)
    for split in ("train", "val", "test"):
        base = f"{root.rstrip('/')}/{split}"
        if not fs.exists(base):
            continue
        for p in fs.find(base):
            rel = p[len(root.rstrip("/")) + 1:]
            if rel not in keep and (p.endswith(".parquet") or p.endswith(".tmp")):
                fs.rm(p)
