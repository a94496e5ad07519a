"""Local paths or object storage (``s3://``, ``gs://``) through fsspec / s3fs / gcsfs.

``storage_options`` follow s3fs, e.g. ``{"key": ..., "secret": ...,
"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}``; the ``AWS_ENDPOINT_URL``
environment variable is honoured when no endpoint is given. For ``gs://`` they follow gcsfs:
anonymous by default (``token: anon``, for public buckets such as WeatherBench 2's); set
``token`` (``google_default``, a service-account JSON path, ...) for private buckets, and
``endpoint_url`` (or ``client_kwargs.endpoint_url``, as for S3) for another server. Remote inputs
are read by byte ranges (:mod:`pipelines.streaming`); what needs a local file goes to the node's
bounded download cache (:mod:`pipelines.node_cache`); :func:`local_copy` is a one-off temporary
download.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.sources.base import SourceError


class StorageError(SourceError):
    """A path, bucket or endpoint that cannot be reached; the message says what to check."""


class PathNotFoundError(StorageError, FileNotFoundError):
    """Nothing matches a path or pattern."""


def is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def protocol(path: str) -> str:
    return str(path).split("://", 1)[0] if is_remote(path) else "file"


GCS_PROTOCOLS = ("gs", "gcs")


def storage_options_for(path: str, storage_options: dict | None = None) -> dict:
    """storage_options with ``AWS_ENDPOINT_URL`` filled in for s3 when no endpoint is set; for gs,
    anonymous access unless a token is given, and ``client_kwargs.endpoint_url`` accepted."""
    opts: dict[str, Any] = dict(storage_options or {})
    if protocol(path) in GCS_PROTOCOLS:
        ck = dict(opts.pop("client_kwargs", None) or {})
        if "endpoint_url" in ck and "endpoint_url" not in opts:
            opts["endpoint_url"] = ck.pop("endpoint_url")
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


def _endpoint(opts: dict, path: str = "") -> str:
    if protocol(path) in GCS_PROTOCOLS:
        return (opts.get("endpoint_url") or os.environ.get("STORAGE_EMULATOR_HOST")
                or "the default GCS endpoint")
    return (opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint")


def filesystem(path: str, storage_options: dict | None = None, *, asynchronous: bool = False):
    """(fsspec filesystem, path without protocol) for a local path or URL.

    ``asynchronous``: an async instance (for zarr's ``FsspecStore``; remote paths only).
    """
    import fsspec

    if not is_remote(path):
        p = str(path)[len("file://"):] if str(path).startswith("file://") else str(path)
        return fsspec.filesystem("file"), os.path.abspath(p)
    opts = storage_options_for(path, storage_options)
    if asynchronous:
        opts["asynchronous"] = True
    try:
        if protocol(path) in GCS_PROTOCOLS:
            # gcsfs.core's class, not the package's default: since 2026.x `gcsfs.GCSFileSystem` is an
            # "experimental" subclass that asks the gRPC Storage Control API for each bucket's
            # layout, which anonymous access and emulators cannot answer (retried, then ignored
            # on every call). Plain JSON-API access is what public WeatherBench 2 buckets need.
            from gcsfs.core import GCSFileSystem

            return GCSFileSystem(**opts), GCSFileSystem._strip_protocol(str(path))
        fs, p = fsspec.core.url_to_fs(str(path), **opts)
    except ImportError as exc:
        need = "gcsfs" if protocol(path) in GCS_PROTOCOLS else "s3fs"
        raise StorageError(f"{path}: no filesystem for {protocol(path)}:// ({exc}); install {need}") from None
    return fs, p


def _bucket(stripped: str) -> str:
    return stripped.split("/", 1)[0]


def explain(exc: BaseException, path: str, storage_options: dict | None = None) -> StorageError:
    """A StorageError with a message that says what to check."""
    opts = storage_options_for(path, storage_options)
    ep = _endpoint(opts, path)
    name = type(exc).__name__
    bucket = _bucket(str(path).split("://", 1)[-1])
    if protocol(path) in GCS_PROTOCOLS:
        return _explain_gcs(exc, path, ep, bucket, opts)
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return StorageError(
            f"{path}: no credentials for {protocol(path)}:// at endpoint {ep}; set "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or storage_options key/secret"
        )
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionError",
                "ClientConnectorError") or "Could not connect" in str(exc):
        return StorageError(
            f"{path}: endpoint {ep} is not reachable ({exc}); check storage_options "
            "client_kwargs.endpoint_url / AWS_ENDPOINT_URL and the network"
        )
    if isinstance(exc, PermissionError):
        return StorageError(
            f"{path}: access denied at endpoint {ep} ({exc}); check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY (or storage_options key/secret) and the bucket policy"
        )
    if isinstance(exc, FileNotFoundError) and "bucket" in str(exc).lower():
        return PathNotFoundError(
            f"bucket {bucket} does not exist or is not reachable at endpoint {ep}; check the "
            "bucket name, storage_options client_kwargs.endpoint_url / AWS_ENDPOINT_URL and "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(exc, FileNotFoundError):
        return PathNotFoundError(f"{path}: not found ({exc})")
    return StorageError(f"{path}: {name}: {exc} (endpoint {ep})")


def _explain_gcs(exc: BaseException, path: str, ep: str, bucket: str, opts: dict) -> StorageError:
    """explain() for gs://: gcsfs raises FileNotFoundError, PermissionError (401/403), HttpError,
    aiohttp connection errors. Credentials are never echoed, only which kind was used."""
    how = "anonymously" if opts.get("token") == "anon" else "with the configured token"
    name = type(exc).__name__
    code = getattr(exc, "code", None)
    if name in ("ClientConnectorError", "ServerDisconnectedError", "ConnectionError",
                "ClientConnectionError") or "Cannot connect" in str(exc):
        return StorageError(f"{path}: endpoint {ep} is not reachable ({name}); check storage_options "
                            "endpoint_url / STORAGE_EMULATOR_HOST and the network")
    if isinstance(exc, PermissionError) or code in (401, 403):
        return StorageError(
            f"{path}: access denied at {ep} (read {how}); for a private bucket set storage_options "
            "token (google_default, or a service-account JSON path), e.g. "
            "`storage_options: {token: google_default}`")
    if isinstance(exc, FileNotFoundError):
        if "bucket" in str(exc).lower():
            return PathNotFoundError(f"bucket {bucket} does not exist or is not reachable at {ep}; "
                                     "check the bucket name and storage_options endpoint_url")
        return PathNotFoundError(f"{path}: not found at {ep}; check the path")
    return StorageError(f"{path}: {name}: {exc} (endpoint {ep}, read {how})")


def _check_bucket(fs, path: str, stripped: str, storage_options) -> None:
    try:
        fs.ls(_bucket(stripped), refresh=True)
    except Exception as exc:
        if isinstance(exc, FileNotFoundError):
            exc = FileNotFoundError(f"bucket {_bucket(stripped)} does not exist")
        raise explain(exc, path, storage_options) from None


def expand_paths(pattern: str, storage_options: dict | None = None) -> list[str]:
    """Sorted paths matching a local or remote glob (``**`` recursive); a plain path that exists
    (file or directory) gives itself. Nothing matching raises PathNotFoundError naming it.
    """
    pattern = str(pattern)
    if not is_remote(pattern):
        p = pattern[len("file://"):] if pattern.startswith("file://") else pattern
        p = os.path.expanduser(p)
        if _glob.has_magic(p):
            matches = sorted(_glob.glob(p, recursive=True))
        else:
            matches = [p] if os.path.exists(p) else []
        if not matches:
            raise PathNotFoundError(
                f"no file matches {pattern!r} (looked in {os.path.abspath(os.path.dirname(p) or '.')}); "
                "check the path in the recipe"
            )
        return matches
    fs, stripped = filesystem(pattern, storage_options)
    proto = protocol(pattern)
    try:
        if _glob.has_magic(stripped):
            matches = fs.glob(stripped)
        else:
            matches = [stripped] if fs.exists(stripped) else []
    except Exception as exc:
        raise explain(exc, pattern, storage_options) from None
    if not matches:
        _check_bucket(fs, pattern, stripped, storage_options)
        raise PathNotFoundError(
            f"no object matches {pattern!r} at endpoint "
            f"{_endpoint(storage_options_for(pattern, storage_options), pattern)}; check the key/pattern"
        )
    return sorted(f"{proto}://{m}" for m in matches)


def _download(path: str, dest: str, storage_options) -> None:
    fs, stripped = filesystem(path, storage_options)
    try:
        fs.get(stripped, dest)
    except Exception as exc:
        if isinstance(exc, FileNotFoundError):
            _check_bucket(fs, path, stripped, storage_options)
        raise explain(exc, path, storage_options) from None


@contextlib.contextmanager
def local_copy(path: str, storage_options: dict | None = None) -> Iterator[str]:
    """A local path for ``path``: itself when local, else a temporary download (same file name,
    so the extension still tells the format), removed on exit.
    """
    if not is_remote(path):
        p = str(path)[len("file://"):] if str(path).startswith("file://") else str(path)
        if not os.path.exists(p):
            raise PathNotFoundError(f"{path}: no such file or directory")
        yield p
        return
    tmp = tempfile.mkdtemp(prefix="climax-src-")
    try:
        dest = os.path.join(tmp, Path(str(path).split("://", 1)[1]).name or "object")
        _download(path, dest, storage_options)
        yield dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
