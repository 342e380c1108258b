"""iPNDM and DPM-Solver++(2M), added as plans only: every backend against their float64 reference steps."""

import math

import pytest
import torch
from conftest import relative_l2

from pndm_fast import build_model, sample
from pndm_fast.ops import available_impls
from pndm_fast.methods import build_plan
from pndm_fast.schedule import Schedule

NEW_METHODS = ("iPNDM", "DPM-Solver++2M")
SCHEDULE = Schedule.from_config({"type": "linear", "beta_start": 1e-4, "beta_end": 2e-2, "diffusion_step": 1000})
# A small DDIM UNet with random weights: nonlinear in x and t like a trained one, and cheap in float64.
TINY_DDIM = {"Model": {"struc": "DDIM", "ch": 32, "out_ch": 1, "ch_mult": [1, 2], "num_res_blocks": 1,
                       "attn_resolutions": [4], "dropout": 0.0, "in_channels": 1, "image_size": 8,
                       "resamp_with_conv": True}}
FAST = ["torch", "fused"] + [impl for impl in available_impls(torch.device("cpu")) if impl != "torch"]


@pytest.fixture(scope="module")
def tiny():
    """The tiny UNet in float32 and float64, and noise for 3 images."""
    torch.manual_seed(0)
    model = build_model(TINY_DDIM).eval().requires_grad_(False)
    model64 = build_model(TINY_DDIM).eval().requires_grad_(False).double()
    model64.load_state_dict(model.state_dict())
    return model, model64, torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("backend", ["torch", "fused"])
@pytest.mark.parametrize("method", NEW_METHODS)
@pytest.mark.parametrize("steps", [4, 10])
def test_every_backend_matches_the_float64_reference_in_float64(tiny, method, steps, backend):
    """With float64 noise the fast backends keep float64 state: the plan's algebra must equal the papers'
    formulas to rounding, at every step."""
    _, model64, noise = tiny
    with torch.no_grad():
        truth = sample(model64, noise.double(), SCHEDULE, method, steps, "reference", return_trajectory=True)
        ours = sample(model64, noise.double(), SCHEDULE, method, steps, backend, return_trajectory=True)
    for step in range(1, len(truth)):
        assert relative_l2(ours[step], truth[step]) < 1e-12, f"step {step}"


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("method", NEW_METHODS)
def test_float32_backends_are_as_close_to_float64_as_the_float32_reference(tiny, method, backend):
    model, model64, noise = tiny
    with torch.no_grad():
        truth = sample(model64, noise.double(), SCHEDULE, method, 20, "reference", return_trajectory=True)
        baseline = sample(model, noise, SCHEDULE, method, 20, "reference", return_trajectory=True)
        ours = sample(model, noise, SCHEDULE, method, 20, backend, return_trajectory=True)
    for step in range(1, len(truth)):
        limit = 2 * relative_l2(baseline[step], truth[step]) + 1e-7
        assert relative_l2(ours[step], truth[step]) <= limit, f"step {step}"


@pytest.mark.parametrize("method", NEW_METHODS)
def test_the_first_step_is_ddims_step(tiny, method):
    """Both start at first order, and first-order DPM-Solver++ is DDIM (Lu et al., 2022, section 3.1)."""
    _, model64, noise = tiny
    with torch.no_grad():
        ddim = sample(model64, noise.double(), SCHEDULE, "DDIM", 10, "reference", return_trajectory=True)
        ours = sample(model64, noise.double(), SCHEDULE, method, 10, "fused", return_trajectory=True)
    assert relative_l2(ours[1], ddim[1]) < 1e-12
    assert relative_l2(ours[2], ddim[2]) > 1e-6  # and from the second step on, higher order


def test_ipndm_ramps_its_order_with_the_history():
    """Step k combines min(k + 1, 4) eps with the Adams-Bashforth weights of that order, scaled by the transfer's
    eps coefficient B, with x's coefficient A; A and B are the paper's eq. 9, computed here in float64 from the
    schedule's alphas at the paper's levels (the state at time t on ac[t + 1], the last step ending on ac[0]).
    Fails if the plan's transfer is not the paper's (planted: solvers.transfer reading the model's levels
    Schedule.alpha(t) instead of the grid's)."""
    plan = build_plan(SCHEDULE, "iPNDM", 10)
    ac = SCHEDULE.alphas_cumprod.double().numpy()  # the float32 table, as the paper's code computes it
    times = list(range(900, -1, -100)) + [-1]  # the paper's seq = range(0, 1000, 100), largest first, then -1
    expected = [(1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24)]
    assert len(plan.steps) == len(times) - 1
    for k, ((call, combine), t, t_next) in enumerate(zip(plan.steps, times, times[1:])):
        a, a_next = ac[t + 1], ac[t_next + 1]
        a_minus_1 = (a_next - a) / (math.sqrt(a) * (math.sqrt(a) + math.sqrt(a_next)))
        b = -(a_next - a) / (math.sqrt(a) * (math.sqrt((1 - a_next) * a) + math.sqrt((1 - a) * a_next)))
        assert call.t == t and call.src == "x"
        weights = expected[min(k, 3)]
        eps_terms = [(name, c) for name, c in combine.expr.terms.items() if name != "x"]
        assert [c for _, c in eps_terms] == pytest.approx([b * w for w in weights], rel=1e-12), f"step {k}"
        assert eps_terms[0][0] == call.dst
        on_x = combine.expr.terms["x"]
        assert getattr(on_x, "delta", on_x - 1.0) == pytest.approx(a_minus_1, rel=1e-12), f"step {k}"
