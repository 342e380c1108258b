"""The teacher: the probability-flow ODE solved from given noises to the data, accurately enough to rank samplers.

PNDM-exact (order 4) on a grid uniform in log-SNR from the noisiest time down to sigma / alpha = 1e-4 (below the
table's t = 0, where the model's time runs on towards -1: a last step from t = 0 straight to the data would leave
an error no step count removes), then to sigma = 0, at S and 2S steps: the 2S run is the teacher, and since the
method is fourth order, its error is about |x_S - x_2S| / (2^4 - 1) (Richardson).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..grids import MODEL, TimeGrid
from ..levels import Level
from ..sampling import sample

METHOD = "PNDM-exact"
MAX_STEPS = 3200
LAST_RHO = 1e-4


def teacher_grid(schedule, steps: int) -> TimeGrid:
    """`steps` steps uniform in lambda from the schedule's noisiest time (N - 1 on the paper's table) to
    sigma / alpha = LAST_RHO, then one to sigma = 0."""
    first = Level.of(schedule.alpha(schedule.t_max)).lam
    last = Level.from_sigma(LAST_RHO).lam
    lams = [first + (last - first) * i / (steps - 1) for i in range(steps)]
    times = [schedule.t_max] + [schedule.time_of(Level.from_lambda(v).ac) for v in lams[1:]]
    return TimeGrid(schedule, tuple(times) + (schedule.t_data,), MODEL, "teacher")


def relative_error(x: torch.Tensor, truth: torch.Tensor) -> float:
    """||x - x*|| / ||x*|| per sample, averaged over the batch (float64)."""
    x, truth = x.flatten(1).double(), truth.flatten(1).double()
    return float(((x - truth).norm(dim=1) / truth.norm(dim=1).clamp_min(1e-300)).mean())


@dataclass
class Teacher:
    x: torch.Tensor  # the final states, one per noise
    steps: int
    error: float  # the estimated relative error of x

    @classmethod
    def solve(cls, model, noise: torch.Tensor, schedule, steps: int = 200, backend: str = "auto") -> "Teacher":
        with torch.inference_mode():
            coarse = sample(model, noise, schedule, METHOD, backend=backend, timesteps=teacher_grid(schedule, steps))
            fine = sample(model, noise, schedule, METHOD, backend=backend, timesteps=teacher_grid(schedule, 2 * steps))
        return cls(fine, 2 * steps, relative_error(coarse, fine) / 15)

    def refined(self, model, noise: torch.Tensor, schedule, backend: str = "auto") -> "Teacher":
        """The teacher at twice the steps (its current run becomes the coarse one)."""
        with torch.inference_mode():
            fine = sample(model, noise, schedule, METHOD, backend=backend,
                          timesteps=teacher_grid(schedule, 2 * self.steps))
        return Teacher(fine, 2 * self.steps, relative_error(self.x, fine) / 15)
