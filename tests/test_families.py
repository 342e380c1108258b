"""Every model family: continuous schedules (rectified flow, EDM, continuous VP), their adapters (a flow's velocity,
EDM's preconditioned network, each network's own state and time input), and the whole sampler against diffusers'
flow-sigma and EDM schedulers fed the same exact model outputs (float64, every step, 1e-10)."""

import math

import numpy as np
import pytest
import torch

from pndm_fast import Denoiser, Schedule, UserError, make_grid, sample
from pndm_fast.continuous import EDMSchedule, FlowSchedule, VPSchedule, flux_shift, schedule_from_config, shifted
from pndm_fast.levels import SIGMA_DATA

MU, STD = 0.4, 0.5  # data x0 ~ N(MU, STD^2) elementwise: the denoiser has a closed form
TOL = 1e-10
FLOW = FlowSchedule(shift=3.0)
EDM = EDMSchedule()
GRIDS = ("uniform", "logsnr", "karras", "quadratic")
SCHEDULES = (FLOW, EDM, VPSchedule("linear"), VPSchedule("cosine"))


def posterior(x, alpha, sigma):
    """(E[eps | x], E[x0 | x]) for x = alpha x0 + sigma eps, any alpha and sigma (not only alpha^2 + sigma^2 = 1)."""
    z = (x - alpha * MU) / (alpha**2 * STD**2 + sigma**2)
    return sigma * z, MU + alpha * STD**2 * z


def start(batch=3):
    return torch.randn(batch, 2, 4, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


def velocity_net(time_scale=1.0):
    """An exact rectified-flow network: it reads x_s = (1 - s) x0 + s eps at time time_scale * s."""
    def net(x, t):
        s = float(t[0]) / time_scale
        eps, x0 = posterior(x, 1 - s, s)
        return eps - x0
    return net


def edm_raw_net(x_in, c_noise):
    """EDM's raw network F exactly: it reads c_in x at c_noise = log(sigma) / 4 and D = c_skip x + c_out F."""
    sigma = math.exp(4 * float(c_noise[0]))
    x = x_in * math.sqrt(sigma**2 + SIGMA_DATA**2)
    d = posterior(x, 1.0, sigma)[1]
    c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
    return (d - c_skip * x) / (sigma * SIGMA_DATA / math.sqrt(sigma**2 + SIGMA_DATA**2))


def agree(theirs, ours, tol=TOL):
    assert len(theirs) == len(ours)
    for i, (a, b) in enumerate(zip(theirs, ours)):
        rel = float((a - b).norm() / b.norm())
        assert rel < tol, f"state {i}: relative difference {rel:.2e}"


# --- the schedules, from their definitions ---

@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.description)
def test_levels_are_the_definitions_and_time_of_inverts_them(schedule):
    for t in np.linspace(schedule.t_min, schedule.t_max, 7):
        if isinstance(schedule, FlowSchedule):
            expected = (1 - t) ** 2 / ((1 - t) ** 2 + t * t)  # alpha = 1 - s, sigma = s, read as alpha-bar
        elif isinstance(schedule, EDMSchedule):
            expected = 1 / (1 + t * t)
        elif schedule.kind == "linear":  # Song et al. 2021: log alpha = -t^2 (b1 - b0) / 2 - t b0
            expected = math.exp(-0.5 * t * t * (20 - 0.1) - 0.1 * t)
        else:  # Nichol and Dhariwal: f(t) / f(0), f = cos((t + s) / (1 + s) pi / 2)^2
            f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
            expected = f(t) / f(0)
        assert schedule.alpha(t) == pytest.approx(expected, rel=1e-13)
        assert schedule.time_of(schedule.alpha(t)) == pytest.approx(t, rel=1e-9, abs=1e-12)
    assert schedule.alpha(schedule.t_data) == 1.0


