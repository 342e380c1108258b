"""The Triton kernel to launch on a tensor's device: the compiled one on CUDA, triton's interpreter on the CPU."""

import functools
import os

import torch


def kernel_for(kernel, device: torch.device, what: str):
    """`kernel` for CUDA tensors; on CPU tensors its interpreted twin, which needs TRITON_INTERPRET=1."""
    if device.type != "cpu":
        return kernel
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{what} on CPU tensors needs TRITON_INTERPRET=1 (triton's interpreter)")
    return _interpreted(kernel)


@functools.cache
def _interpreted(kernel):
    """triton.jit reads TRITON_INTERPRET when a module is imported; building the interpreted twin at call time
    lets CPU tensors run whenever TRITON_INTERPRET=1 is set, whatever was imported first."""
    from triton.runtime.interpreter import InterpretedFunction

    return kernel if isinstance(kernel, InterpretedFunction) else InterpretedFunction(kernel.fn)
