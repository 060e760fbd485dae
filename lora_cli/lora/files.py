"""Files that appear whole or not at all, and folders one process at a time.

A file is written under a temporary name in its own directory, flushed and fsynced, then
renamed over its final name (a rename within one directory is atomic), and the
directory is fsynced so that the rename itself survives a crash. A write that fails (a
full disk, a read-only folder) becomes one :class:`~lora_cli.errors.OutputError` through
:func:`write_error`, after the caller removed what it half-wrote.

Temporary names carry the writer's PID and a random suffix (``.NAME.tmp-PID-RAND``), so
two processes never share one. A process killed mid-write leaves its temporary behind;
:func:`remove_stale_temps` deletes those whose PID is no longer alive, and is run by the
next process that writes into the folder.

A folder (an adapter, a checkpoint, a model directory) is built under a temporary name and
put in place by :func:`put_in_place`, the one way lora-cli replaces a folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from .errors import OutputError

# ".NAME.tmp-PID-RAND" and ".NAME.old-PID-RAND" (this version), ".NAME.tmp-PID" (before it)
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?P<rand>-[0-9a-f]{8})?")


def temp_path(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """A name beside ``path`` that no other process uses: ``.NAME.tmp-PID-RAND``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True          # someone else's process (or not a PID we can ask about): keep it
    return True


def remove_stale_temps(folder: str | os.PathLike, names: Iterable[str] = ()) -> list[Path]:
    """Delete the temporaries that killed lora-cli processes left in ``folder``; return them.

    Only names of lora-cli's pattern whose writer PID is no longer alive are touched; the
    older pattern without a random suffix (``.NAME.tmp-PID``, general enough for another
    tool to use) only for a NAME in ``names``. An ``.old`` copy whose final name is
    missing (the writer died between its two renames) is renamed back into place
    instead of deleted.
    """
    names = set(names)
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.fullmatch(entry.name)
        if m is None or (m.group("rand") is None and m.group("name") not in names) or _alive(int(m.group("pid"))):
            continue
        final = folder / m.group("name")
        if m.group("kind") == "old" and not entry.is_symlink() and not final.exists() and not final.is_symlink():
            with contextlib.suppress(OSError):
                entry.rename(final)
                continue
        with contextlib.suppress(OSError):
            remove(entry)
            removed.append(entry)
    return removed


def inside(folder: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``path``, with every symlink resolved, lies inside ``folder`` (resolved too)."""
    root = os.path.realpath(folder)
    return os.path.realpath(path).startswith(root.rstrip(os.sep) + os.sep)


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
    tmp = temp_path(path)
    try:
        write_synced(tmp, writer)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def put_in_place(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename ``tmp`` (a finished file or folder beside ``final``) to ``final``, replacing
    what is there, and make the rename durable.

    A file replaces a file in one atomic rename. A folder cannot replace a non-empty folder
    that way: the old one is first renamed aside (``.NAME.old-PID-RAND``), the new one
    renamed in, then the old one removed. ``final`` is therefore always the old whole or
    the new whole; after a crash between the two renames it is missing and the old whole
    lies beside it, where :func:`remove_stale_temps` puts it back.
    """
    tmp, final = Path(tmp), Path(final)
    if final.is_symlink() or (final.exists() and final.is_dir() != tmp.is_dir()):
        remove(final)      # a link, or a file where a folder goes (or the reverse): nothing to keep whole
    if tmp.is_dir() and final.exists():
        old = temp_path(final, "old")
        final.rename(old)
        tmp.rename(final)
        remove(old)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def remove(path: str | os.PathLike) -> None:
    """Delete a file or a directory tree, if it exists (a symlink itself, never its target)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


# --- one run per folder ------------------------------------------------------------------

