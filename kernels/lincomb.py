"""Fused linear combination + transfer step: one pass over memory (PNDM, Liu et al. ICLR 2022, eq. 11/12).

    out  = (x if keep_x  else 0) + (w[0]*x  + sum_j w[j+1]*v_j)
    out2 = (x if keep_x2 else 0) + (w2[0]*x + sum_j w2[j+1]*v_j)      (optional)
    out  = m * out + b[0]*k + b[1]*n                                  (optional blend, after the sum)

The blend is inpainting's (pndm_fast/editing.py): m the mask, k = (1 - m) image and n = (1 - m) noise, so the
kept pixels are set back to the image at the step's level in the pass that computed the step.

With 4 operands the plain-torch twin (pndm_fast.ops.lincomb_torch) runs 11 kernels per output and moves
27 tensors' worth of bytes; fused it is one kernel, 5 reads + 1 write (+1 write for out2). The delta is
accumulated in fp32 and only then added to x, because w[0] = A-1 is tiny (~1e-3) and ``(1+w0)*x`` in fp32 would
round w0 away.

Layers: ``lincomb_kernel`` (the @triton.jit kernel); ``lincomb_triton`` (host wrapper: checks, BLOCK/num_warps,
grid), called by the torch.library op in ``pndm_fast.ops`` (``pndm_fast::lincomb_triton_``); and ``bind``, which
fetches the compiled kernel once per buffer set and launches it directly (``pndm_fast.ops.bind``'s eager path).
"""

import functools
from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .constants import MAX_OPERANDS, OPERAND_DTYPES, STATE_DTYPE
from .interpreter import kernel_for

# (from N elements, BLOCK, num_warps), largest first: launch_config takes the first row whose N it reaches.
# kernels/aot.py compiles every row; benchmarks/tune_lincomb.py measures alternatives on a GPU.
LAUNCH_CONFIGS = ((1 << 23, 4096, 8), (0, 1024, 4))
# Why bind fell back to triton's jit launcher (None while the direct launch works); tests/test_cuda.py checks it.
DIRECT_LAUNCH_ERROR: Optional[str] = None


@triton.jit
def lincomb_kernel(
    out_ptr,  # *fp32 [N]: first output; may be x_ptr itself (in-place x <- x + delta)
    out2_ptr,  # *fp32 [N]: second output, may be x_ptr; points at out_ptr, never touched, without HAS_OUT2
    x_ptr,  # *fp32 [N]: current sample x
    v0_ptr, v1_ptr, v2_ptr, v3_ptr, v4_ptr,  # *fp32|bf16|fp16 [N]: operands; the unused ones point at x, never read
    w0, w1, w2, w3, w4, w5,  # fp32: out's weights of x, v0..v4 (rounded from the caller's float64)
    u0, u1, u2, u3, u4, u5,  # fp32: out2's weights of x, v0..v4 (0.0 when HAS_OUT2 is False)
    m_ptr, k_ptr, n_ptr,  # *fp32 [N]: the blend's mask, (1 - mask) image, (1 - mask) noise; x when BLEND is False
    b0, b1,  # fp32: the blend's weights of k and n (0.0 when BLEND is False)
    n_elements,  # int: N, may exceed 2**31 (a 256x3x256x256 fp32 batch is 50M, 8 GB tensors are 2**31)
    NUM_OPERANDS: tl.constexpr,  # 0..5; loads of the unused operands compile away
    KEEP_X: tl.constexpr,  # out = x + delta (True) or delta (False)
    HAS_OUT2: tl.constexpr,  # compute and store out2
    KEEP_X2: tl.constexpr,  # out2 = x + delta2 (True) or delta2 (False)
    BLEND: tl.constexpr,  # out = m * out + b0 * k + b1 * n
    BLOCK: tl.constexpr,  # elements per program, a power of two
):
    # int64 offsets: pid * BLOCK overflows int32 past 2**31 elements.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    # Runs of 4: every load then gets 4 elements per thread (16 B of fp32, 8 B of bf16/fp16) in one register
    # layout. Left alone, triton gives 16-bit loads 8 per thread and shuffles them through 4-8 KB of shared
    # memory into the fp32 layout (one convert_layout per operand, seen in the sm_90 TTGIR).
    offs = tl.max_contiguous(offs, 4)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask)
    d = w0 * x
    d2 = u0 * x
    # Explicit fma: the same rounding whatever triton's fp-fusion default (it flips in 3.10).
    if NUM_OPERANDS > 0:
        v = tl.load(v0_ptr + offs, mask=mask).to(tl.float32)
        d = tl.fma(w1, v, d)
        if HAS_OUT2:
            d2 = tl.fma(u1, v, d2)
    if NUM_OPERANDS > 1:
        v = tl.load(v1_ptr + offs, mask=mask).to(tl.float32)
        d = tl.fma(w2, v, d)
        if HAS_OUT2:
            d2 = tl.fma(u2, v, d2)
    if NUM_OPERANDS > 2:
        v = tl.load(v2_ptr + offs, mask=mask).to(tl.float32)
        d = tl.fma(w3, v, d)
        if HAS_OUT2:
            d2 = tl.fma(u3, v, d2)
    if NUM_OPERANDS > 3:
        v = tl.load(v3_ptr + offs, mask=mask).to(tl.float32)
        d = tl.fma(w4, v, d)
        if HAS_OUT2:
            d2 = tl.fma(u4, v, d2)
    if NUM_OPERANDS > 4:
        v = tl.load(v4_ptr + offs, mask=mask).to(tl.float32)
        d = tl.fma(w5, v, d)
        if HAS_OUT2:
            d2 = tl.fma(u5, v, d2)
    if KEEP_X:
        d = x + d
    if HAS_OUT2:
        if KEEP_X2:
            d2 = x + d2
        tl.store(out2_ptr + offs, d2, mask=mask)
    if BLEND:
        known = b0 * tl.load(k_ptr + offs, mask=mask)
        known = tl.fma(b1, tl.load(n_ptr + offs, mask=mask), known)
        d = tl.fma(tl.load(m_ptr + offs, mask=mask), d, known)
    # Every load of this block happened above, so out_ptr or out2_ptr == x_ptr (in place) is safe.
    tl.store(out_ptr + offs, d, mask=mask)


