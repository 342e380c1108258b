"""The paper's transfer step and its four methods, op by op in plain PyTorch, and two newer solvers from their
own papers' formulas (docs/design.md, "The reference").

Slow on purpose and easy to read: this is the yardstick every fast path is measured against. It computes in
the noise's dtype exactly as the paper's code does, alpha table included (float32 values, cast), and keeps its
forms such as `(1 / 24) * (...)` rather than `(...) / 24`, so float32 rounds alike. A step reads noise levels
through `level(t)`, a 0-d tensor of the state's alpha-bar at time t on the run's grid: on the paper's grid that is
the table entry ac[int(t) + 1], exactly as the paper's code indexes it.
"""

from __future__ import annotations

from typing import Callable

import torch

from .grids import PAPER, TimeGrid

EpsModel = Callable[[torch.Tensor, float], torch.Tensor]
"""eps = m(x, t): the UNet's noise prediction at a scalar (possibly fractional) time t."""


Level = Callable[[float], torch.Tensor]
"""level(t): the alpha-bar of the state at time t, a 0-d tensor in the run's dtype."""


def transfer(x: torch.Tensor, t: float, t_next: float, e: torch.Tensor, level: Level) -> torch.Tensor:
    """The paper's eq. 9: move x from t to t_next along the direction that eps e predicts.

    The arithmetic follows the paper's code's order of operations so float32 rounds alike.
    """
    a = level(t)
    a_next = level(t_next)
    x_coef = 1 / (a.sqrt() * (a.sqrt() + a_next.sqrt()))
    e_coef = 1 / (a.sqrt() * (((1 - a_next) * a).sqrt() + ((1 - a) * a_next).sqrt()))
    return x + (a_next - a) * (x_coef * x - e_coef * e)


def ddim_step(x, t, t_next, m: EpsModel, level: Level, history: list) -> torch.Tensor:
    e = m(x, t)
    history.append(e)
    return transfer(x, t, t_next, e, level)


def s_pndm_step(x, t, t_next, m: EpsModel, level: Level, history: list) -> torch.Tensor:
    """Second-order pseudo linear multistep; its first step is an improved Euler (Heun) step."""
    if history:
        history.append(m(x, t))
        e = 0.5 * (3 * history[-1] - history[-2])
    else:
        e1 = m(x, t)
        history.append(e1)
        e2 = m(transfer(x, t, t_next, e1, level), t_next)
        e = (e1 + e2) / 2
    return transfer(x, t, t_next, e, level)


def f_pndm_step(x, t, t_next, m: EpsModel, level: Level, history: list) -> torch.Tensor:
    """Fourth-order pseudo linear multistep; the first three steps are pseudo Runge-Kutta."""
    if len(history) > 2:
        history.append(m(x, t))
        e = (1 / 24) * (55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4])
    else:
        t_mid = (t + t_next) / 2
        e1 = m(x, t)
        history.append(e1)
        e2 = m(transfer(x, t, t_mid, e1, level), t_mid)
        e3 = m(transfer(x, t, t_mid, e2, level), t_mid)
        e4 = m(transfer(x, t, t_next, e3, level), t_next)
        e = (1 / 6) * (e1 + 2 * e2 + 2 * e3 + e4)
    return transfer(x, t, t_next, e, level)


def fon_step(x, t, t_next, m: EpsModel, level: Level, history: list) -> torch.Tensor:
    """Classical fourth-order method on the ODE in x; history holds the derivatives, not the eps.

    Every stage's derivative is T(x, t, t - 1, e) - x at the step's starting x and t, as the reference
    evaluates it (so the inner stages only see their eps change, not their x or t).
    """
    def derivative(e):
        return transfer(x, t, t - 1, e, level) - x

    h = t - t_next
    if len(history) > 2:
        history.append(derivative(m(x, t)))
        d = (1 / 24) * (55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4])
    else:
        t_mid = (t + t_next) / 2
        d1 = derivative(m(x, t))
        history.append(d1)
        d2 = derivative(m(x + d1 * h / 2, t_mid))
        d3 = derivative(m(x + d2 * h / 2, t_mid))
        d4 = derivative(m(x + d3 * h, t_next))
        d = (1 / 6) * (d1 + 2 * d2 + 2 * d3 + d4)
    return x + d * h


# Two newer solvers, written from their papers' formulas (not from the plans' coefficient algebra), so that the
# plans have an independent yardstick too.


def ipndm_step(x, t, t_next, m: EpsModel, level: Level, history: list) -> torch.Tensor:
    """iPNDM: Adams-Bashforth on the eps, its order ramping 1 -> 4 with the history; one model call per step."""
    history.append(m(x, t))
    h = history
    if len(h) == 1:
        e = h[-1]
    elif len(h) == 2:
        e = (3 * h[-1] - h[-2]) / 2
    elif len(h) == 3:
        e = (23 * h[-1] - 16 * h[-2] + 5 * h[-3]) / 12
    else:
        e = (55 * h[-1] - 59 * h[-2] + 37 * h[-3] - 9 * h[-4]) / 24
    return transfer(x, t, t_next, e, level)


def dpm_solver_pp_2m_step(x, t, t_next, m: EpsModel, level: Level, history: list) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al., 2022, algorithm 2) on the data prediction; history holds (x0, lambda)."""
    def levels(time):
        a = level(time)
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        return alpha, sigma, torch.log(alpha / sigma)

    (alpha, sigma, lam), (alpha_next, sigma_next, lam_next) = levels(t), levels(t_next)
    h = lam_next - lam
    x0 = (x - sigma * m(x, t)) / alpha
    if history and bool(torch.isfinite(h)):  # a final step to sigma = 0 (h infinite) is first order
        x0_prev, lam_prev = history[-1]
        r = (lam - lam_prev) / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
    else:
        d = x0
    history.append((x0, lam))
    return (sigma_next / sigma) * x - alpha_next * torch.expm1(-h) * d


def grid_level(grid: TimeGrid, like: torch.Tensor) -> Level:
    """level(t) for `grid` in like's dtype and device: on the paper's grid an entry of the float32 table (extended
    by the schedule's formula one step past its end), cast; elsewhere the grid's float64 level, cast."""
    if grid.convention == PAPER:
        table = torch.from_numpy(grid.schedule.paper_table).float().to(device=like.device, dtype=like.dtype)
        return lambda t: table[int(t) + 1]
    return lambda t: torch.tensor(grid.level(t), dtype=like.dtype, device=like.device)


def sample_reference(m: EpsModel, noise: torch.Tensor, grid: TimeGrid, step: Callable | None,
                     return_trajectory: bool = False, run: Callable | None = None) -> torch.Tensor:
    """Run `step` (one of the functions above) over `grid` from `noise`, or `run` (a whole-run reference of
    `pndm_fast.multistep_reference`); the final x, or the (steps + 1, *noise.shape) trajectory from the noise."""
    if run is not None:
        states = run(m, noise, grid)
        return torch.stack(states) if return_trajectory else states[-1]
    level = grid_level(grid, noise)
    x, history, trajectory = noise, [], [noise]
    for t, t_next in grid.pairs:
        x = step(x, t, t_next, m, level, history)
        if return_trajectory:
            trajectory.append(x)
    return torch.stack(trajectory) if return_trajectory else x
