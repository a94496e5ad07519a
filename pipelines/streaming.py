"""Reading source files from object storage (s3://, gs://, any fsspec filesystem) without copying them.

* GRIB: :class:`RangeView` gives the GRIB index builder (:mod:`pipelines.sources.grib_index`)
  the bytes-like view it walks (slices, single bytes, ``find``), fetched by byte ranges: only the
  message headers are read (plus one whole message per distinct header signature, for ecCodes).
  Messages in a file usually have one length, so while walking, the headers of the next messages
  are fetched ahead in one concurrent ``cat_ranges`` batch at the predicted offsets (a wrong
  prediction costs a few hundred bytes, never correctness: every byte the walker checks is a
  byte that was read). Data are then read per message (:func:`read_ranges`): exactly the bytes
  a task decodes.
* NetCDF 4 / HDF5: :func:`open_file` returns an fsspec file object with a block cache sized to the
  file (h5netcdf reads through it).
* Everything else (NetCDF 3, ClimateBench pairs) falls back to a bounded per-node local copy
  (:mod:`pipelines.node_cache`).

Hand-written (not fsspec's caches) for GRIB because the index build is a walk that reads a few
hundred bytes every few megabytes: any block or read-ahead cache would read most of the file.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict

from pipelines import storage

__all__ = ["RangeView", "read_ranges", "open_file", "object_info", "block_size_for", "stats"]

#: first guess of a GRIB message's header length (sections 0-5 and the heads of 6 and 7 are about
#: 180 bytes for ECMWF GRIB 2); adapted to the largest header offset actually read
HEADER_GUESS = 512
#: reads up to this size are header reads (larger ones are whole messages, fetched exactly)
SMALL_READ = 4096
#: most headers fetched ahead in one batch (requests run concurrently for async filesystems)
MAX_BATCH = 256
#: bytes of fetched segments kept by one RangeView (signature messages can be megabytes each)
VIEW_CACHE_BYTES = 64 << 20

_STATS = {"bytes": 0, "requests": 0}
_STATS_LOCK = threading.Lock()


def stats() -> dict:
    """Bytes and requests fetched by this module in this process (for benchmarks and logs)."""
    with _STATS_LOCK:
        return dict(_STATS)


def _count(nbytes: int, nreq: int) -> None:
    with _STATS_LOCK:
        _STATS["bytes"] += nbytes
        _STATS["requests"] += nreq


def object_info(path: str, storage_options: dict | None = None) -> tuple[object, str, int, str]:
    """(filesystem, stripped path, size, version tag) of a remote object; errors explained."""
    fs, p = storage.filesystem(path, storage_options)
    try:
        info = fs.info(p)
    except Exception as exc:
        raise storage.explain(exc, path, storage_options) from None
    tag = (info.get("ETag") or info.get("etag") or info.get("generation") or info.get("md5Hash")
           or info.get("LastModified") or info.get("mtime") or info.get("updated") or "")
    return fs, p, int(info["size"]), str(tag)


def read_ranges(fs, path: str, ranges: list[tuple[int, int]], url: str | None = None,
                storage_options: dict | None = None) -> list[bytes]:
    """The bytes of ``(start, length)`` ranges of one object, fetched concurrently where the
    filesystem is async (s3fs, gcsfs); a short read raises OSError naming the object."""
    if not ranges:
        return []
    starts = [int(s) for s, _ in ranges]
    ends = [int(s) + int(n) for s, n in ranges]
    try:
        out = fs.cat_ranges([path] * len(ranges), starts, ends, on_error="raise")
    except Exception as exc:
        raise storage.explain(exc, url or path, storage_options) from None
    total = 0
    for (s, n), b in zip(ranges, out):
        if len(b) != n:
            raise OSError(f"{url or path}: byte range {s}+{n} is cut short ({len(b)} bytes); the "
                          "object changed or is truncated; re-upload it")
        total += len(b)
    _count(total, len(ranges))
    return out


class RangeView:
    """A read-only, bytes-like view (``len``, ``v[i]``, ``v[a:b]``, ``find``) of a remote object,
    fetched by byte ranges on demand; what the GRIB index walker reads from instead of a
    memory map.

    ``hint_message(offset, length)``: the walker is at a message. On a miss, a small (header) read
    fetches the header length learnt so far and, in the same batch, the same range at +length,
    +2 length, ... (the next messages' headers when lengths repeat), doubling the batch while
    predictions are used and halving it when they are not.
    """

    def __init__(self, fs, path: str, size: int, url: str | None = None,
                 storage_options: dict | None = None):
        self.fs, self.path, self.n = fs, path, int(size)
        self.url, self.storage_options = url or path, storage_options
        self._segs: OrderedDict[int, bytes] = OrderedDict()  # start -> bytes (LRU)
        self._starts: list[int] = []  # sorted keys of _segs
        self._held = 0
        self._spec: set[int] = set()  # starts of speculative segments not yet used
        self._stride: int | None = None
        self._msg: int | None = None
        self._batch = 4
        self._spec_used = 0
        self._header = 0  # farthest small read into a message seen (0: none yet)
        self.bytes_read = 0
        self.requests = 0
        self.batches = 0  # round trips (a batch's requests run concurrently)

    def __len__(self) -> int:
        return self.n

    def hint_message(self, offset: int, length: int) -> None:
        """The walker is at a message of ``length`` bytes starting at ``offset``."""
        self._msg = int(offset)
        self._stride = int(length) if length and length > 0 else None

    # -- segments -------------------------------------------------------------------------
    def _lookup(self, a: int, b: int) -> bytes | None:
        i = bisect.bisect_right(self._starts, a) - 1
        # the few segments starting at or before a (header segments may overlap)
        for j in range(i, max(-1, i - 4), -1):
            s = self._starts[j]
            seg = self._segs[s]
            if s + len(seg) >= b:
                self._segs.move_to_end(s)
                if s in self._spec:
                    self._spec.discard(s)
                    self._spec_used += 1
                return seg[a - s:b - s]
        return None

    def _store(self, start: int, data: bytes, *, speculative: bool) -> None:
        old = self._segs.pop(start, None)
        if old is not None:
            self._held -= len(old)
        else:
            bisect.insort(self._starts, start)
        self._segs[start] = data
        self._held += len(data)
        if speculative:
            self._spec.add(start)
        while self._held > VIEW_CACHE_BYTES and len(self._segs) > 1:
            s, d = self._segs.popitem(last=False)
            self._held -= len(d)
            self._starts.remove(s)
            self._spec.discard(s)

    def _fill(self, a: int, b: int) -> None:
        small = b - a <= SMALL_READ
        if not small:  # a whole message (ecCodes decodes the headers of one per signature)
            ranges = [(a, b - a)]
        else:
            # the header estimate: the farthest small read into a message so far, plus the
            # previous message's 4-byte end marker, which is read just before it
            want = self._header + 4 if self._header else HEADER_GUESS
            ranges = [(a, min(max(want, b - a), self.n - a))]
            if self._stride:
                self._batch = (min(MAX_BATCH, self._batch * 2) if self._spec_used * 2 >= self._batch
                               else max(1, self._batch // 2))
                self._spec_used = 0
                for k in range(1, self._batch):
                    s = a + k * self._stride
                    if s >= self.n:
                        break
                    if not self._lookup_quiet(s, min(s + want, self.n)):
                        ranges.append((s, min(want, self.n - s)))
        data = read_ranges(self.fs, self.path, ranges, self.url, self.storage_options)
        self.bytes_read += sum(len(d) for d in data)
        self.requests += len(data)
        self.batches += 1
        for k, ((s, _), d) in enumerate(zip(ranges, data)):
            self._store(s, d, speculative=k > 0)

    def _lookup_quiet(self, a: int, b: int) -> bool:
        i = bisect.bisect_right(self._starts, a) - 1
        return i >= 0 and self._starts[i] + len(self._segs[self._starts[i]]) >= b

    def _read(self, a: int, b: int) -> bytes:
        a, b = max(0, a), min(self.n, b)
        if b <= a:
            return b""
        if self._msg is not None and b - a <= SMALL_READ and a >= self._msg:
            end = b - self._msg
            if end <= (self._stride or 0) - 4:  # inside the message's headers, not its end marker
                self._header = max(self._header, end)
        got = self._lookup(a, b)
        if got is None:
            self._fill(a, b)
            got = self._lookup(a, b)
            if got is None:  # evicted at once (a range larger than the cache): read it alone
                got = read_ranges(self.fs, self.path, [(a, b - a)], self.url, self.storage_options)[0]
        return got

    def __getitem__(self, key):
        if isinstance(key, slice):
            if key.step not in (None, 1):
                raise ValueError("RangeView supports contiguous slices only")
            a = 0 if key.start is None else key.start
            b = self.n if key.stop is None else key.stop
            if a < 0 or b < 0:
                raise ValueError("RangeView does not take negative indices")
            return self._read(a, b)
        i = int(key)
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self._read(i, i + 1)[0]

    def find(self, sub: bytes, start: int = 0) -> int:
        """First offset of ``sub`` at or after ``start``, -1 if none (reads 64 KiB at a time)."""
        step = 1 << 16
        pos = start
        while pos < self.n:
            chunk = self._read(pos, min(self.n, pos + step + len(sub) - 1))
            k = chunk.find(sub)
            if k >= 0:
                return pos + k
            pos += step
        return -1

    def close(self) -> None:
        self._segs.clear()
        self._starts.clear()
        self._held = 0


def block_size_for(size: int) -> int:
    """Block size for streaming an HDF5 file of ``size`` bytes: 1/64 of it, between 8 KiB and
    4 MiB. HDF5 metadata reads are small and scattered (a few blocks per open), chunk reads are
    large: small files get small blocks (so opening one does not read all of it), large files
    large ones (so a chunk is a few requests)."""
    return int(min(4 << 20, max(8 << 10, size // 64)))


def open_file(path: str, storage_options: dict | None = None, *, size: int | None = None):
    """A seekable binary file object over a remote object, with an LRU block cache of
    :func:`block_size_for` blocks holding at most 32 MiB (8 blocks of 4 MiB for a large file, 32
    of 8 KiB for a small one): a worker keeps several files open (``pipelines.build`` caches 16),
    and HDF5 keeps its own metadata cache, so more blocks would mostly hold chunks read once."""
    fs, p = storage.filesystem(path, storage_options)
    if size is None:
        _, _, size, _ = object_info(path, storage_options)
    bs = block_size_for(size)
    maxblocks = max(8, min(32, (32 << 20) // bs))
    try:
        return fs.open(p, "rb", block_size=bs, cache_type="blockcache",
                       cache_options={"maxblocks": maxblocks})
    except Exception as exc:
        raise storage.explain(exc, path, storage_options) from None
