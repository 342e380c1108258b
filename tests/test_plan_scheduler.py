"""diffusers both ways: its scheduler configs read as pndm_fast's schedule, prediction and method; `PlanScheduler` in
stock pipelines (DDPMPipeline, DiTPipeline) and in the Stable Diffusion and SD3 loops (their pipelines need
transformers' text encoders, so the loops run here as the pipelines write them, embeddings given directly); and
`sample_pipeline`, the whole loop through sample(). Pipelines are built offline from small random configs; in
float64 the images equal those of diffusers' own scheduler to 1e-10 where the method is the same."""

import copy
import math

import numpy as np
import pytest
import torch

from pndm_fast import Schedule, UserError, schedule_from_diffusers
from pndm_fast.continuous import EDMSchedule, FlowSchedule

diffusers = pytest.importorskip("diffusers", exc_type=ImportError)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
from accuracy_peers import KeepFloat64  # noqa: E402
from pndm_fast.pipelines import sample_pipeline  # noqa: E402
from pndm_fast.plan_scheduler import PlanScheduler  # noqa: E402

TOL = 1e-10


def rel(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return float((a - b).norm() / b.norm())


def unet2d():
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 32),
                                down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)
    return net.eval().double()


def float64_tables(scheduler):
    """diffusers keeps its alpha table in float32: read in float64 (docs/peers.md), the same numbers as ours."""
    original = type(scheduler).set_timesteps

    def set_timesteps(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.alphas_cumprod = self.alphas_cumprod.double()
        self.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return set_timesteps


# --- reading configs ---

@pytest.mark.parametrize("cls_name,settings,family,prediction,method", [
    ("DDIMScheduler", {}, "vp", "eps", "DDIM"),
    ("DPMSolverMultistepScheduler", {"prediction_type": "v_prediction"}, "vp", "v", "DPM-Solver++2M"),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                                     "flow_shift": 3.0}, "flow", "flow", "DPM-Solver++2M"),
    ("UniPCMultistepScheduler", {"solver_type": "bh1"}, "vp", "eps", "UniPC-bh1:order=2"),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "vp", "eps", "DDIM"),
    ("HeunDiscreteScheduler", {}, "vp", "eps", "Heun"),
    ("DEISMultistepScheduler", {}, "vp", "eps", "DEIS:order=2"),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, "flow", "flow", "DDIM"),
    ("EDMEulerScheduler", {}, "ve", "edm", "DDIM"),
    ("DDPMScheduler", {}, "vp", "eps", "DDIM:eta=1"),
    ("PNDMScheduler", {}, "vp", "eps", None),
])
def test_scheduler_configs_read_as_schedule_prediction_and_method(cls_name, settings, family, prediction, method):
    from pndm_fast.diffusers_schedulers import read_scheduler

    scheduler = getattr(diffusers, cls_name)(**settings)
    reading = read_scheduler(scheduler)
    assert (reading.schedule.family, reading.prediction, reading.method) == (family, prediction, method)
    schedule = schedule_from_diffusers(scheduler)
    if family == "vp":  # the same float32 table, read at every integer time
        assert torch.equal(torch.tensor([schedule.alpha(t) for t in range(1000)], dtype=torch.float32),
                           scheduler.alphas_cumprod)
        config_only = schedule_from_diffusers({**scheduler.config, "_class_name": cls_name})
        assert np.array_equal(config_only.paper_table, schedule.paper_table)
    if family == "flow":
        assert isinstance(schedule, FlowSchedule) and schedule.shift == 3.0
    if family == "ve":
        assert isinstance(schedule, EDMSchedule) and schedule.sigma_max == 80.0


@pytest.mark.parametrize("cls_name,settings,match", [
    ("DDIMScheduler", {"rescale_betas_zero_snr": True}, "zero signal"),
    ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, "stochastic sampling"),
    ("FlowMatchEulerDiscreteScheduler", {"invert_sigmas": True}, "inverted sigmas"),
    ("EDMEulerScheduler", {"sigma_data": 1.0}, "sigma_data"),
    ("DPMSolverMultistepScheduler", {"prediction_type": "flow_prediction"}, "without use_flow_sigmas"),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True}, "needs prediction_type flow_prediction"),
    ("LMSDiscreteScheduler", {}, "not a scheduler pndm_fast reads"),
])
def test_what_cannot_be_represented_is_refused_in_one_line(cls_name, settings, match):
    with pytest.raises(UserError, match=match) as error:
        schedule_from_diffusers(getattr(diffusers, cls_name)(**settings))
    assert "\n" not in str(error.value)


