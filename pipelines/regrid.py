"""Regridding from source latitude/longitude grids to the ClimaX target grids.

xESMF needs conda's ESMF, so the weights are computed here with numpy and kept as
``scipy.sparse.csr_matrix`` of shape ``(n_dst, n_src)`` over fields flattened as
``[lat, lon]`` in each grid's *own* coordinate order. Applying a regridder is one sparse
matrix product per batch of fields.

Both methods work on rectilinear lat/lon grids, where the weights factor into a latitude
part and a longitude part: ``W = kron(W_lat, W_lon)``. Only the two 1-D matrices are built
(a few hundred rows each), so even 721x1440 -> 128x256 takes well under a second.

* ``bilinear``: linear in latitude times linear in longitude. Longitude is periodic when
  the source is global in longitude. Beyond the outermost source latitude row (between it
  and the pole) the nearest row is used (constant extrapolation).
* ``conservative``: first-order, area-weighted. Cell edges lie midway between centres;
  the outer latitude edges are clipped to +-90 (and extended to +-90 when the grid is
  global in latitude); longitude edges are periodic. A latitude band's area is
  proportional to ``sin(lat_n) - sin(lat_s)``, so the weight of source cell j in target
  cell i is ``overlap_area / target_area``: constants map to themselves and the
  area-weighted global mean is preserved.

Sources may list latitude north-first (ERA5, GRIB) or south-first and longitude in
[-180, 180) or [0, 360) in any rotation, ascending or descending: the orderings are folded
into the weights, so callers never sort. Targets from :func:`target_grid` are south-first
(ascending latitude) with longitude ascending from 0, the one order of all shards.

Weights are cached per (source grid, target grid, method) in memory and, optionally, as
``.npz`` files under a cache directory (see :func:`get_regridder`).

Why one module of ~570 lines: the grid axes (orderings folded into the weights), the two 1-D
weight builders and the cached ``Regridder`` are one chain that every caller uses whole; about a
third of the lines are the checks whose errors name the grid and what to do.

This module imports no torch.
"""
from __future__ import annotations

import hashlib
import os
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from climax.storage import atomic_path

__all__ = [
    "METHODS",
    "Grid",
    "RegridError",
    "Regridder",
    "clear_memory_cache",
    "get_regridder",
    "target_grid",
]

METHODS = ("bilinear", "conservative")

# Fraction of -90..90 a grid's latitude cells must span to count as global in latitude.
_GLOBAL_LAT_FRACTION = 0.9
# Conservative overlaps thinner than this fraction of the target cell are round-off
# slivers (two edges that agree mathematically but differ in the last bit); dropped.
_SLIVER = 1e-12
# Regridder.__call__ converts to float64 in chunks of about this many bytes.
_CHUNK_BYTES = 64 * 2**20
# Bump when the weight computation changes, so stale on-disk caches are not reused.
_WEIGHTS_VERSION = "1"


class RegridError(ValueError):
    """A grid cannot be regridded as asked; the message names the grid and the fix."""


def _fmt(x: float) -> str:
    """Short decimal for messages: 35.0, 35.25, -10.0."""
    return repr(float(round(float(x), 4)))


