"""The fast paths on a real GPU: the Triton kernel compiled for the card, the golden runs through the fused and
graph backends and through torch.compile. Skipped without CUDA; the CPU suite checks the same code through the
Triton interpreter and the C++ kernel.

cuDNN runs float32 convolutions in TF32 by default on Ampere and newer (torch.backends.cudnn.allow_tf32), which
moves a 50-step golden sample 2e-4 from float64 on an H200 (benchmarks/RESULTS.md): these tests compare with
float64 at float32's precision, so they switch TF32 off for their duration.
"""

import copy

import pytest
import torch
from conftest import golden_model, golden_run_params
from test_ops import OPERAND_DTYPES, check_case, make_case
from test_plans import check_backend_against_golden

from pndm_fast import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
F32_RUNS = [p for p in golden_run_params() if p.values[1] is None or p.values[1]["dtype"] == "f32"]
# Sizes past one program (BLOCK 1024) and past the L2 of an H100 (50 MB): 256x3x32x32 and 4096x3x32x32 floats.
SHAPES = [(1,), (1100,), (3, 3, 17, 19), (256, 3, 32, 32), (4096, 3, 32, 32)]
FLAGS = [(True, None, False), (False, True, False), (True, False, True), (False, None, False), (True, True, True)]


@pytest.fixture(autouse=True)
def exact_float32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def on_cuda(case):
    x, operands, w, w2 = case
    return x.cuda(), [v.cuda() for v in operands], w, w2


@pytest.mark.parametrize("k", range(6))
@pytest.mark.parametrize("dtypes", list(OPERAND_DTYPES))
def test_triton_kernel_on_the_gpu_matches_float64(k, dtypes):
    assert "triton" in ops.available_impls("cuda") and ops.available_impls("cuda")[0] == "triton"
    for i, shape in enumerate(SHAPES):
        gen = torch.Generator().manual_seed(31 * k + i)
        check_case("triton", on_cuda(make_case(shape, k, OPERAND_DTYPES[dtypes], gen)), *FLAGS[(k + i) % len(FLAGS)])


@pytest.mark.parametrize("backend", ["fused", "graph"])
@pytest.mark.parametrize("name,run", F32_RUNS)
def test_golden_runs_on_the_gpu_stay_as_close_to_float64(name, run, backend):
    model = copy.deepcopy(golden_model(name)[0]).cuda()
    check_backend_against_golden(name, run, backend, model=model, device="cuda")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fused", "graph"])
def test_compiled_model_on_the_gpu_stays_as_close_to_float64(backend):
    model, meta = golden_model("ddim_small_linear")
    run = next(r for r in meta["runs"] if (r["method"], r["sample_speed"], r["dtype"]) == ("F-PNDM", 10, "f32"))
    check_backend_against_golden("ddim_small_linear", run, backend, model=copy.deepcopy(model).cuda(),
                                 device="cuda", compile=True)


@pytest.mark.parametrize("k", [0, 2, 5])
def test_bound_launch_equals_the_registered_op_and_replays_in_a_graph(k):
    """ops.bind's direct launch (the compiled kernel fetched once) against the op's jit launch, bit for bit,
    in eager mode and replayed from a CUDA graph captured on a side stream."""
    gen = torch.Generator().manual_seed(k)
    x, operands, w, w2 = on_cuda(make_case((3, 3, 65, 67), k, OPERAND_DTYPES["mixed"], gen))
    want, want2 = torch.empty_like(x), torch.empty_like(x)
    torch.ops.pndm_fast.lincomb_triton_(want, x, operands, w, True, want2, w2, False, [], [])
    out, out2 = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    launch = ops.bind(out, x, operands, w, True, out2, w2, False, impl="triton")
    from pndm_fast.kernels import lincomb as kernels

    assert kernels.DIRECT_LAUNCH_ERROR is None
    launch()
    assert torch.equal(out, want) and torch.equal(out2, want2)
    out.fill_(float("nan"))
    out2.fill_(float("nan"))
    stream, graph = torch.cuda.Stream(), torch.cuda.CUDAGraph()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        launch()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        launch()
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want) and torch.equal(out2, want2)
