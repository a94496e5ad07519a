"""The byte-level pass that indexes a GRIB file (:mod:`pipelines.sources.grib_index` describes
it): message boundaries from section 0, GRIB 2 sections walked by their lengths, header keys
decoded once per distinct header signature, reference times from the raw bytes.

:func:`scan` walks a memory map or a :class:`pipelines.streaming.RangeView` and returns the
:class:`Scanner` holding one entry per field; ``grib_index`` makes the ``GribIndex`` of it.
"""

from __future__ import annotations

import datetime as _dt

from pipelines.sources.base import SourceError
from pipelines.sources.grib_codes import KIND_KEYS, REDOWNLOAD, assemble_parts, decode_signature, header_key

_EPOCH = _dt.datetime(1970, 1, 1)

#: step units whose offset does not depend on the reference date (code tables 4.4 / GRIB 1 4)
_G2_FIXED_UNITS = {0, 1, 2, 10, 11, 12, 13}
_G1_FIXED_UNITS = {0, 1, 2, 10, 11, 12, 13, 14, 254}


def _ns(y: int, mo: int, d: int, h: int, mi: int, s: int = 0) -> int:
    delta = _dt.datetime(y, mo, d, h, mi, s) - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000


def _ns_from_date_time(date: int, time: int) -> int:
    date, time = int(date), int(time)
    return _ns(date // 10000, date // 100 % 100, date % 100, time // 100, time % 100)

def _corrupt(path: str, what: str) -> SourceError:
    return SourceError(f"{path}: {what}; {REDOWNLOAD}")


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


class Scanner:
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
    def _signature_info(self, sig: tuple, buf_fn, raw_ref: tuple | None, *, cacheable: bool):
        hit = self._sigs.get(sig)
        if hit is not None:
            return hit
        info = decode_signature(buf_fn(), self._grid_by_key)
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
             parse_ref, *, cacheable: bool):
        ref_ns, ymdhm = self._ref_ns(raw_ref_bytes, parse_ref)
        kid, step_ns = self._signature_info(sig, buf_fn, ymdhm, cacheable=cacheable)
        if step_ns is None:  # ambiguous units or disagreement: ask ecCodes for this message
            import eccodes

            self.slow_times += 1
            h = eccodes.codes_new_from_message(buf_fn())
            try:
                t = {k: header_key(h, k) for k in ("dataDate", "dataTime", "validityDate",
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
        self._add(o, length, -1, sig, lambda: mm[o:o + length], raw_ref, _parse_g1_ref, cacheable=cacheable)

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
        for secs in fields:
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

                def buf_fn(o=o, length=length):
                    return mm[o:o + length]
            else:
                ranges = [(o, 16)] + [secs[k] for k in (1, 2, 3, 4, 5, 6, 7) if k in secs]
                part = len(self.parts)
                self.parts.append(ranges)

                def buf_fn(ranges=ranges):
                    return assemble_parts(_MMFile(mm), ranges)
            self._add(o, length, part, sig, buf_fn, raw_ref, _parse_g2_ref, cacheable=cacheable)


class _MMFile:
    """seek/read over a memory map (for :func:`assemble_parts`)."""

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


def scan(mm, size: int, path: str) -> Scanner:
    """Every field of the GRIB bytes ``mm`` (``size`` bytes, named ``path`` in errors)."""
    b = Scanner(path, mm, size)
    _walk(b, mm, size, path)
    return b


def _walk(b: Scanner, mm, n: int, path: str) -> None:
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
