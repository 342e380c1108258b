"""Call times by dynamic programming over a fine candidate grid, from local errors measured on the teacher's
trajectories (the idea of GITS, with each local error weighted by how much of it reaches the data).

The teacher's run is kept at every other of its times (the candidates). From each candidate state x_i one DDIM
step (exact for a straight trajectory) to each later candidate j misses the teacher's x_j by a local error; the
cost of the step is that error's norm times its weight w_j, relative to the norm of the teacher's result and
averaged over the noises. For data of per-dimension standard deviation s, the probability-flow ODE carries an
error at level (alpha, sigma) to the data scaled by w = s / sqrt(alpha^2 s^2 + sigma^2) (exactly, for Gaussian
data): errors in the noisiest steps reach the data shrunk by s. The best path of K calls from the noisiest time to
the data minimises cost_1 + e cost_2 + e^2 cost_3 + ...; the emphasis e >= 1 weighs the later steps more, as the
local errors of a multistep method, which reuses earlier outputs, compound (docs/tuning.md has the measurements).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..adapters import as_denoiser
from ..errors import UserError
from ..levels import Level
from ..methods import fit_grid, method_record
from ..sampling import reference_eps_model, sample
from .search import Candidate, explicit
from .teacher import METHOD, teacher_grid

EMPHASES = (1.0, 1.1, 1.2)
CANDIDATES = 72  # about this many candidate times: every k-th of the teacher's times


@dataclass(frozen=True, eq=False)
class LocalErrors:
    times: tuple[float, ...]  # the candidate call times, noisiest first
    costs: np.ndarray  # (N, N + 1): costs[i, j] of the step from candidate i to j; j = N is the data
    spread: float  # s, the teacher's results' per-dimension standard deviation, in the weights
    forwards: int  # model calls spent measuring them, times the images (as a profile counts them)

    def calls(self, count: int, emphasis: float = 1.0) -> tuple[float, ...]:
        """The `count` call times of least total cost, the first at the noisiest time."""
        return _best_path(self, count, emphasis)


def measure(model, schedule, noise: torch.Tensor, steps: int, backend: str = "auto") -> LocalErrors:
    """The local errors of `model` (any `sample()` model; a Denoiser's conditioning rows match `noise`) along the
    teacher's trajectories from `noise`, on the teacher's grid of `steps` steps."""
    model = as_denoiser(model)
    grid = teacher_grid(schedule, steps)
    usable = [i for i, t in enumerate(grid.times[:-1]) if t >= schedule.t_min]
    keep = usable[::max(1, math.ceil(len(usable) / CANDIDATES))]
    wanted, states = set(keep), {}

    def keep_state(step, t, x, x0):  # x is the solver's state at grid.times[step + 1]
        if step + 1 in wanted or step + 1 == len(grid.times) - 1:
            states[step + 1] = x.double().clone()

    eager = backend if backend in ("torch", "fused", "cpp", "triton") else "auto"
    with torch.inference_mode():
        sample(model, noise, schedule, METHOD, backend=eager, timesteps=grid, callback=keep_state)
    states[0] = noise.double()
    final = states[len(grid.times) - 1].flatten(1)
    eps_of = reference_eps_model(model, noise.shape[1], schedule)
    levels = [Level.of(schedule.alpha(grid.times[i])) for i in keep]
    with torch.inference_mode():
        data = [((states[i] - lv.sigma * eps_of(states[i].to(noise.dtype), grid.times[i]).double()) / lv.alpha)
                .flatten(1) for i, lv in zip(keep, levels)]
    spread = float(final.std(dim=0, unbiased=False).pow(2).mean().sqrt()) if len(final) > 1 else 1.0
    spread = spread if spread > 0 else 1.0
    norm = final.norm(dim=1).clamp_min(1e-300)
    n = len(keep)
    costs = np.full((n, n + 1), np.inf)
    for i, (lv_i, x0_i) in enumerate(zip(levels, data)):
        eps_i = (states[keep[i]].flatten(1) - lv_i.alpha * x0_i) / lv_i.sigma
        for j in range(i + 1, n + 1):
            if j == n:
                miss = x0_i - final
                weight = 1.0
            else:
                lv_j = levels[j]
                miss = lv_j.alpha * x0_i + lv_j.sigma * eps_i - states[keep[j]].flatten(1)
                weight = reaching_data(lv_j, spread)
            costs[i, j] = weight * float((miss.norm(dim=1) / norm).mean())
    forwards = (method_record(METHOD).plan(grid).model_calls + n) * len(noise)
    return LocalErrors(tuple(grid.times[i] for i in keep), costs, spread, forwards)


def reaching_data(level: Level, spread: float) -> float:
    """The share of an error at `level` that the ODE carries to data of per-dimension spread s:
    s / sqrt(alpha^2 s^2 + sigma^2)."""
    return spread / math.sqrt(level.alpha ** 2 * spread ** 2 + level.sigma ** 2)


@lru_cache(maxsize=256)
def _best_path(errors: LocalErrors, count: int, emphasis: float) -> tuple[float, ...]:
    n = len(errors.times)
    if not 1 <= count <= n:
        raise UserError(f"{count} calls do not fit the {n} candidate times")
    ahead = np.full(n + 1, np.inf)  # the least cost from each node to the data in k steps
    ahead[n] = 0.0
    choices = []
    for _ in range(count):
        totals = errors.costs + emphasis * ahead[None, :]
        choices.append(np.argmin(totals, axis=1))
        ahead = np.append(totals[np.arange(n), choices[-1]], np.inf)
    node, path = 0, [0]
    for best_next in reversed(choices[1:]):
        node = int(best_next[node])
        path.append(node)
    return tuple(errors.times[i] for i in path)


def dp_candidates(errors: LocalErrors, schedule, budget: int, methods, emphases=EMPHASES) -> list[Candidate]:
    """Each method on the least-cost call times of each emphasis, with as many calls as `budget` allows."""
    out = []
    for method in methods:
        for emphasis in emphases:
            try:
                grid = fit_grid(method_record(method), budget,
                                lambda steps: explicit(schedule, errors.calls(steps, emphasis), "dp"))
            except UserError:
                continue
            out.append(Candidate(method, grid, f"{method} on local-error times, emphasis {emphasis:g}"))
    return out