def test_plan_scheduler_config_round_trips_and_refuses_a_bad_method(tmp_path):
    base = diffusers.DPMSolverMultistepScheduler(solver_order=3)
    scheduler = PlanScheduler.from_config(base.config, method="UniPC-bh1:order=2")
    scheduler.save_config(tmp_path)
    again = PlanScheduler.from_pretrained(tmp_path)
    assert (again.method_name, again.reading.class_name) == ("UniPC-bh1:order=2", "DPMSolverMultistepScheduler")
    assert PlanScheduler.from_config(base.config).method_name is None  # its own method, DPM-Solver++3M
    with pytest.raises(UserError, match="has no option"):
        PlanScheduler.from_config(base.config, method="DDIM:order=2")
    with pytest.raises(UserError, match="no pndm_fast method with its exact steps"):
        PlanScheduler.from_scheduler(diffusers.PNDMScheduler())


# --- stock pipelines ---

def test_ddpm_pipeline_with_plan_scheduler_makes_ddims_images(monkeypatch):
    net = unet2d()
    base = diffusers.DDIMScheduler(clip_sample=False)
    pipe = diffusers.DDPMPipeline(unet=net, scheduler=base)
    monkeypatch.setattr(diffusers.DDIMScheduler, "set_timesteps", float64_tables(base))
    run = dict(batch_size=2, num_inference_steps=10, output_type="np")
    theirs = pipe(generator=torch.Generator().manual_seed(1), **run).images
    pipe.scheduler = PlanScheduler.from_config(base.config, method="DDIM")
    ours = pipe(generator=torch.Generator().manual_seed(1), **run).images
    assert theirs.dtype == np.float64 and rel(ours, theirs) < TOL
    pipe.scheduler = PlanScheduler.from_config(base.config, method="UniPC-bh2")
    assert rel(pipe(generator=torch.Generator().manual_seed(1), **run).images, theirs) > 1e-3  # another method


def test_in_float32_plan_scheduler_is_as_close_to_float64_as_diffusers_own(monkeypatch):
    """A float32 pipeline: PlanScheduler's DDIM stays within twice DDIMScheduler's own distance to the float64
    images, from the same noise (the pipeline's draw replaced by one float64 noise, cast)."""
    from diffusers.pipelines.ddpm import pipeline_ddpm

    net = unet2d()
    base = diffusers.DDIMScheduler(clip_sample=False)
    run = dict(batch_size=2, num_inference_steps=10, output_type="np")
    noise = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(pipeline_ddpm, "randn_tensor", lambda shape, dtype=None, **kwargs: noise.to(dtype))
    original = diffusers.DDIMScheduler.set_timesteps
    monkeypatch.setattr(diffusers.DDIMScheduler, "set_timesteps", float64_tables(base))
    truth = diffusers.DDPMPipeline(unet=net, scheduler=base)(generator=torch.Generator().manual_seed(1), **run).images
    monkeypatch.setattr(diffusers.DDIMScheduler, "set_timesteps", original)  # float32 tables for the float32 runs
    pipe = diffusers.DDPMPipeline(unet=copy.deepcopy(net).float(), scheduler=base)
    theirs = pipe(generator=torch.Generator().manual_seed(1), **run).images
    pipe.scheduler = PlanScheduler.from_config(base.config, method="DDIM")
    ours = pipe(generator=torch.Generator().manual_seed(1), **run).images
    assert ours.dtype == np.float32 and rel(ours, truth) <= 2 * rel(theirs, truth) + 1e-7


def dit_pipeline():
    torch.manual_seed(0)
    transformer = diffusers.Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                               out_channels=8, num_layers=1, sample_size=4, patch_size=2,
                                               num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
                                               norm_num_groups=2)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  norm_num_groups=4)
    base = diffusers.DDIMScheduler(clip_sample=False)
    return diffusers.DiTPipeline(transformer=transformer.eval().double(), vae=vae.eval().double(),
                                 scheduler=base), base


