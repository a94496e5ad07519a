"""The data-source protocol and the code every reader shares.

A reader (one module per format) turns a file into a list of :class:`Candidate` fields: lazy
DataArrays with standard dim names (``number``, ``time``, ``level``, ``lat``, ``lon``) and the
ClimaX base they map to. :func:`assemble` then applies the contract of ``open_source``: variable
selection with clear errors, ensemble members, canonical units, float32, dims ``(time, lat, lon)``
or ``(lat, lon)`` for constants, ``lon`` in [0, 360) ascending, ``time`` as datetime64[ns].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import xarray as xr

from pipelines import names as V
from pipelines import units as U

STANDARD_DIMS = ("number", "time", "level", "lat", "lon")


class SourceError(ValueError):
    """A source file cannot give what was asked; the message names the file and what to do."""


@runtime_checkable
class DataSource(Protocol):
    """One input format. ``open`` returns a Dataset following ``open_source``'s contract."""

    format: str

    def open(self, path: str, *, variables: list[str] | None = None,
             member: int | None = None) -> xr.Dataset: ...


@dataclass
class Candidate:
    """A field a file has that maps to a ClimaX base.

    ``data`` is lazy, with dims among STANDARD_DIMS (others only of size 1); coords ``time``
    (datetime64[ns]) when time-varying, ``level`` (hPa) for pressure levels, ``lat``, ``lon``.
    ``error``: set when the field exists but cannot be used (e.g. a reduced Gaussian grid);
    raised only if the field is selected.
    """

    base: str
    data: xr.DataArray
    source_name: str
    error: str | None = None
    assume_units: str | None = None
    extra: dict = field(default_factory=dict)


def to_datetime64ns(values) -> np.ndarray:
    return np.asarray(values).astype("datetime64[ns]")


