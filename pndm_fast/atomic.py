"""Atomic file writes: a file under its final name is always complete."""

from __future__ import annotations

import contextlib
import os
import re

# atomic_path's temporary names: ".NAME.PID.tmp" beside NAME
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


def temp_name(name: str, pid: int | None = None) -> str:
    """The temporary name atomic_path writes `name` under, in the same folder."""
    return f".{name}.{os.getpid() if pid is None else pid}.tmp"


def fsync_path(path: str) -> None:
    """Flush a file's (or a folder's) data to the disk: after a power loss it is there, not zero-length."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DestinationExists(FileExistsError):
    """atomic_path(exclusive=True) found a file under `path` when it came to publish: nothing was replaced."""


def _publish_exclusive(tmp: str, path: str) -> None:
    """Give `tmp` the name `path` unless a file has it: os.link fails atomically when `path` exists, where an
    exists-check followed by os.replace could race."""
    try:
        os.link(tmp, path)  # atomic_path removes `tmp` afterwards, leaving `path` its only name
    except FileExistsError:
        raise DestinationExists(path) from None
    except OSError:  # a filesystem without hard links: the rename is still atomic, only the check is not
        if os.path.lexists(path):
            raise DestinationExists(path) from None
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True, exclusive: bool = False):
    """Yield a temporary name beside `path` to write to; rename it onto `path` when the block succeeds.

    A crash or an error mid-write leaves `path` as it was (absent, or its previous complete content) and
    removes the partial file; a kill -9 can leave the temporary file behind, which remove_stale_temps clears.
    The temporary name carries the process id, so two processes never share one, and it is created by the
    writer itself, so it gets the umask's permissions (mkstemp's would be 0600).

    With `fsync` (the default) the data reaches the disk before the rename and the rename before returning:
    without it, ext4's delayed allocation can leave a zero-length file under `path` after a power loss, since
    the rename may be journalled before the data blocks are written. It costs about 3 ms per file on this
    project's disk; callers that check what they find on restart (the sampler's images) may skip it.

    With `exclusive`, a file that appeared under `path` while the block ran is never replaced: DestinationExists
    is raised instead, and the temporary file removed.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, temp_name(name))
    try:
        yield tmp
        if fsync:
            fsync_path(tmp)
        if exclusive:
            _publish_exclusive(tmp, path)
        else:
            os.replace(tmp, path)
        if fsync:
            fsync_path(folder)  # the rename is a change to the folder: make it durable too
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (signal 0 checks without sending anything)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[str]:
    """Remove the temporary files that killed writers left in `folder` (only those for `name` when given).

    A file whose process id belongs to a live process on this machine is kept, since that process may still
    rename it. Returns the names removed. One listing of the folder, so call it once per run, not per file.
    """
    removed = []
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = TEMP_NAME.match(entry)
        if not match or (name is not None and match["name"] != name) or pid_alive(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):  # another process cleaned it up first
            os.remove(os.path.join(folder, entry))
            removed.append(entry)
    return removed
