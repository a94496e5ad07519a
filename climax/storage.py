"""Where bytes live: the one storage layer of ``climax``, ``pipelines`` and ``jobs``.

Three things, for a local path or an object-store URL (``s3://``, ``gs://``, any fsspec protocol):

- **Resolution**: :func:`filesystem` gives (fsspec filesystem, path without protocol);
  :func:`arrow_filesystem` a pyarrow one (shard reading), :func:`arrow_s3` pyarrow's S3 for Ray's
  ``storage_path``.
- **Credentials**: from ``storage_options`` and the environment, never logged (what is written or
  printed goes through :mod:`climax.redact`). For S3 the options follow s3fs (``key``, ``secret``,
  ``token``, ``client_kwargs: {endpoint_url}``); ``AWS_ENDPOINT_URL`` is honoured when no endpoint
  is given (:func:`storage_options_for`). For ``gs://`` they follow gcsfs: reads are anonymous by
  default (``token: anon``, for public buckets such as WeatherBench 2's) unless a ``token`` is set
  (``google_default``, a service-account JSON path); writers resolve with ``anonymous_gcs=False``
  so gcsfs finds the default credentials; ``endpoint_url`` (or ``client_kwargs.endpoint_url``, as
  for S3) names another server.
- **Atomic writes**: a local file is written under a temporary name in its own folder
  (``.<name>.[<tag>.]<random>.tmp``), optionally fsynced, and renamed over the target
  (``os.replace``: readers see the old file or the new one, never half of one): :func:`atomic_path`
  (a context manager yielding the temporary path), :func:`write_bytes`; :func:`replace_dir` swaps
  a folder in. On an object store one PUT is atomic: :func:`write_atomic` (either kind),
  :func:`upload_folder` (a folder, files that say "complete" last), :func:`staged_output`.

The preprocessing's error messages for unreachable buckets and missing objects are in
``pipelines.storage`` (they are ``SourceError`` s there). Standard library at import time;
fsspec/s3fs/gcsfs/pyarrow when called (no torch, no Ray, no ``pipelines``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["GCS_PROTOCOLS", "is_remote", "protocol", "local_path", "storage_options_for", "endpoint_of",
           "filesystem", "arrow_s3_kwargs", "arrow_s3", "arrow_filesystem", "atomic_path", "write_bytes",
           "write_atomic", "replace_dir", "upload_folder", "staged_output", "LAST"]

GCS_PROTOCOLS = ("gs", "gcs")

#: written last by upload_folder: the files whose presence says an output is complete
LAST = ("metrics.json", "summary.json")


# ----------------------------------------------------------------------------- names
def is_remote(path: str | os.PathLike) -> bool:
    p = str(path)
    return "://" in p and not p.startswith("file://")


def protocol(path: str | os.PathLike) -> str:
    return str(path).split("://", 1)[0] if is_remote(path) else "file"


def local_path(path: str | os.PathLike) -> str:
    """A local path without its ``file://`` prefix."""
    return str(path).removeprefix("file://")


# ----------------------------------------------------------------------------- credentials, endpoints
def storage_options_for(path: str, storage_options: dict | None = None, *, anonymous_gcs: bool = True) -> dict:
    """storage_options with ``AWS_ENDPOINT_URL`` filled in for s3 when no endpoint is set; for gs,
    ``client_kwargs.endpoint_url`` accepted and anonymous access unless a token is given (with
    ``anonymous_gcs``)."""
    opts: dict[str, Any] = dict(storage_options or {})
    if protocol(path) in GCS_PROTOCOLS:
        ck = dict(opts.pop("client_kwargs", None) or {})
        if "endpoint_url" in ck and "endpoint_url" not in opts:
            opts["endpoint_url"] = ck.pop("endpoint_url")
        if anonymous_gcs:
            opts.setdefault("token", "anon")
        return opts
    if protocol(path) in ("s3", "s3a"):
        ck = dict(opts.get("client_kwargs") or {})
        env = os.environ.get("AWS_ENDPOINT_URL")
        if env and "endpoint_url" not in ck and "endpoint_url" not in opts:
            ck["endpoint_url"] = env
        if ck:
            opts["client_kwargs"] = ck
    return opts


