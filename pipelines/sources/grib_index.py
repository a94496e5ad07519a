"""A fast, cached index of a GRIB 1 / GRIB 2 file, and lazy per-message reads from it.

Building the index is one pass over the file's bytes (memory-mapped, so the data sections of
big messages are never read):

* message boundaries come from section 0 (``GRIB``, edition, total length: 3 bytes at offset 4
  in GRIB 1 (with ECMWF's large-message convention), 8 bytes at offset 8 in GRIB 2); every
  message must end in ``7777`` inside the file, else :class:`SourceError` naming the file; bytes
  between messages must be zero padding (a damaged message is refused, not skipped);
* GRIB 2 sections are walked by their lengths, so multi-field messages (NCEP packs ``u`` and
  ``v`` in one message) become one entry per field: the field's sections are copied into a
  single-field message (a reused bitmap, indicator 254, is replaced by the one it refers to);
* the header keys (shortName, paramId, typeOfLevel, level, number, step, units, grid) are decoded
  by ecCodes **once per distinct header signature**: the raw bytes of the header sections with
  the reference time masked out (GRIB 2: discipline, sections 1 to 4; GRIB 1: PDS and GDS). A
  year of reanalysis has a few dozen signatures, not hundreds of thousands of messages;
* the reference time is read from the raw bytes; the valid time is reference time + the step
  offset that ecCodes computed for the signature's first message. This is cached only when the
  step units are unambiguous (minutes, hours, days, seconds; not months or years) and the raw
  reference time agrees with ecCodes' ``dataDate``/``dataTime`` for that message; otherwise
  the message's times come from ecCodes (``validityDate``/``validityTime``), one by one.

The index is cached per process (key: absolute path, size, mtime_ns) and on local disk under
``$CLIMAX_GRIB_INDEX_DIR`` or ``<tempdir>/climax-grib-index`` (written to a temporary name, then
renamed; a corrupt or stale cache file is rebuilt), so other processes on the node load it in
milliseconds.

:class:`GribArray` is an xarray ``BackendArray`` over a table of index entries: indexing it reads
and decodes only the messages it needs (:func:`decode_message`, one ecCodes handle per message).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import mmap
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from xarray.backends import BackendArray
from xarray.core import indexing

from pipelines.sources.base import SourceError

__all__ = [
    "GribIndex", "GribArray", "build_index", "get_index", "cache_dir", "decode_message",
    "read_entry", "clear_memory_cache", "INDEX_VERSION",
]

INDEX_VERSION = 1
_REDOWNLOAD = "the file is truncated or corrupt; re-download it"
_EPOCH = _dt.datetime(1970, 1, 1)

#: step units whose offset does not depend on the reference date (code tables 4.4 / GRIB 1 4)
_G2_FIXED_UNITS = {0, 1, 2, 10, 11, 12, 13}
_G1_FIXED_UNITS = {0, 1, 2, 10, 11, 12, 13, 14, 254}

#: grid keys kept in the index (the grid descriptor)
GRID_KEYS = ("gridType", "Ni", "Nj", "latitudeOfFirstGridPointInDegrees",
             "longitudeOfFirstGridPointInDegrees", "latitudeOfLastGridPointInDegrees",
             "longitudeOfLastGridPointInDegrees", "iDirectionIncrementInDegrees",
             "jDirectionIncrementInDegrees", "iScansNegatively", "jScansPositively",
             "jPointsAreConsecutive")
#: field keys kept in the index, once per distinct field kind
KIND_KEYS = ("shortName", "paramId", "cfVarName", "units", "typeOfLevel", "level", "number",
             "stepType", "stepRange", "edition")


# ----------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------


@dataclass
class GribIndex:
    """One entry per GRIB field (a message, or one field of a GRIB 2 multi-field message).

    Per entry (numpy arrays): ``offset``/``length`` of the message in the file; ``part``: -1, or
    the row of ``parts`` listing the byte ranges that make the field's single-field message;
    ``kind``: the row of ``kinds`` (shortName, paramId, cfVarName, units, typeOfLevel, level,
    number (None when not defined), stepType, stepRange, edition, grid); ``ref_time`` and
    ``valid_time``: int64 ns since 1970 (forecast base time, and base time + step).
    ``grids``: descriptors (:data:`GRID_KEYS`) with ``lat``/``lon`` 1-D coordinate arrays in the
    order of the data (for regular_ll / regular_gg grids).
    """

    path: str
    size: int
    mtime_ns: int
    offset: np.ndarray
    length: np.ndarray
    part: np.ndarray
    kind: np.ndarray
    ref_time: np.ndarray
    valid_time: np.ndarray
    kinds: list[dict]
    grids: list[dict]
    parts: list[list[tuple[int, int]]] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.offset.shape[0])

    def records(self) -> list[dict]:
        """One dict per entry, with the keys of ecCodes' names (for inspection and tests)."""
        out = []
        vt = self.valid_time.astype("datetime64[ns]")
        rt = self.ref_time.astype("datetime64[ns]")
        for i in range(len(self)):
            k = self.kinds[int(self.kind[i])]
            g = self.grids[k["grid"]]
            vdate, vtime = _date_time(vt[i])
            ddate, dtime = _date_time(rt[i])
            out.append({
                **{key: k[key] for key in KIND_KEYS},
                "gridType": g["gridType"], "grid": k["grid"],
                "dataDate": ddate, "dataTime": dtime, "validityDate": vdate,
                "validityTime": vtime, "valid_time": vt[i], "offset": int(self.offset[i]),
                "length": int(self.length[i]), "part": int(self.part[i]),
            })
        return out

    def message(self, i: int, f) -> bytes:
        """The single-field message of entry ``i`` from the open binary file ``f``."""
        p = int(self.part[i])
        if p < 0:
            f.seek(int(self.offset[i]))
            buf = f.read(int(self.length[i]))
            if len(buf) != int(self.length[i]):
                raise OSError(f"{self.path}: message at byte {int(self.offset[i])} is cut short")
            return buf
        return _assemble_parts(f, self.parts[p])


