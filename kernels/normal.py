"""Counter-based standard normal draws on the device: row r of the output from its 63-bit seed s_r alone.

Element j of row r: Philox4x32-10 (Salmon et al. 2011) with key (s_r mod 2^32, s_r div 2^32) and counter
(j, 0, 0, 0) gives words (w0, w1, ...); the top 24 bits of each make two exact float32 uniforms
u1 = (w0 >> 8) + 1) / 2^24 in (0, 1] and u2 = (w1 >> 8) / 2^24 in [0, 1), and Box-Muller gives
sqrt(-2 ln u1) cos(2 pi u2). The integers are the same on every device; the float32 logarithm and cosine of a GPU
and of the interpreter may differ in their last bits. One launch fills a whole run's draws, so a stochastic run
on a GPU draws nothing on the host (pndm_fast/noise.py).
"""

import contextlib

import torch
import triton
import triton.language as tl

from .interpreter import kernel_for

BLOCK = 1024
MAX_BLOCKS = 65535  # CUDA's limit on a grid's second axis
NUM_WARPS = 4
# Philox4x32's round multipliers and key increments (Salmon et al. 2011, Random123)
PHILOX_M0, PHILOX_M1 = tl.constexpr(0xD2511F53), tl.constexpr(0xCD9E8D57)
PHILOX_W0, PHILOX_W1 = tl.constexpr(0x9E3779B9), tl.constexpr(0xBB67AE85)
TWO_TO_MINUS_24 = tl.constexpr(5.9604644775390625e-08)  # 2^-24: a 24-bit integer times it is exact in float32


@triton.jit
def normal_kernel(
    out_ptr,  # *fp32 [rows, numel], contiguous
    seeds_ptr,  # *int64 [rows]: each row's 63-bit seed
    numel,  # int: values per row, at most MAX_BLOCKS * BLOCK
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)  # rows on the first axis: the second and third stop at 65535 programs
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < numel
    seed = tl.load(seeds_ptr + row)
    # Philox4x32-10, key = the seed's two 32-bit halves, counter = (j, 0, 0, 0); written out rather than
    # tl.randint4x, whose counter layout is triton's to change (and whose nested jit call the interpreter refuses)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = j.to(tl.uint32)
    c1 = c0 * 0  # not tl.zeros_like: a jit helper, which the interpreter cannot call from here
    c2 = c1
    c3 = c1
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, PHILOX_M0)
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo0 = c0 * PHILOX_M0
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 += PHILOX_W0
        k1 += PHILOX_W1
    u1 = ((c0 >> 8) + 1).to(tl.float32) * TWO_TO_MINUS_24
    u2 = (c1 >> 8).to(tl.float32) * TWO_TO_MINUS_24
    # sqrt_rn: IEEE rounding (tl.sqrt is the approximate instruction); log and cos are libdevice's own code, so a
    # draw is the same on every arch
    z = tl.sqrt_rn(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)
    tl.store(out_ptr + row.to(tl.int64) * numel + j, z, mask=mask)


def normal_rows(seeds: torch.Tensor, numel: int) -> torch.Tensor:
    """(len(seeds), numel) float32 standard normal draws on seeds' device, row r from seeds[r] (int64, >= 0).
    CUDA tensors, or CPU tensors with TRITON_INTERPRET=1."""
    if seeds.dtype != torch.int64 or seeds.dim() != 1:
        raise TypeError("normal_rows needs a 1-d int64 tensor of seeds")
    if not 0 <= numel <= MAX_BLOCKS * BLOCK:  # a row's blocks are the grid's second axis
        raise ValueError(f"normal_rows draws 0 to {MAX_BLOCKS * BLOCK} values per row, not {numel}")
    out = torch.empty((seeds.numel(), numel), dtype=torch.float32, device=seeds.device)
    if out.numel() == 0:
        return out
    kernel = kernel_for(normal_kernel, seeds.device, "normal_rows")
    with torch.cuda.device(seeds.device) if seeds.device.type == "cuda" else contextlib.nullcontext():
        kernel[(seeds.numel(), triton.cdiv(numel, BLOCK))](out, seeds, numel, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out
