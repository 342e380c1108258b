"""Atomic file writes: a file under its final name is always complete."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary name beside `path` to write to; rename it onto `path` when the block succeeds.

    A crash or an error mid-write leaves `path` as it was (absent, or its previous complete content) and
    removes the partial file. The temporary name carries the process id, so two processes never share one,
    and it is created by the writer itself, so it gets the umask's permissions (mkstemp's would be 0600).
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
