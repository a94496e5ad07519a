"""Old import path of the atomic-write helpers: they live in :mod:`climax.storage`."""

from climax.storage import LAST, is_remote, staged_output, upload_folder, write_atomic

__all__ = ["LAST", "is_remote", "write_atomic", "staged_output", "upload_folder"]
