"""One run per output folder: an advisory lock (flock) on a file in the folder, held for the whole run.

Two samplers with different seeds into one --image_path would each keep the other's images and leave a mix; two
trainings into one --train_path would replace each other's checkpoints. The second run is refused with one line
naming the process that holds the folder. flock is released by the kernel when the holder dies, even by kill -9,
so a killed run never leaves the folder locked (its lock file stays, unlocked), and it works between containers
that share the folder (other PID namespaces) on one machine, where a process id says nothing. On NFS, Linux maps
flock to the server's locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys

from .errors import UserError

LOCK_NAME = ".pndm-fast.lock"


def _holder(path: str) -> str:
    """Who holds the lock, as its holder wrote it (pid, host, command), or a plain phrase when unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            text = os.read(fd, 500).decode(errors="replace").strip()
        finally:
            os.close(fd)
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "another process"


def _open_locked(path: str) -> int | None:
    """An fd holding the lock on `path` (created if absent, never through a link), or None when another holds it.

    The file may be removed by a holder that ends (see folder_lock) between our open and our flock: then we hold a
    lock on a file without a name, which protects nothing, so the name is checked to still be our file, and the
    attempt repeated otherwise.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.path.samestat(os.fstat(fd), os.lstat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "run"):
    """Hold `folder`'s lock for the block, or raise a one-line UserError when another process holds it.

    The lock file is created beside the outputs without following a link, and removed when the block ends (while
    still locked, so that a run that opened it meanwhile sees it gone and starts over); a killed holder leaves it,
    unlocked, for the next run to take.
    """
    folder = os.fspath(folder)
    path = os.path.join(folder, LOCK_NAME)
    try:
        fd = _open_locked(path)
    except OSError as err:
        raise UserError(f"cannot lock {folder} for this {what}: {path} could not be opened or locked "
                        f"({err.strerror}); check the folder's permissions, or write to a local folder") from None
    if fd is None:
        raise UserError(f"{folder} is in use by {_holder(path)}: wait for that run to end (or stop it), or write "
                        "to another folder")
    try:
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]
        with contextlib.suppress(OSError):  # on a full disk the record is lost, not the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} ({command})\n".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
        os.close(fd)  # releases the lock
