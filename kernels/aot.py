"""Compile the kernels ahead of time for a CUDA arch, without a GPU (triton ships ptxas).

Proves that every specialization ``lincomb_triton`` can launch, and the device normal draws of
``kernels/normal.py``, lower to PTX and a cubin for sm_80 (A100) and sm_90 (H100) before any GPU is at hand;
``python -m pndm_fast.kernels.aot 90`` compiles them all.
"""

import itertools
import sys
import time

import triton
from triton.backends.compiler import GPUTarget

from .constants import MAX_OPERANDS, OPERAND_DTYPES
from .lincomb import LAUNCH_CONFIGS as _TABLE
from .lincomb import lincomb_kernel
from .normal import BLOCK as NORMAL_BLOCK
from .normal import NUM_WARPS as NORMAL_WARPS
from .normal import normal_kernel

# triton's names of the operand dtypes, in the constants' order
OPERAND_TYPES = tuple({"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[str(d)[6:]] for d in OPERAND_DTYPES)
# every (BLOCK, num_warps) that launch_config picks, smallest first
LAUNCH_CONFIGS = tuple(sorted((block, num_warps) for _, block, num_warps in _TABLE))
# (KEEP_X, HAS_OUT2, KEEP_X2, BLEND); KEEP_X2 is always False without out2 (see lincomb_triton)
FLAGS = tuple((kx, h, kx2, blend) for blend in (False, True) for kx in (True, False)
              for h, kx2 in ((False, False), (True, True), (True, False)))


def specializations(full: bool = True) -> list[tuple]:
    """(num_operands, operand type, flags, (BLOCK, num_warps)) tuples.

    full: every combination with one operand dtype (1 + 5*3 operand sets x 12 flag sets x the launch configs;
    384 with two). Otherwise a covering set (27 with two configs): every (count, dtype) once, rotating flags and
    configs, plus every flag set with 5 bf16 operands. Mixed operand dtypes also launch; they lower through the
    same per-operand code.
    """
    operand_sets = [(0, "fp32")] + [(k, t) for k in range(1, MAX_OPERANDS + 1) for t in OPERAND_TYPES]
    if full:
        return [(k, t, f, c) for (k, t), f, c in itertools.product(operand_sets, FLAGS, LAUNCH_CONFIGS)]
    cover = [(k, t, FLAGS[i % len(FLAGS)], LAUNCH_CONFIGS[i % 2]) for i, (k, t) in enumerate(operand_sets)]
    cover += [(MAX_OPERANDS, "bf16", f, LAUNCH_CONFIGS[0]) for f in FLAGS]
    return list(dict.fromkeys(cover))


def compile_one(arch: int, num_operands: int, operand_type: str, flags: tuple, config: tuple, n_type: str = "i32"):
    """One specialization as the JIT would build it for 16-byte aligned tensors and N divisible by 16."""
    keep_x, has_out2, keep_x2, blend = flags
    block, num_warps = config
    vs = [operand_type if j < num_operands else "fp32" for j in range(MAX_OPERANDS)]  # unused ones are x
    pointers = ["out_ptr", "out2_ptr", "x_ptr"] + [f"v{j}_ptr" for j in range(MAX_OPERANDS)]
    pointers += ["m_ptr", "k_ptr", "n_ptr"]
    signature = dict(zip(pointers, ["*fp32"] * 3 + [f"*{t}" for t in vs] + ["*fp32"] * 3))
    signature.update({f"{w}{j}": "fp32" for w in "wu" for j in range(MAX_OPERANDS + 1)})
    signature.update(b0="fp32", b1="fp32", n_elements=n_type)
    constexprs = dict(NUM_OPERANDS=num_operands, KEEP_X=keep_x, HAS_OUT2=has_out2, KEEP_X2=keep_x2, BLEND=blend,
                      BLOCK=block)
    signature.update({name: "constexpr" for name in constexprs})
    names = lincomb_kernel.arg_names
    aligned = {(names.index(p),): [["tt.divisibility", 16]] for p in pointers + ["n_elements"]}
    src = triton.compiler.ASTSource(fn=lincomb_kernel, signature=signature, constexprs=constexprs, attrs=aligned)
    # enable_fp_fusion given explicitly: triton 3.9 warns that its default flips in 3.10; the kernel's
    # own tl.fma calls make the rounding the same either way.
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "enable_fp_fusion": True})


def compile_normal(arch: int):
    """The device normal draws as the JIT builds them: 16-byte aligned output and seeds, any row length."""
    signature = {"out_ptr": "*fp32", "seeds_ptr": "*i64", "numel": "i32", "BLOCK": "constexpr"}
    names = normal_kernel.arg_names
    aligned = {(names.index(p),): [["tt.divisibility", 16]] for p in ("out_ptr", "seeds_ptr")}
    src = triton.compiler.ASTSource(fn=normal_kernel, signature=signature, constexprs={"BLOCK": NORMAL_BLOCK},
                                    attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": NORMAL_WARPS, "enable_fp_fusion": True})


def compile_all(arch: int, full: bool = True) -> dict:
    """{specialization: CompiledKernel} for sm_<arch>; each has .asm['ptx'] and .asm['cubin']."""
    return {spec: compile_one(arch, *spec) for spec in specializations(full)}


if __name__ == "__main__":
    for arch in [int(a) for a in sys.argv[1:]] or [80, 90]:
        start = time.perf_counter()
        kernels = compile_all(arch) | {"normal": compile_normal(arch)}
        size = sum(len(k.asm["cubin"]) for k in kernels.values())
        seconds = time.perf_counter() - start
        print(f"sm_{arch}: {len(kernels)} specializations, {size / 1e6:.1f} MB of cubin, {seconds:.1f} s")
