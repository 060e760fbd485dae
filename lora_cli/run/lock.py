"""One run per output folder: an OS lock held for the whole run.

:func:`run_lock` holds an exclusive ``flock`` on ``LOCK_NAME`` in a folder for as long as
one run uses it; the lock file holds the owner's PID, so a second run can name it. The
lock goes with its process however that ends, so a killed run never blocks the next.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError

LOCK_NAME = ".lora-cli.lock"


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
