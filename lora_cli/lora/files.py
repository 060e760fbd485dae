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

:func:`run_lock` holds an exclusive ``flock`` on ``LOCK_NAME`` in a folder for as long as
one run uses it; the lock file holds the owner's PID, so a second run can name it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import OutputError, UserError

LOCK_NAME = ".lora-cli.lock"
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


def remove(path: str | os.PathLike) -> None:
    """Delete a file or a directory tree, if it exists (a symlink itself, never its target)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


# --- one run per folder ------------------------------------------------------------------

def _owner(fd: int) -> str:
    """The PID written in a lock file, as text ('' while its owner is still writing it)."""
    try:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, what: str = "lora-train", label: str = "output_dir") -> Iterator[str]:
    """Hold ``folder/LOCK_NAME`` exclusively while the block runs; yields the lock file's path.

    ``folder`` (and missing parents) is created for the lock and removed again afterwards
    if the run left it empty. Another process holding the lock is a UserError naming its
    PID. The lock is an OS lock (``flock``): it goes away with its process, however that
    ends, so a killed run never blocks the next one. The lock file is deleted on release.
    On a filesystem that has no locks the block runs unlocked.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{label} exists and is a file", where=str(folder), fix=f"choose another {label}")
    created = []
    probe = folder
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        created.append(probe)
        probe = probe.parent

    def unwritable(exc: OSError) -> UserError:
        return UserError(f"{label} cannot be written: {exc.strerror}", where=str(folder),
                         fix="choose a folder you can write to")

    path = folder / LOCK_NAME
    fd = -1
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise unwritable(exc) from None
        for _ in range(20):   # the lock file can be replaced between our open and our flock
            try:   # never through a symlink, nor into a file linked elsewhere: the lock file is rewritten
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise UserError(f"{LOCK_NAME} in this folder is a symlink, not lora-cli's lock file",
                                    where=str(folder), fix=f"remove {path} if no run is using the folder") from None
                raise unwritable(exc) from None
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                os.close(fd)
                fd = -1
                raise UserError(f"{LOCK_NAME} in this folder is not lora-cli's lock file (not a plain file, or "
                                "linked elsewhere)", where=str(folder), fix=f"remove {path} if no run is using the folder")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _owner(fd)
                os.close(fd)
                fd = -1
                raise UserError(f"another {what} ({f'PID {pid}' if pid else 'a process starting up'}) is "
                                "using this folder", where=str(folder),
                                fix=f"wait for it to finish (or stop it), or choose another {label}") from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                    raise
                break              # a filesystem without locks: the run goes on unlocked
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            fd = -1
        else:
            raise UserError("the lock file keeps changing", where=str(path), fix="try again")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield str(path)
    finally:
        if fd >= 0:
            with contextlib.suppress(OSError):
                path.unlink()      # while still holding it: the next owner makes a new one
            os.close(fd)
        for d in created:          # innermost first; only folders this lock made and left empty
            try:
                d.rmdir()
            except OSError:
                break
