"""One build at a time per output: a lease (issue 16).

A build owns its output through ``<output>/.build-lease.json``, an owner record (host, pid, a
unique token, when it started, when it expires) created exclusively and refreshed while the build
runs; the build removes it at its end, on error too. A second build into the same output refuses
with one line naming the owner. A stale lease (its owner's pid is dead on this host, or it was not
refreshed before it expired) is taken over; the tokens of the owners taken over are kept in the
record (``dead``), so the new owner may remove their temporary files (``pipelines.build``:
temporary names carry the writer's token, and ``_remove_stale`` removes only those of the current
or dead owners, never a live writer's).

Exclusive creation:

* local folders: ``O_CREAT | O_EXCL``; the check-and-take-over of a stale lease runs under an
  ``flock`` of the output folder, so two builds on one host never both take over;
* S3: a conditional PUT (``If-None-Match: *``; s3fs ``mode="create"``), take-over and refresh with
  ``If-Match: <ETag>`` of the record read, so of two builds racing for a stale lease one wins;
* other object stores (no conditional PUT through fsspec): write, then read back and keep the
  lease only when the record read is ours (a narrow race remains; docs/design.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime

from climax.storage import write_bytes
from pipelines import storage
from pipelines.sources import SourceError

log = logging.getLogger("pipelines.lease")

__all__ = ["LEASE", "Lease", "LeaseError", "acquire", "TTL_S"]

LEASE = ".build-lease.json"
#: How long a lease lasts without a refresh; the owner refreshes it every TTL_S / 5.
TTL_S = 300.0


class LeaseError(SourceError):
    """Another build owns the output (or took it over from this one)."""


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def is_stale(record: dict, now: float | None = None) -> bool:
    """Expired, or its owner's process is gone (known only on the owner's host)."""
    now = time.time() if now is None else now
    if float(record.get("expires", 0)) < now:
        return True
    return record.get("host") == socket.gethostname() and not _pid_alive(int(record.get("pid", -1)))


def describe(record: dict) -> str:
    return (f"host {record.get('host')}, pid {record.get('pid')}, since {_iso(float(record.get('created', 0)))}, "
            f"lease valid until {_iso(float(record.get('expires', 0)))}")


class Lease:
    """The lease this process holds on ``output`` (see ``acquire``)."""

    def __init__(self, output: str, storage_options: dict | None, ttl: float = TTL_S):
        self.output = output.rstrip("/")
        self.storage_options = storage_options
        self.ttl = float(ttl)
        self.path = f"{self.output}/{LEASE}"
        self.fs, self._p = storage.filesystem(self.path, storage_options)
        self.remote = storage.is_remote(self.path)
        self.token = uuid.uuid4().hex
        self.dead: list[str] = []  # tokens of the owners taken over
        self.lost: str | None = None  # set when another build took the lease over
        self._etag: str | None = None
        self._created_dir = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.created = time.time()

    # -- the record
    def record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token, "created": self.created,
                "expires": time.time() + self.ttl, "dead": self.dead}

    def _refusal(self, other: dict) -> LeaseError:
        return LeaseError(f"{self.output} is being built by another build ({describe(other)}); wait for it to "
                          f"finish, or, if that build is gone, delete {self.path}")

    def _read(self) -> tuple[dict | None, str | None]:
        """(record, ETag) of the lease file, (None, None) when there is none; {} when unreadable."""
        try:
            if self.remote:
                self.fs.invalidate_cache(self._p)
                info = self.fs.info(self._p)
                blob = self.fs.cat_file(self._p)
                etag = info.get("ETag") or info.get("etag")
            else:
                with open(self._p, "rb") as f:
                    blob, etag = f.read(), None
        except FileNotFoundError:
            return None, None
        try:
            rec = json.loads(blob)
            return (rec if isinstance(rec, dict) else {}), etag
        except ValueError:
            return {}, etag

    # -- local
    @contextlib.contextmanager
    def _folder_lock(self):
        import fcntl

        fd = os.open(os.path.dirname(self._p), os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # e.g. NFS, where flock needs a file open for writing: O_EXCL alone
                pass
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write_local(self, *, exclusive: bool) -> None:
        data = json.dumps(self.record()).encode()
        if exclusive:
            fd = os.open(self._p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return
        write_bytes(self._p, data, tag=self.token)

    def _acquire_local(self) -> None:
        folder = os.path.dirname(self._p)
        if not os.path.isdir(folder):
            os.makedirs(folder, exist_ok=True)
            self._created_dir = True
        with self._folder_lock():
            try:
                self._write_local(exclusive=True)
                return
            except FileExistsError:
                pass
            other, _ = self._read()
            if other is None:  # released meanwhile
                self._write_local(exclusive=True)
                return
            if other and not is_stale(other):
                raise self._refusal(other)
            if not other and time.time() - os.path.getmtime(self._p) < 30:  # being written (another host)
                raise self._refusal({"host": "?", "pid": "?"})
            self._take_over(other)
            os.unlink(self._p)
            self._write_local(exclusive=True)

    # -- object storage
    def _put(self, **cond) -> str | None:
        out = self.fs.pipe_file(self._p, json.dumps(self.record()).encode(), **cond)
        return out.get("ETag") if isinstance(out, dict) else None

    def _acquire_remote(self) -> None:
        s3 = storage.protocol(self.path) in ("s3", "s3a")
        try:
            if s3:
                try:
                    self._etag = self._put(mode="create")  # If-None-Match: *
                except FileExistsError:
                    other, etag = self._read()
                    if other is not None and other and not is_stale(other):
                        raise self._refusal(other) from None
                    self._take_over(other or {})
                    try:
                        self._etag = self._put(IfMatch=etag) if other is not None else self._put(mode="create")
                    except OSError:  # another build took it over first
                        other, _ = self._read()
                        raise self._refusal(other or {}) from None
            else:
                other, _ = self._read()
                if other and not is_stale(other):
                    raise self._refusal(other)
                if other is not None:
                    self._take_over(other)
                self._put()
        except LeaseError:
            raise
        except Exception as exc:  # a missing bucket, no credentials: say so
            raise storage.explain(exc, self.path, self.storage_options) from None
        mine, etag = self._read()  # read back: a store that ignored the condition, or a racing writer
        if not mine or mine.get("token") != self.token:
            raise self._refusal(mine or {})
        self._etag = etag or self._etag

    def _take_over(self, other: dict) -> None:
        if other.get("token"):
            self.dead = [t for t in [*other.get("dead", []), other["token"]] if t != self.token][-64:]
        log.warning("taking over the stale build lease of %s (%s)", self.output,
                    describe(other) if other else "unreadable record")

    # -- life cycle
    def acquire(self) -> Lease:
        if self.remote:
            self._acquire_remote()
        else:
            try:
                self._acquire_local()
            except LeaseError:
                raise
            except OSError as exc:  # read-only, full, or not a folder
                raise LeaseError(f"{self.output}: cannot write the build lease {self.path} ({exc.strerror or exc}); "
                                 "check that the output is a writable folder with free space") from None
        self._thread = threading.Thread(target=self._refresh_loop, name="build-lease", daemon=True)
        self._thread.start()
        return self

    def refresh(self) -> None:
        """Extend the lease; note (``lost``) when another build took it over."""
        if self.lost:
            return
        try:
            if self.remote:
                cur, etag = self._read()
                if not cur or cur.get("token") != self.token:
                    self.lost = describe(cur or {})
                    return
                self._etag = self._put(IfMatch=etag) if storage.protocol(self.path) in ("s3", "s3a") else self._put()
            else:
                with self._folder_lock():
                    cur, _ = self._read()
                    if not cur or cur.get("token") != self.token:
                        self.lost = describe(cur or {})
                        return
                    self._write_local(exclusive=False)
        except Exception as exc:  # noqa: BLE001 - a missed refresh is retried; expiry is TTL_S away
            log.warning("could not refresh the build lease %s: %s", self.path, exc)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.ttl / 5):
            self.refresh()

    def check(self) -> None:
        """Raise when another build took this lease over (before publishing anything)."""
        if self.lost:
            raise LeaseError(f"{self.output}: the build lease was taken over by another build ({self.lost}) while "
                             "this one ran (it was not refreshed in time); this build stops without publishing; "
                             "re-run it when the other build has finished")

    def release(self) -> None:
        """Stop refreshing and remove the lease file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            if self.remote:
                cur, _ = self._read()
                if cur and cur.get("token") == self.token:
                    self.fs.rm(self._p)
            else:
                with self._folder_lock():
                    cur, _ = self._read()
                    if cur and cur.get("token") == self.token:
                        os.unlink(self._p)
                if self._created_dir:
                    with contextlib.suppress(OSError):
                        os.rmdir(os.path.dirname(self._p))  # only when the build wrote nothing else
        except Exception as exc:  # noqa: BLE001 - never mask the build's own error
            log.warning("could not remove the build lease %s: %s", self.path, exc)

    def owns_temporary(self, token: str | None) -> bool:
        """Whether a temporary file written under ``token`` is this build's or a dead owner's."""
        return token is None or token == self.token or token in self.dead


def acquire(output: str, storage_options: dict | None = None, ttl: float = TTL_S) -> Lease:
    """Take the lease on ``output`` or raise LeaseError naming its owner."""
    return Lease(output, storage_options, ttl).acquire()
