"""img2img, inpainting and the per-step callback, against diffusers' own pipeline code (its img2img
`get_timesteps`, its inpainting blend, its scheduler's add_noise and step) and against the float64 reference."""

import ast
import importlib.util
import os
import types

import pytest
import torch

from pndm_fast import Denoiser, Schedule, UserError, build_plan, engine, make_grid, ops, sample, sampling
from pndm_fast.editing import masked_plan, strength_grid
from pndm_fast.lowering import Launch, lower
from pndm_fast.methods import METHODS
from pndm_fast.plans import Blend

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 warnings inside diffusers
MU, STD = 0.4, 0.5
LINEAR = Schedule.from_config({"type": "linear", "beta_start": 1e-4, "beta_end": 0.02, "diffusion_step": 1000})


def exact_eps(x, ac):
    ac = torch.as_tensor(ac, dtype=torch.float64)
    alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
    return sigma * (x - alpha * MU) / (alpha**2 * STD**2 + sigma**2)


def model_on(schedule):
    def model(x, t):
        return exact_eps(x, schedule.alpha(float(t[0])))
    return model


def inputs():
    gen = torch.Generator().manual_seed(8)
    noise = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=gen)
    image = torch.rand(2, 1, 4, 4, dtype=torch.float64, generator=gen) * 2 - 1
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    mask[..., :, :2] = 1  # repaint the left half, keep the right
    return noise, image, mask