def endpoint_of(opts: dict, path: str = "") -> str:
    """The endpoint ``opts`` (as :func:`storage_options_for` returns them) reach, for messages."""
    if protocol(path) in GCS_PROTOCOLS:
        return (opts.get("endpoint_url") or os.environ.get("STORAGE_EMULATOR_HOST")
                or "the default GCS endpoint")
    return (opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint")


# ----------------------------------------------------------------------------- resolution
def filesystem(path: str | os.PathLike, storage_options: dict | None = None, *, asynchronous: bool = False,
               anonymous_gcs: bool = True):
    """(fsspec filesystem, path without protocol) for a local path or URL; an ImportError naming
    the package to install when the protocol's driver is missing.

    ``asynchronous``: an async instance (for zarr's ``FsspecStore``; remote paths only).
    ``anonymous_gcs``: ``gs://`` without a token reads anonymously (False: gcsfs's default credentials).
    """
    import fsspec

    path = str(path)
    if not is_remote(path):
        return fsspec.filesystem("file"), os.path.abspath(local_path(path))
    opts = storage_options_for(path, storage_options, anonymous_gcs=anonymous_gcs)
    if asynchronous:
        opts["asynchronous"] = True
    try:
        if protocol(path) in GCS_PROTOCOLS:
            # gcsfs.core's class, not the package's default: since 2026.x `gcsfs.GCSFileSystem` is an
            # "experimental" subclass that asks the gRPC Storage Control API for each bucket's
            # layout, which anonymous access and emulators cannot answer (retried, then ignored
            # on every call). Plain JSON-API access is what public WeatherBench 2 buckets need.
            from gcsfs.core import GCSFileSystem

            return GCSFileSystem(**opts), GCSFileSystem._strip_protocol(path)
        return fsspec.core.url_to_fs(path, **opts)
    except ImportError as exc:
        need = "gcsfs" if protocol(path) in GCS_PROTOCOLS else "s3fs"
        raise ImportError(f"{path}: no filesystem for {protocol(path)}:// ({exc}); install {need}") from None


def _split_endpoint(url: str) -> tuple[str, str]:
    """'http://host:port' -> ('host:port', 'http')."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return rest.rstrip("/"), scheme
    return url.rstrip("/"), "https"


_S3_KEYS = {"key", "secret", "token", "anon", "endpoint_url", "client_kwargs", "region", "use_ssl"}


def arrow_s3_kwargs(storage_options: dict | None, *, strict: bool = True) -> dict[str, Any] | None:
    """Keyword arguments of ``pyarrow.fs.S3FileSystem`` for s3fs-style storage_options (endpoint,
    ``AWS_ENDPOINT_URL``, key/secret/token, anon, region); when an option has no mapping, None
    (``strict``) or that option left out."""
    opts = dict(storage_options or {})
    ck = dict(opts.get("client_kwargs") or {})
    if strict and (set(opts) - _S3_KEYS or set(ck) - {"endpoint_url", "region_name"}):
        return None
    kw: dict[str, Any] = {}
    endpoint = opts.get("endpoint_url") or ck.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        kw["endpoint_override"], kw["scheme"] = _split_endpoint(endpoint)
    if opts.get("anon"):
        kw["anonymous"] = True
    else:
        if opts.get("key") is not None:
            kw["access_key"], kw["secret_key"] = opts.get("key"), opts.get("secret")
        if opts.get("token") is not None:
            kw["session_token"] = opts["token"]
    region = opts.get("region") or ck.get("region_name")
    if region:
        kw["region"] = region
    elif endpoint:
        kw["region"] = "us-east-1"  # a custom endpoint: no region lookup
    return kw


def arrow_s3(storage_options: dict | None, filesystem_class=None, *, strict: bool = True):
    """A ``pyarrow.fs.S3FileSystem`` (or ``filesystem_class``, a subclass) for s3fs-style options;
    None when an option has no pyarrow mapping (``strict``; else that option is left out)."""
    kw = arrow_s3_kwargs(storage_options, strict=strict)
    if kw is None:
        return None
    if filesystem_class is None:
        import pyarrow.fs as pafs

        filesystem_class = pafs.S3FileSystem
    return filesystem_class(**kw)


def arrow_filesystem(root: str, storage_options: dict | None = None):
    """(pyarrow filesystem, base path) for a local folder or URL: pyarrow's native S3 where the
    options allow, fsspec (through ``PyFileSystem``) for any other protocol or option."""
    import pyarrow.fs as pafs

    if not is_remote(root):
        return pafs.LocalFileSystem(), os.path.abspath(local_path(root))
    if protocol(root) in ("s3", "s3a"):
        fs = arrow_s3(storage_options)
        if fs is not None:
            return fs, root.split("://", 1)[1].rstrip("/")
    fs, base = filesystem(root, storage_options, anonymous_gcs=False)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), base.rstrip("/")


# ----------------------------------------------------------------------------- atomic writes
def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, tag: str = "", durable: bool = False) -> Iterator[Path]:
    """A temporary path beside local ``path`` (``.<name>.[<tag>.]<random>.tmp``) to write a file or
    a folder into; renamed over ``path`` when the block ends without error (a file fsynced first
    with ``durable``; a folder through :func:`replace_dir`), removed otherwise. The parent folder
    is created."""
    target = Path(local_path(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{tag + '.' if tag else ''}{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if tmp.is_dir():
            replace_dir(tmp, target)
        else:
            if durable:
                _fsync(tmp)
            os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes | memoryview | str, *, tag: str = "",
                durable: bool = False) -> str:
    """Write ``data`` (text is UTF-8 encoded) to local ``path`` atomically (:func:`atomic_path`)."""
    if isinstance(data, str):
        data = data.encode()
    with atomic_path(path, tag=tag, durable=durable) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return str(Path(local_path(path)))


def write_atomic(path: str | os.PathLike, data: bytes | str, storage_options: dict | None = None) -> str:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically; returns the path. Local: a
    temporary name, fsync, rename; an object-store URL: one PUT, which is atomic there."""
    if isinstance(data, str):
        data = data.encode()
    path = str(path)
    if is_remote(path):
        fs, remote = filesystem(path, storage_options, anonymous_gcs=False)
        fs.pipe_file(remote, bytes(data))
        return path
    return write_bytes(path, data, durable=True)


def replace_dir(src: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move local folder ``src`` to ``target``: an existing ``target`` is moved aside first (a folder
    cannot be replaced in one rename), restored if the move fails, and deleted after it."""
    target = Path(local_path(target))
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
    try:
        if target.exists():
            os.replace(target, old)
        os.replace(src, target)
    except BaseException:
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- remote folders
def upload_folder(local: str | os.PathLike, url: str, storage_options: dict | None = None,
                  last: tuple[str, ...] = LAST) -> list[str]:
    """Upload every file under ``local`` to ``url`` (one PUT each; files named in ``last`` at the end)."""
    fs, remote = filesystem(url, storage_options, anonymous_gcs=False)
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
        out = Path(local_path(output)).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    # refuse now, not after the work: an unknown protocol, a missing driver, a bucket that is not there
    fs, remote = filesystem(output, storage_options, anonymous_gcs=False)
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