@dataclass(frozen=True, eq=False)
class Grid:
    """A rectilinear lat/lon grid: 1-D cell-centre coordinates in degrees.

    The arrays are copied to read-only float64. Equality and hashing go by
    :meth:`fingerprint`, so two grids with identical coordinates are the same grid.
    Coordinates are checked when a :class:`Regridder` is built (so the error can say
    whether the source or the target grid is at fault), not here.
    """

    lat: np.ndarray
    lon: np.ndarray

    def __post_init__(self) -> None:
        for name in ("lat", "lon"):
            a = np.array(getattr(self, name), dtype=np.float64, copy=True)
            if a.ndim != 1:
                raise ValueError(f"Grid.{name} must be 1-D, got shape {a.shape}")
            a.flags.writeable = False
            object.__setattr__(self, name, a)
        h = hashlib.sha256()
        h.update(f"lat{self.lat.size}:lon{self.lon.size}:".encode())
        h.update(np.ascontiguousarray(self.lat).tobytes())
        h.update(np.ascontiguousarray(self.lon).tobytes())
        object.__setattr__(self, "_fingerprint", h.hexdigest())

    @property
    def shape(self) -> tuple[int, int]:
        """(nlat, nlon)."""
        return (int(self.lat.size), int(self.lon.size))

    @property
    def size(self) -> int:
        """Number of cells, nlat * nlon."""
        return int(self.lat.size * self.lon.size)

    def fingerprint(self) -> str:
        """Stable sha256 hex digest of the coordinate arrays (order and values)."""
        return self._fingerprint  # type: ignore[attr-defined]

    def cell_areas(self) -> np.ndarray:
        """Cell areas as fractions of the sphere, shape (nlat, nlon), in the grid's order.

        Uses the cell edges of the conservative method, so on a global grid the areas sum
        to 1 and ``(cell_areas() * field).sum()`` is the area-weighted global mean.
        """
        lat = _lat_axis(self.lat, "this")
        lon = _lon_axis(self.lon, "this")
        band = np.empty(lat.values.size)
        band[lat.order] = np.sin(np.deg2rad(lat.hi)) - np.sin(np.deg2rad(lat.lo))
        width = np.empty(lon.values.size)
        width[lon.order] = lon.hi - lon.lo
        return np.outer(band / 2.0, width / 360.0)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Grid):
            return NotImplemented
        return self.fingerprint() == other.fingerprint()

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def __repr__(self) -> str:
        return (
            f"Grid({self.shape[0]}x{self.shape[1]}, lat {_fmt(self.lat[0])}..{_fmt(self.lat[-1])}, "
            f"lon {_fmt(self.lon[0])}..{_fmt(self.lon[-1])})"
        )


def target_grid(resolution: float) -> Grid:
    """The equiangular, cell-centred WeatherBench/ClimaX grid at ``resolution`` degrees.

    Latitude ascends south to north, ``-90 + r/2 + r*i``; longitude ascends from 0,
    ``r*j``. 5.625 gives 32x64, 1.40625 gives 128x256. ``180/r`` and ``360/r`` must be
    whole numbers.
    """
    r = float(resolution)
    if not np.isfinite(r) or r <= 0:
        raise ValueError(f"target resolution must be a positive number of degrees, got {resolution!r}")
    nlat, nlon = round(180.0 / r), round(360.0 / r)
    if nlat < 1 or abs(nlat * r - 180.0) > 1e-9 or abs(nlon * r - 360.0) > 1e-9:
        raise ValueError(
            f"target resolution {resolution!r} deg does not divide 180 and 360 into whole cells; "
            "use e.g. 5.625, 2.8125, 1.40625 or 0.25"
        )
    lat = -90.0 + r / 2.0 + r * np.arange(nlat, dtype=np.float64)
    lon = r * np.arange(nlon, dtype=np.float64)
    return Grid(lat=lat, lon=lon)


# ----------------------------------------------------------------------------------------
# Axis analysis: sort order, cell edges, global or not.


@dataclass(frozen=True)
class _Axis:
    """One coordinate axis in ascending (for longitude: unwrapped) order.

    ``order[k]`` is the grid's own index of the k-th sorted point; ``values``, ``lo`` and
    ``hi`` are the sorted centres and cell edges in degrees. For longitude the values are
    unwrapped (strictly ascending, ``values[0]`` in [0, 360)); ``is_global`` means the
    points go all the way round, and then ``hi[-1] == lo[0] + 360``.
    """

    order: np.ndarray
    values: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    is_global: bool  # longitude: goes all the way round; latitude: spans ~all of -90..90


def _check_points(a: np.ndarray, which: str, name: str) -> None:
    if a.size < 2:
        raise RegridError(
            f"{which} grid has {a.size} {name} point(s); regridding needs at least 2 along each axis"
        )
    if not np.all(np.isfinite(a)):
        raise RegridError(f"{which} grid {name}s contain NaN or inf; fix the {name} coordinate")


