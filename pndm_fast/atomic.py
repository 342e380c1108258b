"""Atomic file writes: a file under its final name is always complete, and writing never follows a link.

Every temporary file is created here with O_CREAT | O_EXCL | O_NOFOLLOW under a name holding 16 random hex
digits (64 bits), so a link or file that someone planted in the output folder is never written through, and
the name cannot be guessed in advance. Writers get the open file itself, never a path to reopen.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import secrets

from .errors import UserError

# atomic_file's temporary names: ".NAME.<16 hex digits>.tmp" beside NAME
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<tag>[0-9a-f]{16})\.tmp$")
# errors that mean "the disk is full": no space left, or the user's quota spent
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def temp_name(name: str) -> str:
    """A fresh temporary name for `name`, in the same folder (random: two writers never share one)."""
    return f".{name}.{secrets.token_hex(8)}.tmp"


def fsync_path(path: str) -> None:
    """Flush a file's (or a folder's) data to the disk: after a power loss it is there, not zero-length."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(folder: str) -> int | None:
    """The bytes an unprivileged user may still write on `folder`'s filesystem (None when it cannot be told)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _size(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    if n < 1024:
        return f"{n} bytes"
    return f"{n / 2**20:.1f} MB" if n < 2**30 else f"{n / 2**30:.1f} GB"


def disk_full_error(path: str) -> UserError:
    folder = os.path.dirname(os.path.abspath(path))
    return UserError(f"no space left on the device writing {path} ({_size(free_bytes(folder))} free in {folder}); "
                     "nothing partial was left: free some space and rerun the same command")


class DestinationExists(FileExistsError):
    """atomic_file(exclusive=True) found a file under `path` when it came to publish: nothing was replaced."""


def _publish_exclusive(tmp: str, path: str) -> None:
    """Give `tmp` the name `path` unless a file has it: os.link fails atomically when `path` exists, where an
    exists-check followed by os.replace could race."""
    try:
        os.link(tmp, path)  # atomic_file removes `tmp` afterwards, leaving `path` its only name
    except FileExistsError:
        raise DestinationExists(path) from None
    except OSError:  # a filesystem without hard links: the rename is still atomic, only the check is not
        if os.path.lexists(path):
            raise DestinationExists(path) from None
        os.replace(tmp, path)


def _write(fd: int, data) -> int:
    """os.write, the one call through which every temporary file's bytes go (tests inject a full disk here)."""
    return os.write(fd, data)


class _TempFile:
    """A binary, unbuffered, write-only file on an fd opened by atomic_file; remembers a full-disk error so that
    one is reported as such even when the library writing (torch's zip writer, Pillow) rewraps it."""

    def __init__(self, fd: int, path: str):
        self.fd, self.path, self.disk_full, self.pos = fd, path, False, 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            try:
                done += _write(self.fd, view[done:])
            except OSError as err:
                self.disk_full |= err.errno in DISK_FULL
                raise
        self.pos += done
        return done

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.pos = os.lseek(self.fd, offset, whence)
        return self.pos

    def flush(self) -> None:
        pass  # unbuffered: every write went to the fd

    def fileno(self) -> int:
        return self.fd

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def read(self, *args):
        # np.savez takes an object with `read` for a file (any other for a path), then only writes to it
        raise io.UnsupportedOperation("a temporary file of atomic_file is write-only")

    def seekable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return False


def create_exclusive(folder: str, name: str) -> tuple[str, int]:
    """Create a new temporary file for `name` in `folder`: (its path, an fd open for writing). O_EXCL makes the
    create fail on anything already there, a link included; O_NOFOLLOW adds the same for the last component on
    systems where O_EXCL alone would not. Mode 0666 less the umask, like every other output."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        tmp = os.path.join(folder, temp_name(name))
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue  # 1 in 2**64: draw another name


def _discard(tmp: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, fsync: bool = True, exclusive: bool = False):
    """Yield a new temporary file (binary, write-only) beside `path`; rename it onto `path` when the block succeeds.

    A crash or an error mid-write leaves `path` as it was (absent, or its previous complete content) and
    removes the partial file; a kill -9 can leave the temporary file behind, which remove_stale_temps clears
    (under the lock of the folder, see pndm_fast.lock). A full disk (ENOSPC, EDQUOT) becomes a one-line
    UserError naming the path and the free space, with nothing partial left.

    With `fsync` (the default) the data reaches the disk before the rename and the rename before returning:
    without it, ext4's delayed allocation can leave a zero-length file under `path` after a power loss, since
    the rename may be journalled before the data blocks are written. It costs about 3 ms per file on this
    project's disk; callers that check what they find on restart (the sampler's images) may skip it.

    With `exclusive`, a file that appeared under `path` while the block ran is never replaced: DestinationExists
    is raised instead, and the temporary file removed.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        tmp, fd = create_exclusive(folder, name)
    except OSError as err:
        if err.errno in DISK_FULL:
            raise disk_full_error(path) from None
        raise
    file = _TempFile(fd, tmp)
    try:
        try:
            try:
                yield file
                if fsync:
                    os.fsync(fd)
                written = os.fstat(fd)
            finally:
                os.close(fd)
        except BaseException as err:
            if file.disk_full or isinstance(err, OSError) and err.errno in DISK_FULL:
                _discard(tmp)  # closed and removed first, so that the message tells the space there is without it
                raise disk_full_error(path) from None
            raise
        # the temporary name must still be the file written: one swapped for a link meanwhile is not published
        if not os.path.samestat(os.lstat(tmp), written):
            raise UserError(f"the temporary file {tmp} was replaced by someone else while {path} was written; "
                            f"nothing was published: check who else writes to {folder}")
        if exclusive:
            _publish_exclusive(tmp, path)
        else:
            os.replace(tmp, path)
        if fsync:
            fsync_path(folder)  # the rename is a change to the folder: make it durable too
    except OSError as err:
        if err.errno in DISK_FULL:
            _discard(tmp)
            raise disk_full_error(path) from None
        raise
    finally:
        _discard(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True, exclusive: bool = False):
    """Like atomic_file, for writers that need a file name (np.savez appends a suffix to names, some libraries
    take paths only): yields the temporary file's path, created empty and exclusively. Prefer atomic_file, which
    hands over the open file itself, so nothing can be swapped in between."""
    with atomic_file(path, fsync=fsync, exclusive=exclusive) as file:
        yield file.path


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[str]:
    """Remove the temporary files that killed writers left in `folder` (only those for `name` when given).

    Call it only while holding the folder's lock (pndm_fast.lock.folder_lock): then no other run writes there, so
    every temporary file is a leftover. Returns the names removed. One listing of the folder, so call it once per
    run, not per file.
    """
    removed = []
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = TEMP_NAME.match(entry)
        if not match or (name is not None and match["name"] != name):
            continue
        with contextlib.suppress(FileNotFoundError):  # another process of this run cleaned it up first
            os.remove(os.path.join(folder, entry))
            removed.append(entry)
    return removed
