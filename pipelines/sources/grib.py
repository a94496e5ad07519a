"""GRIB 1 / GRIB 2 reader: a cached byte-level index plus per-message ecCodes decoding.

1. :func:`pipelines.sources.grib_index.get_index` indexes the file in one pass over its bytes
   (message boundaries, header keys decoded by ecCodes once per distinct header signature,
   valid times from the raw reference time + step) and caches the index per process and on
   local disk, so the many workers that open the same file reuse it. Truncated or corrupt files
   raise :class:`SourceError` naming the file.
2. From the index: which fields map to ClimaX variables; duplicate valid times (several base
   times + steps landing on one valid time) are refused; each field becomes a lazy
   :class:`~pipelines.sources.grib_index.GribArray` with dims (number, time[, level], lat, lon)
   (forecasts flattened to valid times), which reads and decodes only the messages indexed.
   Non-regular grids (reduced Gaussian, rotated, ...) are listed but refused when selected.

cfgrib is not used to read data (tests use it as the cross-check).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import xarray as xr
from xarray.core import indexing

from pipelines import names as V
from pipelines.sources import grib_index as GI
from pipelines.sources.base import Candidate, SourceError, assemble

_REDOWNLOAD = "the file is truncated or corrupt; re-download it"
_REGULAR = ("regular_ll", "regular_gg")


def scan(path: str) -> list[dict]:
    """Header keys of every field (from the cached index); SourceError for truncated/corrupt
    files."""
    return GI.get_index(str(path)).records()


def _window(step_range) -> float:
    s = str(step_range)
    if "-" in s:
        a, b = s.split("-", 1)
        try:
            return float(b) - float(a)
        except ValueError:
            return 0.0
    return 0.0


def _fmt_date_time(ns: int) -> tuple[str, str]:
    d, t = GI._date_time(np.datetime64(int(ns), "ns"))
    return str(d), f"{t:04d}"


def _check_duplicates(path: str, idx: GI.GribIndex) -> None:
    """Refuse one valid time reached from different base times / steps for one field."""
    kinds = idx.kinds
    dup_key: dict[tuple, int] = {}
    kind_dup = np.full(len(kinds), -1, dtype=np.int64)
    step_id: dict[str, int] = {}
    kind_step = np.zeros(len(kinds), dtype=np.int64)
    for i, k in enumerate(kinds):
        kind_step[i] = step_id.setdefault(str(k["stepRange"]), len(step_id))
        if V.grib_base(str(k["shortName"]), k["typeOfLevel"], k["level"]) is None:
            continue
        key = (k["shortName"], k["typeOfLevel"], k["level"], k["number"], k["stepType"],
               _window(k["stepRange"]))
        kind_dup[i] = dup_key.setdefault(key, len(dup_key))
    d = kind_dup[idx.kind]
    sel = np.flatnonzero(d >= 0)
    if sel.size < 2:
        return
    order = sel[np.lexsort((idx.valid_time[sel], d[sel]))]
    same = (d[order[1:]] == d[order[:-1]]) & (idx.valid_time[order[1:]]
                                               == idx.valid_time[order[:-1]])
    differ = (idx.ref_time[order[1:]] != idx.ref_time[order[:-1]]) | (
        kind_step[idx.kind[order[1:]]] != kind_step[idx.kind[order[:-1]]])
    bad = np.flatnonzero(same & differ)
    if not bad.size:
        return
    a, b = int(order[bad[0]]), int(order[bad[0] + 1])
    if idx.offset[b] < idx.offset[a]:
        a, b = b, a
    ka, kb = kinds[int(idx.kind[a])], kinds[int(idx.kind[b])]
    vd, vt = _fmt_date_time(idx.valid_time[b])
    ad, at = _fmt_date_time(idx.ref_time[a])
    bd, bt = _fmt_date_time(idx.ref_time[b])
    raise SourceError(
        f"{path}: duplicate valid time {vd} {vt} UTC for {kb['shortName']} on "
        f"{kb['typeOfLevel']} {kb['level']}: base time {ad} {at} step {ka['stepRange']} and "
        f"base time {bd} {bt} step {kb['stepRange']}. Keep one forecast per valid time (e.g. "
        "`grib_copy -w step=0 in.grib out.grib`) or split the file by base time."
    )


def _kind_base(k: dict) -> str | None:
    name, short, tol, lv = str(k["cfVarName"]), str(k["shortName"]), k["typeOfLevel"], k["level"]
    if tol == "isobaricInhPa":
        return V.grib_base(name, tol) or V.grib_base(short, tol)
    lv_f = None if lv is None else float(lv)
    base = V.grib_base(name, tol, lv_f) or V.grib_base(short, tol, lv_f)
    if base is None or base in V.PRESSURE_LEVEL:
        return None
    return base


def _candidates(path: str, idx: GI.GribIndex, wanted: set[str] | None,
                storage_options: dict | None = None) -> list[Candidate]:
    kinds = idx.kinds
    # group kinds into fields: pressure levels share one (level axis), others one per level
    groups: dict[tuple, list[int]] = {}
    group_base: dict[tuple, str] = {}
    for i, k in enumerate(kinds):
        base = _kind_base(k)
        if base is None:
            continue
        pl = k["typeOfLevel"] == "isobaricInhPa"
        key = (k["paramId"], k["shortName"], k["cfVarName"], k["typeOfLevel"],
               None if pl else k["level"], k["stepType"], _window(k["stepRange"]), k["grid"],
               k["units"])
        groups.setdefault(key, []).append(i)
        group_base[key] = base
    if not groups:
        return []
    # entries of each group, in file order
    kind_group = np.full(len(kinds), -1, dtype=np.int64)
    keys = list(groups)
    for g, key in enumerate(keys):
        kind_group[groups[key]] = g
    eg = kind_group[idx.kind]
    first_entry = {g: int(np.flatnonzero(eg == g)[0]) for g in range(len(keys))}
    order = np.argsort(eg, kind="stable")
    bounds = np.searchsorted(eg[order], np.arange(len(keys) + 1))
    cands: list[Candidate] = []
    # candidates in the order their fields first appear in the file (as cfgrib's groups)
    for g in sorted(range(len(keys)), key=lambda g: first_entry[g]):
        key = keys[g]
        base = group_base[key]
        entries = order[bounds[g]:bounds[g + 1]]
        k0 = kinds[groups[key][0]]
        pl = key[3] == "isobaricInhPa"
        levels = np.array(sorted({float(kinds[i]["level"]) for i in groups[key]}, reverse=True))
        if wanted is not None:
            if pl and not any(V.level_name(base, lv) in wanted for lv in levels):
                continue
            if not pl and base not in wanted:
                continue
        short = str(k0["shortName"])
        name = str(k0["cfVarName"])
        source_name = (short if short != "unknown" else name) if pl else name
        grid = idx.grids[k0["grid"]]
        attrs = {"units": k0["units"], "GRIB_units": k0["units"], "GRIB_shortName": short,
                 "GRIB_paramId": k0["paramId"], "GRIB_typeOfLevel": key[3],
                 "GRIB_gridType": grid.get("gridType"), "GRIB_stepType": k0["stepType"]}
        if not pl:
            attrs["GRIB_level"] = k0["level"]
        if attrs["units"] in (None, "unknown"):
            attrs.pop("units")
            attrs.pop("GRIB_units")
        if grid.get("gridType") not in _REGULAR or "lat" not in grid:
            error = (f"it is on a {grid.get('gridType') or 'non-regular'} grid (not a regular "
                     "lat/lon grid); regrid to a regular lat-lon grid first (e.g. `cdo "
                     "remapbil,r360x181 in.grib out.grib`, or request `grid: 0.25/0.25` from "
                     "MARS/CDS)")
            if pl:
                da = xr.DataArray(np.zeros(len(levels)), dims=("level",),
                                  coords={"level": levels}, attrs=attrs)
            else:
                da = xr.DataArray(np.zeros(1), dims=("values",), attrs=attrs)
            cands.append(Candidate(base, da, source_name, error))
            continue
        da = _field_array(idx, entries, levels, grid, attrs, storage_options, pl=pl)
        cands.append(Candidate(base, da, source_name))
    return cands


def _field_array(idx: GI.GribIndex, entries: np.ndarray, levels: np.ndarray, grid: dict, attrs: dict,
                 storage_options: dict | None = None, *, pl: bool) -> xr.DataArray:
    kinds = idx.kinds
    kind_of = idx.kind[entries]
    uk = np.unique(kind_of)
    numbers = {int(u): kinds[int(u)]["number"] for u in uk}
    has_number = any(v is not None for v in numbers.values())
    num_of = np.array([numbers[int(u)] if numbers[int(u)] is not None else 0 for u in kind_of],
                      dtype=np.int64) if has_number else np.zeros(len(entries), dtype=np.int64)
    members = np.unique(num_of)
    times = np.unique(idx.valid_time[entries])
    ti = np.searchsorted(times, idx.valid_time[entries])
    mi = np.searchsorted(members, num_of)
    dims: list[str] = ["number", "time"]
    shape = [len(members), len(times)]
    pos = [mi, ti]
    if pl:
        lev_of = np.array([float(kinds[int(u)]["level"]) for u in kind_of])
        lv_sorted = levels[::-1]  # ascending for searchsorted
        li = len(levels) - 1 - np.searchsorted(lv_sorted, lev_of)
        dims.append("level")
        shape.append(len(levels))
        pos.append(li)
    table = np.full(shape, -1, dtype=np.int64)
    # first message wins for exact repeats: assign in reverse file order
    table[tuple(p[::-1] for p in pos)] = entries[::-1]
    arr = GI.GribArray(idx, table, storage_options)
    var = xr.Variable(tuple(dims) + ("lat", "lon"), indexing.LazilyIndexedArray(arr))
    coords = {"time": ("time", times.astype("datetime64[ns]")),
              "lat": ("lat", np.asarray(grid["lat"], dtype=np.float64)),
              "lon": ("lon", np.asarray(grid["lon"], dtype=np.float64))}
    if pl:
        coords["level"] = ("level", levels)
    if has_number:
        coords["number"] = ("number", members)
        return xr.DataArray(var, coords=coords, attrs=attrs)
    da = xr.DataArray(var, coords=coords, attrs=attrs)
    return da.isel(number=0, drop=True)


class GribSource:
    format = "grib"

    def open(self, path: str, *, variables: list[str] | None = None,
             member: int | None = None, storage_options: dict | None = None) -> xr.Dataset:
        """``path``: a local file, or an object-store URL read by byte ranges (no local copy)."""
        path = str(path)
        idx = GI.get_index(path, storage_options=storage_options)
        _check_duplicates(path, idx)
        wanted = None
        if variables is not None:
            wanted = set()
            for v in [variables] if isinstance(variables, str) else variables:
                try:
                    spec = V.parse_variable(v)
                except ValueError as exc:
                    raise SourceError(f"{path}: {exc}") from None
                wanted.add(spec.name)
                wanted.add(spec.base)
        cands = _candidates(path, idx, wanted, storage_options)
        cands.sort(key=lambda c: _PRIORITY.get(c.source_name, 0))
        return assemble(path, cands, variables=variables, member=member, fmt="grib",
                        describe=describe(idx))


def describe(records) -> str:
    """What a GRIB file has, in ClimaX terms, from its headers (for error messages).

    ``records``: a :class:`~pipelines.sources.grib_index.GribIndex` or a list of header dicts."""
    if isinstance(records, GI.GribIndex):
        records = records.kinds  # one per distinct field kind, in file order
    singles: list[str] = []
    levels: dict[str, set] = defaultdict(set)
    for r in records:
        base = V.grib_base(str(r["shortName"]), r["typeOfLevel"], r["level"])
        if base is None:
            continue
        if r["typeOfLevel"] == "isobaricInhPa":
            levels[base].add(int(r["level"]))
        elif base not in singles:
            singles.append(base)
    parts = singles + [f"{b} at {', '.join(map(str, sorted(lv, reverse=True)))} hPa"
                       for b, lv in levels.items()]
    return "; ".join(parts) if parts else "no field that maps to a ClimaX variable"


# when two fields give the same ClimaX variable, prefer the ECMWF one (`z` over `gh`)
_PRIORITY = {"gh": 1, "prmsl": 1}