def _lat_axis(lat: np.ndarray, which: str) -> _Axis:
    _check_points(lat, which, "latitude")
    if np.any(np.abs(lat) > 90.0 + 1e-9):
        raise RegridError(
            f"{which} grid latitudes run {_fmt(lat.min())}..{_fmt(lat.max())}, outside -90..90; "
            "check that lat and lon are not swapped"
        )
    d = np.diff(lat)
    if np.all(d > 0):
        order = np.arange(lat.size)
    elif np.all(d < 0):
        order = np.arange(lat.size)[::-1].copy()
    else:
        bad = np.flatnonzero((d == 0) | (np.sign(d) != np.sign(d[0])))
        k = int(bad[0]) if d[0] != 0 else 0
        raise RegridError(
            f"{which} grid latitudes are not strictly monotonic (step {k}: {_fmt(lat[k])} -> "
            f"{_fmt(lat[k + 1])}); sort the data along latitude and drop repeated rows"
        )
    v = lat[order]
    lo = np.empty_like(v)
    hi = np.empty_like(v)
    lo[1:] = hi[:-1] = 0.5 * (v[:-1] + v[1:])
    lo[0] = max(-90.0, v[0] - 0.5 * (v[1] - v[0]))
    hi[-1] = min(90.0, v[-1] + 0.5 * (v[-1] - v[-2]))
    is_global = (hi[-1] - lo[0]) >= _GLOBAL_LAT_FRACTION * 180.0
    if is_global:
        # Extend the outermost cells to the poles: the same nearest-row rule as bilinear's
        # constant extrapolation, and what lets a global target's polar cells be filled.
        lo[0], hi[-1] = -90.0, 90.0
    return _Axis(order=order, values=v, lo=lo, hi=hi, is_global=bool(is_global))


def _lon_axis(lon: np.ndarray, which: str) -> _Axis:
    _check_points(lon, which, "longitude")
    # Monotonic on the circle: every step, taken modulo 360, is positive (ascending) or
    # every step is negative (descending), and the steps together go round less than once.
    d = np.diff(lon)
    up, down = np.mod(d, 360.0), np.mod(-d, 360.0)
    if not ((np.all(up > 0) and up.sum() < 360.0) or (np.all(down > 0) and down.sum() < 360.0)):
        raise RegridError(
            f"{which} grid longitudes are not strictly monotonic (or repeat a longitude modulo "
            "360, e.g. both 0 and 360); sort the data along longitude and drop repeated columns"
        )
    m = np.mod(lon, 360.0)
    m[m >= 360.0] = 0.0  # np.mod(-1e-20, 360) rounds to 360.0
    order = np.argsort(m, kind="stable")
    s = m[order]
    if np.any(np.diff(s) <= 0):
        raise RegridError(f"{which} grid repeats a longitude modulo 360; drop the repeated column")
    n = s.size
    # gaps[k]: spacing from sorted point k to point k+1, the last one wrapping through 360.
    gaps = np.diff(np.append(s, s[0] + 360.0))
    big = int(np.argmax(gaps))
    # Global in longitude unless one gap is over twice the typical spacing (the median of
    # the other gaps, so a 2-point axis like [0, 10] is not mistaken for global).
    typical = np.median(np.delete(gaps, big))
    if gaps[big] <= 2.0 * typical * (1 + 1e-9):
        lo = s - 0.5 * np.roll(gaps, 1)  # midpoint with the previous point, wrapped
        lo[0] = s[0] - 0.5 * gaps[-1]
        hi = np.append(lo[1:], lo[0] + 360.0)
        return _Axis(order=order, values=s, lo=lo, hi=hi, is_global=True)
    # Regional: the points form one arc that starts after the largest gap.
    start = (big + 1) % n
    order = np.roll(order, -start)
    v = np.roll(s, -start)
    v[v < v[0]] += 360.0
    lo = np.empty_like(v)
    hi = np.empty_like(v)
    lo[1:] = hi[:-1] = 0.5 * (v[:-1] + v[1:])
    lo[0] = v[0] - 0.5 * (v[1] - v[0])
    hi[-1] = v[-1] + 0.5 * (v[-1] - v[-2])
    return _Axis(order=order, values=v, lo=lo, hi=hi, is_global=False)


def _lon_display(axis: _Axis, raw: np.ndarray) -> tuple[float, float]:
    """First and last longitude of the arc, in the grid's own convention (+-180 or 0..360)."""
    if axis.is_global:
        return float(raw.min()), float(raw.max())
    base = -180.0 if np.any(raw < 0) else 0.0
    start = base + (float(axis.values[0]) - base) % 360.0
    end = base + (float(axis.values[-1]) - base) % 360.0  # an arc across the seam reads 350.0..40.0
    return start, end


def _extent(grid: Grid, lat: _Axis, lon: _Axis) -> str:
    a, b = _lon_display(lon, grid.lon)
    return f"lat {_fmt(lat.values[0])}..{_fmt(lat.values[-1])}, lon {_fmt(a)}..{_fmt(b)}"


