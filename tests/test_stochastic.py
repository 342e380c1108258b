"""The stochastic samplers: fresh noise as a plan operand, counter-based per image and step, and each method against
diffusers' scheduler fed the same noise (float64, exact eps, every step to 1e-10) and against the other methods'
references where the mathematics says they coincide."""

import math

import pytest
import torch

from pndm_fast import Schedule, UserError, sample
from pndm_fast.grids import MODEL, TimeGrid, make_grid
from pndm_fast.levels import Level
from pndm_fast.methods import METHODS, method_record
from pndm_fast.noise import step_noise
from pndm_fast.sampling import resolve_run
from pndm_fast.tuning.search import method_variants

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 warnings inside diffusers
MU, STD = 0.4, 0.5  # data x0 ~ N(MU, STD^2) elementwise: eps has a closed form
TOL = 1e-10
LINEAR = Schedule.from_config({"type": "linear", "beta_start": 1e-4, "beta_end": 0.02, "diffusion_step": 1000})
STOCHASTIC = ("DDIM:eta=1", "DDIM:eta=0.3", "Euler-a", "Euler-a:eta=0.5,s_noise=1.2", "DPM-Solver++2S-a",
              "DPM-Solver++2S-a:eta=0.4,s_noise=1.1", "DPM-Solver++2M-SDE",
              "DPM-Solver++2M-SDE:order=1")
THRESHOLDED = ("UniPC-bh2:threshold=0.9,max_value=1.2", "DPM-Solver++2M-SDE:threshold=0.995")


def exact_eps(x, ac):
    alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
    return sigma * (x - alpha * MU) / (alpha**2 * STD**2 + sigma**2)


def model_on(schedule):
    def model(x, t):
        return exact_eps(x, torch.tensor(schedule.alpha(float(t[0])), dtype=torch.float64))
    return model