def test_dit_pipeline_with_class_labels_guidance_and_learned_sigma(monkeypatch):
    """DiTPipeline: class labels, guidance 4 (the pipeline's own mixing), a learned-sigma output: PlanScheduler's
    DDIM makes its scheduler's images; sample_pipeline, with guidance folded, its latents."""
    pipe, base = dit_pipeline()
    monkeypatch.setattr(diffusers.DDIMScheduler, "set_timesteps", float64_tables(base))
    run = dict(class_labels=[3, 7], guidance_scale=4.0, num_inference_steps=6, output_type="np")
    latents = []
    decode = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda z, **kw: (latents.append(z.clone()), decode(z, **kw))[1])
    theirs = pipe(generator=torch.Generator().manual_seed(1), **run).images
    pipe.scheduler = PlanScheduler.from_config(base.config, method="DDIM")
    ours = pipe(generator=torch.Generator().manual_seed(1), **run).images
    assert rel(ours, theirs) < TOL
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.tensor([3, 7])
    times = base.timesteps.tolist()
    whole = sample_pipeline(pipe, noise, "DDIM", cond={"class_labels": labels},
                            uncond={"class_labels": torch.full_like(labels, 1000)}, guidance=4.0, backend="fused",
                            timesteps=times)
    latents_theirs = latents[0] * pipe.vae.config.scaling_factor
    assert rel(whole, latents_theirs) < TOL


# --- the Stable Diffusion and SD3 loops, as their pipelines write them ---

def in_float64(scheduler):
    """diffusers' float32 sigmas and alpha table read in float64 (docs/peers.md): the numbers both sides share."""
    for name in ("sigmas", "alphas_cumprod"):
        if isinstance(getattr(scheduler, name, None), torch.Tensor):
            setattr(scheduler, name, getattr(scheduler, name).double())


def sd_loop(unet, scheduler, latents, embeds, negative, guidance, steps, rescale=0.0, times=None):
    """StableDiffusionPipeline's denoising loop: both branches in one batch, guidance (with diffusers' own
    guidance_rescale), scale_model_input, step. `times` replaces the network's timesteps."""
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    scheduler.set_timesteps(steps)
    in_float64(scheduler)
    latents = latents * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        t_in = t if times is None else torch.tensor(times[i], dtype=torch.float64)
        out = unet(model_in, t_in, encoder_hidden_states=torch.cat([negative, embeds])).sample
        uncond, text = out.chunk(2)
        guided = uncond + guidance * (text - uncond)
        if rescale:
            guided = rescale_noise_cfg(guided, text, guidance_rescale=rescale)
        latents = scheduler.step(guided, t, latents).prev_sample
    return latents


def sd_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                          block_out_channels=(32, 32), cross_attention_dim=16,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                          norm_num_groups=8, attention_head_dim=4).eval().double()


@pytest.mark.parametrize("cls_name,settings", [
    ("DPMSolverMultistepScheduler", dict(solver_order=2)),
    ("UniPCMultistepScheduler", dict(solver_type="bh2")),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("HeunDiscreteScheduler", dict()),
    ("DEISMultistepScheduler", dict()),
])
def test_stable_diffusion_loop_with_each_scheduler_and_its_plan_scheduler(cls_name, settings):
    """Stable Diffusion's config (scaled_linear betas, leading spacing, steps_offset 1), text embeddings given
    directly, guidance 7.5: PlanScheduler with the scheduler's own method makes its latents to 1e-10 (float64
    kept through the schedulers that cast to float32, docs/peers.md)."""
    unet = sd_unet()
    sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
              timestep_spacing="leading", **settings)
    base = getattr(diffusers, cls_name)(**sd)
    g = torch.Generator().manual_seed(2)
    embeds, negative = torch.randn(2, 3, 16, generator=g, dtype=torch.float64), torch.zeros(2, 3, 16,
                                                                                            dtype=torch.float64)
    latents = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        theirs = sd_loop(unet, base, latents.as_subclass(KeepFloat64), embeds, negative, 7.5, 8)
        ours = sd_loop(unet, PlanScheduler.from_scheduler(base), latents, embeds, negative, 7.5, 8)
    assert rel(ours, theirs.as_subclass(torch.Tensor)) < TOL


