"""The open engine: plans validated when built, time grids against their formulas, every method on every grid
against its float64 reference, model adapters (x0, v, guidance, diffusers), passes counted, threads."""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import in_threads, relative_l2
from torch.utils._python_dispatch import TorchDispatchMode

from pndm_fast import METHODS, Denoiser, Schedule, UserError, build_model, make_grid, ops, sample
from pndm_fast.lowering import lower
from pndm_fast.methods import build_plan
from mixture import MixtureEps, ring_2d
from pndm_fast.plans import EPS, STATE, Lin, ModelCall, Plan, PlanError, var

LINEAR = Schedule.from_config({"type": "linear", "beta_start": 1e-4, "beta_end": 2e-2, "diffusion_step": 1000})
COSINE = Schedule.from_config({"type": "cosine", "diffusion_step": 1000})
TINY_DDIM = {"Model": {"struc": "DDIM", "ch": 32, "out_ch": 1, "ch_mult": [1, 2], "num_res_blocks": 1,
                       "attn_resolutions": [4], "dropout": 0.0, "in_channels": 1, "image_size": 8,
                       "resamp_with_conv": True}}
GRIDS = [("uniform", None), ("quadratic", "zero"), ("logsnr", "zero"), ("karras", "min"), ("karras", "zero"),
         ((0, 40.5, 200, 600, 999), "zero")]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model(TINY_DDIM).eval().requires_grad_(False)
    model64 = copy.deepcopy(model).double()
    return model, model64, torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(7))


# Plans ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps,buffers,match", [
    (((ModelCall("x", 10, "e"), Lin("x", var("x") + var("f"))),), (("x", STATE), ("e", EPS)), "not declared"),
    (((Lin("x", var("x") + var("e")),),), (("x", STATE), ("e", EPS)), "before anything wrote it"),
    (((ModelCall("x", 10, "e"), Lin("e", var("x"))),), (("x", STATE), ("e", EPS)), "writes a state buffer"),
    (((ModelCall("x", 10, "x"),),), (("x", STATE), ("e", EPS)), "writes an eps buffer"),
    ((), (("x", EPS),), "state buffer named 'x'"),
])
def test_a_wrong_plan_fails_when_built_with_a_message_naming_it(steps, buffers, match):
    with pytest.raises(PlanError, match=match):
        Plan("broken", steps, buffers)


def test_a_plan_prints_its_whole_run():
    text = str(build_plan(LINEAR, "F-PNDM", 5))
    assert "F-PNDM on the uniform grid: 5 steps, 14 model calls" in text and "step 4:" in text
    assert "h0 = eps(x, t=800)" in text


# Grids against their formulas -----------------------------------------------------------------------------------

def test_alpha_is_the_table_at_integer_times_and_log_linear_between():
    table = LINEAR.alphas_cumprod.double().numpy()
    for t in (0, 1, 17, 500, 999):
        assert LINEAR.alpha(t) == table[t]
    assert LINEAR.alpha(-1) == 1.0
    assert LINEAR.alpha(17.25) == pytest.approx(math.exp(0.75 * math.log(table[17]) + 0.25 * math.log(table[18])),
                                                rel=1e-14)
    # the mixture's model reads its level with its own interpolation: both must agree, fractional times included
    mix = MixtureEps(ring_2d(), LINEAR)
    times = torch.tensor([-1.0, -0.5, 0.0, 3.7, 250.5, 998.9])
    assert np.allclose(np.exp(mix.log_level(times).numpy()), [LINEAR.alpha(float(t)) for t in times], rtol=1e-13)
    for t in (-0.5, 0.0, 3.7, 998.9):
        assert LINEAR.time_of(LINEAR.alpha(t)) == pytest.approx(t, abs=1e-9)


def _lam(a):
    return math.log(a / (1 - a))


