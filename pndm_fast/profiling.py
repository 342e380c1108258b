"""NVTX ranges around steps and model calls, free when switched off.

Switched on by `nvtx=True` in the API, `--nvtx` on the command line, or PNDM_FAST_NVTX=1. When off, `nvtx_range`
returns one shared no-op context manager: no import, no allocation, no call into the profiler.
"""

from __future__ import annotations

import contextlib
import os

_NO_RANGE = contextlib.nullcontext()


def nvtx_enabled(flag: bool | None = None) -> bool:
    return bool(flag) if flag is not None else os.environ.get("PNDM_FAST_NVTX", "0") == "1"


def nvtx_range(name: str, enabled: bool):
    """A context manager marking `name` in Nsight Systems when enabled, else a no-op."""
    if not enabled:
        return _NO_RANGE
    import nvtx

    return nvtx.annotate(name, color="green", domain="pndm_fast")