def normalise_lon(lon: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(new lon values in [0, 360) ascending, index order or None when already so)."""
    lon = np.asarray(lon, dtype=np.float64)
    wrapped = np.mod(lon, 360.0)
    wrapped[np.isclose(wrapped, 360.0)] = 0.0
    order = np.argsort(wrapped, kind="stable")
    # drop duplicate meridians (e.g. a grid with both -180 and 180)
    keep = np.concatenate([[True], np.diff(wrapped[order]) > 1e-9]) if len(order) else order
    order = order[keep]
    new = wrapped[order]
    if len(order) == len(lon) and np.array_equal(order, np.arange(len(lon))) and np.array_equal(new, lon):
        return lon, None
    return new, order


def _fmt_levels(levels) -> str:
    return ", ".join(str(int(round(float(x)))) for x in levels)


def _available(candidates: list[Candidate]) -> tuple[dict[str, tuple[Candidate, float | None]], dict[str, list]]:
    """ClimaX name -> (candidate, level); and base -> levels for pressure-level bases."""
    avail: dict[str, tuple[Candidate, float | None]] = {}
    levels_by_base: dict[str, list] = {}
    for cand in candidates:
        if cand.base in V.PRESSURE_LEVEL:
            if "level" not in cand.data.coords:
                continue
            for lvl in np.atleast_1d(cand.data["level"].values):
                lvl = float(lvl)
                if not np.isclose(lvl, round(lvl)) or lvl <= 0:
                    continue
                name = V.level_name(cand.base, lvl)
                if name not in avail:
                    avail[name] = (cand, lvl)
                    levels_by_base.setdefault(cand.base, []).append(lvl)
        elif cand.base not in avail:
            avail[cand.base] = (cand, None)
    return avail, levels_by_base


def _describe(avail: dict, levels_by_base: dict) -> str:
    singles = [n for n, (c, lvl) in avail.items() if lvl is None]
    parts = list(singles)
    for base, lv in levels_by_base.items():
        parts.append(f"{base} at {_fmt_levels(sorted(lv, reverse=True))} hPa")
    return "; ".join(parts) if parts else "no field that maps to a ClimaX variable"


def _select_member(da: xr.DataArray, member: int | None, path: str) -> xr.DataArray:
    if "number" not in da.dims:
        if "number" in da.coords:
            only = int(np.asarray(da["number"].values).ravel()[0])
            if member is not None and int(member) != only:
                raise SourceError(
                    f"file {path} holds only ensemble member {only}, not {member}; set "
                    f"`member: {only}` on the source in the recipe or remove `member`"
                )
            da = da.drop_vars("number")
        return da
    members = [int(m) for m in np.atleast_1d(da["number"].values)]
    if member is None:
        if len(members) == 1:
            return da.isel(number=0, drop=True)
        raise SourceError(
            f"file {path} has {len(members)} ensemble members ({members[0]}..{members[-1]}); "
            f"set `member: N` on the source in the recipe"
        )
    if int(member) not in members:
        raise SourceError(
            f"file {path}: ensemble member {member} not found; the file has members "
            f"{members[0]}..{members[-1]}; set `member:` on the source to one of them"
        )
    return da.isel(number=members.index(int(member)), drop=True)


def _field(name: str, cand: Candidate, level: float | None, member: int | None, path: str,
           lon_order: np.ndarray | None, new_lon: np.ndarray) -> xr.DataArray:
    spec = V.parse_variable(name)
    if cand.error:
        raise SourceError(f"{path}: variable {name!r} ({cand.source_name}): {cand.error}")
    da = cand.data
    if level is not None:
        lv = np.atleast_1d(da["level"].values).astype(float)
        idx = int(np.flatnonzero(np.isclose(lv, level))[0])
        da = da.isel(level=idx, drop=True) if "level" in da.dims else da.drop_vars("level")
    elif "level" in da.dims:
        if da.sizes["level"] != 1:
            raise SourceError(f"{path}: {cand.source_name!r} for {name!r} has several levels")
        da = da.isel(level=0, drop=True)
    da = _select_member(da, member, path)
    if spec.is_constant:
        if "time" in da.dims:
            da = da.isel(time=0, drop=True)
        elif "time" in da.coords:
            da = da.drop_vars("time")
    elif "time" not in da.dims:
        if "time" not in da.coords:
            raise SourceError(
                f"{path}: variable {cand.source_name!r} (for {name!r}) has no time coordinate; "
                "time-varying fields need one (add a time axis or use a file that has it)"
            )
        # a single time written as a scalar: tiny, expanding it reads one field
        da = da.expand_dims("time")
    for d in list(da.dims):
        if d not in ("time", "lat", "lon"):
            if da.sizes[d] != 1:
                raise SourceError(
                    f"{path}: variable {cand.source_name!r} (for {name!r}) has an unexpected "
                    f"dimension {d!r} of size {da.sizes[d]}; select one value before preprocessing"
                )
            da = da.isel({d: 0}, drop=True)
    if "lat" not in da.dims or "lon" not in da.dims:
        raise SourceError(f"{path}: variable {cand.source_name!r} (for {name!r}) has no lat/lon grid")
    da = da.drop_vars([c for c in da.coords if c not in ("time", "lat", "lon")])
    if lon_order is not None:
        da = da.isel(lon=lon_order)
    da = da.assign_coords(lon=new_lon)
    try:
        out = U.to_canonical(da.rename(cand.source_name), name, path, assume_units=cand.assume_units)
    except U.UnitsError as exc:
        raise SourceError(str(exc)) from None
    out.attrs.update(source_name=cand.source_name, source_file=str(path))
    return out


def latitude_field(lat: np.ndarray, lon: np.ndarray) -> xr.DataArray:
    lat = np.asarray(lat, dtype=np.float64)
    values = np.broadcast_to(lat[:, None], (len(lat), len(lon))).astype(np.float32)
    return xr.DataArray(values, dims=("lat", "lon"), coords={"lat": lat, "lon": lon},
                        attrs={"units": "degrees_north", "source_name": "computed"})


def assemble(path: str, candidates: list[Candidate], *, variables: list[str] | None,
             member: int | None, fmt: str, calendar: str = "proleptic_gregorian",
             describe: str | None = None) -> xr.Dataset:
    """Build the contract Dataset from a reader's candidates (see module docstring).

    ``describe``: what the file has, for error messages, when ``candidates`` were pre-filtered.
    """
    path = str(path)
    avail, levels_by_base = _available(candidates)
    has = describe or _describe(avail, levels_by_base)
    if variables is None:
        names = [n for n in avail if not avail[n][0].error]
        skipped: list[str] = []
        kept = []
        for n in names:
            cand = avail[n][0]
            try:
                U.conversion(U.found_units(cand.data) or cand.assume_units, n)
                kept.append(n)
            except U.UnitsError:  # e.g. CMIP6 `pr` (a rate): listed in attrs, not returned
                try:
                    U.to_canonical(cand.data.rename(cand.source_name), n, path,
                                   assume_units=cand.assume_units)
                except U.UnitsError as exc:
                    skipped.append(str(exc))
        names = kept
        if not names:
            errored = [c for c in candidates if c.error]
            if errored:
                raise SourceError(f"{path}: variable {errored[0].base!r} "
                                  f"({errored[0].source_name}): {errored[0].error}")
            if skipped:
                raise SourceError(skipped[0])
            raise SourceError(
                f"{path}: no field maps to a ClimaX variable (the file has {has}); check the "
                "format or the file"
            )
    else:
        if isinstance(variables, str):
            variables = [variables]
        names, skipped = [], []
        for v in variables:
            try:
                n = V.parse_variable(v).name
            except ValueError as exc:
                raise SourceError(f"{path}: {exc}") from None
            if n not in names:
                names.append(n)
        for n in names:
            if n == "latitude" or n in avail:
                continue
            raise SourceError(
                f"{path}: variable {n!r} not found. The file has: {has}. Remove {n!r} from "
                "this source's `variables` in the recipe, or add a source file that provides it."
            )

    # one grid for all: take it from the first selected field that has one
    grid_src = next((avail[n][0] for n in names if n in avail), None)
    if grid_src is None:
        grid_src = next(iter(avail.values()))[0] if avail else None
    if grid_src is None or "lat" not in grid_src.data.coords or "lon" not in grid_src.data.coords:
        raise SourceError(f"{path}: no regular lat/lon grid found")
    lat = np.asarray(grid_src.data["lat"].values, dtype=np.float64)
    lon_raw = np.asarray(grid_src.data["lon"].values, dtype=np.float64)
    new_lon, order = normalise_lon(lon_raw)

    fields: dict[str, xr.DataArray] = {}
    for n in names:
        if n == "latitude":
            fields[n] = latitude_field(lat, new_lon)
            fields[n].attrs["source_file"] = path
            continue
        cand, level = avail[n]
        if cand.error:
            raise SourceError(f"{path}: variable {n!r} ({cand.source_name}): {cand.error}")
        c_lat = np.asarray(cand.data["lat"].values, dtype=np.float64)
        c_lon = np.asarray(cand.data["lon"].values, dtype=np.float64)
        if not (np.array_equal(c_lat, lat) and np.array_equal(c_lon, lon_raw)):
            raise SourceError(
                f"{path}: variable {n!r} ({cand.source_name}) is on a different grid "
                f"({len(c_lat)} x {len(c_lon)}) from the others ({len(lat)} x {len(lon_raw)}); "
                "split them into separate sources"
            )
        fields[n] = _field(n, cand, level, member, path, order, new_lon)

    times = None
    for n, da in fields.items():
        if "time" not in da.dims:
            continue
        t = to_datetime64ns(da["time"].values)
        if times is None:
            times, first = t, n
            uniq, counts = np.unique(t, return_counts=True)
            if (counts > 1).any():
                raise SourceError(
                    f"{path}: duplicate valid time {uniq[counts > 1][0]} for {n!r}; each valid "
                    "time must appear once (e.g. overlapping forecasts from several base times): "
                    "split the file or select one forecast per valid time"
                )
        elif not np.array_equal(t, times):
            raise SourceError(
                f"{path}: {n!r} has {len(t)} times but {first!r} has {len(times)} (or different "
                "ones); variables of one source must share their times: split them into "
                "separate sources"
            )
    coords: dict = {"lat": ("lat", lat), "lon": ("lon", new_lon)}
    if times is not None:
        coords["time"] = ("time", times)
    ds = xr.Dataset({n: da.variable for n, da in fields.items()}, coords=coords)
    ds["lat"].attrs.update(units="degrees_north", standard_name="latitude")
    ds["lon"].attrs.update(units="degrees_east", standard_name="longitude")
    ds.attrs.update(source_file=path, source_format=fmt, calendar=calendar)
    if skipped:
        ds.attrs["skipped_variables"] = "; ".join(skipped)
    return ds