def _describe_target(grid: Grid) -> str:
    dlat, dlon = np.diff(grid.lat), np.diff(grid.lon)
    r = abs(dlon[0])
    if np.allclose(np.abs(dlat), r) and np.allclose(np.abs(dlon), r):
        return f"global {r:g} deg grid"
    return f"global {grid.shape[0]}x{grid.shape[1]} grid"


def _wrap_into(x: np.ndarray, lon: _Axis) -> np.ndarray:
    """Longitudes x (degrees) shifted by multiples of 360 onto the source axis' unwrapped range.

    For a regional axis the cut sits in the middle of the gap, so points inside the arc (or
    within half a cell of it) land on the arc.
    """
    if lon.is_global:
        ref = lon.lo[0]
    else:
        ref = 0.5 * (lon.hi[-1] + lon.lo[0] + 360.0) - 360.0
    return ref + np.mod(x - ref, 360.0)


# ----------------------------------------------------------------------------------------
# 1-D weights. Rows are the target axis' own indices, columns the source axis' own indices.


def _linear_1d(src: _Axis, x: np.ndarray, n_dst: int, *, wrap: bool) -> sp.csr_matrix:
    """Linear interpolation from the sorted source points to positions x (target order).

    Beyond the first or last source point the weight is clipped to that point (constant
    extrapolation): for latitude this fills the band between the outermost source row and
    the pole with the nearest row. With ``wrap`` (a longitude axis that goes all the way
    round) one wrapped point is added at each end, so it never extrapolates and
    interpolates across the 0/360 seam.
    """
    xs, idx = src.values, src.order
    if wrap:
        xs = np.concatenate(([xs[-1] - 360.0], xs, [xs[0] + 360.0]))
        idx = np.concatenate(([idx[-1]], idx, [idx[0]]))
    i = np.clip(np.searchsorted(xs, x, side="right") - 1, 0, xs.size - 2)
    w = np.clip((x - xs[i]) / (xs[i + 1] - xs[i]), 0.0, 1.0)
    rows = np.repeat(np.arange(x.size), 2)
    cols = np.stack([idx[i], idx[i + 1]], axis=1).ravel()
    vals = np.stack([1.0 - w, w], axis=1).ravel()
    m = sp.csr_matrix((vals, (rows, cols)), shape=(n_dst, src.order.size))
    m.eliminate_zeros()
    return m


def _overlap_1d(src_lo, src_hi, dst_lo, dst_hi, measure):
    """Overlaps of two sorted sets of disjoint intervals.

    Returns (i, j, length): target interval i and source interval j share ``length``
    (in ``measure`` units, e.g. sin(lat) for area). All breakpoints are merged; each piece
    between consecutive breakpoints lies in at most one interval of each set.
    """
    pts = np.unique(np.concatenate([src_lo, src_hi, dst_lo, dst_hi]))
    mid = 0.5 * (pts[:-1] + pts[1:])
    seg = measure(pts[1:]) - measure(pts[:-1])
    i = np.searchsorted(dst_lo, mid, side="right") - 1
    j = np.searchsorted(src_lo, mid, side="right") - 1
    ok = (i >= 0) & (j >= 0)
    ok &= mid < dst_hi[np.maximum(i, 0)]
    ok &= mid < src_hi[np.maximum(j, 0)]
    return i[ok], j[ok], seg[ok]


def _conservative_1d(src: _Axis, dst: _Axis, measure, *, periodic_lon: bool) -> sp.csr_matrix:
    """Fraction of each target cell covered by each source cell, along one axis."""
    s_lo, s_hi, s_idx = src.lo, src.hi, src.order
    d_lo, d_hi = dst.lo, dst.hi
    if periodic_lon:
        # Shift the target arc by whole turns to start inside the source's first turn, and lay
        # two turns of source cells so that every target cell falls on source cells.
        shift = np.floor((d_lo[0] - s_lo[0]) / 360.0) * 360.0
        d_lo, d_hi = d_lo - shift, d_hi - shift
        s_lo = np.concatenate([src.lo, src.lo + 360.0])
        s_hi = np.concatenate([src.hi, src.hi + 360.0])
        s_idx = np.concatenate([src.order, src.order])
    i, j, seg = _overlap_1d(s_lo, s_hi, d_lo, d_hi, measure)
    width = measure(d_hi) - measure(d_lo)
    w = seg / width[i]
    keep = w > _SLIVER
    m = sp.csr_matrix(
        (w[keep], (dst.order[i[keep]], s_idx[j[keep]])), shape=(dst.order.size, src.order.size)
    )
    # A target cell only partly covered by the source (possible only for regional grids)
    # is normalised by the covered part, so constants still map to themselves.
    sums = np.asarray(m.sum(axis=1)).ravel()
    partial = (sums > 0) & (sums < 1.0 - 1e-9)
    if np.any(partial):
        scale = np.ones_like(sums)
        scale[partial] = 1.0 / sums[partial]
        m = sp.csr_matrix(sp.diags(scale) @ m)
    return m