@pytest.mark.parametrize("schedule", [LINEAR, COSINE])
@pytest.mark.parametrize("steps", [1, 5, 12])
def test_each_grid_spaces_its_times_by_its_own_formula(schedule, steps):
    n = schedule.num_steps
    quad = make_grid(schedule, "quadratic", steps, "min")
    v = np.linspace(1, 0, steps + 1)
    np.testing.assert_allclose(quad.times, (n - 1) * v**2, rtol=0, atol=1e-9)
    logsnr = make_grid(schedule, "logsnr", steps, "min")
    lams = [_lam(logsnr.level(t)) for t in logsnr.times]
    np.testing.assert_allclose(np.diff(lams), (lams[-1] - lams[0]) / steps, rtol=1e-7)
    karras = make_grid(schedule, "karras", steps, "min")
    roots = [((1 - a) / a) ** (1 / 14) for a in (karras.level(t) for t in karras.times)]
    np.testing.assert_allclose(np.diff(roots), (roots[-1] - roots[0]) / steps, rtol=1e-7)
    assert karras.level(karras.times[0]) == pytest.approx(float(schedule.alphas_cumprod[-1]), rel=1e-12)
    zero = make_grid(schedule, "karras", steps, "zero")
    assert zero.steps == steps and zero.times[-1] == -1 and zero.level(-1) == 1.0
    assert zero.times[-2] == (0 if steps > 1 else n - 1)  # the last call at t_min, or the only one at t_max


def test_an_explicit_list_is_called_largest_first_and_ends_at_the_data():
    grid = make_grid(LINEAR, [0, 10.5, 500, 999])
    assert grid.times == (999, 500, 10.5, 0, -1) and grid.level(-1) == 1.0
    assert make_grid(LINEAR, [0, 10.5, 500, 999], end="min").times == (999, 500, 10.5, 0)
    assert make_grid(LINEAR, [999, 500, 10.5, 0]).times == grid.times  # diffusers' order reads the same




@pytest.mark.parametrize("bad,match", [([5, 3, 4], "strictly increasing or strictly decreasing"), ([3, 3], "strictly"),
                                       ([0, 1000], r"\[0, 999\]"), ("spiral", "unknown time grid"),
                                       ([float("nan")], r"\[0, 999\]"), ([], "at least")])
def test_a_bad_grid_is_one_line(bad, match):
    with pytest.raises(UserError, match=match):
        make_grid(LINEAR, bad, 10)


# Every method on every grid -------------------------------------------------------------------------------------

@pytest.mark.parametrize("timesteps,end", GRIDS, ids=[str(g[0])[:9] + f"-{g[1]}" for g in GRIDS])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_on_every_grid_as_its_reference_step_says(tiny, method, timesteps, end):
    """float64 state: the lowered plan equals the method's reference step (written from its paper) to rounding."""
    _, model64, noise = tiny
    options = dict(timesteps=timesteps, end=end)
    with torch.no_grad():
        truth = sample(model64, noise.double(), LINEAR, method, 6, "reference", True, **options)
        ours = sample(model64, noise.double(), LINEAR, method, 6, "fused", True, **options)
    assert torch.isfinite(truth).all()
    for step in range(1, len(truth)):
        assert relative_l2(ours[step], truth[step]) < 1e-12, f"step {step}"


# Adapters -------------------------------------------------------------------------------------------------------

class Conditional(torch.nn.Module):
    """A tiny UNet plus a label-dependent shift: eps(x, t, y) = unet(x, t) + 0.1 * (y + 1) (y None -> 0)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, y=None):
        out = self.unet(x, t)
        if y is None:
            return out
        return out + 0.1 * (y.to(out.dtype) + 1).view(-1, 1, 1, 1)


class GuidedByHand(torch.nn.Module):
    """Classifier-free guidance computed by hand: two separate calls, combined in the run's dtype."""

    def __init__(self, net, labels, w):
        super().__init__()
        self.net, self.labels, self.w = net, labels, w

    def forward(self, x, t):
        eps_u = self.net(x, t, y=None)
        return eps_u + self.w * (self.net(x, t, y=self.labels) - eps_u)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("method", ["DDIM", "F-PNDM", "DPM-Solver++2M"])
