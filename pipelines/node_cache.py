"""One bounded cache of local copies of remote objects per node, for the readers that need a file.

GRIB and NetCDF 4 are read from object storage by byte ranges (:mod:`pipelines.streaming`); what
cannot be (NetCDF 3, which h5netcdf does not read, and ClimateBench pairs) is copied here:

* one folder per node, shared by the node's worker processes: ``$CLIMAX_FETCH_CACHE_DIR`` or
  ``<tempdir>/climax-fetch-cache``; an entry per object version (URL + ETag + size), downloaded
  once under an exclusive ``flock`` on the entry's lock file, to a temporary name then renamed;
* bounded: ``$CLIMAX_FETCH_CACHE_MB`` (default 8192) for all entries together; before a download
  the least recently used entries (by modification time, refreshed on every use) are deleted
  until the new one fits. An object larger than the limit is refused with a message naming the
  variable to raise;
* an entry is locked (shared) only while a reader opens it: deleting it afterwards is safe on
  POSIX, since readers keep the file open (its space is freed when they close it);
* :func:`clear` deletes every entry not being opened, and the folder when empty;
  :func:`cleanup_nodes` runs it on every node of the Ray cluster; ``pipelines.build`` calls it
  when a build starts (copies left by a killed run) and when it ends.

Hand-written (fsspec's ``filecache`` is per process and unbounded across processes).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from climax.storage import atomic_path
from pipelines import storage

log = logging.getLogger("pipelines.node_cache")

__all__ = ["cache_root", "limit_bytes", "local_copy", "clear", "cleanup_nodes", "entries"]

DEFAULT_MB = 8192
_LOCK_SUFFIX = ".lock"


def cache_root() -> str:
    return os.environ.get("CLIMAX_FETCH_CACHE_DIR") or os.path.join(tempfile.gettempdir(),
                                                                    "climax-fetch-cache")


def limit_bytes() -> int:
    raw = os.environ.get("CLIMAX_FETCH_CACHE_MB")
    try:
        mb = float(raw) if raw else DEFAULT_MB
    except ValueError:
        raise storage.StorageError(f"CLIMAX_FETCH_CACHE_MB={raw!r} is not a number of megabytes; "
                                   "set it to e.g. 8192") from None
    return int(mb * (1 << 20))


def entries(root: str | None = None) -> list[Path]:
    """The entry folders in the cache (each holds one downloaded object)."""
    r = Path(root or cache_root())
    if not r.is_dir():
        return []
    return sorted(p for p in r.iterdir() if p.is_dir())


def _size(entry: Path) -> int:
    return sum(f.stat().st_size for f in entry.iterdir() if f.is_file())


@contextlib.contextmanager
def _flock(path: str, mode: int) -> Iterator[int]:
    """An flock on ``path`` (created), re-taken if the lock file was replaced meanwhile (a
    cleaner deletes lock files of entries it removes)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _try_remove(entry: Path) -> bool:
    """Delete an entry unless a reader holds its lock; True when deleted."""
    lock = str(entry) + _LOCK_SUFFIX
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        shutil.rmtree(entry, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(lock)
        return not entry.exists()
    finally:
        os.close(fd)


def _make_room(root: Path, need: int, limit: int, keep: Path, url: str) -> None:
    if need > limit:
        raise storage.StorageError(
            f"{url}: {need / 2**20:.0f} MB does not fit the node's download cache "
            f"({limit / 2**20:.0f} MB); raise CLIMAX_FETCH_CACHE_MB on the workers (or convert the "
            "file to NetCDF 4 / GRIB, which are streamed without a local copy)")
    with _flock(str(root / ".evict.lock"), fcntl.LOCK_EX):
        others = [(e.stat().st_mtime, e) for e in entries(str(root)) if e != keep]
        used = sum(_size(e) for _, e in others)
        for _, e in sorted(others, key=lambda t: t[0]):
            if used + need <= limit:
                break
            sz = _size(e)
            if _try_remove(e):
                used -= sz
        if used + need > limit:
            log.warning("download cache %s holds %.0f MB in use; %s (%.0f MB) goes over its "
                        "%.0f MB limit", root, used / 2**20, url, need / 2**20, limit / 2**20)


@contextlib.contextmanager
def local_copy(url: str, storage_options: dict | None = None) -> Iterator[str]:
    """A local path of ``url`` in the node's cache, downloaded once per object version and node.
    The entry is locked against eviction while the ``with`` block runs: open the file inside it.
    """
    from pipelines import streaming

    fs, p, size, tag = streaming.object_info(url, storage_options)
    root = Path(cache_root())
    root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(f"{url}|{tag}|{size}".encode()).hexdigest()[:20]
    entry = root / key
    name = Path(p).name or "object"
    dest = entry / name
    lock = str(entry) + _LOCK_SUFFIX
    with _flock(lock, fcntl.LOCK_SH) as fd:  # shared: a reader (of this process too) may hold it
        if dest.exists():
            _touch(entry)
            yield str(dest)
            return
    with _flock(lock, fcntl.LOCK_EX) as fd:  # not there: one process downloads it
        if not dest.exists():
            _make_room(root, size, limit_bytes(), entry, url)
            entry.mkdir(parents=True, exist_ok=True)
            with atomic_path(dest) as part:
                try:
                    fs.get(p, str(part))
                except Exception as exc:
                    shutil.rmtree(entry, ignore_errors=True)
                    raise storage.explain(exc, url, storage_options) from None
        _touch(entry)
        fcntl.flock(fd, fcntl.LOCK_SH)  # readers share; eviction needs it exclusive
        yield str(dest)


def _touch(entry: Path) -> None:
    now = time.time()
    os.utime(entry, (now, now))  # least recently used = oldest mtime


def clear(root: str | None = None) -> dict:
    """Delete every entry that no reader is opening; the folder too when nothing is left.
    Returns what was removed and kept (for logs and tests)."""
    r = Path(root or cache_root())
    removed = kept = 0
    for e in entries(str(r)):
        if _try_remove(e):
            removed += 1
        else:
            kept += 1
    if r.is_dir():
        for f in r.iterdir():  # lock files of entries gone, a crashed download's leftovers
            if f.is_file() and f.name.endswith(_LOCK_SUFFIX) and not Path(str(f)[:-len(_LOCK_SUFFIX)]).exists():
                with contextlib.suppress(OSError):
                    f.unlink()
        with contextlib.suppress(OSError):
            r.rmdir()  # only when empty
    return {"host": os.uname().nodename, "removed": removed, "kept": kept}


def cleanup_nodes(timeout_s: float = 120.0) -> list[dict]:
    """Run :func:`clear` on every alive node of the connected Ray cluster (one zero-CPU task per
    node, pinned with NodeAffinitySchedulingStrategy), and here. Without Ray, here only."""
    out = [clear()]
    try:
        import ray
    except ImportError:
        return out
    if not ray.is_initialized():
        return out
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(clear)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in ray.nodes() if n.get("Alive")]
    try:
        out += ray.get(refs, timeout=timeout_s)
    except Exception as exc:  # a node going away must not fail the build: its disk goes with it
        log.warning("download cache cleanup did not finish on every node: %s", exc)
    return out
