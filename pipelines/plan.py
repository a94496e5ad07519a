"""The build's plan: which source files hold which steps, and how the time axis is cut into tasks.

``plan_chunks`` checks coverage before any data is decoded (every variable at every step, no
duplicates, one grid per variable, a grid the regridder accepts, the calendar's steps) and cuts the
time axis into shards that never cross a gap. Training years are cut by windows of day-of-year x
hour slots so that one task sees every training step of its slots (one-pass climatology); the
result is a :class:`Plan` of typed, frozen parts that ``pipelines.build`` runs: a :class:`Chunk` per
output file (one shard, or the constants) with the :class:`Read` of each source file it needs, and a
:class:`Unit` per Ray task (a climatology window, one shard, or the constants).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from climax import shards as S
from pipelines import regrid
from pipelines.names import parse_variable
from pipelines.recipe import Recipe
from pipelines.sources import SourceError

log = logging.getLogger("pipelines.build")

__all__ = ["Plan", "Chunk", "Read", "Unit", "plan_chunks", "BuildError", "calendar_times", "climatology_hours",
           "slot_keys", "SYNOPTIC_HOURS"]

COMPUTED = {"latitude"}  # constants derived from the grid, not read


class BuildError(SourceError):
    """A problem with the inputs found while planning; the message says what to do."""


def ns(t: Any) -> int:
    """A time as int nanoseconds."""
    return int(np.datetime64(t, "ns").astype(np.int64))


def iso(ns_: int) -> str:
    """int nanoseconds as an ISO time (seconds)."""
    return str(np.datetime64(int(ns_), "ns").astype("datetime64[s]"))


@dataclass(frozen=True)
class Read:
    """One read of one source file: ``variables`` at ``times`` (int ns; None for constants)."""

    file: int  # index into the build's scanned files (``Plan.files``, ``BuildContext.files``)
    variables: tuple[str, ...]
    times: tuple[int, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class Chunk:
    """One output file: a shard (``kind="shard"``: its ``times``, the step before them ``prev`` for
    differences across its edge, its ``split`` and ``year``) or the constants (``kind="constants"``:
    its ``variables``). ``path`` is relative to the output; ``reads`` say where its fields come from."""

    kind: str
    index: int
    path: str
    reads: tuple[Read, ...]
    split: str | None = None
    year: int | None = None
    times: tuple[int, ...] = ()
    prev: int | None = None
    variables: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Unit:
    """One Ray task. ``kind="window"``: the training shards of one window of climatology slots for
    every training year plus that window's climatology part (``path``; ``slots``: those it stores);
    ``"shard"``: one validation/test shard; ``"constants"``: the constants. Each unit carries its
    own chunks, so the context every task shares stays small."""

    kind: str
    chunks: tuple[Chunk, ...]
    window: int | None = None
    slots: tuple[int, ...] = ()
    path: str | None = None


@dataclass
class Plan:
    """What the build writes: ``chunks`` in index order and ``units``, the Ray tasks that write them
    (windows first, the longest tasks)."""

    chunks: list[Chunk]
    files: list[dict]
    dst: regrid.Grid
    time_vars: list[str]
    const_vars: list[str]
    units: list[Unit] = field(default_factory=list)
    calendar: str = "standard"  # the sources' calendar ("mixed" when they differ)
    gaps: list = None  # [first missing step (ISO), number of steps] left out under time.missing: allow
    clim_hours: list[int] = field(default_factory=list)  # hours of day the climatology stores


#: WeatherBench 2's climatology hours (its ERA5 climatologies are 6-hourly): the default, so that
#: an hourly archive does not store 24 fields per day of year when scores are made at 0/6/12/18 UTC.
SYNOPTIC_HOURS = (0, 6, 12, 18)


def climatology_hours(wanted, train_hours) -> list[int]:
    """The hours of day at which the climatology is stored (recipe ``climatology_hours``)."""
    have = sorted({int(h) for h in train_hours})
    if wanted == "all":
        return have
    if wanted is None:
        return [h for h in SYNOPTIC_HOURS if h in have] or have
    missing = [h for h in wanted if h not in have]
    if missing:
        raise BuildError(f"climatology_hours {missing}: no training step falls at those hours (training steps "
                         f"are at hours {have}); choose among them, or use 'all'")
    return list(wanted)


STANDARD_CALENDARS = {"standard", "gregorian", "proleptic_gregorian"}
#: Model calendars whose steps, converted to dates as the NetCDF reader converts them, are known
#: in advance: a step of the calendar the sources lack is then missing, not absent by design.
MODEL_CALENDARS = {"noleap", "365_day", "360_day", "all_leap", "366_day", "julian"}


def calendar_times(time, calendar: str) -> np.ndarray:
    """The recipe's steps in a model calendar as the readers convert them (datetime64[ns]): noleap
    has no 29 February, 360_day converted with ``align_on="year"`` lacks 5 or 6 days a year."""
    import xarray as xr

    from pipelines.sources.netcdf import convert_times

    start, end = time.start, time.end
    first = f"{start.year:04d}-01-01T{start.hour:02d}:{start.minute:02d}"
    last = f"{end.year:04d}-12-{30 if calendar == '360_day' else 31}T23:59"
    cf = xr.date_range(first, last, freq=pd_freq(time.step), calendar=calendar, use_cftime=True)
    times, _ = convert_times(np.asarray(cf), calendar, f"time {calendar}")
    lo, hi = np.datetime64(start, "ns"), np.datetime64(end, "ns")
    return times[(times >= lo) & (times <= hi)]


def pd_freq(step: str) -> str:
    import pandas as pd

    return pd.tseries.frequencies.to_offset(pd.Timedelta(step)).freqstr


def _gaps(expected: np.ndarray, kept: np.ndarray) -> list:
    """Runs of ``expected`` steps (int ns) not in ``kept``: [[first ISO, count], ...]."""
    edges = np.diff(np.r_[0, (~np.isin(expected, kept)).astype(np.int8), 0])
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [[iso(expected[a]), int(b - a)] for a, b in zip(starts, ends)]


def slot_keys(tns: np.ndarray) -> np.ndarray:
    """One integer per climatology slot (day of year, hour): (doy - 1) * 24 + hour."""
    doy, hour = S.climatology_slots(np.asarray(tns, dtype=np.int64).astype("datetime64[ns]"))
    return (doy - 1) * 24 + hour


def _held_step(times, step_ns: int) -> str | None:
    """The sources' step ("6h") when it is coarser than the recipe's (time.step: 1h on 6-hourly
    files), else None."""
    t = np.unique(np.fromiter(times, np.int64, len(times)))
    if len(t) < 2:
        return None
    held = int(np.diff(t).min())
    if held <= step_ns:
        return None
    hour, minute = 3600 * 10**9, 60 * 10**9
    if held % hour == 0:
        return f"{held // hour}h"
    return f"{held // minute}min" if held % minute == 0 else f"{held // 10**9}s"


def plan_chunks(recipe: Recipe, files: list[dict]) -> Plan:
    """Check coverage and cut the time axis into shards. Raises BuildError naming what is wrong.

    Shards never cross a gap (a step the calendar lacks, or one left out under ``time.missing:
    allow``): each shard holds regular steps, so its start, end and row count in the manifest give
    its stored times exactly (docs/design.md, "Time axis")."""
    dst = regrid.target_grid(recipe.grid.resolution)
    specs = {v: parse_variable(v) for v in recipe.variables}
    const_vars = [v for v in recipe.variables if specs[v].is_constant]
    time_vars = [v for v in recipe.variables if not specs[v].is_constant]
    # Model calendars (their times are converted to the standard calendar when read) cannot have
    # every date: their own steps are expected, the others are not missing. Recorded in the
    # manifest (time.calendar, and the calendar of each source file).
    calendars = {str(f.get("calendar", "standard")).lower() for f in files if f["times"]}
    if not calendars or calendars <= STANDARD_CALENDARS:
        calendar, times = "standard", recipe.time.times()
    elif len(calendars) == 1 and calendars <= MODEL_CALENDARS:
        calendar = next(iter(calendars))
        times = calendar_times(recipe.time, calendar)
    else:
        calendar, times = "mixed" if len(calendars) > 1 else next(iter(calendars)), recipe.time.times()
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
        for v in f["variables"]:
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
                    raise BuildError(f"variable {v} at {iso(t)} is in both {files[where[v][t]]['path']} and "
                                     f"{f['path']}; remove the duplicate file or narrow the source glob")
                where[v][t] = i
    for v in const_vars:
        if v not in COMPUTED and v not in const_file:
            raise BuildError(f"constant {v} is in none of the {len(files)} source files; add a source that has it "
                             "(e.g. the ERA5 invariants or WeatherBench constants) or drop it from variables")
    if calendar not in STANDARD_CALENDARS | MODEL_CALENDARS and time_vars:
        # other calendars (ClimateBench's yearly steps, files in different calendars): take the
        # time steps every variable has, within the recipe's range and split years
        common = set.intersection(*(set(where[v]) for v in time_vars))
        lo, hi = ns(recipe.time.start.replace(tzinfo=None)), ns(recipe.time.end.replace(tzinfo=None))
        tns = np.array(sorted(t for t in common if lo <= t <= hi and recipe.split_of(
            int(np.datetime64(t, "ns").astype("datetime64[Y]").astype(int) + 1970)) is not None), dtype=np.int64)
        years = tns.astype("datetime64[ns]").astype("datetime64[Y]").astype(int) + 1970
    expected, dropped = tns, set()
    for v in time_vars:
        if not where[v]:
            raise BuildError(f"variable {v} is in none of the {len(files)} source files "
                             f"({', '.join(f['path'] for f in files[:3])}{', ...' if len(files) > 3 else ''}); "
                             "check the variable name and level, or add a source that has it")
        missing = [t for t in tns if t not in where[v]]
        if missing and recipe.time.missing == "error":
            held = _held_step(where[v], step_ns=recipe.time.step_ns)
            if held:  # the recipe's step is not the sources' (time.step: 1h for 6-hourly files)
                raise BuildError(
                    f"variable {v} is missing at {len(missing)} of {len(tns)} time steps, first at "
                    f"{', '.join(iso(t) for t in missing[:3])}: the sources hold it every {held}, not every "
                    f"{recipe.time.step}; set time.step: {held} (or a multiple of it)")
            raise BuildError(
                f"variable {v} is missing at {len(missing)} of {len(tns)} time steps, first at "
                f"{', '.join(iso(t) for t in missing[:3])}; add the files covering them, set time.start/"
                "time.end/time.step to what the sources hold, or set time.missing: allow to leave them out")
        dropped.update(missing)
    if dropped:  # time.missing: allow: a step any variable lacks is left out, and listed in the manifest
        keep_t = ~np.isin(tns, np.fromiter(dropped, np.int64, len(dropped)))
        tns, years = tns[keep_t], years[keep_t]
        if not len(tns):
            raise BuildError(f"no time step of {recipe.time.start}..{recipe.time.end} has every variable "
                             f"{time_vars}; check the sources")
        log.warning("time.missing: allow: %d of %d time steps left out (first at %s)", len(dropped),
                    len(expected), iso(min(dropped)))
    gaps = _gaps(expected, tns) if dropped else []
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
    tset = set(tns.tolist())
    splits_of_year = {int(y): recipe.split_of(int(y)) for y in set(years.tolist())}
    # Training years are cut by windows of climatology slots (day of year x hour), the same
    # windows in every year, so that one task sees every training step of its slots and writes
    # their climatology exactly, without a second pass over the shards (docs/design.md).
    train = np.array([splits_of_year[int(y)] == "train" for y in years], dtype=bool)
    slot_of = slot_keys(tns)
    train_slots = np.unique(slot_of[train])
    clim_hours = climatology_hours(recipe.climatology_hours, train_slots % 24)
    window_of_slot = {int(s): k // rows for k, s in enumerate(train_slots)}

    def prev_of(first: int, split: str) -> int | None:
        prev = first - step
        ok = split == "train" and prev in tset and recipe.split_of(
            int(np.datetime64(prev, "ns").astype("datetime64[Y]").astype(int) + 1970)) == "train"
        return prev if ok else None

    chunks: list[Chunk] = []
    units: list[Unit] = []
    windows: dict[int, list[Chunk]] = defaultdict(list)
    for year in sorted(set(years.tolist())):
        split = splits_of_year[int(year)]
        sel = years == year
        ys, ss = tns[sel], slot_of[sel]
        if split == "train":
            wins = np.array([window_of_slot[int(s)] for s in ss])
            runs = [(int(k), ys[wins == k]) for k in np.unique(wins)]
        else:
            runs = [(None, ys)]
        parts = []
        for win, run_ in runs:
            # runs of regular steps: a shard never spans a gap
            cuts = np.flatnonzero(np.diff(run_) != step) + 1
            for piece in np.split(run_, cuts):
                parts += [(win, piece)] if win is not None else [(None, piece[k:k + rows])
                                                                 for k in range(0, len(piece), rows)]
        for win, part_arr in parts:
            part = part_arr.tolist()
            prev = prev_of(part[0], split)
            reads: dict[int, dict] = defaultdict(lambda: {"variables": set(), "times": set()})
            for v in time_vars:
                for t in part + ([prev] if prev is not None else []):
                    r = reads[where[v][t]]
                    r["variables"].add(v)
                    r["times"].add(t)
            start = np.datetime64(part[0], "ns").astype("datetime64[m]").item()
            chunk = Chunk(
                kind="shard", index=len(chunks), split=split, year=year,
                path=f"{split}/{year}/{start:%Y-%m-%dT%H%M}.parquet", times=tuple(part), prev=prev,
                reads=tuple(Read(i, tuple(sorted(r["variables"])), tuple(sorted(r["times"])))
                            for i, r in sorted(reads.items())),
            )
            chunks.append(chunk)
            if win is None:
                units.append(Unit(kind="shard", chunks=(chunk,)))
            else:
                windows[win].append(chunk)
    for win in sorted(windows):
        slots = train_slots[win * rows:(win + 1) * rows]
        units.append(Unit(kind="window", window=win, chunks=tuple(windows[win]),
                          slots=tuple(int(s) for s in slots if s % 24 in clim_hours),  # the slots it stores
                          path=f"{S.CLIMATOLOGY_DIR}/{win:05d}.parquet"))
    consts = list(const_vars)
    if consts:
        chunks.append(Chunk(kind="constants", index=len(chunks), path=S.CONSTANTS, variables=tuple(consts),
                            reads=tuple(Read(const_file[v], (v,)) for v in consts if v not in COMPUTED)))
        units.append(Unit(kind="constants", chunks=(chunks[-1],)))
    # windows first (the longest tasks), then the single shards
    units.sort(key=lambda u: {"window": 0, "shard": 1, "constants": 2}[u.kind])
    return Plan(chunks, files, dst, time_vars, const_vars, units=units, calendar=calendar, gaps=gaps,
                clim_hours=clim_hours)
