"""WeatherBench layout: ``<root>/<folder>/<folder>_<year>_<res>deg.nc`` plus
``<root>/constants/constants_<res>deg.nc`` (WeatherBench's download) or ``<root>/constants.nc`` (the
layout ClimaX's own preprocessing, ``nc2np_equally_era5.py``, reads).

Folder names are ClimaX names and are authoritative: ``2m_temperature`` (var ``t2m``),
``geopotential`` (var ``z`` with a ``level`` axis in hPa), ``temperature_850`` (var ``t``, one
level), ``constants`` (``lsm``, ``orography`` in m, ``slt``; ``lat2d``/``lon2d`` ignored).
Folders that are not ClimaX variables (``vorticity``, ``potential_vorticity``) are ignored.
Units missing from a file are taken to be WeatherBench's (the canonical ones).

``open_weatherbench(root)`` concatenates the yearly files along time lazily (no dask);
``list_files(root)`` and ``years(root)`` let a pipeline open one year at a time
(``open_weatherbench(root, years=[2015])``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import xarray as xr
from xarray.backends import BackendArray
from xarray.core import indexing

from pipelines import names as V
from pipelines.sources.base import Candidate, SourceError, assemble
from pipelines.sources.netcdf import candidates as nc_candidates
from pipelines.sources.netcdf import open_raw

CONSTANTS_FOLDER = "constants"
CONSTANT_VARS = {"lsm": "land_sea_mask", "orography": "orography", "slt": "soil_type"}
_YEAR = re.compile(r"_(\d{4})_")


def folder_spec(folder: str) -> tuple[str, int | None] | None:
    """(base, fixed level or None) for a WeatherBench folder name, None if not a ClimaX variable."""
    if folder in V.PRESSURE_LEVEL:
        return folder, None
    try:
        spec = V.parse_variable(folder)
    except ValueError:
        return None
    if spec.name == "latitude":
        return None
    return spec.base, spec.level_hpa


def file_year(path: str | Path) -> int | None:
    m = _YEAR.search(Path(path).name)
    return int(m.group(1)) if m else None


def is_root_constants(path: str | Path) -> bool:
    """``<root>/constants.nc`` (or ``constants_<res>deg.nc``) beside WeatherBench variable folders."""
    p = Path(path)
    if p.suffix not in (".nc", ".nc4") or not (p.stem == CONSTANTS_FOLDER or p.stem.startswith("constants_")):
        return False
    if p.parent.name == CONSTANTS_FOLDER:
        return False
    return any(d.is_dir() and folder_spec(d.name) is not None for d in p.parent.iterdir())


def folder_of(path: str | Path) -> str:
    """The WeatherBench folder a file belongs to (``constants`` for a root constants file)."""
    return CONSTANTS_FOLDER if is_root_constants(path) else Path(path).parent.name


def is_weatherbench_file(path: str | Path) -> bool:
    """A ``<folder>/<folder>_...nc`` file whose folder is a ClimaX name or ``constants``, or a
    root ``constants.nc``."""
    p = Path(path)
    if is_root_constants(p):
        return True
    folder = p.parent.name
    if p.suffix not in (".nc", ".nc4") or not p.name.startswith(folder):
        return False
    return folder == CONSTANTS_FOLDER or folder_spec(folder) is not None


def list_files(root: str | Path, variables: list[str] | None = None) -> dict[str, list[str]]:
    """Folder name -> sorted NetCDF files, for the folders that hold ClimaX variables.

    With ``variables``, only folders that can provide them (and ``constants`` when a constant is
    asked for).
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: WeatherBench root is not a directory")
    wanted = None
    if variables is not None:
        wanted = {V.parse_variable(v) for v in variables}
    out: dict[str, list[str]] = {}
    # ClimaX's layout: constants.nc at the root (the constants folder wins when both exist)
    root_consts = sorted(str(f) for f in root.iterdir() if f.is_file() and is_root_constants(f))
    if root_consts and (wanted is None or any(s.is_constant and s.name != "latitude" for s in wanted)):
        out[CONSTANTS_FOLDER] = root_consts[:1]
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(str(f) for f in sub.iterdir() if f.suffix in (".nc", ".nc4"))
        if not files:
            continue
        if sub.name == CONSTANTS_FOLDER:
            if wanted is None or any(s.is_constant and s.name != "latitude" for s in wanted):
                out[sub.name] = files
            continue
        fs = folder_spec(sub.name)
        if fs is None:
            continue
        base, level = fs
        if wanted is not None and not any(
                s.base == base and (level is None or s.level_hpa == level) for s in wanted):
            continue
        out[sub.name] = files
    if not out:
        raise SourceError(
            f"{root}: no WeatherBench variable folders found (expected e.g. "
            f"{root}/2m_temperature/2m_temperature_2015_5.625deg.nc)"
            + (f" for {sorted(variables)}" if variables else "")
        )
    return out


def years(root: str | Path) -> list[int]:
    ys = {file_year(f) for files in list_files(root).values() for f in files}
    return sorted(y for y in ys if y is not None)


