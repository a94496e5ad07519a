"""Outputs that appear whole or not at all: the one atomic-write helper of the jobs' reports.

- :func:`write_atomic`: a local file is written under a temporary name in its own folder, flushed
  and renamed over the target (``os.replace``: readers see the old file or the new one, never half
  of one); an object-store URL (``s3://``, ``gs://``, ...) is one PUT through fsspec, which is
  atomic there.
- :func:`staged_output`: an output *folder* that may be local or remote. Jobs write into the local
  folder it yields; for a remote target the files are uploaded when the block ends without error
  (``metrics.json``/``summary.json`` last, so their presence means the rest is there).

Standard library and fsspec only (no torch, no Ray).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["is_remote", "write_atomic", "staged_output", "upload_folder"]

#: written last by upload_folder: the files whose presence says an output is complete
LAST = ("metrics.json", "summary.json")


def is_remote(path: str | os.PathLike) -> bool:
    p = str(path)
    return "://" in p and not p.startswith("file://")


def write_atomic(path: str | os.PathLike, data: bytes | str, storage_options: dict | None = None) -> str:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically; returns the path."""
    if isinstance(data, str):
        data = data.encode()
    path = str(path)
    if is_remote(path):
        import fsspec

        fs, remote = fsspec.core.url_to_fs(path, **(storage_options or {}))
        fs.pipe_file(remote, bytes(data))
        return path
    target = Path(path.removeprefix("file://"))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return str(target)


def upload_folder(local: str | os.PathLike, url: str, storage_options: dict | None = None,
                  last: tuple[str, ...] = LAST) -> list[str]:
    """Upload every file under ``local`` to ``url`` (one PUT each; files named in ``last`` at the end)."""
    import fsspec

    fs, remote = fsspec.core.url_to_fs(url, **(storage_options or {}))
    local = Path(local)
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: (p.name in last, str(p)))
    done = []
    for p in files:
        dest = f"{remote.rstrip('/')}/{p.relative_to(local).as_posix()}"
        fs.put_file(str(p), dest)
        done.append(dest)
    return done


@contextlib.contextmanager
def staged_output(output: str | os.PathLike, storage_options: dict | None = None) -> Iterator[Path]:
    """A local folder to write an output folder into: ``output`` itself when local; for a remote
    ``output`` a temporary folder, uploaded on success and removed either way. The remote
    filesystem is resolved first, so an unknown protocol or missing driver fails before any work."""
    if not is_remote(output):
        out = Path(str(output).removeprefix("file://")).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    import fsspec

    # refuse now, not after the work: an unknown protocol, a missing driver, a bucket that is not there
    fs, remote = fsspec.core.url_to_fs(str(output), **(storage_options or {}))
    bucket = remote.split("/", 1)[0]
    try:
        found = fs.exists(bucket)
    except Exception as exc:  # noqa: BLE001 - endpoint or credentials: say which output
        raise OSError(f"output {output}: cannot reach bucket {bucket!r} ({type(exc).__name__}: {exc}); check "
                      "storage_options (endpoint_url, credentials)") from None
    if not found:
        raise FileNotFoundError(f"output {output}: bucket {bucket!r} does not exist; create it or choose another "
                                "output")
    tmp = Path(tempfile.mkdtemp(prefix="climax-out-"))
    try:
        yield tmp
        upload_folder(tmp, str(output), storage_options)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