def _date_time(t: np.datetime64) -> tuple[int, int]:
    s = str(t.astype("datetime64[m]"))  # YYYY-MM-DDTHH:MM
    return int(s[0:4] + s[5:7] + s[8:10]), int(s[11:13] + s[14:16])


def _ns(y: int, mo: int, d: int, h: int, mi: int, s: int = 0) -> int:
    delta = _dt.datetime(y, mo, d, h, mi, s) - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000


def _ns_from_date_time(date: int, time: int) -> int:
    date, time = int(date), int(time)
    return _ns(date // 10000, date // 100 % 100, date % 100, time // 100, time % 100)


def _assemble_parts(f, ranges) -> bytes:
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


# ----------------------------------------------------------------------------------------------
# ecCodes helpers
# ----------------------------------------------------------------------------------------------


def _get(h, key, default=None):
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


def _decode_signature(buf: bytes, known_grids: dict) -> dict:
    """Header keys, step offset and grid of one message (ecCodes, full decode of headers).

    ``known_grids``: grid descriptor tuple -> grid dict (coordinates computed once per grid)."""
    import eccodes

    h = eccodes.codes_new_from_message(buf)
    try:
        kind = {k: _get(h, k) for k in KIND_KEYS}
        if kind["cfVarName"] in (None, "unknown", "~"):
            kind["cfVarName"] = kind["shortName"]
        if kind["level"] is not None:
            lv = float(kind["level"])
            kind["level"] = int(lv) if lv.is_integer() else lv
        times = {k: _get(h, k) for k in ("dataDate", "dataTime", "validityDate", "validityTime")}
        grid = {k: _get(h, k) for k in GRID_KEYS}
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
    lat2, lon2 = _to_grid(lats, grid), _to_grid(lons, grid)
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


def _to_grid(values: np.ndarray, grid: dict) -> np.ndarray:
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


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------


def _corrupt(path: str, what: str) -> SourceError:
    return SourceError(f"{path}: {what}; {_REDOWNLOAD}")


def _grib1_length(mm, o: int, n: int, path: str) -> int:
    """Total length of the GRIB 1 message at ``o`` (with the large-message convention)."""
    total = int.from_bytes(mm[o + 4:o + 7], "big")
    if not total & 0x800000:
        return total
    # ECMWF large GRIB 1: length in units of 120 bytes, corrected by section 4's length
    pos = o + 8
    if pos + 8 > n:
        raise _corrupt(path, f"GRIB message at byte {o} runs past the end of the file")
    sec1 = int.from_bytes(mm[pos:pos + 3], "big")
    flags = mm[pos + 7]
    pos += sec1
    for present in (flags & 0x80, flags & 0x40):
        if present:
            if pos + 3 > n:
                raise _corrupt(path, f"GRIB message at byte {o} runs past the end of the file")
            pos += int.from_bytes(mm[pos:pos + 3], "big")
    if pos + 3 > n:
        raise _corrupt(path, f"GRIB message at byte {o} runs past the end of the file")
    sec4 = int.from_bytes(mm[pos:pos + 3], "big")
    total = (total & 0x7FFFFF) * 120
    if sec4 < 120:
        total = total - sec4 + 4
    return total


class _Builder:
    def __init__(self, path: str, mm, size: int):
        self.path, self.mm, self.n = path, mm, size
        self.offset: list[int] = []
        self.length: list[int] = []
        self.part: list[int] = []
        self.kind: list[int] = []
        self.ref: list[int] = []
        self.valid: list[int] = []
        self.parts: list[list[tuple[int, int]]] = []
        self.kinds: list[dict] = []
        self._kind_ids: dict[tuple, int] = {}
        self.grids: list[dict] = []
        self._grid_ids: dict[tuple, int] = {}
        self._grid_by_key: dict[tuple, dict] = {}
        self._sigs: dict[tuple, tuple[int, int | None]] = {}  # sig -> (kind id, offset ns | None)
        self._times: dict[bytes, int] = {}
        self.ecc_decodes = 0
        self.slow_times = 0

    # -- signatures ----------------------------------------------------------------------
    def _signature_info(self, sig: tuple, buf_fn, raw_ref: tuple | None, cacheable: bool):
        hit = self._sigs.get(sig)
        if hit is not None:
            return hit
        info = _decode_signature(buf_fn(), self._grid_by_key)
        self.ecc_decodes += 1
        grid, gkey = info["grid"], info["gkey"]
        gid = self._grid_ids.get(gkey)
        if gid is None:
            gid = self._grid_ids[gkey] = len(self.grids)
            self.grids.append(grid)
            self._grid_by_key[gkey] = grid
        kind = dict(info["kind"], grid=gid)
        kkey = tuple(kind[k] for k in (*KIND_KEYS, "grid"))
        kid = self._kind_ids.get(kkey)
        if kid is None:
            kid = self._kind_ids[kkey] = len(self.kinds)
            self.kinds.append(kind)
        t = info["times"]
        step_ns = None
        if cacheable and raw_ref is not None and None not in t.values():
            dd, dt = int(t["dataDate"]), int(t["dataTime"])
            y, mo, d, hh, mi = raw_ref
            if (y * 10000 + mo * 100 + d, hh * 100 + mi) == (dd, dt):
                step_ns = (_ns_from_date_time(t["validityDate"], t["validityTime"])
                           - _ns_from_date_time(dd, dt))
        self._sigs[sig] = (kid, step_ns)
        return kid, step_ns

    def _ref_ns(self, raw: bytes, parse) -> tuple[int, tuple]:
        hit = self._times.get(raw)
        if hit is not None:
            return hit
        ymdhm = parse(raw)
        try:
            ns = _ns(*ymdhm)
        except (ValueError, OverflowError):
            raise _corrupt(self.path, f"bad reference time {ymdhm} in a GRIB message") from None
        self._times[raw] = (ns, ymdhm)
        return ns, ymdhm

    def _add(self, o: int, length: int, part: int, sig: tuple, buf_fn, raw_ref_bytes: bytes,
             parse_ref, cacheable: bool):
        ref_ns, ymdhm = self._ref_ns(raw_ref_bytes, parse_ref)
        kid, step_ns = self._signature_info(sig, buf_fn, ymdhm, cacheable)
        if step_ns is None:  # ambiguous units or disagreement: ask ecCodes for this message
            import eccodes

            self.slow_times += 1
            h = eccodes.codes_new_from_message(buf_fn())
            try:
                t = {k: _get(h, k) for k in ("dataDate", "dataTime", "validityDate",
                                             "validityTime")}
            finally:
                eccodes.codes_release(h)
            if None in t.values():
                raise _corrupt(self.path, f"GRIB message at byte {o} has no valid time")
            ref_ns = _ns_from_date_time(t["dataDate"], t["dataTime"])
            valid_ns = _ns_from_date_time(t["validityDate"], t["validityTime"])
        else:
            valid_ns = ref_ns + step_ns
        self.offset.append(o)
        self.length.append(length)
        self.part.append(part)
        self.kind.append(kid)
        self.ref.append(ref_ns)
        self.valid.append(valid_ns)

    # -- editions --------------------------------------------------------------------------
    def grib1(self, o: int, length: int):
        mm = self.mm
        p = o + 8
        end = o + length - 4
        sec1_len = int.from_bytes(mm[p:p + 3], "big")
        if sec1_len < 28 or p + sec1_len > end:
            raise _corrupt(self.path, f"GRIB 1 message at byte {o} has a bad section 1")
        s1 = mm[p:p + sec1_len]
        p += sec1_len
        gds = b""
        if s1[7] & 0x80:
            gl = int.from_bytes(mm[p:p + 3], "big")
            if gl < 3 or p + gl > end:
                raise _corrupt(self.path, f"GRIB 1 message at byte {o} has a bad grid section")
            gds = mm[p:p + gl]
        # masked: year of century, month, day, hour, minute (octets 13-17), century (25)
        sig = (1, s1[:12], s1[17:24], s1[25:], gds)
        cacheable = s1[17] in _G1_FIXED_UNITS
        raw_ref = bytes(s1[12:17]) + bytes(s1[24:25])
        self._add(o, length, -1, sig, lambda: mm[o:o + length], raw_ref, _parse_g1_ref, cacheable)

    def grib2(self, o: int, length: int):
        mm = self.mm
        end = o + length - 4
        p = o + 16
        cur: dict[int, tuple[int, int]] = {}
        fields: list[dict[int, tuple[int, int]]] = []
        last_bitmap: tuple[int, int] | None = None
        while p < end:
            if p + 5 > end:
                raise _corrupt(self.path, f"GRIB 2 message at byte {o} has a bad section")
            sl = int.from_bytes(mm[p:p + 4], "big")
            num = mm[p + 4]
            if sl < 5 or p + sl > end or not 1 <= num <= 7:
                raise _corrupt(self.path, f"GRIB 2 message at byte {o} has a bad section {num}")
            if num == 6:
                ind = mm[p + 5]
                if ind == 0:
                    last_bitmap = (p, sl)
                elif ind == 254:
                    if last_bitmap is None:
                        raise _corrupt(self.path, f"GRIB 2 message at byte {o} reuses a "
                                                  "bitmap it never defined")
                    cur[6] = last_bitmap
                    p += sl
                    continue
            cur[num] = (p, sl)
            if num == 7:
                if not all(k in cur for k in (1, 3, 4, 5, 6)):
                    raise _corrupt(self.path, f"GRIB 2 message at byte {o} misses a section")
                fields.append(dict(cur))
            p += sl
        if p != end or not fields:
            raise _corrupt(self.path, f"GRIB 2 message at byte {o} has no data section")
        discipline = mm[o + 6]
        for fi, secs in enumerate(fields):
            s1p, s1l = secs[1]
            s1 = mm[s1p:s1p + s1l]
            if s1l < 21:
                raise _corrupt(self.path, f"GRIB 2 message at byte {o} has a bad section 1")
            s2 = mm[secs[2][0]:secs[2][0] + secs[2][1]] if 2 in secs else b""
            s3 = mm[secs[3][0]:secs[3][0] + secs[3][1]]
            s4p, s4l = secs[4]
            s4 = mm[s4p:s4p + s4l]
            s4sig, cacheable = _g2_section4_signature(s4)
            sig = (2, discipline, s1[:12], s1[19:], s2, s3, s4sig)
            raw_ref = bytes(s1[12:18])
            if len(fields) == 1:
                part = -1
                buf_fn = (lambda o=o, length=length: mm[o:o + length])
            else:
                ranges = [(o, 16)] + [secs[k] for k in (1, 2, 3, 4, 5, 6, 7) if k in secs]
                part = len(self.parts)
                self.parts.append(ranges)
                buf_fn = (lambda ranges=ranges: _assemble_parts(_MMFile(mm), ranges))
            self._add(o, length, part, sig, buf_fn, raw_ref, _parse_g2_ref, cacheable)


class _MMFile:
    """seek/read over a memory map (for :func:`_assemble_parts`)."""

    def __init__(self, mm):
        self.mm, self.pos = mm, 0

    def seek(self, pos):
        self.pos = pos

    def read(self, n):
        b = self.mm[self.pos:self.pos + n]
        self.pos += len(b)
        return b


def _parse_g1_ref(raw: bytes) -> tuple:
    yoc, mo, d, h, mi, century = raw
    return (century - 1) * 100 + yoc, mo, d, h, mi


def _parse_g2_ref(raw: bytes) -> tuple:
    return int.from_bytes(raw[0:2], "big"), raw[2], raw[3], raw[4], raw[5]


def _g2_section4_signature(s4) -> tuple[bytes, bool]:
    """Section 4 bytes for the signature (end-of-interval dates masked where redundant) and
    whether the step offset may be cached for it."""
    tmpl = int.from_bytes(s4[7:9], "big")
    if tmpl in (0, 1, 2, 3, 4, 5, 6, 7, 15) and len(s4) >= 34:
        return bytes(s4), s4[17] in _G2_FIXED_UNITS
    # statistically processed: the end of the overall interval is forecastTime + the range
    end_at = {8: 34, 11: 37}.get(tmpl)
    if end_at is not None and len(s4) >= end_at + 19:
        n_ranges = s4[end_at + 7]
        range_unit = s4[end_at + 14]
        if n_ranges == 1 and s4[17] in _G2_FIXED_UNITS and range_unit in _G2_FIXED_UNITS:
            return bytes(s4[:end_at]) + bytes(s4[end_at + 7:]), True
    return bytes(s4), False


def build_index(path: str) -> GribIndex:
    """Index every field of a GRIB file (no cache). SourceError for truncated/corrupt files."""
    path = str(path)
    try:
        st = os.stat(path)
        f = open(path, "rb")
    except OSError as exc:
        raise SourceError(f"{path}: cannot read it ({exc})") from None
    with f:
        if st.st_size == 0:
            raise SourceError(f"{path}: is empty; {_REDOWNLOAD}")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return _index_of(mm, path, os.path.abspath(path), st.st_size, st.st_mtime_ns)
        finally:
            mm.close()


def build_index_remote(url: str, storage_options: dict | None = None) -> GribIndex:
    """Index a GRIB object in object storage by ranged reads of its message headers (see
    :class:`pipelines.streaming.RangeView`); the data sections are never read, except one
    message per distinct header signature. ``mtime_ns`` holds a hash of the object's ETag."""
    from pipelines import streaming

    fs, p, size, tag = streaming.object_info(url, storage_options)
    if size == 0:
        raise SourceError(f"{url}: is empty; {_REDOWNLOAD}")
    view = streaming.RangeView(fs, p, size, url=url, storage_options=storage_options)
    try:
        idx = _index_of(view, url, url, size, remote_version(tag))
        idx.stats.update(index_bytes_read=view.bytes_read, index_requests=view.requests,
                         index_round_trips=view.batches)
        return idx
    finally:
        view.close()


def remote_version(tag: str) -> int:
    """An int standing for an object's version tag (ETag, generation), where a local file's
    index keeps its mtime_ns."""
    return int(hashlib.sha1(str(tag).encode()).hexdigest()[:15], 16)


def _index_of(mm, path: str, key_path: str, size: int, mtime_ns: int) -> GribIndex:
    """The index from a memory map or a RangeView (anything with slices, bytes and ``find``)."""
    try:
        b = _Builder(path, mm, size)
        _walk(b, mm, size, path)
        idx = GribIndex(
            path=key_path, size=size, mtime_ns=mtime_ns,
            offset=np.asarray(b.offset, dtype=np.int64),
            length=np.asarray(b.length, dtype=np.int64),
            part=np.asarray(b.part, dtype=np.int32), kind=np.asarray(b.kind, dtype=np.int32),
            ref_time=np.asarray(b.ref, dtype=np.int64),
            valid_time=np.asarray(b.valid, dtype=np.int64), kinds=b.kinds, grids=b.grids,
            parts=b.parts,
            stats={"ecCodes_header_decodes": b.ecc_decodes, "per_message_times": b.slow_times},
        )
    except SourceError:
        raise
    except OSError as exc:  # a remote range cut short: the message names the object
        raise SourceError(f"{exc}") from None
    except Exception as exc:  # ecCodes errors on a bad message
        raise SourceError(f"{path}: reading GRIB headers failed ({type(exc).__name__}: "
                          f"{exc}); {_REDOWNLOAD}") from None
    if len(idx) == 0:
        raise SourceError(f"{path}: contains no GRIB message; {_REDOWNLOAD} (or it is not GRIB)")
    return idx


def _walk(b: _Builder, mm, n: int, path: str) -> None:
    pos = 0
    count = 0
    hint = getattr(mm, "hint_message", None)  # a streaming.RangeView: fetch the next headers ahead
    while True:
        if mm[pos:pos + 4] == b"GRIB":
            o = pos
        else:
            o = mm.find(b"GRIB", pos)
            # Zero padding between messages is normal (GRIB 1 archives pad to record boundaries);
            # other bytes there are a damaged message whose fields would silently go missing.
            end = n if o < 0 else o
            if end > pos and (o >= 0 or count) and bytes(mm[pos:end]).strip(b"\x00"):
                where = f"between message {count} and {count + 1}" if o >= 0 and count else \
                    "before the first message" if not count else "after the last message"
                raise _corrupt(path, f"bytes {pos}..{end} ({where}) are not GRIB: a damaged message")
            if o < 0:
                return
        if o + 16 > n:
            raise _corrupt(path, f"GRIB message {count + 1} (at byte {o}) runs past the end "
                                 "of the file")
        edition = mm[o + 7]
        if edition == 2:
            length = int.from_bytes(mm[o + 8:o + 16], "big")
        elif edition == 1:
            length = _grib1_length(mm, o, n, path)
        else:
            raise _corrupt(path, f"GRIB message {count + 1} (at byte {o}) has edition {edition}")
        if length < 16 or o + length > n:
            raise _corrupt(path, f"GRIB message {count + 1} (at byte {o}, {length} bytes) runs "
                                 f"past the end of the file ({n} bytes)")
        if hint is not None:
            hint(o, length)
        if mm[o + length - 4:o + length] != b"7777":
            raise _corrupt(path, f"GRIB message {count + 1} (at byte {o}) has no '7777' end "
                                 "marker")
        if edition == 2:
            b.grib2(o, length)
        else:
            b.grib1(o, length)
        count += 1
        pos = o + length


# ----------------------------------------------------------------------------------------------
# Caching
# ----------------------------------------------------------------------------------------------

_MEMORY: OrderedDict[tuple, GribIndex] = OrderedDict()
_MEMORY_MAX = 64
_LOCK = threading.Lock()


def cache_dir() -> str:
    return os.environ.get("CLIMAX_GRIB_INDEX_DIR") or os.path.join(tempfile.gettempdir(),
                                                                   "climax-grib-index")


def clear_memory_cache() -> None:
    with _LOCK:
        _MEMORY.clear()


def _cache_file(folder: str, key: tuple) -> str:
    h = hashlib.sha1(f"{key[0]}|{key[1]}|{key[2]}|v{INDEX_VERSION}".encode()).hexdigest()[:24]
    return os.path.join(folder, f"{os.path.basename(key[0])[:60]}.{h}.idx.npz")


def _save(idx: GribIndex, target: str) -> None:
    meta = {
        "version": INDEX_VERSION, "path": idx.path, "size": idx.size, "mtime_ns": idx.mtime_ns,
        "kinds": idx.kinds, "parts": idx.parts, "stats": idx.stats,
        "grids": [{k: v for k, v in g.items() if k not in ("lat", "lon")} for g in idx.grids],
    }
    arrays = {"offset": idx.offset, "length": idx.length, "part": idx.part, "kind": idx.kind,
              "ref_time": idx.ref_time, "valid_time": idx.valid_time,
              "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    for i, g in enumerate(idx.grids):
        for c in ("lat", "lon"):
            if c in g:
                arrays[f"grid{i}_{c}"] = np.asarray(g[c], dtype=np.float64)
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _load(target: str, key: tuple) -> GribIndex | None:
    try:
        with open(target, "rb") as f:
            data = f.read()
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if (meta.get("version") != INDEX_VERSION or meta["path"] != key[0]
                    or meta["size"] != key[1] or meta["mtime_ns"] != key[2]):
                return None
            grids = meta["grids"]
            for i, g in enumerate(grids):
                for c in ("lat", "lon"):
                    if f"grid{i}_{c}" in z.files:
                        g[c] = z[f"grid{i}_{c}"]
            kinds = meta["kinds"]
            idx = GribIndex(
                path=meta["path"], size=meta["size"], mtime_ns=meta["mtime_ns"],
                offset=z["offset"], length=z["length"], part=z["part"], kind=z["kind"],
                ref_time=z["ref_time"], valid_time=z["valid_time"], kinds=kinds, grids=grids,
                parts=[[tuple(r) for r in p] for p in meta["parts"]], stats=meta.get("stats", {}),
            )
        n = len(idx)
        if not (len(idx.length) == len(idx.part) == len(idx.kind) == len(idx.ref_time)
                == len(idx.valid_time) == n) or n == 0:
            return None
        if idx.kind.min() < 0 or idx.kind.max() >= len(kinds) or any(
                not 0 <= k["grid"] < len(grids) for k in kinds):
            return None
        if idx.part.max() >= len(idx.parts):
            return None
        return idx
    except Exception:  # missing, partial, corrupt: rebuild
        return None


def get_index(path: str, *, cache: str | None | bool = None,
              storage_options: dict | None = None) -> GribIndex:
    """The index of ``path``, from this process' memory, the disk cache, or built (and cached).

    ``cache``: a folder for the disk cache (default :func:`cache_dir`), or False for no disk
    cache. The key is (absolute path, size, mtime_ns): a changed file gets a new index. A remote
    ``path`` (s3://, gs://, ...) is indexed by ranged reads (:func:`build_index_remote`), keyed
    by (URL, size, ETag), and cached the same way.
    """
    path = str(path)
    remote = "://" in path and not path.startswith("file://")
    if remote:
        from pipelines import streaming

        _, _, size, tag = streaming.object_info(path, storage_options)
        key = (path, size, remote_version(tag))
    else:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise SourceError(f"{path}: cannot read it ({exc})") from None
        key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    with _LOCK:
        idx = _MEMORY.get(key)
        if idx is not None:
            _MEMORY.move_to_end(key)
            return idx
    folder = None if cache is False else (cache if isinstance(cache, str) else cache_dir())
    target = _cache_file(folder, key) if folder else None
    idx = _load(target, key) if target and os.path.exists(target) else None
    if idx is None:
        idx = build_index_remote(path, storage_options) if remote else build_index(path)
        if (idx.size, idx.mtime_ns) != key[1:]:
            key = (key[0], idx.size, idx.mtime_ns)
            target = _cache_file(folder, key) if folder else None
        if target:
            try:
                _save(idx, target)
            except OSError:
                pass  # a read-only or full cache folder only costs speed
    with _LOCK:
        _MEMORY[key] = idx
        while len(_MEMORY) > _MEMORY_MAX:
            _MEMORY.popitem(last=False)
    return idx


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def read_entry(idx: GribIndex, i: int, f=None) -> np.ndarray:
    """Entry ``i``'s field as a 2-D float32 (lat, lon) array in the order of ``grids[g]``."""
    grid = idx.grids[idx.kinds[int(idx.kind[i])]["grid"]]
    if f is None:
        with open(idx.path, "rb") as fh:
            buf = idx.message(i, fh)
    else:
        buf = idx.message(i, f)
    return _to_grid(decode_message(buf), grid).astype(np.float32)


class GribArray(BackendArray):
    """Lazy float32 array with dims ``lead + (lat, lon)``: ``table[lead]`` is an index entry
    (-1: no message, read as NaN). Indexing reads and decodes only the entries it needs."""

    def __init__(self, idx: GribIndex, table: np.ndarray, storage_options: dict | None = None):
        self.path = idx.path
        # a remote object (its index path is the URL): messages are read by byte ranges
        self._remote = "://" in idx.path
        self._storage_options = storage_options
        self.file_size, self.mtime_ns = idx.size, idx.mtime_ns
        table = np.asarray(table, dtype=np.int64)
        ok = table >= 0
        safe = np.where(ok, table, 0)
        # keep only what reading needs (numpy, small and picklable)
        self._offset = np.where(ok, idx.offset[safe], -1)
        self._length = np.where(ok, idx.length[safe], -1)
        multi = ok & (idx.part[safe] >= 0)
        self._parts = {int(e): idx.parts[int(idx.part[e])] for e in np.unique(table[multi])}
        grids = {idx.kinds[int(k)]["grid"] for k in np.unique(idx.kind[table[ok]])}
        if len(grids) > 1:
            raise ValueError("entries of one GribArray must share their grid")
        g = idx.grids[grids.pop()] if grids else {"Ni": 0, "Nj": 0}
        self._grid = {k: g.get(k) for k in ("Ni", "Nj", "jPointsAreConsecutive")}
        self.table = table
        self.shape = table.shape + (int(g["Nj"]), int(g["Ni"]))
        self.dtype = np.dtype("float32")

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.OUTER, self._raw_getitem)

    def _message(self, e: int, offset: int, length: int, f) -> bytes:
        if e in self._parts:
            return _assemble_parts(f, self._parts[e])
        f.seek(offset)
        buf = f.read(length)
        if len(buf) != length:
            raise OSError(f"{self.path}: message at byte {offset} is cut short")
        return buf

    def _raw_getitem(self, key: tuple) -> np.ndarray:
        nlead = self.table.ndim
        lead, squeeze = [], []
        for ax, k in enumerate(key[:nlead]):
            if isinstance(k, (int, np.integer)):
                lead.append(np.array([int(k)]))
                squeeze.append(ax)
            elif isinstance(k, slice):
                lead.append(np.arange(self.table.shape[ax])[k])
            else:
                lead.append(np.asarray(k, dtype=np.int64))
        plane = []
        for ax, k in enumerate(key[nlead:]):
            if isinstance(k, (int, np.integer)):
                plane.append(slice(int(k), int(k) + 1))
                squeeze.append(nlead + ax)
            else:
                plane.append(k)
        ix = np.ix_(*lead) if nlead else ()
        sub = self.table[ix]
        sub_off, sub_len = self._offset[ix], self._length[ix]
        lat_k, lon_k = plane
        ny = len(np.arange(self.shape[-2])[lat_k])
        nx = len(np.arange(self.shape[-1])[lon_k])
        out = np.full(sub.shape + (ny, nx), np.nan, dtype=np.float32)
        needed = sub[sub >= 0]
        if needed.size and self._remote:
            self._fill_remote(out, sub, sub_off, sub_len, lat_k, lon_k)
        elif needed.size:
            st = _stat(self.path)
            if st is None or (st.st_size, st.st_mtime_ns) != (self.file_size, self.mtime_ns):
                raise OSError(f"{self.path}: the file changed or vanished since it was "
                              "indexed; reopen it")
            done: dict[int, np.ndarray] = {}
            with open(self.path, "rb") as f:
                for pos in zip(*np.nonzero(sub >= 0)):
                    e = int(sub[pos])
                    plane_vals = done.get(e)
                    if plane_vals is None:
                        off, n = int(sub_off[pos]), int(sub_len[pos])
                        try:
                            values = decode_message(self._message(e, off, n, f))
                        except OSError:
                            raise
                        except Exception as exc:  # ecCodes decoding errors
                            raise OSError(f"{self.path}: decoding the message at byte {off} "
                                          f"failed ({type(exc).__name__}: {exc})") from None
                        plane_vals = _to_grid(values, self._grid)[lat_k][:, lon_k]
                        done[e] = plane_vals
                    out[pos] = plane_vals
        if squeeze:
            out = out.squeeze(axis=tuple(squeeze))
        return out

    def _fill_remote(self, out, sub, sub_off, sub_len, lat_k, lon_k) -> None:
        """Read every needed message of a remote object in one batch of byte ranges (concurrent
        requests for async filesystems), exactly the messages' bytes, then decode them."""
        from pipelines import storage, streaming

        fs, p = storage.filesystem(self.path, self._storage_options)
        order: dict[int, tuple[int, int]] = {}
        for pos in zip(*np.nonzero(sub >= 0)):
            e = int(sub[pos])
            if e not in order:
                order[e] = (int(sub_off[pos]), int(sub_len[pos]))
        ranges: list[tuple[int, int]] = []
        for e, (off, n) in order.items():
            ranges += list(self._parts[e]) if e in self._parts else [(off, n)]
        data = iter(streaming.read_ranges(fs, p, ranges, self.path, self._storage_options))
        done: dict[int, np.ndarray] = {}
        for e, (off, n) in order.items():
            if e in self._parts:
                chunks = [next(data) for _ in self._parts[e]]
                total = sum(len(c) for c in chunks) + 4
                buf = chunks[0][:8] + total.to_bytes(8, "big") + b"".join(chunks[1:]) + b"7777"
            else:
                buf = next(data)
            try:
                values = decode_message(buf)
            except Exception as exc:  # ecCodes decoding errors
                raise OSError(f"{self.path}: decoding the message at byte {off} failed "
                              f"({type(exc).__name__}: {exc})") from None
            done[e] = _to_grid(values, self._grid)[lat_k][:, lon_k]
        for pos in zip(*np.nonzero(sub >= 0)):
            out[pos] = done[int(sub[pos])]


def _stat(path: str):
    try:
        return os.stat(path)
    except OSError:
        return None