def test_img2img_runs_the_tail_of_the_grid_from_the_noised_image():
    noise, image, _ = inputs()
    for method, steps, strength, calls in (("DDIM", 10, 0.5, 5), ("DPM-Solver++2M", 10, 0.35, 3),
                                           ("UniPC-bh2", 7, 1.0, 7)):
        seen = []

        def model(x, t):
            seen.append(float(t[0]))
            return exact_eps(x, LINEAR.alpha(float(t[0])))

        grid = make_grid(LINEAR, "logsnr", steps)
        out = {b: sample(model, noise, LINEAR, method, steps, b, timesteps="logsnr", init_image=image,
                         strength=strength, return_trajectory=True) for b in ("reference", "torch")}
        assert len(seen) == 2 * calls  # both backends: floor(steps x strength) calls each
        assert seen[:calls] == pytest.approx(grid.times[steps - calls:-1], rel=1e-6)  # t reaches the model in float32
        assert torch.allclose(out["reference"], out["torch"], rtol=0, atol=1e-12)
        first = LINEAR.alpha(grid.times[steps - calls])
        expected = noise if strength == 1 else first**0.5 * image + (1 - first) ** 0.5 * noise
        assert torch.allclose(out["torch"][0], expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("timesteps", ["uniform", "logsnr"])
def test_inpainting_keeps_the_kept_pixels_exactly(timesteps):
    """Whatever the grid's last level (the paper's uniform grid ends at ac[0] < 1), the last blend is the image."""
    noise, image, mask = inputs()
    for method in ("DDIM", "F-PNDM", "Euler-a"):
        out = sample(model_on(LINEAR), noise, LINEAR, method, 10, "fused", timesteps=timesteps, init_image=image,
                     mask=mask)
        assert torch.equal(out[..., 2:], image[..., 2:])
        assert (out[..., :2] - image[..., :2]).abs().max() > 0.1  # the repainted half is the model's
        # the blend is a plan entry: the plain-torch plan gives the fused run's images
        torch_out = sample(model_on(LINEAR), noise, LINEAR, method, 10, "torch", timesteps=timesteps,
                           init_image=image, mask=mask)
        assert torch.allclose(torch_out, out, rtol=0, atol=1e-12)


def test_the_masked_plan_blends_after_every_step_and_keeps_the_image_last():
    grid = make_grid(LINEAR, "logsnr", 4)
    plan = masked_plan(build_plan(LINEAR, "DDIM", 4, timesteps="logsnr"), grid)
    blends = [step[-1] for step in plan.steps]
    assert all(isinstance(b, Blend) and b.buf == "x" for b in blends) and plan.masked
    levels = [grid.level(t) for t in grid.times[1:-1]] + [1.0]
    assert [b.image_weight for b in blends] == pytest.approx([v ** 0.5 for v in levels], rel=1e-15)
    assert [b.noise_weight for b in blends] == pytest.approx([(1 - v) ** 0.5 for v in levels], abs=1e-15)


def guided_on(schedule):
    """A guided denoiser whose two branches differ: its combinations read twice the operands, so the lowering pairs
    them differently (UniPC's corrected state becomes the launch's second output)."""
    def net(x, t, y):
        return exact_eps(x, schedule.alpha(float(t[0]))) + 0.05 * y
    return Denoiser(net, cond={"y": 1.0}, uncond={"y": -1.0}, guidance=1.5)


def soft_inputs():
    """inputs() with a column of the repainted half at mask 0.25: every term of the blend shows in every state."""
    noise, image, mask = inputs()
    mask[..., 1] = 0.25
    return noise, image, mask


def blend_after_each_step(grid, image, noise, mask):
    """Inpainting's blend written here from diffusers' convention and applied through the callback after each step
    of a run without a mask: the kept pixels become the image noised to the step's level, the image itself after
    the last step. The reference that the plan's blend, folded into the fused pass, is judged against."""
    def blend(i, t, x, x0):
        level = 1.0 if i == grid.steps - 1 else grid.level(t)
        known = level ** 0.5 * image + (1 - level) ** 0.5 * noise
        x.copy_(mask * x + (1 - mask) * known.to(x.dtype))
    return blend


@pytest.mark.parametrize("method, guided", [("DDIM", False), ("F-PNDM", False), ("UniPC-bh2", True),
                                            ("Heun", True), ("DPM-Solver++2M-SDE", False), ("DDIM:eta=1", True)])
def test_the_blend_folded_into_the_fused_pass_is_the_blend_after_each_step(method, guided):
    """Every state of the run: float64 on the plain-torch plan to 1e-12, float32 on the C++ kernel to float32
    rounding (and the kept pixels exactly the image at the end), against the blend applied after each step of an
    unmasked run. The guided cases blend the kernel's second output, swapped to the first. Fails when the kernel
    leaves out a term of the blend, or the lowering blends the wrong output or swaps only some of a launch's
    weights."""
    noise, image, mask = soft_inputs()
    model = guided_on(LINEAR) if guided else model_on(LINEAR)
    grid = make_grid(LINEAR, "logsnr", 8)
    want = sample(model, noise, LINEAR, method, 8, "torch", timesteps="logsnr", seed=3, return_trajectory=True,
                  callback=blend_after_each_step(grid, image, noise, mask))
    got = sample(model, noise, LINEAR, method, 8, "torch", timesteps="logsnr", seed=3, init_image=image, mask=mask,
                 return_trajectory=True)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    if not ops.cpp_available():
        return
    got32 = sample(model, noise.float(), LINEAR, method, 8, "cpp", timesteps="logsnr", seed=3,
                   init_image=image.float(), mask=mask.float(), return_trajectory=True)
    assert (got32.double() - want).abs().max() < 2e-5
    assert torch.equal(got32[-1, ..., 2:], image.float()[..., 2:])


@pytest.mark.parametrize("method", ["UniPC-bh2", "DPM-Solver++2S-a"])
def test_the_triton_kernel_blends_as_the_float64_plan(method, monkeypatch):
    """The Triton kernel's blend, in its interpreter on float32 tensors, against the plain-torch plan in float64."""
    if not ops.triton_available():
        pytest.skip("triton did not import")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    noise, image, mask = soft_inputs()
    runs = {backend: sample(guided_on(LINEAR), noise.to(dtype), LINEAR, method, 6, backend, seed=1,
                            init_image=image.to(dtype), mask=mask.to(dtype), return_trajectory=True)
            for backend, dtype in (("triton", torch.float32), ("torch", torch.float64))}
    assert (runs["triton"].double() - runs["torch"]).abs().max() < 2e-5
    assert torch.equal(runs["triton"][-1, ..., 2:], image.float()[..., 2:])


def test_every_method_blends_inside_its_fused_pass():
    """Inpainting costs no pass of its own: with every registered method and every kind of denoiser, the masked
    plan lowers to as many launches as the plain one, and none of its blends is left outside a launch."""
    grid = make_grid(LINEAR, "logsnr", 10)
    denoisers = [Denoiser(lambda x, t: x), Denoiser(lambda x, t: x, prediction="x0"),
                 Denoiser(lambda x, t, y: x, cond={"y": 1}, uncond={"y": 0}, guidance=2.0)]
    for name in list(METHODS) + ["DPM-Solver++2M:threshold=0.995"]:
        plan = build_plan(LINEAR, name, 10, timesteps="logsnr")
        for denoiser in denoisers:
            plain, masked = (lower(p, denoiser, LINEAR) for p in (plan, masked_plan(plan, grid)))
            blended = [op.blend for step in masked.steps for op in step if isinstance(op, Launch) and op.blend]
            left = [op for step in masked.steps for op in step if isinstance(op, Blend)]
            assert masked.launches == plain.launches and len(blended) == 10 and not left, (name, denoiser.outputs)
            assert masked.masked and not plain.masked


def test_bad_editing_input_gets_one_line():
    noise, image, mask = inputs()
    cases = [(dict(init_image=image, strength=0.05), "runs no step"),
             (dict(init_image=image, strength=1.5), "strength must be"),
             (dict(strength=0.5), "give init_image"),
             (dict(init_image=image[:, :, :2]), "does not broadcast"),
             (dict(init_image=image, mask=torch.ones(3, 1, 4, 4, dtype=torch.float64)), "does not broadcast"),
             (dict(callback=3), "callback must be callable")]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            sample(model_on(LINEAR), noise, LINEAR, "DDIM", 10, "torch", **kwargs)
    with pytest.raises(UserError, match="backend 'reference' runs a method's own formulas and has no blend"):
        sample(model_on(LINEAR), noise, LINEAR, "DDIM", 10, "reference", init_image=image, mask=mask)


def test_the_callback_sees_every_step_and_the_data_prediction_and_may_steer():
    noise, _, _ = inputs()
    seen = []
    traj = sample(model_on(LINEAR), noise, LINEAR, "DPM-Solver++2M", 6, "torch", timesteps="logsnr",
                  return_trajectory=True, callback=lambda i, t, x, x0: seen.append((i, t, x.clone(), x0.clone())))
    grid = make_grid(LINEAR, "logsnr", 6)
    assert [(i, t) for i, t, _, _ in seen] == list(enumerate(grid.times[1:]))
    for i, t, x, x0 in seen:
        assert torch.equal(x, traj[i + 1])
        ac = torch.tensor(grid.level(grid.times[i]), dtype=torch.float64)
        eps = model_on(LINEAR)(traj[i], torch.tensor([grid.times[i]], dtype=torch.float64))  # float64 time, as run
        expected = (traj[i] - (1 - ac).sqrt() * eps) / ac.sqrt()
        assert torch.allclose(x0, expected, rtol=0, atol=1e-12)

    def zero_after_first(i, t, x, x0):
        if i == 0:
            x.zero_()

    # DDIM keeps no history: once the callback zeroes the state, the noise no longer matters
    steered = [sample(model_on(LINEAR), n, LINEAR, "DDIM", 6, "fused", callback=zero_after_first)
               for n in (noise, 2 * noise)]
    assert torch.equal(steered[0], steered[1])
    assert (steered[0] - sample(model_on(LINEAR), noise, LINEAR, "DDIM", 6, "fused")).abs().max() > 0.01


class StandInGraph:
    """In place of a CUDA graph: runs what it captures once, at capture, and again at each replay."""

    def __init__(self, fn, pool=None):
        self.fn = fn
        fn()

    def replay(self):
        self.fn()


@pytest.mark.parametrize("method", ["F-PNDM", "DPM-Solver++2M-SDE"])
def test_the_graph_backends_python_with_a_stand_in_for_cuda_graphs(method, monkeypatch):
    """The graph backend's own logic, run on the CPU with capture replaced by StandInGraph (the CUDA test holds real
    graphs to the same): the whole-loop graph, and with a callback one graph per step, the callback between two
    replays reading the static copy of the step's last forward, the trajectory kept after it. Both give the eager
    fused run's states, and the callback sees the same states and data predictions and steers the run alike.
    Fails when a step's callback reads another step's forward, or the trajectory is kept before the callback."""
    monkeypatch.setattr(engine, "captured", StandInGraph)
    monkeypatch.setattr(engine, "warm_up", lambda runner: runner.walk())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(sampling, "resolve_backend", lambda backend, device: backend)
    noise, _, _ = inputs()
    model = guided_on(LINEAR)

    def run(backend, steer):
        seen = []

        def callback(i, t, x, x0):
            seen.append((i, t, x.clone(), x0.clone()))
            if i == 1:
                x.mul_(0.5)

        out = sample(model, noise, LINEAR, method, 6, backend, True, timesteps="logsnr", seed=4,
                     callback=callback if steer else None)
        return out, seen

    for steer in (False, True):
        want, seen_eager = run("fused", steer)
        got, seen = run("graph", steer)
        assert torch.equal(got, want)
        assert [(i, t) for i, t, _, _ in seen] == [(i, t) for i, t, _, _ in seen_eager]
        for (_, _, x, x0), (_, _, x_eager, x0_eager) in zip(seen, seen_eager):
            assert torch.equal(x, x_eager) and torch.equal(x0, x0_eager)


class TestDiffusers:
    @pytest.fixture(autouse=True)
    def _diffusers(self):
        self.d = pytest.importorskip("diffusers", exc_type=ImportError)

    def get_timesteps(self, scheduler, steps, strength):
        """diffusers' StableDiffusionImg2ImgPipeline.get_timesteps, its own source (the pipeline class itself
        needs transformers to import)."""
        spec = importlib.util.find_spec("diffusers")
        path = os.path.join(os.path.dirname(spec.origin), "pipelines", "stable_diffusion",
                            "pipeline_stable_diffusion_img2img.py")
        tree = ast.parse(open(path, encoding="utf-8").read())
        node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "get_timesteps")
        namespace = {}
        exec(compile(ast.Module([node], []), path, "exec"), namespace)
        scheduler.set_timesteps(steps)
        timesteps, calls = namespace["get_timesteps"](types.SimpleNamespace(scheduler=scheduler), steps, strength,
                                                      "cpu")
        return [int(t) for t in timesteps], calls

    @pytest.mark.parametrize("strength", [0.3, 0.55, 0.8, 1.0])
    @pytest.mark.parametrize("steps", [7, 10, 25])
    @pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
    @pytest.mark.parametrize("cls_name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
    def test_img2img_times_are_the_pipelines(self, cls_name, spacing, steps, strength):
        # the named grids are these schedulers' spacings (DDIMScheduler's leading and linspace round otherwise)
        scheduler = getattr(self.d, cls_name)(timestep_spacing=spacing)
        theirs, calls = self.get_timesteps(scheduler, steps, strength)
        ours = strength_grid(make_grid(LINEAR, spacing, steps), strength)
        assert ours.times[:-1] == tuple(float(t) for t in theirs) and ours.steps == calls

    @pytest.mark.parametrize("strength", [0.6, 1.0])
    @pytest.mark.parametrize("masked", [False, True])
    def test_img2img_and_inpainting_runs_are_the_pipelines(self, masked, strength):
        """The pipelines' loops (img2img: add_noise at the first time step, then step; inpainting with a plain
        UNet: after each step the kept pixels are the image noised to the next time step, the image itself at
        the end) with DDIMScheduler, float64, exact eps: every state to 1e-10."""
        steps = 10
        scheduler = self.d.DDIMScheduler(clip_sample=False)
        timesteps, _ = self.get_timesteps(scheduler, steps, strength)
        schedule = Schedule(scheduler.betas.double().numpy())
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
        noise, image, mask = inputs()
        latents = noise if strength == 1 else scheduler.add_noise(image, noise, torch.tensor(timesteps[:1]))
        theirs = [latents]
        for i, t in enumerate(timesteps):
            eps = exact_eps(theirs[-1], scheduler.alphas_cumprod[t])
            latents = scheduler.step(eps, t, theirs[-1]).prev_sample
            if masked:
                known = image if i == len(timesteps) - 1 else scheduler.add_noise(
                    image, noise, torch.tensor([timesteps[i + 1]]))
                latents = (1 - mask) * known + mask * latents
            theirs.append(latents)
        full = sorted(int(t) for t in scheduler.timesteps)
        ours = sample(model_on(schedule), noise, schedule, "DDIM", backend="torch", timesteps=full,
                      init_image=image, strength=strength, mask=mask if masked else None, return_trajectory=True)
        assert len(ours) == len(theirs)
        for i, (a, b) in enumerate(zip(theirs, ours)):
            assert float((a - b).norm() / b.norm()) < 1e-10, i
        if masked:
            assert torch.equal(ours[-1][..., 2:], image[..., 2:])
