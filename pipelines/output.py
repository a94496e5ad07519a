"""Writing the build's files: atomic writes owned by a build's lease, and Parquet bytes.

Shared by the shard tasks (``pipelines.shard_task``) and the driver's publishing step
(``pipelines.publish``): one rule for temporary names, so that a build removes only its own
temporaries and those of dead owners (``tmp_owner``).
"""

from __future__ import annotations

import errno
import re

import pyarrow as pa
import pyarrow.parquet as pq

from climax import shards as S
from climax.storage import write_bytes
from pipelines import storage

__all__ = ["write_atomic", "table_bytes", "join", "tmp_owner"]

#: the disk, a quota or a file-size limit: the write says which file and what to do
FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

#: ``.<name>.<owner token>.<random>.tmp`` (write_atomic); older code wrote ``.<name>.<random>.tmp``
TMP = re.compile(r"^\..+?(?:\.([0-9a-f]{32}))?\.[0-9a-f]{8}\.tmp$")


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for a local folder or an object-store prefix."""
    return "/".join([root.rstrip("/"), *parts])


def tmp_owner(name: str) -> str | None:
    """The lease token in a temporary file's name (None for older code's temporaries)."""
    m = TMP.match(name)
    return m.group(1) if m else None


def write_atomic(path: str, data: bytes | memoryview, storage_options: dict | None, *, durable: bool = False,
                 owner: str | None = None) -> None:
    """Local: temporary name in the same folder, then rename. Object storage: one PUT, which is
    atomic (the object appears whole or not at all).

    ``owner``: the build's lease token, part of the temporary name (``.<name>.<token>.<random>.tmp``)
    so that a build removes only its own and dead owners' temporaries (``publish.remove_stale``).

    ``durable`` also fsyncs before the rename (the manifest). Shards skip it: a crash never leaves
    a half-written shard under its name either way, a re-run checks every footer, and forcing
    3.5 GB of writes through fsync cost the 2-core build a quarter of its speed (RESULTS.md)."""
    fs, p = storage.filesystem(path, storage_options)
    if storage.is_remote(path):
        try:
            fs.pipe_file(p, bytes(data))
        except Exception as exc:  # e.g. a missing bucket: name it, the endpoint and what to check
            raise storage.explain(exc, path, storage_options) from None
        return
    try:
        write_bytes(p, data, tag=owner or "", durable=durable)
    except OSError as exc:
        if exc.errno in FULL:  # the disk, a quota or a file-size limit: say which file and what to do
            raise OSError(exc.errno, f"no space left writing {p} ({exc.strerror}, {len(data)} bytes); free "
                                     "space there or set output to a folder with room (a re-run resumes: "
                                     "finished shards are kept)") from None
        raise


def table_bytes(table: pa.Table, variables: list[str], compression_level: int) -> memoryview:
    """The Parquet file as one buffer (hashed and written as is, without a copy)."""
    sink = pa.BufferOutputStream()
    shape = table.schema.field(variables[0]).type.shape if variables else None
    pq.write_table(table, sink, **S.write_options(variables, compression_level, shape))
    return memoryview(sink.getvalue())
