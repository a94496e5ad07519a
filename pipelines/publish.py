"""The build's last stage, on the driver: the time mean, the manifest, and what an earlier build left.

``make_manifest`` merges the shard tasks' metadata (statistics in chunk order, splits by time,
variables and sources from the scan); ``publish`` writes ``manifest.json`` last and durably, then
removes the shards and climatology parts of an earlier recipe that no manifest lists any more and
the temporaries of this build or of dead owners (never those of a live writer: their names carry
its lease token, ``pipelines.output.write_atomic``).
"""

from __future__ import annotations

import hashlib
import json
import platform

import numpy as np

from climax import shards as S
from climax.redact import redact
from pipelines import lease, storage
from pipelines.output import join, table_bytes, tmp_owner, write_atomic
from pipelines.plan import Plan
from pipelines.recipe import Recipe
from pipelines.stats import Moments, merge_all

__all__ = ["write_time_mean", "make_manifest", "publish", "remove_stale", "versions"]

TIME_MEAN = f"{S.CLIMATOLOGY_DIR}/time_mean.parquet"


def write_time_mean(recipe: Recipe, time_sum: dict[str, np.ndarray], time_count: int, *, overwrite: bool = False,
                    owner: str | None = None) -> dict:
    """Write the time mean over every training step (from the windows' float64 sums); return its
    entry for the manifest's climatology files. A resumed run rewrites nothing."""
    so = recipe.storage_options or None
    mean = {v: (s / max(time_count, 1)).astype(np.float32) for v, s in time_sum.items()}
    data = table_bytes(S.table_from_arrays(None, mean), list(mean), recipe.compression_level)
    tm_path = join(recipe.output, TIME_MEAN)
    fs_tm, p_tm = storage.filesystem(tm_path, so)
    if overwrite or not fs_tm.exists(p_tm) or fs_tm.cat_file(p_tm) != bytes(data):
        write_atomic(tm_path, data, so, owner=owner)
    return {"path": TIME_MEAN, "rows": 1, "sha256": hashlib.sha256(data).hexdigest()}


def versions() -> dict:
    """Versions of Python and the packages that shape the output (recorded in the manifest)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("climax-ray", "numpy", "pyarrow", "xarray", "cfgrib", "eccodes", "ray", "scipy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _statistics(recipe: Recipe, results: list[dict]) -> dict:
    statistics = {}
    for v in recipe.variables:
        parts_v = [r["stats"][v] for r in results if v in r.get("stats", {})]
        values = merge_all(Moments.from_dict(p["values"]) for p in parts_v)
        diffs = merge_all(Moments.from_dict(p["diffs"]) for p in parts_v)
        statistics[v] = {"mean": values.mean, "std": values.std, "count": values.count,
                         "diff_std": diffs.std if diffs.count else None}
    return statistics


def _variables(recipe: Recipe, files: list[dict], const_vars: list[str]) -> dict:
    var_meta: dict[str, dict] = {}
    for f in files:
        for v, spec in f["variables"].items():
            entry = var_meta.setdefault(v, {"units": spec["units"], "source_names": [], "constant": spec["constant"]})
            if spec["source_name"] and spec["source_name"] not in entry["source_names"]:
                entry["source_names"].append(spec["source_name"])
    if "latitude" in recipe.variables:
        var_meta["latitude"] = {"units": "degrees_north", "source_names": [], "constant": True}
    return {v: {**var_meta.get(v, {}), "constant": v in const_vars} for v in recipe.variables}


def _splits(recipe: Recipe, results: list[dict]) -> dict:
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
    return splits


def make_manifest(recipe: Recipe, plan: Plan, results: list[dict], parts: list[str], part_files: list[dict]) -> dict:
    """The manifest of a finished build: ``results`` are the shard tasks' chunk metadata in chunk
    order, ``parts`` the climatology parts, ``part_files`` their rows and sha256 (and the time mean's)."""
    const = [r for r in results if r["kind"] == "constants"]
    return {
        "format": S.FORMAT,
        "grid": {"resolution": recipe.grid.resolution, "method": recipe.grid.method, "lat_order": S.LAT_ORDER,
                 "shape": list(plan.dst.shape), "lat": plan.dst.lat.tolist(), "lon": plan.dst.lon.tolist()},
        "time": {"step": recipe.time.step, "step_seconds": recipe.time.step_ns // 10**9, "calendar": plan.calendar,
                 "missing": recipe.time.missing, "gaps": plan.gaps or []},
        "variables": _variables(recipe, plan.files, plan.const_vars),
        "normalized": False,
        "constants": {"path": S.CONSTANTS, "rows": 1, "sha256": const[0]["sha256"]} if const else None,
        "splits": _splits(recipe, results),
        "statistics": _statistics(recipe, results),
        "climatology": {"path": S.CLIMATOLOGY_DIR, "over": "train", "slots": "dayofyear x hour",
                        "hours": plan.clim_hours,
                        "parts": parts, "time_mean": TIME_MEAN,
                        # rows and sha256 of each file, checked by the readers (climax.shards.check_rows)
                        "files": sorted(part_files, key=lambda f: f["path"])} if parts else None,
        "recipe": redact(recipe),  # no storage credentials in the published manifest (climax.redact)
        "recipe_fingerprint": recipe.fingerprint(),
        "versions": versions(),
        "sources": [{"path": f["path"], "format": f["format"], "fingerprint": f["fingerprint"],
                     "calendar": f["calendar"]} for f in plan.files],
    }


def publish(recipe: Recipe, manifest: dict, keep: set[str], owner: lease.Lease | None = None) -> str:
    """Write ``manifest.json`` (durably, replacing an earlier build's atomically), then remove what
    it does not list (``remove_stale``); return its path. Refuses if another build took the output
    over (``owner.check``)."""
    so = recipe.storage_options or None
    manifest_path = join(recipe.output, S.MANIFEST)
    if owner is not None:
        owner.check()  # never publish over a build that took the output over
    write_atomic(manifest_path, json.dumps(manifest, indent=1).encode(), so, durable=True,
                 owner=owner.token if owner else None)
    remove_stale(recipe, keep, owner)  # after: never listed by a manifest
    return manifest_path


def remove_stale(recipe: Recipe, keep: set[str], owner: lease.Lease | None = None) -> None:
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
            if rel == TIME_MEAN:
                continue
            if p.endswith(".tmp"):
                if owner is None or owner.owns_temporary(tmp_owner(p.rsplit("/", 1)[-1])):
                    fs.rm(p)
            elif rel not in keep and p.endswith(".parquet"):
                fs.rm(p)
