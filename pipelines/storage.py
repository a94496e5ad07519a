"""The preprocessing's side of the storage layer (``climax.storage``): its errors and its reads.

Resolution, credentials and atomic writes are :mod:`climax.storage`'s (re-exported here:
:func:`filesystem`, :func:`is_remote`, :func:`protocol`, :func:`storage_options_for`); this module
adds what a recipe's inputs need: errors that are ``SourceError`` s and say what to check
(:func:`explain`: endpoint, credentials, bucket), globbing (:func:`expand_paths`) and a one-off
temporary download (:func:`local_copy`). Remote inputs are read by byte ranges
(:mod:`pipelines.streaming`); what needs a local file goes to the node's bounded download cache
(:mod:`pipelines.node_cache`).
"""

from __future__ import annotations

import contextlib
import glob as _glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from climax.storage import GCS_PROTOCOLS, endpoint_of, is_remote, protocol, storage_options_for
from climax.storage import filesystem as resolve
from pipelines.sources.base import SourceError

__all__ = ["StorageError", "PathNotFoundError", "GCS_PROTOCOLS", "is_remote", "protocol", "storage_options_for",
           "filesystem", "explain", "expand_paths", "local_copy"]


class StorageError(SourceError):
    """A path, bucket or endpoint that cannot be reached; the message says what to check."""


class PathNotFoundError(StorageError, FileNotFoundError):
    """Nothing matches a path or pattern."""


def filesystem(path: str, storage_options: dict | None = None, *, asynchronous: bool = False):
    """(fsspec filesystem, path without protocol) for a local path or URL (``climax.storage.filesystem``;
    gs:// anonymous unless a token is given); a missing driver is a StorageError naming the package."""
    try:
        return resolve(path, storage_options, asynchronous=asynchronous)
    except ImportError as exc:
        raise StorageError(str(exc)) from None


def _bucket(stripped: str) -> str:
    return stripped.split("/", 1)[0]


def explain(exc: BaseException, path: str, storage_options: dict | None = None) -> StorageError:
    """A StorageError with a message that says what to check."""
    opts = storage_options_for(path, storage_options)
    ep = endpoint_of(opts, path)
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
            f"{endpoint_of(storage_options_for(pattern, storage_options), pattern)}; check the key/pattern"
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
