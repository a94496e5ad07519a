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

This module is the driver. The stages live beside it: ``pipelines.scan`` (1), ``pipelines.plan``
(the typed plan: ``Read``, ``Chunk``, ``Unit``), ``pipelines.shard_task`` (2: the Ray task and its
``BuildContext``), ``pipelines.publish`` (3: manifest, stale files) and ``pipelines.output``
(atomic writes). Their public names stay importable from here.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipelines import lease, node_cache
from pipelines.output import table_bytes, write_atomic
from pipelines.plan import BuildError, Chunk, Plan, Read, Unit, calendar_times, plan_chunks
from pipelines.publish import make_manifest, publish, remove_stale, write_time_mean
from pipelines.recipe import Recipe
from pipelines.scan import expand_sources, fingerprint_file, scan_file
from pipelines.shard_task import CODE_VERSION, BuildContext, block_steps, run_chunk, run_unit, run_window

log = logging.getLogger("pipelines.build")

__all__ = ["build", "BuildError", "plan_chunks", "calendar_times", "Plan", "Chunk", "Read", "Unit", "BuildContext",
           "CODE_VERSION", "block_steps", "run_unit", "run_chunk", "run_window", "expand_sources", "scan_file",
           "fingerprint_file", "write_atomic", "table_bytes", "remove_stale"]


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


def build(recipe: Recipe, *, overwrite: bool = False, progress: bool = True,
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
            return _build(recipe, overwrite=overwrite, progress=progress, timings=timings, owner=owner)
        finally:
            node_cache.cleanup_nodes()
    finally:
        owner.release()


def _build(recipe: Recipe, *, overwrite: bool = False, progress: bool = True,
           timings: dict[str, float] | None = None, owner: lease.Lease | None = None) -> dict:
    import time as _time

    timings = {} if timings is None else timings
    so = recipe.storage_options or None
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
    chunk_bytes = max((len(c.times) or 1 for c in plan.chunks), default=1) * max(1, len(plan.time_vars)) * h * w * 4
    ctx = BuildContext(
        recipe_fp=recipe.fingerprint(), output=recipe.output, storage_options=so,
        files=tuple({k: v for k, v in f.items() if k != "times"} for f in files),
        lat=tuple(plan.dst.lat.tolist()), lon=tuple(plan.dst.lon.tolist()), method=recipe.grid.method,
        regrid_cache=recipe.regrid_cache, time_vars=tuple(plan.time_vars), overwrite=overwrite,
        compression_level=recipe.compression_level, block_bytes=max(budget - 4 * chunk_bytes, budget // 4),
        ranges={v: recipe.value_range(v) for v in recipe.variables},
        owner=owner.token if owner else None,
    )
    timings["plan"] = _time.perf_counter() - t
    t = _time.perf_counter()
    log.info("writing %d shards in %d tasks", len(plan.chunks), len(plan.units))

    results: list[dict] = []
    part_files: list[dict] = []  # rows and sha256 of each climatology file, for the readers' checks
    time_sum = {v: np.zeros((h, w), np.float64) for v in plan.time_vars}
    time_count = 0

    def take(_i: int, res: dict) -> None:
        nonlocal time_count
        results.extend(res["chunks"])
        if res.get("part"):
            part_files.append(res["part"])
        if res["time_sums"] is not None:
            for v, s in res["time_sums"].items():
                time_sum[v] += s
            time_count += res["count"]

    # each task carries its own chunks (time lists, reads); the shared context stays small
    _run_tasks(run_unit, plan.units, ctx, "shards", memory=budget, progress=progress, on_result=take)
    results.sort(key=lambda r: r["index"])
    timings["shards"] = _time.perf_counter() - t
    t = _time.perf_counter()

    parts = [u.path for u in plan.units if u.kind == "window"]
    if parts:
        part_files.append(write_time_mean(recipe, time_sum, time_count, overwrite=overwrite, owner=ctx.owner))
    manifest = make_manifest(recipe, plan, results, parts, part_files)
    manifest_path = publish(recipe, manifest, {r["path"] for r in results} | set(parts), owner)
    timings["driver"] = _time.perf_counter() - t
    log.info("wrote %s (%d shards, %d skipped)", manifest_path, len(results),
             sum(r.get("skipped", False) for r in results))
    return manifest


