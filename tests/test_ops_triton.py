"""The triton path of pndm_fast.ops.lincomb, run by triton's interpreter on CPU tensors (TRITON_INTERPRET=1).

The interpreter runs a 1024-element program in numpy, so the cases are few and small. The env var is set per
test: ``lincomb_triton`` builds the interpreted kernel at call time, so import order does not matter.
"""

import re

import pytest
import torch

pytest.importorskip("triton")

from pndm_fast import ops  # noqa: E402
from test_ops import OPERAND_DTYPES, assert_close_to_truth, check_blend, check_case, make_case  # noqa: E402

pytestmark = pytest.mark.skipif(not ops.triton_available(), reason="pndm_fast.kernels.lincomb did not import")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# Odd sizes (no power of two divides 1100 past 4, nor 2907 = 3x3x17x19) leave a partial last program whatever
# the kernel's block; test_sizes_around_every_power_of_two covers the block boundaries themselves.
SHAPES = [(1,), (1100,), (3, 3, 17, 19), (2, 3, 8, 8)]
# keep_x, keep_x2 (None: no out2), out written in place over x
FLAGS = [(True, None, False), (False, True, False), (True, False, True), (False, None, False), (True, True, True)]
# every operand count with every operand dtype set; shapes and flags rotate through the 24 cases
CASES = [(k, d, SHAPES[i % len(SHAPES)], *FLAGS[i % len(FLAGS)])
         for i, (k, d) in enumerate((k, d) for k in range(6) for d in OPERAND_DTYPES)]


@pytest.mark.parametrize("k, dtypes, shape, keep_x, keep_x2, in_place", CASES, ids=str)
def test_matches_float64(k, dtypes, shape, keep_x, keep_x2, in_place):
    gen = torch.Generator().manual_seed(17 * k + len(shape))
    check_case("triton", make_case(shape, k, OPERAND_DTYPES[dtypes], gen), keep_x, keep_x2, in_place)


@pytest.mark.parametrize("k", [0, 2, 5])
def test_the_blend_matches_float64(k):
    gen = torch.Generator().manual_seed(k)
    check_blend("triton", SHAPES[k % len(SHAPES)], k, gen, with_out2=k != 2)


def test_available_on_cpu_with_interpreter():
    assert "triton" in ops.available_impls("cpu")


@pytest.mark.parametrize("n", sorted({2**p + d for p in range(5, 14) for d in (-1, 0, 1)}))
def test_sizes_around_every_power_of_two(n):
    """Whatever block the kernel picks (a power of two, 32 to 8192 elements), sizes one below, at and one above
    it fill the last program, leave one element over, or miss one: every element written, none past the end."""
    gen = torch.Generator().manual_seed(n)
    x, operands, w, w2 = make_case((n + 1,), 2, OPERAND_DTYPES["mixed"], gen)
    out, out2 = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    # views of n elements; element n of each buffer is a guard that must stay NaN
    ops.lincomb(out[:n], x[:n], [v[:n] for v in operands], w, True, out2[:n], w2, False, impl="triton")
    assert out[n].isnan() and out2[n].isnan()
    for got, weights, keep in ((out[:n], w, True), (out2[:n], w2, False)):
        assert_close_to_truth(got, x[:n], [v[:n] for v in operands], weights, keep)


def test_every_launch_config_is_exact():
    """Each (BLOCK, num_warps) that launch_config can pick, forced on a small odd size: same result."""
    from pndm_fast.kernels.lincomb import LAUNCH_CONFIGS, launch_config, lincomb_triton

    gen = torch.Generator().manual_seed(5)
    x, operands, w, _ = make_case((3, 3, 17, 19), 3, OPERAND_DTYPES["bf16"], gen)
    want = torch.empty_like(x)
    ops.lincomb(want, x, operands, w, impl="torch")
    for start, block, warps in LAUNCH_CONFIGS:
        assert launch_config(start) == (block, warps)
        out = torch.full_like(x, float("nan"))
        lincomb_triton(out, x, operands, w, config=(block, warps))
        torch.testing.assert_close(out, want, rtol=2e-6, atol=1e-6)


def test_registered_triton_op_checks_direct_calls():
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="out has shape"):
        torch.ops.pndm_fast.lincomb_triton_(torch.empty(2, 2), x, [x.clone()], [0.1, 0.2], True, None, None, False,
                                            [], [])
    with pytest.raises(ValueError, match="overlaps out"):
        torch.ops.pndm_fast.lincomb_triton_(x, x.clone(), [x], [0.1, 0.2], True, None, None, False, [], [])


class _Captured(Exception):
    pass


def test_traces_to_a_triton_kernel_on_fake_cuda_tensors():
    """What torch.compile sees on a GPU: one user-defined triton kernel node, weights baked in as fp32 args."""
    from functorch.compile import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode

    graphs = []

    def capture(gm, _):
        graphs.append(gm)
        raise _Captured  # stop before running: this torch has no CUDA

    def step(x, eps, hist, x_next):
        ops.lincomb(x, x, [eps, hist], [-1e-3, 0.5, -0.25], True, x_next, [0.0, 1.5, -0.5], False)
        return x

    with FakeTensorMode():
        x = torch.empty(2, 3, 32, 32, device="cuda")
        args = (x, torch.empty_like(x, dtype=torch.bfloat16), torch.empty_like(x), torch.empty_like(x))
        with pytest.raises(_Captured):
            aot_function(step, fw_compiler=capture)(*args)
    code = graphs[0].code
    assert code.count("triton_kernel_wrapper_functional(") == 1
    assert "'NUM_OPERANDS': 2" in code and "'HAS_OUT2': True" in code and "'w0': -0.001" in code
    # the grid covers the 2x3x32x32 = 6144 elements, with no program wholly past the end
    programs, block = int(re.search(r"grid = \[\((\d+), 1, 1\)\]", code)[1]), int(re.search(r"'BLOCK': (\d+)", code)[1])
    assert (programs - 1) * block < 6144 <= programs * block