def _sin_deg(x: np.ndarray) -> np.ndarray:
    return np.sin(np.deg2rad(x))


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _build_weights(src: Grid, dst: Grid, method: str) -> sp.csr_matrix:
    """The (n_dst, n_src) weight matrix; grids are validated here."""
    s_lat, s_lon = _lat_axis(src.lat, "source"), _lon_axis(src.lon, "source")
    d_lat, d_lon = _lat_axis(dst.lat, "target"), _lon_axis(dst.lon, "target")
    _check_coverage(src, dst, s_lat, s_lon, d_lat, d_lon)
    if src == dst:
        return sp.identity(src.size, dtype=np.float64, format="csr")
    if method == "bilinear":
        w_lat = _linear_1d(s_lat, dst.lat, dst.lat.size, wrap=False)
        x = _wrap_into(np.mod(dst.lon, 360.0), s_lon)
        w_lon = _linear_1d(s_lon, x, dst.lon.size, wrap=s_lon.is_global)
    else:
        w_lat = _conservative_1d(s_lat, d_lat, _sin_deg, periodic_lon=False)
        w_lon = _conservative_1d(s_lon, d_lon, _identity, periodic_lon=True)
    # Flattened [lat, lon] index is lat * nlon + lon on both sides: exactly kron's layout.
    w = sp.kron(w_lat, w_lon, format="csr")
    w.sort_indices()
    return w


def _check_coverage(src, dst, s_lat, s_lon, d_lat, d_lon) -> None:
    """Raise RegridError when the source cannot fill the target."""
    src_global = s_lat.is_global and s_lon.is_global
    if d_lat.is_global and d_lon.is_global:
        if not src_global:
            raise RegridError(
                f"source grid covers {_extent(src, s_lat, s_lon)}: not global; regridding to a "
                f"{_describe_target(dst)} needs a global source; give a global file or crop the target"
            )
        return
    # Regional target: every target centre must lie on the source's cells.
    tol = 1e-9
    lat_ok = np.all((dst.lat >= s_lat.lo[0] - tol) & (dst.lat <= s_lat.hi[-1] + tol))
    lon_ok = True
    if not s_lon.is_global:
        x = _wrap_into(np.mod(dst.lon, 360.0), s_lon)
        lon_ok = bool(np.all((x >= s_lon.lo[0] - tol) & (x <= s_lon.hi[-1] + tol)))
    if not (lat_ok and lon_ok):
        raise RegridError(
            f"target grid covers {_extent(dst, d_lat, d_lon)}, beyond the source grid, which covers "
            f"{_extent(src, s_lat, s_lon)}; give a larger source or crop the target"
        )


# ----------------------------------------------------------------------------------------


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown regridding method {method!r}; use one of {', '.join(METHODS)}")


