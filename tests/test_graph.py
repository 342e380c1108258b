"""The CUDA-graph backend: the whole loop in one graph. Skipped without CUDA; written for an H100."""

import pytest
import torch
from conftest import relative_l2

from pndm_fast import Schedule
from pndm_fast.models import build_model
from pndm_fast.methods import METHODS
from pndm_fast.sampling import sample

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the graph backend needs a CUDA device")
SCHEDULE = Schedule.from_config({"type": "linear", "beta_start": 1e-4, "beta_end": 2e-2, "diffusion_step": 1000})
SMALL_DDIM = {"Model": {"struc": "DDIM", "ch": 32, "out_ch": 3, "ch_mult": [1, 2], "num_res_blocks": 1,
                        "attn_resolutions": [8], "dropout": 0.0, "in_channels": 3, "image_size": 16,
                        "resamp_with_conv": True}}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(SMALL_DDIM).cuda().eval().requires_grad_(False)


@cuda
@pytest.mark.parametrize("method", list(METHODS))
def test_graph_replay_equals_fused_eager(model, method):
    noise = torch.randn(4, 3, 16, 16, device="cuda")
    with torch.no_grad():
        eager = sample(model, noise, SCHEDULE, method, 10, "fused", return_trajectory=True)
        graphed = sample(model, noise, SCHEDULE, method, 10, "graph", return_trajectory=True)
    assert relative_l2(graphed, eager) < 1e-6


@cuda
def test_two_batches_in_a_row_are_independent_and_right(model):
    first, second = torch.randn(2, 4, 3, 16, 16, device="cuda").unbind(0)
    with torch.no_grad():
        out_first = sample(model, first, SCHEDULE, "F-PNDM", 20, "graph")
        kept = out_first.clone()
        out_second = sample(model, second, SCHEDULE, "F-PNDM", 20, "graph")
        for noise, out in [(first, out_first), (second, out_second)]:
            assert relative_l2(out, sample(model, noise, SCHEDULE, "F-PNDM", 20, "fused")) < 1e-6
    torch.testing.assert_close(out_first, kept, rtol=0, atol=0)  # the second replay did not write into it


@cuda
def test_replay_allocates_nothing_but_the_returned_copy(model):
    """check_finite=False: the finite check's isfinite/all allocate their own temporaries (and sync)."""
    noise = torch.randn(4, 3, 16, 16, device="cuda")
    with torch.no_grad():
        sample(model, noise, SCHEDULE, "F-PNDM", 20, "graph", check_finite=False)  # capture
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()["allocation.all.allocated"]
        sample(model, noise, SCHEDULE, "F-PNDM", 20, "graph", check_finite=False)
        torch.cuda.synchronize()
        assert torch.cuda.memory_stats()["allocation.all.allocated"] == before + 1


@cuda
@pytest.mark.parametrize("backend", ["fused", "graph"])
def test_sampling_makes_no_host_sync_on_cuda(model, backend):
    noise = torch.randn(2, 3, 16, 16, device="cuda")
    with torch.no_grad():
        sample(model, noise, SCHEDULE, "F-PNDM", 10, backend)  # builds buffers, compiles kernels, captures
        torch.cuda.set_sync_debug_mode("error")
        try:  # the finite check on the noise is the one sync sample() makes, and the option that skips it
            sample(model, noise, SCHEDULE, "F-PNDM", 10, backend, check_finite=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
