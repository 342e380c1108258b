"""Peer equivalence: diffusers' schedulers and our coefficients, on the same noise levels with the same exact eps in
float64, agree to 1e-10 at every step. The convention differences adapted here are listed in docs/peers.md."""


import pytest
import torch

from multistep_run import run_steps

from pndm_fast import Schedule, make_grid, sample
from pndm_fast import multistep as ms

# any import failure skips (absent, or installed without a dependency it needs)
diffusers = pytest.importorskip("diffusers", exc_type=ImportError)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 warnings inside diffusers
from accuracy_peers import KeepFloat64  # noqa: E402  (the study feeds diffusers the same way)

MU, STD = 0.4, 0.5  # data x0 ~ N(MU, STD^2) elementwise: eps has a closed form
TOL = 1e-10


def exact_eps(x, ac):
    alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
    return sigma * (x - alpha * MU) / (alpha**2 * STD**2 + sigma**2)


def start_noise():
    return torch.randn(3, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 1.2


def run_sigma_scheduler(scheduler, steps, keep_float64=False):
    """Runs a scheduler that keeps sigma = sqrt((1 - ac) / ac) per step; returns (levels ac, states)."""
    scheduler.set_timesteps(steps)
    scheduler.sigmas = scheduler.sigmas.double()  # its float32 sigmas, read in float64: the levels we share
    levels = [1.0 / (1.0 + float(s) ** 2) for s in scheduler.sigmas]
    x = start_noise()
    if keep_float64:
        x = x.as_subclass(KeepFloat64)
    states = [x]
    for i, t in enumerate(scheduler.timesteps):
        eps = exact_eps(states[-1], torch.tensor(levels[i], dtype=torch.float64))
        states.append(scheduler.step(eps, t, states[-1]).prev_sample)
    return levels, [s.as_subclass(torch.Tensor) for s in states]


def assert_every_step_agrees(theirs, ours):
    assert len(theirs) == len(ours)
    for i, (a, b) in enumerate(zip(theirs, ours)):
        rel = float((a - b).norm() / b.norm())
        assert rel < TOL, f"state {i}: relative difference {rel:.2e}"


@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_solver_pp_multistep(order, steps):
    scheduler = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=order)
    levels, theirs = run_sigma_scheduler(scheduler, steps, keep_float64=True)
    assert levels[-1] == 1.0  # final_sigmas_type="zero": the last step lands on the data
    # its lower_order_final acts only below 15 steps; the step to sigma = 0 is first order either way
    plan = ms.dpm_solver_pp(levels, order, lower_order_final=steps < 15)
    ours, _ = run_steps(plan, start_noise(), levels, exact_eps, "x0")
    assert_every_step_agrees(theirs, ours)


@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("variant,final", [("bh1", "sigma_min"), ("bh2", "sigma_min"), ("bh2", "zero")])
def test_unipc(variant, final, order, steps):
    # bh1 with final_sigmas_type="zero" (diffusers' default) returns NaN at the last step: B(h) = -h = -inf
    # multiplies an empty correction 0 (docs/peers.md); we compare bh1 on the grid ending at alphas_cumprod[0]
    scheduler = diffusers.UniPCMultistepScheduler(solver_type=variant, solver_order=order, final_sigmas_type=final)
    levels, theirs = run_sigma_scheduler(scheduler, steps)
    assert (levels[-1] == 1.0) == (final == "zero")
    plan = ms.unipc(levels, order, variant)  # its lower_order_final applies at any step count
    ours, corrected = run_steps(plan, start_noise(), levels, exact_eps, "x0")
    # diffusers returns the predicted states (the model is called there); the corrector shows in the next one
    assert_every_step_agrees(theirs, ours)
    assert len(corrected) == steps


@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("order", [2, 3])
def test_deis(order, steps):
    scheduler = diffusers.DEISMultistepScheduler(solver_order=order)
    levels, theirs = run_sigma_scheduler(scheduler, steps)
    assert levels[-1] < 1.0  # DEIS ends at alphas_cumprod[0], not on the data
    plan = ms.deis(levels, order, lower_order_final=steps < 15)
    ours, _ = run_steps(plan, start_noise(), levels, exact_eps, "eps")
    assert_every_step_agrees(theirs, ours)


@pytest.mark.parametrize("steps", [5, 20])
def test_ddim(steps):
    """The whole sampler (sample(), plan, lowering, float64 torch backend) on diffusers' own betas and time steps."""
    scheduler = diffusers.DDIMScheduler(clip_sample=False)  # its default clips x0 to [-1, 1]
    scheduler.set_timesteps(steps)
    schedule = Schedule(scheduler.betas.double().numpy())  # the same float32 betas, so the same float32 table
    assert torch.equal(schedule.alphas_cumprod, scheduler.alphas_cumprod)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    x = start_noise()
    theirs = [x]
    for t in scheduler.timesteps:  # it reads ac at each integer time step, and ends at ac = 1 (set_alpha_to_one)
        eps = exact_eps(theirs[-1], scheduler.alphas_cumprod[t])
        theirs.append(scheduler.step(eps, t, theirs[-1], eta=0.0).prev_sample)

    def model(x, t):
        return exact_eps(x, torch.tensor(schedule.alpha(float(t[0])), dtype=torch.float64))

    times = sorted(int(t) for t in scheduler.timesteps)
    ours = sample(model, x[..., None], schedule, "DDIM", backend="torch", return_trajectory=True, timesteps=times)
    assert_every_step_agrees(theirs, list(ours[..., 0]))


@pytest.mark.parametrize("steps", [1, 4, 7, 10, 25, 999])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("cls_name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                                      "DEISMultistepScheduler"])
def test_diffusers_spacings_are_named_grids(cls_name, spacing, steps):
    """diffusers' time steps at each spacing (steps_offset 1 with leading, as Stable Diffusion's configs set it) are
    the named grid's call times, and the grid then ends at sigma = 0 (final_sigmas_type "zero")."""
    offset = 1 if spacing == "leading" else 0
    scheduler = getattr(diffusers, cls_name)(timestep_spacing=spacing, steps_offset=offset)
    scheduler.set_timesteps(steps)
    schedule = Schedule(scheduler.betas.double().numpy())
    grid = make_grid(schedule, spacing, steps, offset=offset or None)
    assert grid.times[:-1] == tuple(float(t) for t in scheduler.timesteps) and grid.times[-1] == -1.0
    if grid.times[-2] > 0:  # a last call at t = 0 leaves no step to end at t = 0 with
        assert make_grid(schedule, spacing, steps, "min", offset=offset or None).times[-1] == 0.0


@pytest.mark.parametrize("steps", [3, 10, 50])
def test_the_trailing_grid_is_ddims_too(steps):
    scheduler = diffusers.DDIMScheduler(timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    grid = make_grid(Schedule(scheduler.betas.double().numpy()), "trailing", steps)
    assert grid.times[:-1] == tuple(float(t) for t in scheduler.timesteps)
