"""GRIB 1 / GRIB 2 reader (ecCodes + cfgrib).

1. One pass over the message headers with ecCodes (``headers_only``): detects truncated or corrupt
   files (cfgrib would silently skip a broken message), finds which (paramId, typeOfLevel) groups
   map to ClimaX variables, and refuses duplicate valid times (several base times + steps
   landing on the same valid time).
2. Each needed group is opened with cfgrib, ``time_dims=("valid_time",)`` so forecasts flatten to
   valid times, ``squeeze=False``, and an index file in a private temporary folder, so nothing
   is written beside the (possibly read-only) input. Data stay lazy: cfgrib reads a message only
   when its field is indexed.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
import warnings
from collections import defaultdict

import numpy as np
import xarray as xr

from pipelines import variables as V
from pipelines.sources.base import Candidate, SourceError, assemble, to_datetime64ns

_INDEX_DIR: str | None = None

_REDOWNLOAD = "the file is truncated or corrupt; re-download it"


def _index_template(path: str) -> str:
    """cfgrib index path in a private temp folder (inputs may be read-only)."""
    global _INDEX_DIR
    if _INDEX_DIR is None or not os.path.isdir(_INDEX_DIR):
        _INDEX_DIR = tempfile.mkdtemp(prefix="climax-cfgrib-idx-")
        atexit.register(shutil.rmtree, _INDEX_DIR, True)
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return os.path.join(_INDEX_DIR, key + ".{short_hash}.idx")


def _get(h, key, default=None):
    import eccodes

    try:
        if not eccodes.codes_is_defined(h, key):
            return default
        return eccodes.codes_get(h, key)
    except Exception:
        return default


def scan(path: str) -> list[dict]:
    """Header keys of every message; SourceError for truncated/corrupt files."""
    import eccodes

    keys = ("paramId", "shortName", "typeOfLevel", "level", "stepType", "stepRange",
            "dataDate", "dataTime", "validityDate", "validityTime", "gridType")
    out: list[dict] = []
    try:
        with open(path, "rb") as f:
            # GRIB 2 messages may hold several fields (NCEP packs u and v together): read them
            # all, as cfgrib does, from a clean multi-field state, and switch it off again.
            eccodes.codes_grib_multi_support_on()
            eccodes.codes_grib_multi_support_reset_file(f)
            try:
                while True:
                    h = eccodes.codes_grib_new_from_file(f, headers_only=True)
                    if h is None:
                        break
                    try:
                        rec = {k: _get(h, k) for k in keys}
                        rec["number"] = _get(h, "number", 0) or 0
                        out.append(rec)
                    finally:
                        eccodes.codes_release(h)
            finally:
                eccodes.codes_grib_multi_support_off()
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: cannot read it ({exc})") from None
    except Exception as exc:  # gribapi errors (PrematureEndOfFileError, ...)
        raise SourceError(
            f"{path}: reading GRIB message {len(out) + 1} failed ({type(exc).__name__}: {exc}); "
            f"{_REDOWNLOAD}"
        ) from None
    if not out:
        raise SourceError(f"{path}: contains no GRIB message; {_REDOWNLOAD} (or it is not GRIB)")
    return out


def _window(step_range) -> float:
    s = str(step_range)
    if "-" in s:
        a, b = s.split("-", 1)
        try:
            return float(b) - float(a)
        except ValueError:
            return 0.0
    return 0.0


def _check_duplicates(path: str, records: list[dict]) -> None:
    seen: dict[tuple, dict] = {}
    for r in records:
        if V.grib_base(str(r["shortName"]), r["typeOfLevel"], r["level"]) is None:
            continue
        key = (r["shortName"], r["typeOfLevel"], r["level"], r["number"], r["stepType"],
               _window(r["stepRange"]), r["validityDate"], r["validityTime"])
        prev = seen.get(key)
        if prev is None:
            seen[key] = r
        elif (prev["dataDate"], prev["dataTime"], prev["stepRange"]) != (
                r["dataDate"], r["dataTime"], r["stepRange"]):
            vt = f"{r['validityDate']} {int(r['validityTime']):04d}"
            raise SourceError(
                f"{path}: duplicate valid time {vt} UTC for {r['shortName']} on "
                f"{r['typeOfLevel']} {r['level']}: base time {prev['dataDate']} "
                f"{int(prev['dataTime']):04d} step {prev['stepRange']} and base time "
                f"{r['dataDate']} {int(r['dataTime']):04d} step {r['stepRange']}. Keep one "
                "forecast per valid time (e.g. `grib_copy -w step=0 in.grib out.grib`) or split "
                "the file by base time."
            )


def _open_group(path: str, param_id: int, type_of_level: str) -> list[xr.Dataset]:
    import cfgrib  # noqa: F401  (registers the engine)

    bk = {
        "filter_by_keys": {"paramId": int(param_id), "typeOfLevel": type_of_level},
        "indexpath": _index_template(path),
        "time_dims": ("valid_time",),
        "squeeze": False,
        "errors": "raise",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return [xr.open_dataset(path, engine="cfgrib", backend_kwargs=bk, cache=False,
                                    decode_timedelta=True)]
        except Exception as exc:
            if type(exc).__name__ != "DatasetBuildError":
                raise SourceError(f"{path}: cfgrib failed ({type(exc).__name__}: {exc}); "
                                  f"{_REDOWNLOAD}") from None
        # heterogeneous group (e.g. several steps types): cfgrib's heuristic split
        return cfgrib.open_datasets(path, backend_kwargs=bk, cache=False, decode_timedelta=True)


def _candidates_from(ds: xr.Dataset, path: str, wanted: set[str] | None) -> list[Candidate]:
    cands: list[Candidate] = []
    for name, da in ds.data_vars.items():
        tol = da.attrs.get("GRIB_typeOfLevel")
        short = da.attrs.get("GRIB_shortName", name)
        lev_coord = tol if tol in da.coords else None
        levels = np.atleast_1d(da[lev_coord].values) if lev_coord else np.array([None])
        da = da.drop_vars([c for c in ("time", "step") if c in da.coords and c not in da.dims])
        rename = {"valid_time": "time", "latitude": "lat", "longitude": "lon"}
        da = da.rename({k: v for k, v in rename.items() if k in da.coords or k in da.dims})
        if "time" in da.coords:
            da = da.assign_coords(time=to_datetime64ns(da["time"].values))
        non_regular = "values" in da.dims or "lat" not in da.dims or "lon" not in da.dims
        error = None
        if non_regular:
            error = (f"it is on a {da.attrs.get('GRIB_gridType', 'non-regular')} grid (cfgrib "
                     "gives a 1-D `values` axis, not lat/lon); regrid to a regular lat-lon grid "
                     "first (e.g. `cdo remapbil,r360x181 in.grib out.grib`, or request `grid: "
                     "0.25/0.25` from MARS/CDS)")
        if tol == "isobaricInhPa":
            base = V.grib_base(name, tol) or V.grib_base(short, tol)
            if base is None:
                continue
            if lev_coord is None:
                continue
            da = da.rename({lev_coord: "level"})
            if wanted is not None and not any(
                    V.level_name(base, lv) in wanted for lv in np.atleast_1d(da["level"].values)):
                continue
            cands.append(Candidate(base, da, short if short != "unknown" else name, error))
            continue
        for i, lv in enumerate(levels):
            lv_f = None if lv is None else float(lv)
            base = V.grib_base(name, tol, lv_f) or V.grib_base(short, tol, lv_f)
            if base is None or base in V.PRESSURE_LEVEL:
                continue
            if wanted is not None and base not in wanted:
                continue
            sub = da
            if lev_coord:
                sub = sub.isel({lev_coord: i}, drop=True) if lev_coord in sub.dims else sub.drop_vars(lev_coord)
            cands.append(Candidate(base, sub, name, error))
    return cands


class GribSource:
    format = "grib"

    def open(self, path: str, *, variables: list[str] | None = None,
             member: int | None = None) -> xr.Dataset:
        path = str(path)
        records = scan(path)
        _check_duplicates(path, records)
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
        groups: dict[tuple[int, str], set] = defaultdict(set)
        for r in records:
            groups[(r["paramId"], r["typeOfLevel"])].add(r["shortName"])
        cands: list[Candidate] = []
        for (pid, tol), shorts in groups.items():
            if not any(V.grib_base(str(s), tol) or tol == "heightAboveGround" and
                       V.GRIB_HEIGHT.keys() & {(str(s), 2.0), (str(s), 10.0)} for s in shorts):
                continue
            for ds in _open_group(path, pid, tol):
                cands.extend(_candidates_from(ds, path, wanted))
        cands.sort(key=lambda c: _PRIORITY.get(c.source_name, 0))
        return assemble(path, cands, variables=variables, member=member, fmt="grib",
                        describe=describe(records))


def describe(records: list[dict]) -> str:
    """What a GRIB file has, in ClimaX terms, from its headers (for error messages)."""
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
