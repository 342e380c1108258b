"""pndm_fast against diffusers' own sampling loop: a local random UNet2DModel, DDIMScheduler and PNDMScheduler with
their documented settings, the same noise; pndm_fast's matching method on the same grid must give the same images
(float64: 1e-10 relative; float32: within twice the float32 reference's distance to float64).

The matching grid: diffusers' "leading" timesteps k * (1000 // S), read at alphas_cumprod[t] (the model's own
level), ending at final_alpha_cumprod = 1 (set_alpha_to_one=True), is pndm_fast's explicit list of those times,
which ends at sigma = 0. Its PNDMScheduler with the Runge-Kutta warm-up (skip_prk_steps=False) is the paper's
F-PNDM on that grid (midpoints t - skip / 2). diffusers' tables are float32: its alphas_cumprod is kept but read
in float64 (docs/peers.md), and its betas are ours (trained_betas), so both tables are the same numbers.
"""

import pytest
import torch
from conftest import relative_l2

from pndm_fast import Denoiser, Schedule, sample

diffusers = pytest.importorskip("diffusers", exc_type=ImportError)

SCHEDULE = Schedule.from_config({"type": "linear", "beta_start": 1e-4, "beta_end": 2e-2, "diffusion_step": 1000})
STEPS = 10


def unet(dtype):
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 32),
                                down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)
    return net.eval().to(dtype)


def diffusers_loop(scheduler_class, net, noise, **settings):
    """The loop of diffusers' pipelines: set_timesteps, then model -> scheduler.step for every timestep."""
    scheduler = scheduler_class(num_train_timesteps=1000, trained_betas=SCHEDULE.betas.numpy(),
                                set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading", **settings)
    scheduler.set_timesteps(STEPS)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    x = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(net(x, t).sample, t, x).prev_sample
    return x


def leading_times():
    return [k * (1000 // STEPS) for k in range(STEPS)]


@pytest.mark.parametrize("scheduler,method,settings", [
    ("DDIMScheduler", "DDIM", {"clip_sample": False}),
    ("PNDMScheduler", "F-PNDM", {"skip_prk_steps": False}),
])
def test_pndm_fast_gives_diffusers_images_in_float64(scheduler, method, settings):
    net = unet(torch.float64)
    noise = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    theirs = diffusers_loop(getattr(diffusers, scheduler), net, noise, **settings)
    with torch.no_grad():
        for backend in ("reference", "fused"):
            ours = sample(Denoiser.from_diffusers(net), noise, SCHEDULE, method, backend=backend,
                          timesteps=leading_times())
            assert relative_l2(ours, theirs) < 1e-10, backend


@pytest.mark.parametrize("scheduler,method,settings", [
    ("DDIMScheduler", "DDIM", {"clip_sample": False}),
    ("PNDMScheduler", "F-PNDM", {"skip_prk_steps": False}),
])
def test_float32_is_as_close_to_the_float64_images_as_the_float32_reference(scheduler, method, settings):
    net32, net64 = unet(torch.float32), unet(torch.float64)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    truth = diffusers_loop(getattr(diffusers, scheduler), net64, noise.double(), **settings)
    with torch.no_grad():
        baseline = sample(Denoiser.from_diffusers(net32), noise, SCHEDULE, method, backend="reference",
                          timesteps=leading_times())
        ours = sample(Denoiser.from_diffusers(net32), noise, SCHEDULE, method, backend="fused",
                      timesteps=leading_times())
    assert relative_l2(ours, truth) <= 2 * relative_l2(baseline, truth) + 1e-7
