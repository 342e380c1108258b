"""Which implementation of the fused sampler op runs here, in one line, and how to get the faster one.

The C++ kernel (pndm_fast._C) is built at install time only when a C++ compiler with OpenMP works, and the Triton
kernel needs the `triton` extra; without them pndm_fast.ops falls back to plain torch, which gives results within
float32 rounding of them, more slowly (`python benchmarks/bench_kernels.py` measures the difference).
`pndm-fast --runner check` and the first line of a sampling run print this notice.
"""

from __future__ import annotations

import torch

from . import ops


def fused_op_notice(device, backend: str = "fused") -> str:
    """One line: the fused op's implementation on `device` for `backend` (after "auto" is resolved), and,
    when it is the plain-torch fallback, what to install for the kernel."""
    kind = torch.device(device).type
    if backend in ("reference", "torch"):
        return f"sampler: backend {backend} (plain torch, no fused op)"
    impl = backend if backend in ("cpp", "triton") else ops.available_impls(device)[0]
    if impl == "triton":
        return f"fused op: Triton kernel (pndm_fast.kernels) on {kind.upper() if kind == 'cuda' else kind}"
    if impl == "cpp":
        return "fused op: C++/OpenMP kernel (pndm_fast._C) on the CPU"
    if kind == "cuda":
        return ("fused op: plain torch on CUDA, the Triton kernel did not import; for it, install the triton extra: "
                "pip install -e \".[triton]\"")
    if kind == "cpu":
        return ("fused op: plain torch on the CPU, pndm_fast._C was not built (no working C++ compiler with OpenMP "
                "at install time); for the faster C++ kernel, install one (e.g. apt install g++) and reinstall: "
                "pip install -e .")
    return f"fused op: plain torch on {kind}"