def test_guidance_equals_two_separate_calls_combined_in_float64(tiny, method, batched):
    _, model64, noise = tiny
    net, labels = Conditional(model64), torch.tensor([0, 3, 7])
    uncond = {"y": torch.full((3,), -1)} if batched else {"y": None}  # y = -1 shifts by 0, like None
    guided = Denoiser(net, cond={"y": labels}, uncond=uncond, guidance=2.5)
    with torch.no_grad():
        truth = sample(GuidedByHand(net, labels, 2.5), noise.double(), LINEAR, method, 8, "reference", True)
        ours = sample(guided, noise.double(), LINEAR, method, 8, "fused", True)
        plain = sample(guided, noise.double(), LINEAR, method, 8, "reference", True)
    for step in range(1, len(truth)):
        assert relative_l2(ours[step], truth[step]) < 1e-12 and relative_l2(plain[step], truth[step]) < 1e-12


@pytest.mark.parametrize("method", ["DDIM", "F-PNDM", "iPNDM"])
def test_guided_float32_backends_stay_within_twice_the_float32_reference(tiny, method):
    model, model64, noise = tiny
    labels = torch.tensor([1, 2, 3])

    def guided(net):
        return Denoiser(Conditional(net), cond={"y": labels}, uncond={"y": torch.full((3,), -1)}, guidance=3.0)

    with torch.no_grad():
        truth = sample(guided(model64), noise.double(), LINEAR, method, 10, "reference", True)
        baseline = sample(guided(model), noise, LINEAR, method, 10, "reference", True)
        for backend in ("torch", "fused"):
            ours = sample(guided(model), noise, LINEAR, method, 10, backend, True)
            for step in range(1, len(truth)):
                limit = 2 * relative_l2(baseline[step], truth[step]) + 1e-7
                assert relative_l2(ours[step], truth[step]) <= limit, f"{backend}, step {step}"


class Reparametrised(torch.nn.Module):
    """The same network read as an x0 or a v predictor: x = sqrt(a) x0 + sqrt(1 - a) eps, v = sqrt(a) eps -
    sqrt(1 - a) x0, with a = ac[t] read from the float32 table at integer t (the DDIM grid's times)."""

    def __init__(self, net, kind):
        super().__init__()
        self.net, self.kind = net, kind
        self.table = LINEAR.alphas_cumprod.double()

    def forward(self, x, t):
        a = self.table[t.long()].to(x.dtype).view(-1, 1, 1, 1)
        eps = self.net(x, t)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return x0 if self.kind == "x0" else a.sqrt() * eps - (1 - a).sqrt() * x0


@pytest.mark.parametrize("kind", ["x0", "v"])
@pytest.mark.parametrize("method", ["DDIM", "iPNDM", "DPM-Solver++2M"])
def test_x0_and_v_models_sample_like_the_same_network_read_as_eps(tiny, kind, method):
    _, model64, noise = tiny
    with torch.no_grad():
        truth = sample(model64, noise.double(), LINEAR, method, 10, "reference", True)
        for backend in ("reference", "fused"):
            ours = sample(Denoiser(Reparametrised(model64, kind), prediction=kind), noise.double(), LINEAR, method,
                          10, backend, True)
            assert relative_l2(ours, truth) < 1e-10, backend


def test_a_diffusers_unet_samples_as_calling_it_directly():
    diffusers = pytest.importorskip("diffusers", exc_type=ImportError)
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 32),
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                 norm_num_groups=8).eval().double()

    class Direct(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, x, t):
            return self.unet(x, t).sample

    noise = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        truth = sample(Direct(), noise, LINEAR, "F-PNDM", 6, "reference", True)
        ours = sample(Denoiser.from_diffusers(unet), noise, LINEAR, "F-PNDM", 6, "fused", True)
    assert relative_l2(ours, truth) < 1e-12


# Passes over memory, model outputs, threads -------------------------------------------------------------------

class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


