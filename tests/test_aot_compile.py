"""Ahead-of-time compilation of the lincomb kernel for sm_80 and sm_90, without a GPU (ptxas ships with triton).

A covering set (every operand count x dtype, every flag set: 27 per arch, ~6 s each arch on 2 cores), then, marked
slow, all 384 specializations per arch (~60 s each), as ``python -m pndm_fast.kernels.aot 80 90`` compiles them.
`-m "not slow"` leaves the full compile out; nothing here needs a GPU, so nothing is skipped without one.
"""

import re

import pytest

pytest.importorskip("triton")

from pndm_fast.kernels import aot  # noqa: E402


def _check(kernels, arch):
    for spec, kernel in kernels.items():
        ptx, cubin = kernel.asm["ptx"], kernel.asm["cubin"]
        assert f".target sm_{arch}" in ptx and len(cubin) > 1000, spec
        assert kernel.metadata.shared == 0, f"{spec}: a layout conversion through shared memory crept back in"
        # vectorized: 16-byte fp32 loads and stores, 8-byte loads of 16-bit operands
        assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx, spec
        if spec[0] and spec[1] != "fp32":
            assert "ld.global.v2.b32" in ptx, spec
        # 4 elements per load and store, BLOCK / (4 * 32 * num_warps) of each per tensor and thread: x, the
        # operands and a blend's three tensors are each loaded once
        outputs, (block, num_warps) = 2 if spec[2][1] else 1, spec[3]
        per_tensor = block // (4 * 32 * num_warps)
        assert len(re.findall(r"st\.global", ptx)) == outputs * per_tensor, spec
        assert len(re.findall(r"ld\.global", ptx)) == (1 + spec[0] + 3 * spec[2][3]) * per_tensor, spec


@pytest.mark.parametrize("arch", [80, 90])
def test_covering_set_compiles(arch):
    specs = aot.specializations(full=False)
    assert {(k, t) for k, t, _, _ in specs} == {(k, t) for k, t, _, _ in aot.specializations()}
    assert {f for _, _, f, _ in specs} == set(aot.FLAGS)
    _check(aot.compile_all(arch, full=False), arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_specialization_compiles(arch):
    _check(aot.compile_all(arch), arch)


@pytest.mark.parametrize("arch", [80, 90])
def test_the_device_normal_draws_compile(arch):
    """kernels/normal.py lowers for the arch: Philox's 32-bit high products, and an IEEE square root (the
    approximate one may round differently from one arch to the next)."""
    kernel = aot.compile_normal(arch)
    ptx = kernel.asm["ptx"]
    assert f".target sm_{arch}" in ptx and len(kernel.asm["cubin"]) > 1000 and kernel.metadata.shared == 0
    assert "mul.hi.u32" in ptx and "sqrt.rn.f32" in ptx and "sqrt.approx" not in ptx