class Regridder:
    """Regrids fields shaped (..., nlat_src, nlon_src) to (..., nlat_dst, nlon_dst).

    ``weights`` is a ``scipy.sparse.csr_matrix`` of shape (n_dst, n_src) over fields
    flattened as [lat, lon] in each grid's own order. Arithmetic is float64, results are
    float32. NaN in a source cell propagates to every target cell that uses it. When
    ``src == dst`` the weights are exactly the identity (either method).

    ``weights`` may be passed in (as loaded from a cache); the grids are still checked.
    Prefer :func:`get_regridder`, which caches.
    """

    def __init__(self, src: Grid, dst: Grid, method: str, *, weights: sp.spmatrix | None = None):
        _check_method(method)
        self.src, self.dst, self.method = src, dst, method
        if weights is None:
            weights = _build_weights(src, dst, method)
        else:
            _check_coverage(
                src, dst,
                _lat_axis(src.lat, "source"), _lon_axis(src.lon, "source"),
                _lat_axis(dst.lat, "target"), _lon_axis(dst.lon, "target"),
            )
            weights = sp.csr_matrix(weights, dtype=np.float64)
            if weights.shape != (dst.size, src.size):
                raise RegridError(
                    f"weights have shape {weights.shape}, expected {(dst.size, src.size)} for "
                    f"{src!r} -> {dst!r}; rebuild them"
                )
        self.weights: sp.csr_matrix = weights

    def __call__(self, field: np.ndarray, *, copy: bool = True) -> np.ndarray:
        """``copy=False``: an identity regrid may return ``field`` itself (when it is float32)."""
        a = np.asarray(field)
        if a.ndim < 2 or a.shape[-2:] != self.src.shape:
            raise RegridError(
                f"field of shape {a.shape} does not end with the source grid shape {self.src.shape} "
                "(nlat, nlon); transpose it to (..., lat, lon)"
            )
        if self.src == self.dst:  # identity weights: skip the sparse product (exact either way)
            return np.array(a, dtype=np.float32, order="C", copy=True if copy else None)
        lead = a.shape[:-2]
        flat = a.reshape(-1, self.src.size)
        out = np.empty((flat.shape[0], self.dst.size), dtype=np.float32)
        step = max(1, _CHUNK_BYTES // (8 * self.src.size))
        for k in range(0, flat.shape[0], step):
            x = np.asarray(flat[k : k + step], dtype=np.float64)
            # (n_dst, n_src) @ (n_src, batch): scipy wants the dense operand C-ordered.
            out[k : k + step] = (self.weights @ np.ascontiguousarray(x.T)).T
        return out.reshape(lead + self.dst.shape)

    def __repr__(self) -> str:
        return f"Regridder({self.src!r} -> {self.dst!r}, {self.method}, nnz={self.weights.nnz})"


# ----------------------------------------------------------------------------------------
# Caching.

_CACHE: dict[tuple[str, str, str], Regridder] = {}
_CACHE_LOCK = threading.Lock()


def clear_memory_cache() -> None:
    """Forget every in-memory regridder (the on-disk cache is left alone)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _cache_path(cache_dir: str | os.PathLike, src: Grid, dst: Grid, method: str) -> Path:
    key = hashlib.sha256(
        f"{src.fingerprint()}|{dst.fingerprint()}|{method}|v{_WEIGHTS_VERSION}".encode()
    ).hexdigest()[:20]
    (a, b), (c, d) = src.shape, dst.shape
    return Path(cache_dir) / f"regrid-{method}-{a}x{b}-to-{c}x{d}-{key}.npz"


def _load_weights(path: Path) -> sp.csr_matrix | None:
    try:
        return sp.load_npz(path).tocsr()
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # truncated or foreign file: rebuild and overwrite


def _save_weights(path: Path, weights: sp.csr_matrix) -> None:
    """Write to a temporary name in the same folder, then rename: readers never see half a file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        sp.save_npz(f, weights)


def get_regridder(
    src: Grid, dst: Grid, method: str, cache_dir: str | os.PathLike | None = None
) -> Regridder:
    """A :class:`Regridder`, built once per (source grid, target grid, method).

    Looked up in memory first (the same object comes back each time in a process), then as
    an ``.npz`` under ``cache_dir`` when given; a freshly built regridder's weights are
    written there. An unreadable cache file is rebuilt and replaced.
    """
    _check_method(method)
    key = (src.fingerprint(), dst.fingerprint(), method)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    path = _cache_path(cache_dir, src, dst, method) if cache_dir is not None else None
    if hit is None:
        regridder = None
        if path is not None:
            weights = _load_weights(path)
            if weights is not None and weights.shape == (dst.size, src.size):
                regridder = Regridder(src, dst, method, weights=weights)
        if regridder is None:
            regridder = Regridder(src, dst, method)
            if path is not None:  # missing or unreadable on disk: (re)write it
                _save_weights(path, regridder.weights)
        with _CACHE_LOCK:
            hit = _CACHE.setdefault(key, regridder)
    elif path is not None and not path.exists():
        _save_weights(path, hit.weights)
    return hit