def exact_model(schedule):
    """The exact network of the schedule's family: a velocity on the flow, EDM's raw network on EDM, else eps."""
    if schedule.family == "flow":
        return Denoiser(velocity_net(), "flow")
    if schedule.family == "ve":
        return Denoiser(edm_raw_net, "edm")

    def eps(x, t):
        level = schedule.alpha(float(t[0]))
        return posterior(x, math.sqrt(level), math.sqrt(1 - level))[0]
    return Denoiser(eps)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.description)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("method", ["DDIM", "DPM-Solver++2M", "UniPC-bh2", "Heun", "iPNDM", "DEIS"])
def test_every_method_and_grid_runs_on_every_schedule_as_its_reference_says(schedule, grid, method):
    """The fused plan against the method's reference: the schedule enters only through levels and the adapter,
    so what holds on the paper's table holds here."""
    model, x = exact_model(schedule), start()
    truth = sample(model, x, schedule, method, 8, "reference", True, timesteps=grid)
    agree(truth, sample(model, x, schedule, method, 8, "fused", True, timesteps=grid))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.description)
def test_runs_converge_to_the_exact_map_at_second_order(schedule):
    """Gaussian data: the probability-flow ODE maps the state at the first level affinely onto the data. The
    second-order solver's error falls at least 8x for 8x the steps and ends below 1e-3 on every family, which a
    wrong state factor, time input or velocity reading would not allow."""
    x, errors = start(), []
    for steps in (25, 200):
        level = schedule.alpha(make_grid(schedule, "logsnr", steps).times[0])
        exact = MU + STD * (x - math.sqrt(level) * MU) / math.sqrt(level * STD**2 + 1 - level)
        out = sample(exact_model(schedule), x, schedule, "DPM-Solver++2M", steps, "fused", timesteps="logsnr")
        errors.append(float((out - exact).abs().max()))
    assert errors[1] < errors[0] / 8 and errors[1] < 1e-3, errors


def test_flow_uniform_grid_is_diffusers_flow_sigmas_and_the_shift_is_sd3s():
    diffusers = pytest.importorskip("diffusers", exc_type=ImportError)
    for steps in (4, 10, 28):
        scheduler = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                          prediction_type="flow_prediction")
        scheduler.set_timesteps(steps)
        grid = make_grid(FLOW, "uniform", steps)
        assert np.allclose(grid.times, scheduler.sigmas.double().numpy(), rtol=0, atol=1e-7)
    assert shifted(0.5, 3.0) == 0.75 and shifted(0.3, 1.0) == 0.3
    assert flux_shift(256) == pytest.approx(math.exp(0.5)) and flux_shift(4096) == pytest.approx(math.exp(1.15))


# --- diffusers' flow and EDM schedulers, the same exact model outputs, float64 ---

diffusers_or_skip = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def run_flow_scheduler(scheduler, steps, x):
    """diffusers' loop with the exact velocity at its own (float32) sigmas, read in float64; returns (sigmas,
    states)."""
    scheduler.set_timesteps(steps)
    scheduler.sigmas = scheduler.sigmas.double()
    sigmas = [float(s) for s in scheduler.sigmas]
    states = [x]
    for i, t in enumerate(scheduler.timesteps):
        eps, x0 = posterior(states[-1], 1 - sigmas[i], sigmas[i])
        states.append(scheduler.step(eps - x0, t, states[-1]).prev_sample)
    return sigmas, [s.as_subclass(torch.Tensor) for s in states]