class Affine(torch.nn.Module):
    """eps = 0.1 x + 0.01 y: one multiply-add, so that the ops counted are the sampler's own."""

    def forward(self, x, t, y=None):
        out = x.mul(0.1)
        return out if y is None else out.add(y.view(-1, 1, 1, 1), alpha=0.01)


class CountingKernel:
    """Stands in for the C++ extension: counts the fused kernel's launches and runs them."""

    def __init__(self, module):
        self.module, self.launches = module, 0

    def __getattr__(self, name):
        return getattr(self.module, name)

    def lincomb(self, *args):
        self.launches += 1
        return self.module.lincomb(*args)


@pytest.mark.skipif(not ops.cpp_available(), reason="counts the C++ kernel's launches")
@pytest.mark.parametrize("method", ["DDIM", "iPNDM", "DPM-Solver++2M"])
def test_guidance_costs_no_extra_pass_over_memory(method, monkeypatch):
    """The guided eps is folded into the combination that consumes it: as many fused launches per run as
    without guidance, and no copy of an output (only the batched input x, 2x, is written before each call)."""
    kernel = CountingKernel(ops._C)
    monkeypatch.setattr(ops, "_C", kernel)  # before any runner binds its launches
    noise = torch.randn(2, 3, 4, 4)
    launches, copies = {}, {}
    for label, model in (("plain", Affine()),
                         ("guided", Denoiser(Affine(), cond={"y": torch.ones(2)}, uncond={"y": torch.zeros(2)},
                                             guidance=4.0))):
        sample(model, noise, LINEAR, method, 10, "fused", check_finite=False)  # runner built outside the count
        kernel.launches = 0
        with torch.no_grad(), CountOps() as mode:
            sample(model, noise, LINEAR, method, 10, "fused", check_finite=False)
        launches[label], copies[label] = kernel.launches, mode.counts.get("copy_", 0)
    assert launches["guided"] == launches["plain"] == 10
    # both copy the noise in; guided also writes the two halves of its 2B input before each of its 10 calls, and
    # loads the two halves of its conditioning (y) once per sample() call
    assert copies["plain"] + 2 * 10 + 2 == copies["guided"]


@pytest.mark.parametrize("bad,match", [
    (lambda x, t: (x,), "returned a tuple"),
    (lambda x, t: x[:1], r"returned shape \(1, 3, 4, 4\)"),
    (lambda x, t: x.sum(), r"returned shape \(\)"),
    (lambda x, t: x.mean(dim=(2, 3), keepdim=True), r"nothing is broadcast"),
    (lambda x, t: x.to(torch.int32), "int32"),
])
def test_a_model_output_of_the_wrong_kind_is_one_line(bad, match):
    with pytest.raises(UserError, match=match):
        sample(bad, torch.randn(2, 3, 4, 4), LINEAR, "DDIM", 3, "fused")


def test_the_default_backend_is_the_fast_path(tiny):
    model, _, noise = tiny
    with torch.no_grad():
        assert torch.equal(sample(model, noise, LINEAR, "F-PNDM", 5), sample(model, noise, LINEAR, "F-PNDM", 5,
                                                                               "fused"))


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_threads_sampling_one_model_get_their_own_results(tiny, backend):
    model, _, _ = tiny
    noises = [torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    with torch.no_grad():
        alone = [sample(model, n, LINEAR, "F-PNDM", 6, backend) for n in noises]

    def work(i):
        with torch.no_grad():
            return sample(model, noises[i], LINEAR, "F-PNDM", 6, backend)

    results = in_threads(work, 6)
    for i in range(6):
        assert torch.equal(results[i], alone[i]), f"thread {i}"


def test_lowering_pairs_a_stored_value_with_the_update_that_reads_it():
    """DPM-Solver++(2M) writes x0 and the next x in one launch, except on the last step (x0 no longer needed)."""
    program = lower(build_plan(LINEAR, "DPM-Solver++2M", 5), Denoiser(Affine()), LINEAR)
    assert program.launches == 5
    assert all(step[-1].out2 for step in program.steps[:-1]) and program.steps[-1][-1].out2 is None
