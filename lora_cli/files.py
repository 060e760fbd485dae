"""Files that appear whole or not at all.

A file is written under a temporary name in its own directory, flushed and fsynced, then
renamed over its final name (a rename within one directory is atomic), and the
directory is fsynced so that the rename itself survives a crash. A write that fails (a
full disk, a read-only folder) becomes one :class:`~lora_cli.errors.OutputError` through
:func:`write_error`, after the caller removed what it half-wrote.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import OutputError

_REASONS = {
    errno.ENOSPC: ("the disk is full", "free space on that disk, or write to another one"),
    errno.EDQUOT: ("the disk quota is used up", "free space within your quota, or write to another disk"),
    errno.EFBIG: ("the file is too large for this file system", "write to another disk"),
    errno.EROFS: ("the file system is read-only", "write to a folder on a writable disk"),
    errno.EACCES: ("permission denied", "write to a folder you own"),
    errno.EPERM: ("the operation is not permitted", "write to a folder you own"),
}


def write_error(exc: OSError, path: str | os.PathLike, what: str) -> OutputError:
    """One message for an OSError that stopped ``what`` being written to ``path``."""
    reason, fix = _REASONS.get(exc.errno, (exc.strerror or str(exc), "check the disk and the folder, then retry"))
    return OutputError(f"cannot write {what}: {reason}", where=str(path),
                       fix=fix + "; nothing half-written was left behind")


class _Recorded:
    """A file's ``write`` that remembers the OSError it raised: torch.save reports a
    failed write (ENOSPC) as a RuntimeError without it."""

    def __init__(self, fh: BinaryIO):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames in a directory durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path: str | os.PathLike, writer: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` with ``writer(file)`` and fsync it (not atomic by itself: for files
    inside a directory that is renamed into place afterwards)."""
    with open(path, "wb") as fh:
        recorded = _Recorded(fh)
        try:
            writer(recorded)
        except Exception:
            if recorded.error is not None:
                raise recorded.error from None
            raise
        fh.flush()
        os.fsync(fh.fileno())


def write_atomic(path: str | os.PathLike, writer: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` with ``writer(file)``: the old file or the complete new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_synced(tmp, writer)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove(path: str | os.PathLike) -> None:
    """Delete a file or a directory tree, if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
