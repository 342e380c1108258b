"""Image editing and watching a run: img2img (`strength`), inpainting (`mask`) and the per-step callback.

img2img follows diffusers' convention: of a grid of S steps, the last floor(S x strength) run (its img2img
pipelines' `get_timesteps`), from the input image noised to the first of them with the run's noise. Inpainting
follows diffusers' blend for a plain UNet: after each step the pixels outside the mask (mask 0: keep) are set to the
input image noised to the level the step reached, with the same starting noise, and after the last step to the
image itself (on the paper's grid too, whose last level is ac[0], not 1). Both read levels from the grid, so they
work with every method and grid (docs/stochastic.md). The blend is a plan entry (`Blend`, appended to each step by
`masked_plan`), so it runs on every plan backend, inside a CUDA graph too; lowering folds it into the fused pass
that writes the step's state.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from dataclasses import replace

from .errors import UserError
from .grids import TimeGrid
from .levels import Level
from .plans import Blend, Plan


def strength_grid(grid: TimeGrid, strength) -> TimeGrid:
    """The tail of `grid` an img2img run at `strength` in (0, 1] walks: its last floor(steps x strength) steps."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise UserError(f"strength must be a number in (0, 1] (the share of the grid's steps that run), got "
                        f"{strength!r}")
    keep = min(int(grid.steps * strength), grid.steps)
    if keep < 1:
        raise UserError(f"strength {strength:g} of {grid.steps} steps runs no step: raise the strength or the steps")
    return TimeGrid(grid.schedule, grid.times[grid.steps - keep:], grid.convention, grid.name)


def check_image(image, noise: torch.Tensor, what: str) -> torch.Tensor:
    """`image` as a tensor in noise's dtype and device that broadcasts to noise's shape (one line if not)."""
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        raise UserError(f"{what} must be a floating torch.Tensor shaped like the noise {tuple(noise.shape)}")
    try:
        fits = image.dim() == 4 and torch.broadcast_shapes(image.shape, noise.shape) == noise.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise UserError(f"{what} of shape {tuple(image.shape)} does not broadcast to the noise's "
                        f"{tuple(noise.shape)}")
    if image.device != noise.device:
        raise UserError(f"{what} is on {image.device} and the noise on {noise.device}: expected the same device")
    return image.to(noise.dtype)


def noised(image: torch.Tensor, noise: torch.Tensor, level: float) -> torch.Tensor:
    """alpha x0 + sigma eps at alpha-bar `level`."""
    at = Level.of(level)
    return at.alpha * image + at.sigma * noise


def masked_plan(plan: Plan, grid: TimeGrid) -> Plan:
    """`plan` with inpainting's blend after each step: x <- mask x + (1 - mask) noised(image) at the level the step
    reached, the image itself after the last (as diffusers' blend does, on the paper's grid too)."""
    steps = []
    for i, step in enumerate(plan.steps):
        at = Level.of(1.0 if i == len(plan.steps) - 1 else grid.level(grid.times[i + 1]))
        steps.append(step + (Blend("x", at.alpha, at.sigma),))
    return replace(plan, steps=tuple(steps))


def mask_inputs(mask: torch.Tensor, image: torch.Tensor, noise: torch.Tensor, like: torch.Tensor):
    """(mask, (1 - mask) image, (1 - mask) noise) in the state's dtype, shaped like it: what `Blend` reads."""
    dtype, shape = like.dtype, like.shape
    keep = (1 - mask).to(dtype)
    return (mask.to(dtype).expand(shape), (keep * image.to(dtype)).expand(shape), (keep * noise.to(dtype)).expand(shape))


class AfterStep:
    """What runs after each plan step of an eager run: the callback, then the progress bar. `x` is the runner's
    state buffer, changed in place."""

    def __init__(self, runner, grid_times, level, callback=None, eps_of=None, progress: bool = False):
        self.runner, self.times, self.level, self.callback, self.eps_of = runner, grid_times, level, callback, eps_of
        self.bar = tqdm(total=len(grid_times) - 1, unit="step", disable=not progress, leave=False)
        runner.watch["on"] = callback is not None

    def __call__(self, i: int) -> None:
        x, t_next = self.runner.x, self.times[i + 1]
        if self.callback is not None:
            src, t, outputs = self.runner.watch["last"]
            at = Level.of(self.level(t))
            x0 = (src - at.sigma * self.eps_of(src, t, outputs)) / at.alpha
            self.callback(i, t_next, x, x0)
        self.bar.update(1)

    def close(self) -> None:
        self.runner.watch["on"], self.runner.watch["last"] = False, None
        self.bar.close()


def eps_evaluator(denoiser, schedule):
    """eps(src, t, outputs) of one model call, from the adapter's own expression (guidance, x0/v predictions)."""
    def eps_of(src, t, outputs):
        names = tuple(f"out{j}" for j in range(len(outputs)))
        values = {"src": src, **dict(zip(names, outputs))}
        expr = denoiser.eps_expression("src", names, schedule.alpha(t))
        return sum(float(c) * values[n].to(src.dtype) for n, c in expr.terms.items())
    return eps_of