def test_guidance_rescale_on_a_v_prediction_model_is_diffusers_own():
    """Stable Diffusion 2's setting: a v-prediction UNet, guidance 7.5 with guidance_rescale 0.7 (not linear: the
    runner mixes the branches and rescales, then folds the reading). sample_pipeline equals the loop with
    diffusers' rescale_noise_cfg, on the same times (the network given our times in both)."""
    unet = sd_unet()
    base = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                 prediction_type="v_prediction")
    g = torch.Generator().manual_seed(2)
    embeds, negative = torch.randn(2, 3, 16, generator=g, dtype=torch.float64), torch.zeros(2, 3, 16,
                                                                                            dtype=torch.float64)
    latents = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    plan = PlanScheduler.from_scheduler(base)
    plan.set_timesteps(8)
    times = list(plan.grid.times[:-1])
    pipe = type("Pipe", (), {"unet": unet, "scheduler": base})()
    with torch.no_grad():
        loop = sd_loop(unet, plan, latents, embeds, negative, 7.5, 8, rescale=0.7, times=times)
        whole = sample_pipeline(pipe, latents, "DPM-Solver++2M:lower_order_final=true", guidance=7.5,
                                guidance_rescale=0.7, cond={"encoder_hidden_states": embeds},
                                uncond={"encoder_hidden_states": negative}, timesteps=times, backend="fused")
        plain = sample_pipeline(pipe, latents, "DPM-Solver++2M:lower_order_final=true", guidance=7.5,
                                cond={"encoder_hidden_states": embeds}, uncond={"encoder_hidden_states": negative},
                                timesteps=times, backend="fused")
    assert rel(whole, loop) < TOL and rel(plain, loop) > 1e-3


def test_sd3_flow_loop_and_sample_pipeline_on_an_sd3_transformer():
    """SD3's loop on an SD3Transformer2DModel (pooled projections, 1000 s as its time) with DPM-Solver++ on flow
    sigmas: PlanScheduler equals the scheduler, and sample_pipeline, the loop through sample(), equals the loop
    with the network given 1000 s unrounded."""
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                                  attention_head_dim=8, num_attention_heads=2,
                                                  joint_attention_dim=16, caption_projection_dim=16,
                                                  pooled_projection_dim=8, out_channels=4).eval().double()
    base = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                 prediction_type="flow_prediction")
    g = torch.Generator().manual_seed(3)
    cond = {"encoder_hidden_states": torch.randn(2, 5, 16, generator=g, dtype=torch.float64),
            "pooled_projections": torch.randn(2, 8, generator=g, dtype=torch.float64)}
    latents = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)

    def loop(scheduler, x, exact_times=False):
        scheduler.set_timesteps(6)
        in_float64(scheduler)
        if exact_times:  # diffusers rounds a flow's timesteps to integers; sample() gives the network 1000 s
            scheduler.timesteps = 1000 * torch.tensor(scheduler.grid.times[:-1], dtype=torch.float64)
        for t in scheduler.timesteps:
            out = transformer(x, timestep=t.expand(2), return_dict=False, **cond)[0]
            x = scheduler.step(out, t, x).prev_sample
        return x

    with torch.no_grad():
        theirs = loop(base, latents.as_subclass(KeepFloat64)).as_subclass(torch.Tensor)
        plan = PlanScheduler.from_scheduler(base)
        ours = loop(plan, latents)
        assert rel(ours, theirs) < TOL
        exact = loop(plan, latents, exact_times=True)
        pipe = type("Pipe", (), {"transformer": transformer, "scheduler": base})()
        level = plan.grid.level(plan.grid.times[0])
        noise = latents * (math.sqrt(level) + math.sqrt(1 - level))  # the latents as the VP state
        whole = sample_pipeline(pipe, noise, "DPM-Solver++2M:lower_order_final=true", cond=cond, backend="fused",
                                timesteps=list(plan.grid.times[:-1]))
    assert rel(whole, exact) < TOL


def test_sample_pipeline_refuses_a_pipeline_without_a_network():
    pipe = type("Pipe", (), {"scheduler": diffusers.DDIMScheduler()})()
    with pytest.raises(UserError, match="neither a unet nor a transformer"):
        sample_pipeline(pipe, torch.randn(1, 1, 4, 4))
