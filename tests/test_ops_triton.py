"""The triton path of pndm_fast.ops.lincomb, run by triton's interpreter on CPU tensors (TRITON_INTERPRET=1).

The interpreter runs a 1024-element program in numpy, so the cases are few and small. The env var is set per
test: ``lincomb_triton`` builds the interpreted kernel at call time, so import order does not matter.
"""

import pytest
import torch

pytest.importorskip("triton")

from pndm_fast import ops  # noqa: E402
from test_ops import OPERAND_DTYPES, check_case, make_case  # noqa: E402

pytestmark = pytest.mark.skipif(not ops.triton_available(), reason="pndm_fast.kernels.lincomb did not import")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# 1100 and 3x3x17x19 = 2907 elements are not multiples of the 1024 BLOCK and span two and three programs.
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


def test_available_on_cpu_with_interpreter():
    assert "triton" in ops.available_impls("cpu")


def test_launch_config():
    from pndm_fast.kernels.lincomb import launch_config

    assert launch_config(256 * 3 * 32 * 32) == (1024, 4)
    assert launch_config(256 * 3 * 256 * 256) == (4096, 8)


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
    assert "grid = [(6, 1, 1)]" in code  # 6144 elements / BLOCK 1024
