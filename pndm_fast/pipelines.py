"""A diffusers pipeline's denoising loop run whole by `sample()` (docs/diffusers.md): its network and scheduler
config, its prompt embeddings or class labels as conditioning, guidance folded into the fused combination, and the
whole loop in one CUDA graph on a GPU. Decoding the latents (a VAE) stays with the pipeline."""

from __future__ import annotations

import torch

from .adapters import Denoiser
from .diffusers_schedulers import read_scheduler
from .errors import UserError


def pipeline_network(pipe) -> torch.nn.Module:
    """The denoising network of a diffusers pipeline: its unet, else its transformer."""
    net = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if net is None:
        raise UserError(f"{type(pipe).__name__} has neither a unet nor a transformer to sample")
    return net


def sample_pipeline(pipe, noise: torch.Tensor, method: str = "UniPC-bh2", sample_step: int | None = None, *,
                    cond: dict | None = None, uncond: dict | None = None, guidance: float = 1.0,
                    guidance_rescale: float = 0.0, mu=None, **sample_kwargs) -> torch.Tensor:
    """The latents a pipeline's loop would make from `noise` (standard normal, the solver's starting state), with
    `method` on the schedule its scheduler config says (`pndm_fast.diffusers_schedulers`). `cond`/`uncond` are the
    network's keyword inputs of the two branches (e.g. {"encoder_hidden_states": prompt_embeds} and the negative
    prompt's, or {"class_labels": labels} and the null class), `guidance` the classifier-free scale and
    `guidance_rescale` diffusers' (0: none); `mu` a dynamic flow shift (Flux); the other keywords go to `sample()`
    (timesteps, model_calls, backend, ...)."""
    from .sampling import sample

    reading = read_scheduler(pipe.scheduler, None if mu is None else float(torch.tensor(mu).exp()))
    denoiser = Denoiser.from_diffusers(pipeline_network(pipe), reading.prediction, cond=cond, uncond=uncond,
                                       guidance=guidance, time_input=reading.time_input,
                                       guidance_rescale=guidance_rescale)
    return sample(denoiser, noise, reading.schedule, method, sample_step, **sample_kwargs)