@diffusers_or_skip
@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("method,cls_name,settings", [
    ("DPM-Solver++2M", "DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
    ("DPM-Solver++3M", "DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=3)),
    ("UniPC-bh2", "UniPCMultistepScheduler", dict(solver_type="bh2", solver_order=3)),
    ("UniPC-bh2:order=2", "UniPCMultistepScheduler", dict(solver_type="bh2", solver_order=2)),
])
def test_flow_sigma_solvers_equal_diffusers(method, cls_name, settings, steps):
    """sample() on the flow schedule, a velocity network read through its adapter (SD3's time input, 1000 s),
    against diffusers' solver with use_flow_sigmas on the same times: every state to 1e-10."""
    diffusers = pytest.importorskip("diffusers", exc_type=ImportError)
    from accuracy_peers import KeepFloat64

    scheduler = getattr(diffusers, cls_name)(use_flow_sigmas=True, flow_shift=3.0,
                                             prediction_type="flow_prediction", **settings)
    x = start()
    sigmas, theirs = run_flow_scheduler(scheduler, steps, x.as_subclass(KeepFloat64))
    lower_final = steps < 15 if cls_name.startswith("DPM") else True
    if method == "DPM-Solver++2M" and lower_final:
        method = "DPM-Solver++2M:lower_order_final=true"
    if method == "DPM-Solver++3M" and not lower_final:
        method = "DPM-Solver++3M:lower_order_final=false"
    end = "zero" if sigmas[-1] == 0 else "min"
    times = sigmas if end == "min" else sigmas[:-1]
    model = Denoiser(velocity_net(1000.0), "flow", time_input="1000t")
    # diffusers starts from its latents as they are; our noise is the variance-preserving state, their latents
    # over the flow's factor 1 / (alpha + sigma) at the first level
    level = FLOW.alpha(times[0])
    first = math.sqrt(level) + math.sqrt(1 - level)
    ours = sample(model, x * first, FLOW, method, backend="torch", return_trajectory=True, timesteps=times,
                  end=end)
    agree(theirs, list(ours))


@diffusers_or_skip
def test_flow_match_euler_is_ddim_on_the_flow_schedule():
    """FlowMatchEulerDiscreteScheduler: x' = x + (s' - s) v. Its step computes in float32 by design (it casts the
    sample), so the whole loop agrees with ours to float32 rounding, and its formula in float64 on its own sigmas
    to 1e-10. Its default grid starts at s = 1, where no trace of the data is left in the state and a solver written
    in eps cannot start: it is given the flow schedule's uniform grid instead."""
    diffusers = pytest.importorskip("diffusers", exc_type=ImportError)
    steps, x = 8, start()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    unshifted = np.linspace(1 - 1 / 1000, 0, steps + 1)[:-1]
    scheduler.set_timesteps(sigmas=list(unshifted))  # it shifts them itself
    sigmas = [float(s) for s in scheduler.sigmas.double()]
    assert np.allclose(sigmas, make_grid(FLOW, "uniform", steps).times, rtol=0, atol=1e-7)
    theirs, euler = [x.float()], [x]
    for i, t in enumerate(scheduler.timesteps):
        eps, x0 = posterior(theirs[-1].double(), 1 - sigmas[i], sigmas[i])
        theirs.append(scheduler.step((eps - x0).float(), t, theirs[-1]).prev_sample)
        eps, x0 = posterior(euler[-1], 1 - sigmas[i], sigmas[i])
        euler.append(euler[-1] + (sigmas[i + 1] - sigmas[i]) * (eps - x0))
    level = FLOW.alpha(sigmas[0])
    noise = x * (math.sqrt(level) + math.sqrt(1 - level))
    ours = sample(Denoiser(velocity_net(), "flow"), noise, FLOW, "DDIM", backend="torch", return_trajectory=True,
                  timesteps=sigmas[:-1])
    agree(euler, list(ours))
    agree([s.double() for s in theirs], list(ours), 1e-6)


@diffusers_or_skip
@pytest.mark.parametrize("steps", [4, 12])
def test_edm_euler_is_ddim_with_edms_preconditioned_network(steps):
    """EDMEulerScheduler (Karras sigmas, sigma_data 0.5, c_in / c_noise / c_skip / c_out) on EDM's raw network
    against DDIM (Euler in sigma) on the EDM schedule's uniform grid with the "edm" adapter: the same times, and
    the same states to float32 rounding (its step casts to float32), and its formula in float64 to 1e-10."""
    diffusers = pytest.importorskip("diffusers", exc_type=ImportError)
    scheduler = diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=SIGMA_DATA)
    scheduler.set_timesteps(steps)
    sigmas = [float(s) for s in scheduler.sigmas.double()]
    assert np.allclose(sigmas, make_grid(EDM, "uniform", steps).times, rtol=1e-6, atol=0)
    x = start() * scheduler.init_noise_sigma
    theirs, euler = [x.float()], [x]
    for i, t in enumerate(scheduler.timesteps):
        model_in = scheduler.scale_model_input(theirs[-1], t)
        out = edm_raw_net(model_in.double(), torch.tensor([float(t)]))
        theirs.append(scheduler.step(out.float(), t, theirs[-1]).prev_sample)
        d = posterior(euler[-1], 1.0, sigmas[i])[1]
        euler.append(euler[-1] + (sigmas[i + 1] - sigmas[i]) * (euler[-1] - d) / sigmas[i])
    noise = x / math.sqrt(1 + sigmas[0] ** 2)  # the VE state over 1 / alpha
    ours = sample(Denoiser(edm_raw_net, "edm"), noise, EDM, "DDIM", backend="torch", return_trajectory=True,
                  timesteps=sigmas[:-1])
    agree(euler, list(ours))
    agree([s.double() for s in theirs], list(ours), 1e-5)


@diffusers_or_skip
@pytest.mark.parametrize("steps", [3, 10])
def test_heun_with_karras_sigmas_equals_diffusers_heun_on_the_edm_schedule(steps):
    """HeunDiscreteScheduler(use_karras_sigmas) keeps float64: our Heun on an EDM schedule at its sigmas, an eps
    network reading the VE state x0 + sigma eps, agrees with every completed step to 1e-10."""
    diffusers = pytest.importorskip("diffusers", exc_type=ImportError)
    scheduler = diffusers.HeunDiscreteScheduler(use_karras_sigmas=True)
    scheduler.set_timesteps(steps)
    scheduler.sigmas = scheduler.sigmas.double()
    sigmas = [float(s) for s in scheduler.sigmas]
    x = start() * scheduler.init_noise_sigma
    theirs, completed = [x], [x]
    for i, t in enumerate(scheduler.timesteps):
        sigma = float(scheduler.sigmas[scheduler.step_index if scheduler.step_index is not None else 0])
        model_in = scheduler.scale_model_input(theirs[-1], t)  # x / sqrt(sigma^2 + 1), the VP state
        level = 1 / (1 + sigma**2)
        eps = posterior(model_in, math.sqrt(level), math.sqrt(1 - level))[0]
        theirs.append(scheduler.step(eps, t, theirs[-1]).prev_sample)
        if scheduler.state_in_first_order:
            completed.append(theirs[-1])
    completed.append(theirs[-1])  # the last step, to sigma = 0, is Euler's alone: no second stage completes it
    unique = sorted(set(sigmas), reverse=True)
    schedule = EDMSchedule(sigma_min=unique[-2], sigma_max=unique[0])

    def net(x_ve, sigma):  # reads the VE state at time sigma (the EDM schedule's own time)
        s = float(sigma[0])
        return posterior(x_ve, 1.0, s)[0]

    noise = x / math.sqrt(1 + unique[0] ** 2)
    ours = sample(net, noise, schedule, "Heun", backend="torch", return_trajectory=True, timesteps=unique[:-1])
    agree(completed, list(ours))


# --- adapters and bad input ---

def test_guidance_folds_on_a_flow_model_as_the_guided_velocity():
    """Classifier-free guidance on a velocity: eps_u + w (eps_c - eps_u) is the guided velocity read as eps, since
    the reading is linear; the fused run equals the reference run of the guided network."""
    cond = {"shift": torch.tensor(0.2, dtype=torch.float64)}
    uncond = {"shift": torch.tensor(-0.1, dtype=torch.float64)}

    def net(x, t, shift):
        return velocity_net()(x, t) * (1 + shift) + shift

    def guided(x, t):
        return net(x, t, uncond["shift"]) + 1.7 * (net(x, t, cond["shift"]) - net(x, t, uncond["shift"]))

    x = start()
    ours = sample(Denoiser(net, "flow", cond=cond, uncond=uncond, guidance=1.7), x, FLOW, "UniPC-bh2", 6, "fused")
    truth = sample(Denoiser(guided, "flow"), x, FLOW, "UniPC-bh2", 6, "reference")
    agree([truth], [ours], 1e-12)
    # diffusers' guidance_rescale, not linear: mixed by the runner, the same on every backend
    rescaled = {backend: sample(Denoiser(net, "flow", cond=cond, uncond=uncond, guidance=1.7, guidance_rescale=0.5),
                                x, FLOW, "UniPC-bh2", 6, backend) for backend in ("reference", "torch", "fused")}
    agree([rescaled["reference"]] * 2, [rescaled["torch"], rescaled["fused"]], 1e-12)
    assert float((rescaled["fused"] - ours).norm()) > 1e-3


@pytest.mark.parametrize("prediction,schedule", [("flow", Schedule.from_config({"type": "linear"})),
                                                 ("flow", EDM), ("edm", FLOW), ("v", FLOW)])
def test_a_prediction_under_a_schedule_it_does_not_belong_to_is_refused(prediction, schedule):
    with pytest.raises(UserError, match="belongs to a"):
        sample(Denoiser(lambda x, t: x, prediction), start(), schedule, "DDIM", 4)


@pytest.mark.parametrize("bad,match", [
    (lambda: FlowSchedule(shift=0), "shift must be"),
    (lambda: EDMSchedule(sigma_min=2, sigma_max=1), "below sigma_max"),
    (lambda: VPSchedule("sigmoid"), "linear or cosine"),
    (lambda: make_grid(FLOW, "linspace", 5), "integer times of a discrete table"),
    (lambda: make_grid(FLOW, [0.5, 1.0]), r"outside|must be in"),
    (lambda: make_grid(EDM, "karras", 5, t_max=100.0), "grid bounds"),
    (lambda: Denoiser(lambda x, t: x, time_input="days"), "unknown time_input"),
    (lambda: schedule_from_config({"type": "flow", "shift": -1}), "shift"),
    (lambda: schedule_from_config({"type": "linear", "shift": 3}), "belongs to a rectified flow"),
])
def test_bad_family_input_is_one_line(bad, match):
    with pytest.raises(UserError, match=match) as error:
        bad()
    assert "\n" not in str(error.value)


def test_a_flow_config_gives_the_flow_schedule():
    schedule = schedule_from_config({"type": "flow", "shift": 3.0, "diffusion_step": 1000})
    assert isinstance(schedule, FlowSchedule) and schedule.shift == 3.0
    assert isinstance(schedule_from_config({"type": "linear"}), Schedule)


@diffusers_or_skip
def test_the_flow_study_runs_and_measures_against_the_exact_ode(tmp_path):
    """benchmarks/flow_mixture.py end to end in its smallest setting: every configuration's error is against the
    ODE's solution (planted: the truth from another start fails the tuned run's ratio), the page and the JSON are
    written."""
    pytest.importorskip("diffusers", exc_type=ImportError)
    import flow_mixture

    rows = flow_mixture.main(["--batch", "8", "--calls", "8", "--out", str(tmp_path), "--doc",
                              str(tmp_path / "page.md")], log=lambda text: None)
    for name in (flow_mixture.TUNED_ON, flow_mixture.HELD_OUT):
        assert rows[0][name]["ratio_tuned"] < 0.5 and rows[0][name]["peer_error"] < 0.5
    assert (tmp_path / "flow_mixture.json").exists() and "tuned" in (tmp_path / "page.md").read_text()