def start(batch=3):
    return torch.randn(batch, 2, 4, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 1.2


def agree(theirs, ours):
    assert len(theirs) == len(ours)
    for i, (a, b) in enumerate(zip(theirs, ours)):
        rel = float((a - b).norm() / b.norm())
        assert rel < TOL, f"state {i}: relative difference {rel:.2e}"


@pytest.mark.parametrize("method", STOCHASTIC + THRESHOLDED)
def test_every_backend_equals_the_reference_with_the_same_draws(method):
    x = start()
    ours = {backend: sample(model_on(LINEAR), x, LINEAR, method, 8, backend, timesteps="logsnr", seed=11,
                            return_trajectory=True) for backend in ("reference", "torch", "fused")}
    agree(list(ours["reference"]), list(ours["torch"]))
    agree(list(ours["reference"]), list(ours["fused"]))
    # float32: the fused kernel (cpp here) reads the float32 draws as one more operand
    f32 = {b: sample(model_on(LINEAR), x.float(), LINEAR, method, 8, b, timesteps="logsnr", seed=11)
           for b in ("reference", "fused")}
    assert torch.allclose(f32["fused"].double(), ours["reference"][-1], atol=1e-4)
    assert torch.allclose(f32["fused"], f32["reference"], atol=1e-4)


def test_the_noise_changes_the_sample_and_the_seed_changes_the_noise():
    x = start()
    a, b = (sample(model_on(LINEAR), x, LINEAR, "Euler-a", 8, "torch", seed=s) for s in (1, 2))
    deterministic = sample(model_on(LINEAR), x, LINEAR, "DDIM", 8, "torch")
    assert (a - b).abs().max() > 1e-2 and (a - deterministic).abs().max() > 1e-2
    assert torch.equal(a, sample(model_on(LINEAR), x, LINEAR, "Euler-a", 8, "torch", seed=1))


@pytest.mark.parametrize("backend", ["reference", "torch", "fused"])
def test_an_image_depends_on_its_seed_and_index_not_its_batch(backend):
    x = start(4)
    whole = sample(model_on(LINEAR), x, LINEAR, "DPM-Solver++2M-SDE", 6, backend, seed=3, indices=[10, 11, 12, 13])
    for row in range(4):
        alone = sample(model_on(LINEAR), x[row:row + 1], LINEAR, "DPM-Solver++2M-SDE", 6, backend, seed=3,
                       indices=[10 + row])
        assert torch.equal(alone, whole[row:row + 1])
    # draw k of image i is (seed, i, k) only: the 6-step run's draws start with the 3-step run's
    assert torch.equal(step_noise(3, [12], 2, (2, 4, 1)), step_noise(3, [12], 5, (2, 4, 1))[:2])


def test_three_papers_give_one_first_order_sampler():
    """DDIM at eta = 1 (Song et al., eq. 12), Euler ancestral (k-diffusion, in rho) and SDE-DPM-Solver++ of order 1
    (Lu et al., in lambda) are all the DDPM posterior step: three references, written apart, agree."""
    x = start()
    runs = [sample(model_on(LINEAR), x, LINEAR, m, 7, "reference", timesteps="quadratic", seed=4,
                   return_trajectory=True) for m in ("DDIM:eta=1", "Euler-a", "DPM-Solver++2M-SDE:order=1")]
    agree(list(runs[0]), list(runs[1]))
    agree(list(runs[0]), list(runs[2]))


@pytest.mark.parametrize("steps", [3, 6])
def test_dpm_2s_at_eta_0_is_diffusers_singlestep_second_order(steps):
    """DPM-Solver++(2S) ancestral without noise is the paper's DPM-Solver++(2S) with r = 1/2, which diffusers'
    DPMSolverSinglestepScheduler (order 2) computes when every other sigma of its grid is the geometric mean of its
    neighbours: every completed step but the last (Euler's here) to 1e-10, on a grid ending at t_min."""
    diffusers = pytest.importorskip("diffusers", exc_type=ImportError)
    from accuracy_peers import KeepFloat64

    grid = make_grid(LINEAR, "logsnr", steps, "min")
    rhos = [Level.of(grid.level(t)).rho for t in grid.times]
    sigmas = [s for a, b in zip(rhos, rhos[1:]) for s in (a, math.sqrt(a * b))] + [rhos[-1]]
    scheduler = diffusers.DPMSolverSinglestepScheduler(solver_order=2, algorithm_type="dpmsolver++",
                                                       lower_order_final=False, final_sigmas_type="sigma_min")
    scheduler.set_timesteps(2 * steps)
    scheduler.sigmas = torch.tensor(sigmas, dtype=torch.float64)
    x = start()
    theirs = [x.as_subclass(KeepFloat64)]
    for i, t in enumerate(scheduler.timesteps):
        eps = exact_eps(theirs[-1].as_subclass(torch.Tensor), torch.tensor(1 / (1 + sigmas[i] ** 2),
                                                                          dtype=torch.float64))
        theirs.append(scheduler.step(eps, t, theirs[-1]).prev_sample)
    ours = sample(model_on(LINEAR), x, LINEAR, "DPM-Solver++2S-a:eta=0", timesteps=grid, backend="torch",
                  return_trajectory=True)
    agree([s.as_subclass(torch.Tensor) for s in theirs[::2]][:-1], list(ours)[:-1])


def test_dpm_2s_ancestral_without_noise_is_second_order():
    """At eta = 0, on Gaussian data, the error to the probability-flow ODE's exact map falls at least 30x for 8x
    the steps."""
    x, errors = start(), []
    for steps in (10, 80):
        level = LINEAR.alpha(999.0)
        exact = MU + STD * (x - math.sqrt(level) * MU) / math.sqrt(level * STD**2 + 1 - level)
        out = sample(model_on(LINEAR), x, LINEAR, "DPM-Solver++2S-a:eta=0", steps, "fused", timesteps="logsnr")
        errors.append(float((out - exact).abs().max()))
    assert errors[1] < errors[0] / 30, errors


def test_options_and_what_the_tuner_sees():
    assert method_record("DDIM:eta=0") is METHODS["DDIM"]
    assert method_record("DDIM:eta=1.0").name == "DDIM:eta=1"
    for bad in ("DDIM:eta=2", "DDIM:eta=x", "Euler-a:s_noise=-1"):
        with pytest.raises(UserError, match="is not one of"):
            method_record(bad)
    _, _, plan = resolve_run(LINEAR, "Euler-a", 5, timesteps="logsnr")
    assert plan.draws == 4  # no noise on the step to the data
    assert resolve_run(LINEAR, "DDIM", 5)[2].draws == 0
    variants = method_variants()
    assert not any(v.startswith(("Euler-a", "DPM-Solver++2M-SDE", "DPM-Solver++2S-a")) or "eta" in v
                   for v in variants)
    with pytest.raises(UserError, match="seed must be"):
        sample(model_on(LINEAR), start(), LINEAR, "Euler-a", 5, "torch", seed=-1)
    with pytest.raises(UserError, match="indices must be"):
        sample(model_on(LINEAR), start(), LINEAR, "Euler-a", 5, "torch", seed=1, indices=[0, 1])


def test_a_run_is_a_function_of_its_arguments():
    x = start()
    assert torch.equal(sample(model_on(LINEAR), x, LINEAR, "Euler-a", 5, "torch"),
                       sample(model_on(LINEAR), x, LINEAR, "Euler-a", 5, "torch", seed=0))


# ---------------------------------------------------------------- diffusers, fed the same noise

class TestDiffusers:
    @pytest.fixture(autouse=True)
    def _diffusers(self):
        self.d = pytest.importorskip("diffusers", exc_type=ImportError)
        from accuracy_peers import KeepFloat64
        self.keep = KeepFloat64

    def schedule_of(self, scheduler) -> Schedule:
        schedule = Schedule(scheduler.betas.double().numpy())
        assert torch.equal(schedule.alphas_cumprod, scheduler.alphas_cumprod)
        return schedule

    def shared_grid(self, schedule, scheduler) -> TimeGrid:
        """Our grid on diffusers' time steps, then to sigma = 0 (t = -1); the scheduler's sigmas are set to our
        levels' in float64, so both run on the same levels: its own are float32 (4e-8 apart) and, between integer
        times, interpolated linearly in sigma where the schedule interpolates log ac (1e-5 apart)."""
        grid = TimeGrid(schedule, (*(float(t) for t in scheduler.timesteps), -1.0), MODEL, "diffusers")
        ours = torch.tensor([((1 - a) / a) ** 0.5 for a in map(grid.level, grid.times)], dtype=torch.float64)
        assert torch.allclose(ours, scheduler.sigmas.double(), rtol=1e-4)  # the same times
        scheduler.sigmas = ours
        return grid

    @pytest.mark.parametrize("steps", [5, 20])
    @pytest.mark.parametrize("eta", [0.5, 1.0])
    @pytest.mark.parametrize("backend", ["reference", "torch"])
    def test_ddim_eta(self, eta, steps, backend):
        scheduler = self.d.DDIMScheduler(clip_sample=False)
        scheduler.set_timesteps(steps)
        schedule = self.schedule_of(scheduler)
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
        x = start()
        ours = sample(model_on(schedule), x, schedule, f"DDIM:eta={eta}", backend=backend, return_trajectory=True,
                      timesteps=sorted(int(t) for t in scheduler.timesteps), seed=9)
        draws = step_noise(9, range(3), steps - 1, (2, 4, 1)).double()
        theirs = [x]
        for k, t in enumerate(scheduler.timesteps):  # its last step, to ac = 1, has variance 0
            z = draws[k] if k < steps - 1 else torch.zeros_like(x)
            eps = exact_eps(theirs[-1], scheduler.alphas_cumprod[t])
            theirs.append(scheduler.step(eps, t, theirs[-1], eta=eta, variance_noise=z).prev_sample)
        agree(theirs, list(ours))

    @pytest.mark.parametrize("steps", [4, 10, 25])
    @pytest.mark.parametrize("backend", ["reference", "torch"])
    def test_euler_ancestral(self, steps, backend, monkeypatch):
        import diffusers.schedulers.scheduling_euler_ancestral_discrete as module

        scheduler = self.d.EulerAncestralDiscreteScheduler()
        scheduler.set_timesteps(steps)
        schedule = self.schedule_of(scheduler)
        times = self.shared_grid(schedule, scheduler)
        x = start()
        ours = sample(model_on(schedule), x, schedule, "Euler-a", backend=backend, return_trajectory=True,
                      timesteps=times, seed=2)
        draws = iter(step_noise(2, range(3), steps - 1, (2, 4, 1)).double())
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: next(draws, torch.zeros(shape)))
        sigmas = scheduler.sigmas
        state = (x / (1.0 / (1.0 + sigmas[0] ** 2)).sqrt()).as_subclass(self.keep)  # its x is ours / alpha
        theirs = [state]
        for i, t in enumerate(scheduler.timesteps):
            eps = exact_eps(scheduler.scale_model_input(theirs[-1], t), 1.0 / (1.0 + sigmas[i] ** 2))
            theirs.append(scheduler.step(eps, t, theirs[-1]).prev_sample)
        alphas = (1.0 / (1.0 + sigmas**2)).sqrt()
        agree([s.as_subclass(torch.Tensor) * a for s, a in zip(theirs, alphas)], list(ours))

    @pytest.mark.parametrize("steps", [5, 10, 20])
    @pytest.mark.parametrize("order", [1, 2])
    @pytest.mark.parametrize("backend", ["reference", "torch"])
    def test_sde_dpm_solver_pp(self, order, steps, backend):
        scheduler = self.d.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=order)
        scheduler.set_timesteps(steps)
        schedule = self.schedule_of(scheduler)
        times = self.shared_grid(schedule, scheduler)
        x = start()
        # its lower_order_final acts only below 15 steps; the step to sigma = 0 is first order either way
        method = f"DPM-Solver++2M-SDE:order={order},lower_order_final={str(steps < 15).lower()}"
        ours = sample(model_on(schedule), x, schedule, method_record(method), backend=backend,
                      return_trajectory=True, timesteps=times, seed=6)
        # its step casts the noise to float32 (the noise term would then be computed in float32): kept float64
        draws = step_noise(6, range(3), steps - 1, (2, 4, 1)).double().as_subclass(self.keep)
        theirs = [x.as_subclass(self.keep)]
        for k, t in enumerate(scheduler.timesteps):
            z = draws[k] if k < steps - 1 else torch.zeros_like(x).as_subclass(self.keep)
            eps = exact_eps(theirs[-1], 1.0 / (1.0 + scheduler.sigmas[k] ** 2))
            theirs.append(scheduler.step(eps, t, theirs[-1], variance_noise=z).prev_sample)
        agree([s.as_subclass(torch.Tensor) for s in theirs], list(ours))

    @pytest.mark.parametrize("steps", [5, 12])
    @pytest.mark.parametrize("cls_name,method", [("DPMSolverMultistepScheduler", "DPM-Solver++2M"),
                                                 ("UniPCMultistepScheduler", "UniPC-bh2")])
    @pytest.mark.parametrize("backend", ["reference", "torch"])
    def test_dynamic_thresholding(self, cls_name, method, steps, backend):
        """Imagen's dynamic thresholding of the data prediction as diffusers applies it (thresholding=True,
        ratio 0.995, sample_max_value 1.5), float64, every step; and it changes the run."""
        scheduler = getattr(self.d, cls_name)(thresholding=True, dynamic_thresholding_ratio=0.995,
                                              sample_max_value=1.5, solver_order=2)
        scheduler.set_timesteps(steps)
        schedule = self.schedule_of(scheduler)
        grid = self.shared_grid(schedule, scheduler)
        x = start() * 2  # data and noise large enough that the quantile passes 1
        # diffusers' lower_order_final: DPMSolverMultistep's below 15 steps only, UniPC's at any count
        name = {"DPM-Solver++2M": f"DPM-Solver++2M:lower_order_final={str(steps < 15).lower()}",
                "UniPC-bh2": "UniPC-bh2:order=2"}[method]
        options = ",threshold=0.995,max_value=1.5"
        ours = sample(model_on(schedule), x, schedule, method_record(name + options), backend=backend,
                      return_trajectory=True, timesteps=grid)
        theirs = [x.as_subclass(self.keep)]
        for k, t in enumerate(scheduler.timesteps):
            eps = exact_eps(theirs[-1], 1.0 / (1.0 + scheduler.sigmas[k] ** 2))
            theirs.append(scheduler.step(eps, t, theirs[-1]).prev_sample)
        agree([s.as_subclass(torch.Tensor) for s in theirs], list(ours))
        plain = sample(model_on(schedule), x, schedule, method_record(name), backend=backend, timesteps=grid)
        assert (plain - ours[-1]).abs().max() > 1e-3
