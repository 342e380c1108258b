"""The paper's transfer step and its four methods, and iPNDM, op by op in plain PyTorch (docs/design.md, "The
reference").

Every reference, here and in `pndm_fast.multistep_reference`, is a whole run with one signature:
`reference(m, x, grid, **options) -> [x_0, x_1, ..., x_S]`, the state at every time of the grid, from the noise
x_0. `m(x, t)` is the model's eps at a scalar time t.

Slow on purpose and easy to read: this is the yardstick every fast path is measured against. These compute in
the noise's dtype exactly as the paper's code does, alpha table included (float32 values, cast), and keep its
forms such as `(1 / 24) * (...)` rather than `(...) / 24`, so float32 rounds alike. Levels are read through
`grid_level`: on the paper's grid the table entry ac[int(t) + 1], exactly as the paper's code indexes it.
"""

from __future__ import annotations

from typing import Callable

import torch

from .grids import PAPER, TimeGrid

EpsModel = Callable[[torch.Tensor, float], torch.Tensor]
Level = Callable[[float], torch.Tensor]
"""level(t): the alpha-bar of the state at time t, a 0-d tensor in the run's dtype."""

def grid_level(grid: TimeGrid, like: torch.Tensor) -> Level:
    """level(t) for `grid` in like's dtype and device: on the paper's grid an entry of the float32 table (extended
    by the schedule's formula one step past its end), cast; elsewhere the grid's float64 level, cast."""
    if grid.convention == PAPER:
        table = torch.from_numpy(grid.schedule.paper_table).float().to(device=like.device, dtype=like.dtype)
        return lambda t: table[int(t) + 1]
    return lambda t: torch.tensor(grid.level(t), dtype=like.dtype, device=like.device)


def transfer(x: torch.Tensor, t: float, t_next: float, e: torch.Tensor, level: Level) -> torch.Tensor:
    """The paper's eq. 9: move x from t to t_next along the direction that eps e predicts, in the paper's code's
    order of operations so that float32 rounds alike."""
    a = level(t)
    a_next = level(t_next)
    x_coef = 1 / (a.sqrt() * (a.sqrt() + a_next.sqrt()))
    e_coef = 1 / (a.sqrt() * (((1 - a_next) * a).sqrt() + ((1 - a) * a_next).sqrt()))
    return x + (a_next - a) * (x_coef * x - e_coef * e)


def ddim(m: EpsModel, x: torch.Tensor, grid: TimeGrid, eta: float = 0.0, draws=None) -> list[torch.Tensor]:
    """DDIM; with eta > 0 Song et al. 2021, eq. 12: x' = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z with
    s = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a'), reading the next of `draws` wherever s > 0."""
    level, xs = grid_level(grid, x), [x]
    fresh = iter(draws if draws is not None else ())
    for t, t_next in grid.pairs:
        e = m(xs[-1], t)
        if eta == 0:
            xs.append(transfer(xs[-1], t, t_next, e, level))
            continue
        a, a_next = level(t), level(t_next)
        x0 = (xs[-1] - (1 - a).sqrt() * e) / a.sqrt()
        s = eta * ((1 - a_next) / (1 - a)).sqrt() * (1 - a / a_next).sqrt()
        x_next = a_next.sqrt() * x0 + (1 - a_next - s**2).clamp(min=0).sqrt() * e
        xs.append(x_next + s * next(fresh) if s > 0 else x_next)
    return xs


def s_pndm(m: EpsModel, x: torch.Tensor, grid: TimeGrid) -> list[torch.Tensor]:
    """Second-order pseudo linear multistep; its first step is an improved Euler (Heun) step."""
    level, xs, history = grid_level(grid, x), [x], []
    for t, t_next in grid.pairs:
        x = xs[-1]
        history.append(m(x, t))
        if len(history) > 1:
            e = 0.5 * (3 * history[-1] - history[-2])
        else:
            e = (history[-1] + m(transfer(x, t, t_next, history[-1], level), t_next)) / 2
        xs.append(transfer(x, t, t_next, e, level))
    return xs


def f_pndm(m: EpsModel, x: torch.Tensor, grid: TimeGrid) -> list[torch.Tensor]:
    """Fourth-order pseudo linear multistep; the first three steps are pseudo Runge-Kutta."""
    level, xs, history = grid_level(grid, x), [x], []
    for t, t_next in grid.pairs:
        x = xs[-1]
        history.append(m(x, t))
        if len(history) > 3:
            e = (1 / 24) * (55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4])
        else:
            t_mid = (t + t_next) / 2
            e1 = history[-1]
            e2 = m(transfer(x, t, t_mid, e1, level), t_mid)
            e3 = m(transfer(x, t, t_mid, e2, level), t_mid)
            e4 = m(transfer(x, t, t_next, e3, level), t_next)
            e = (1 / 6) * (e1 + 2 * e2 + 2 * e3 + e4)
        xs.append(transfer(x, t, t_next, e, level))
    return xs


def fon(m: EpsModel, x: torch.Tensor, grid: TimeGrid) -> list[torch.Tensor]:
    """Classical fourth-order method on the ODE in x; the history holds derivatives, not eps. Every stage's
    derivative is T(x, t, t - 1, e) - x at the step's starting x and t, as the paper's code evaluates it."""
    level, xs, history = grid_level(grid, x), [x], []
    for t, t_next in grid.pairs:
        x = xs[-1]

        def derivative(e):
            return transfer(x, t, t - 1, e, level) - x

        h = t - t_next
        history.append(derivative(m(x, t)))
        if len(history) > 3:
            d = (1 / 24) * (55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4])
        else:
            t_mid = (t + t_next) / 2
            d1 = history[-1]
            d2 = derivative(m(x + d1 * h / 2, t_mid))
            d3 = derivative(m(x + d2 * h / 2, t_mid))
            d4 = derivative(m(x + d3 * h, t_next))
            d = (1 / 6) * (d1 + 2 * d2 + 2 * d3 + d4)
        xs.append(x + d * h)
    return xs


def ipndm(m: EpsModel, x: torch.Tensor, grid: TimeGrid) -> list[torch.Tensor]:
    """iPNDM (Zhang and Chen 2023): Adams-Bashforth on the eps, its order ramping 1 -> 4 with the history."""
    level, xs, history = grid_level(grid, x), [x], []
    for t, t_next in grid.pairs:
        h = history
        h.append(m(xs[-1], t))
        if len(h) == 1:
            e = h[-1]
        elif len(h) == 2:
            e = (3 * h[-1] - h[-2]) / 2
        elif len(h) == 3:
            e = (23 * h[-1] - 16 * h[-2] + 5 * h[-3]) / 12
        else:
            e = (55 * h[-1] - 59 * h[-2] + 37 * h[-3] - 9 * h[-4]) / 24
        xs.append(transfer(xs[-1], t, t_next, e, level))
    return xs
