"""The CUDA-graph backend: the whole loop in one graph. Skipped without CUDA; written for an H100."""

import copy

import pytest
import torch
from conftest import relative_l2

from pndm_fast import Schedule
from pndm_fast.grids import GRIDS
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


# Every option of every method set away from its default, once: the plans these build are what the graph captures.
WITH_OPTIONS = ["DDIM:eta=0.5", "S-PNDM", "F-PNDM", "FON", "iPNDM",
                "DPM-Solver++2M:lower_order_final=true,threshold=0.995,max_value=2",
                "DPM-Solver++3M:lower_order_final=false,threshold=0.99,max_value=3",
                "PNDM-exact:order=3,basis=rho,lower_order_final=true",
                "PNDM-exact:basis=log_sigma", "DEIS:order=4,lower_order_final=false",
                "UniPC-bh1:order=2,lower_order_final=false,threshold=0.995,max_value=2",
                "UniPC-bh2:order=2,lower_order_final=false,threshold=0.99,max_value=3", "Heun",
                "Euler-a:eta=0.5,s_noise=1.5", "DPM-Solver++2S-a:eta=0.5,s_noise=0.5",
                "DPM-Solver++2M-SDE:order=1,lower_order_final=false,threshold=0.995,max_value=2"]


def test_the_option_list_sets_every_option_of_every_method():
    """A method or option added later must join the GPU pass (this check runs everywhere)."""
    named = {spec.split(":")[0] for spec in WITH_OPTIONS}
    assert named == set(METHODS)
    for name, record in METHODS.items():
        given = {item.split("=")[0] for spec in WITH_OPTIONS if spec.startswith(name + ":")
                 for item in spec.split(":")[1].split(",")}
        assert given == set(record.options), name


@cuda
@pytest.mark.parametrize("grid", ["uniform", *GRIDS])
@pytest.mark.parametrize("spec", WITH_OPTIONS)
def test_every_method_and_option_on_every_grid_family_replays_as_the_eager_run(model, spec, grid):
    noise = torch.randn(2, 3, 16, 16, device="cuda")
    with torch.no_grad():
        eager = sample(model, noise, SCHEDULE, spec, 8, "fused", return_trajectory=True, timesteps=grid)
        graphed = sample(model, noise, SCHEDULE, spec, 8, "graph", return_trajectory=True, timesteps=grid)
    assert relative_l2(graphed, eager) < 1e-6


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["fused", "graph"])
def test_half_models_sample_with_a_float32_state_as_closely_as_the_reference(model, dtype, backend):
    """The state stays float32 around a half-precision network: the fast path ends no farther from the float64
    run than the plain reference does with the same half network (planted: a state in the model's dtype)."""
    half, exact = copy.deepcopy(model).to(dtype), copy.deepcopy(model).double()
    noise = torch.randn(4, 3, 16, 16, device="cuda")
    with torch.no_grad():
        judge = sample(exact, noise.double(), SCHEDULE, "F-PNDM", 10, "torch")
        fast = sample(half, noise, SCHEDULE, "F-PNDM", 10, backend)
        plain = sample(half, noise, SCHEDULE, "F-PNDM", 10, "reference")
    assert fast.dtype == torch.float32 and torch.isfinite(fast).all()
    assert relative_l2(fast, judge) <= 1.5 * relative_l2(plain, judge) + 1e-4
