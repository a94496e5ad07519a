"""ecCodes and message bytes for the GRIB index (:mod:`pipelines.sources.grib_index`): the header
keys of one message signature (:func:`decode_signature`), a single-field message's values
(:func:`decode_message`) and its (lat, lon) layout (:func:`to_grid`), a GRIB 2 single-field message
assembled from byte ranges (:func:`assemble_parts`).

ecCodes is imported where it is used: indexing a cached file needs none of it.
"""

from __future__ import annotations

import numpy as np

REDOWNLOAD = "the file is truncated or corrupt; re-download it"

#: grid keys kept in the index (the grid descriptor)
GRID_KEYS = ("gridType", "Ni", "Nj", "latitudeOfFirstGridPointInDegrees",
             "longitudeOfFirstGridPointInDegrees", "latitudeOfLastGridPointInDegrees",
             "longitudeOfLastGridPointInDegrees", "iDirectionIncrementInDegrees",
             "jDirectionIncrementInDegrees", "iScansNegatively", "jScansPositively",
             "jPointsAreConsecutive")
#: field keys kept in the index, once per distinct field kind
KIND_KEYS = ("shortName", "paramId", "cfVarName", "units", "typeOfLevel", "level", "number",
             "stepType", "stepRange", "edition")


def assemble_parts(f, ranges) -> bytes:
    """A GRIB 2 message from byte ranges: the first is section 0 (16 bytes), whose total
    length is rewritten; ``7777`` is appended."""
    chunks = []
    for start, n in ranges:
        f.seek(start)
        b = f.read(n)
        if len(b) != n:
            raise OSError(f"byte range {start}+{n} is cut short")
        chunks.append(b)
    total = sum(len(c) for c in chunks) + 4
    sec0 = chunks[0][:8] + total.to_bytes(8, "big")
    return sec0 + b"".join(chunks[1:]) + b"7777"


def header_key(h, key, default=None):
    import eccodes

    try:
        if not eccodes.codes_is_defined(h, key):
            return default
        v = eccodes.codes_get(h, key)
    except Exception:
        return default
    if isinstance(v, (int, np.integer)):
        try:
            if eccodes.codes_is_missing(h, key):
                return default
        except Exception:
            pass
    if isinstance(v, np.generic):
        v = v.item()
    return v


def decode_signature(buf: bytes, known_grids: dict) -> dict:
    """Header keys, step offset and grid of one message (ecCodes, full decode of headers).

    ``known_grids``: grid descriptor tuple -> grid dict (coordinates computed once per grid)."""
    import eccodes

    h = eccodes.codes_new_from_message(buf)
    try:
        kind = {k: header_key(h, k) for k in KIND_KEYS}
        if kind["cfVarName"] in (None, "unknown", "~"):
            kind["cfVarName"] = kind["shortName"]
        if kind["level"] is not None:
            lv = float(kind["level"])
            kind["level"] = int(lv) if lv.is_integer() else lv
        times = {k: header_key(h, k) for k in ("dataDate", "dataTime", "validityDate", "validityTime")}
        grid = {k: header_key(h, k) for k in GRID_KEYS}
        gkey = tuple(grid[k] for k in GRID_KEYS)
        if gkey in known_grids:
            grid = known_grids[gkey]
        elif grid["gridType"] in ("regular_ll", "regular_gg") and grid["Ni"] and grid["Nj"]:
            grid["lat"], grid["lon"] = _grid_coords(h, grid)
        return {"kind": kind, "times": times, "grid": grid, "gkey": gkey}
    finally:
        eccodes.codes_release(h)


def _grid_coords(h, grid: dict) -> tuple[np.ndarray, np.ndarray]:
    """1-D lat and lon in the order of the decoded values' rows and columns."""
    import eccodes

    ni, nj = int(grid["Ni"]), int(grid["Nj"])
    lats = eccodes.codes_get_array(h, "latitudes").astype(np.float64)
    lons = eccodes.codes_get_array(h, "longitudes").astype(np.float64)
    lat2, lon2 = to_grid(lats, grid), to_grid(lons, grid)
    lat_pts, lon_pts = lat2[:, 0], lon2[0, :]
    lat, lon = lat_pts, lon_pts
    try:  # prefer ecCodes' exact distinct values (what cfgrib reports), in data order
        dlat = np.asarray(eccodes.codes_get_array(h, "distinctLatitudes"), dtype=np.float64)
        dlon = np.asarray(eccodes.codes_get_array(h, "distinctLongitudes"), dtype=np.float64)
    except Exception:
        dlat = dlon = None
    if dlat is not None and len(dlat) == nj:
        for cand in (dlat, dlat[::-1]):
            if np.allclose(cand, lat_pts, atol=1e-6):
                lat = cand.copy()
                break
    if dlon is not None and len(dlon) == ni:
        for cand in (dlon, dlon[::-1]):
            if np.allclose(np.mod(cand, 360.0), np.mod(lon_pts, 360.0), atol=1e-6):
                lon = cand.copy()
                break
    return lat, lon


def to_grid(values: np.ndarray, grid: dict) -> np.ndarray:
    """Decoded values (scanning order) -> (lat, lon) array in that order."""
    ni, nj = int(grid["Ni"]), int(grid["Nj"])
    if grid.get("jPointsAreConsecutive"):
        return values.reshape(ni, nj).T
    return values.reshape(nj, ni)


def decode_message(buf: bytes) -> np.ndarray:
    """The values of a single-field message (1-D, scanning order, NaN where bitmapped)."""
    import eccodes

    h = eccodes.codes_new_from_message(buf)
    try:
        values = eccodes.codes_get_values(h)
        if eccodes.codes_get(h, "bitmapPresent"):
            missing = eccodes.codes_get(h, "missingValue")
            values = np.where(values == missing, np.nan, values)
        return values
    finally:
        eccodes.codes_release(h)