class _LazyConcat(BackendArray):
    """Lazily concatenated variables along axis 0 (time): reads only the files indexed."""

    def __init__(self, parts: list[xr.Variable]):
        self._parts = parts
        self._offsets = np.cumsum([0] + [p.shape[0] for p in parts])
        self.shape = (int(self._offsets[-1]), *parts[0].shape[1:])
        self.dtype = np.result_type(*[p.dtype for p in parts])

    def __getitem__(self, key):
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER,
                                                  self._raw_getitem)

    def _raw_getitem(self, key: tuple):
        k0, rest = key[0], tuple(key[1:])
        scalar = isinstance(k0, (int, np.integer))
        idx = np.arange(self.shape[0])[k0]
        idx = np.atleast_1d(idx)
        which = np.searchsorted(self._offsets, idx, side="right") - 1
        chunks = []
        for f in np.unique(which):  # files in increasing order
            local = idx[which == f] - self._offsets[f]
            if len(local) and np.array_equal(local, np.arange(local[0], local[-1] + 1)):
                sel = slice(int(local[0]), int(local[-1]) + 1)
            else:
                sel = local
            chunks.append((np.flatnonzero(which == f), np.asarray(self._parts[f][(sel, *rest)].values)))
        out = np.empty((len(idx), *chunks[0][1].shape[1:]), dtype=self.dtype) if chunks else \
            np.empty((0,), dtype=self.dtype)
        for pos, arr in chunks:
            out[pos] = arr
        return out[0] if scalar else out


def _concat(das: list[xr.DataArray]) -> xr.DataArray:
    if len(das) == 1:
        return das[0]
    first = das[0]
    if "time" not in first.dims:
        return first
    for d in das[1:]:
        if d.dims != first.dims or d.shape[1:] != first.shape[1:] or first.dims[0] != "time":
            raise SourceError(
                f"WeatherBench yearly files of {first.name!r} differ in layout "
                f"({first.dims} {first.shape} vs {d.dims} {d.shape})"
            )
    times = np.concatenate([d["time"].values for d in das])
    data = indexing.LazilyIndexedArray(_LazyConcat([d.variable for d in das]))
    coords = {k: v for k, v in first.coords.items() if "time" not in v.dims}
    coords["time"] = ("time", times)
    return xr.DataArray(xr.Variable(first.dims, data), coords=coords, name=first.name,
                        attrs=dict(first.attrs))


def _folder_candidates(folder: str, files: list[str],
                       storage_options: dict | None = None) -> list[Candidate]:
    if folder == CONSTANTS_FOLDER:
        ds = open_raw(files[0], storage_options)
        cands, _ = nc_candidates(ds, files[0], base_for=lambda n, lev: CONSTANT_VARS.get(n))
        for c in cands:
            c.assume_units = V.parse_variable(c.base).units
        return cands
    fs = folder_spec(folder)
    if fs is None:
        return []
    base, level = fs
    per_file: list[Candidate] = []
    for f in files:
        ds = open_raw(f, storage_options)
        cands, _ = nc_candidates(
            ds, f, base_for=lambda n, lev: base,
            assume_units=V.PRESSURE_LEVEL.get(base) or V.parse_variable(base).units,
        )
        cands = [c for c in cands if c.source_name not in ("lat2d", "lon2d")]
        if len(cands) != 1:
            raise SourceError(
                f"{f}: expected one data variable on a lat/lon grid in a WeatherBench "
                f"{folder!r} file, found {[c.source_name for c in cands] or 'none'}"
            )
        c = cands[0]
        if base in V.PRESSURE_LEVEL and "level" not in c.data.coords:
            if level is None:
                raise SourceError(
                    f"{f}: {c.source_name!r} in folder {folder!r} has no pressure level; name the "
                    f"folder <base>_<hPa> (e.g. {folder}_500) or add a level coordinate"
                )
            c.data = c.data.assign_coords(level=float(level))
        per_file.append(c)
    if not per_file:
        return []
    merged = _concat([c.data for c in per_file])
    return [Candidate(base, merged, per_file[0].source_name, assume_units=per_file[0].assume_units)]


def open_weatherbench(root: str | Path, variables: list[str] | None = None, *,
                      years: list[int] | None = None, member: int | None = None) -> xr.Dataset:
    """One Dataset across all (or the given) years of a WeatherBench root."""
    files = list_files(root, variables)
    if years is not None:
        ys = {int(y) for y in years}
        files = {k: [f for f in v if k == CONSTANTS_FOLDER or file_year(f) in ys] for k, v in files.items()}
        files = {k: v for k, v in files.items() if v}
    # full-level folders first, single-level folders (temperature_850) only fill gaps
    order = sorted(files, key=lambda k: (k != CONSTANTS_FOLDER and folder_spec(k)[1] is not None, k))
    cands: list[Candidate] = []
    for folder in order:
        cands.extend(_folder_candidates(folder, files[folder]))
    return assemble(str(root), cands, variables=variables, member=member, fmt="weatherbench",
                    calendar="proleptic_gregorian")


def open_file(path: str | Path, variables: list[str] | None = None,
              member: int | None = None, storage_options: dict | None = None) -> xr.Dataset:
    """One WeatherBench file (e.g. one year of one variable), named by its folder; local, or a
    URL streamed from object storage (see ``netcdf.open_raw``)."""
    if "://" in str(path):
        path = str(path)
        folder = folder_of(path)
    else:
        path = str(Path(path))
        folder = folder_of(Path(path))
    cands = _folder_candidates(folder, [path], storage_options)
    return assemble(path, cands, variables=variables, member=member, fmt="weatherbench",
                    calendar="proleptic_gregorian")


class WeatherBenchSource:
    format = "weatherbench"

    def open(self, path: str, *, variables: list[str] | None = None,
             member: int | None = None) -> xr.Dataset:
        if Path(path).is_dir():
            return open_weatherbench(path, variables, member=member)
        return open_file(path, variables, member=member)