def launch_config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for N elements.

    1024 elements on 4 warps is 8 fp32 per thread, i.e. two 16-byte loads per tensor (one for bf16/fp16);
    a 256x3x32x32 batch (786k) is then 768 programs, ~6 per SM on an H100's 132 SMs. From 8M elements on,
    4096 on 8 warps (16 per thread) quarters the number of programs to schedule.
    """
    return next((block, warps) for start, block, warps in LAUNCH_CONFIGS if n >= start)


def lincomb_triton(out, x, operands, weights, keep_x=True, out2=None, weights2=None, keep_x2=False, blend=None,
                   blend_weights=None, config: Optional[tuple[int, int]] = None):
    """Host wrapper: out (and out2) <- see the module docstring; returns None and allocates nothing.

    All tensors have one shape and are dense with the same memory order (pndm_fast.ops checks the layout).
    out, out2, x: float32; operands: up to 5 of float32/bfloat16/float16; weights: len(operands)+1 floats.
    blend: None, or float32 (mask, known image, known noise) with blend_weights (image weight, noise weight).
    CUDA tensors, or CPU tensors with TRITON_INTERPRET=1. User-facing checks live in ``pndm_fast.ops``.
    config: (BLOCK, num_warps) instead of launch_config's, for tuning.
    """
    kernel, grid, args, meta = _launch(out, x, operands, weights, keep_x, out2, weights2, keep_x2, blend,
                                       blend_weights, config)
    # wrap_triton makes the launch visible to torch.compile; torch before 2.13 refuses the interpreter's kernel,
    # which no tracer needs to see.
    (kernel if x.device.type == "cpu" else wrap_triton(kernel))[grid](*args, **meta)


def bind(out, x, operands, weights, keep_x=True, out2=None, weights2=None, keep_x2=False, blend=None,
         blend_weights=None, config: Optional[tuple[int, int]] = None) -> Callable[[], None]:
    """A no-argument launcher of one call over fixed buffers: the compiled kernel is fetched once, here.

    Each call then goes straight to triton's C launcher with the argument tuple built here: no torch.library
    dispatch, no argument binding, specialization or cache-key hashing per call (the jit path's host cost).
    The stream is read at each call, so a CUDA graph capture on a side stream records the launch. Falls back
    to the jit path on the interpreter, and while a launch hook (a profiler's) is installed.
    """
    kernel, grid, args, meta = _launch(out, x, operands, weights, keep_x, out2, weights2, keep_x2, blend,
                                       blend_weights, config)
    jit_call = functools.partial(kernel[grid], *args, **meta)
    if x.device.type != "cuda":
        return jit_call
    from triton import knobs
    from triton.runtime.driver import driver

    global DIRECT_LAUNCH_ERROR
    try:
        with torch.cuda.device(x.device):
            compiled = kernel.warmup(*args, grid=grid, **meta)  # compiles once, or finds the cached binary
            device = driver.active.get_current_device()
            # the launcher's arguments exactly as JITFunction.run builds them for this specialization
            binder = kernel.device_caches[device][4]
            bound_args, _, _ = binder(*args, **meta)
            launch_args = tuple(bound_args.values())
            launcher, function, packed = compiled.run, compiled.function, compiled.packed_metadata
    except Exception as e:  # triton internals moved (another version): the jit path still runs, only slower
        DIRECT_LAUNCH_ERROR = f"{type(e).__name__}: {e}"
        return jit_call
    get_stream, grid0 = driver.active.get_current_stream, grid[0]
    runtime = knobs.runtime

    # the default argument holds the tensors behind the pointers
    def launch(_keep_alive=(out, x, operands, out2, blend)) -> None:
        if runtime.launch_enter_hook is not None or runtime.launch_exit_hook is not None:
            return jit_call()
        launcher(grid0, 1, 1, get_stream(device), function, packed, None, None, None, *launch_args)

    return launch


def _launch(out, x, operands, weights, keep_x, out2, weights2, keep_x2, blend, blend_weights, config):
    """Check a call and return (kernel, grid, positional args, constexpr and launch keywords)."""
    k = len(operands)
    if k > MAX_OPERANDS:
        raise ValueError(f"lincomb takes at most {MAX_OPERANDS} operands, got {k}")
    if len(weights) != k + 1 or (out2 is not None and (weights2 is None or len(weights2) != k + 1)):
        raise ValueError(f"lincomb needs len(operands)+1 = {k + 1} weights per output")
    if x.dtype != STATE_DTYPE or out.dtype != STATE_DTYPE or (out2 is not None and out2.dtype != STATE_DTYPE):
        raise TypeError("lincomb_triton needs float32 x/out/out2")
    if any(v.dtype not in OPERAND_DTYPES for v in operands):
        raise TypeError("lincomb_triton operands must be float32, bfloat16 or float16")
    if blend and (len(blend) != 3 or blend_weights is None or len(blend_weights) != 2
                  or any(t.dtype != STATE_DTYPE for t in blend)):
        raise ValueError("lincomb_triton's blend is three float32 tensors (mask, image, noise) with two weights")
    blend = tuple(blend or ())
    tensors = [out, x, *operands, *blend] + ([] if out2 is None else [out2])
    if any(t.shape != x.shape or t.device != x.device for t in tensors):
        raise ValueError("lincomb_triton needs tensors of one shape and device")
    if x.device.type == "cuda" and torch.cuda.is_available() and x.device.index != torch.cuda.current_device():
        # triton launches on the current device, whatever the pointers say
        raise ValueError(f"lincomb_triton: x is on {x.device}; call torch.cuda.set_device({x.device.index}) first")
    kernel = kernel_for(lincomb_kernel, x.device, "triton (use impl='cpp' or 'torch' on CPU)")

    # Dense, same memory order: the kernel walks each storage as a flat [N] array, no reshape needed.
    n = x.numel()
    block, num_warps = config or launch_config(n)
    v = list(operands) + [x] * (MAX_OPERANDS - k)
    w = list(weights) + [0.0] * (MAX_OPERANDS - k)
    u = [0.0] * (MAX_OPERANDS + 1) if out2 is None else list(weights2) + [0.0] * (MAX_OPERANDS - k)
    has_out2 = out2 is not None
    b = list(blend_weights) if blend else [0.0, 0.0]
    args = (out, out2 if has_out2 else out, x, *v, *w, *u, *(blend or (x, x, x)), *b, n)
    meta = dict(NUM_OPERANDS=k, KEEP_X=bool(keep_x), HAS_OUT2=has_out2, KEEP_X2=has_out2 and bool(keep_x2),
                BLEND=bool(blend), BLOCK=block, num_warps=num_warps)
    return kernel, (triton.cdiv(n, block),), args, meta
