"""Schedules, time steps and transfer coefficients against closed forms and the paper's formula."""

import math

import numpy as np
import pytest
import torch

from pndm_fast import Schedule, UserError, make_grid
from pndm_fast.reference import transfer

LINEAR = {"type": "linear", "beta_start": 1e-4, "beta_end": 2e-2, "diffusion_step": 1000}


def test_linear_alpha_table_is_a_float32_cumprod_of_float64_betas():
    schedule = Schedule.from_config(LINEAR)
    exact = np.cumprod(1 - np.linspace(1e-4, 2e-2, 1000))
    assert schedule.alphas_cumprod.dtype == torch.float32
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), exact, rtol=1e-4)


def test_cosine_alpha_table_follows_the_closed_form():
    schedule = Schedule.from_config({"type": "cosine", "diffusion_step": 1000})

    def f(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    # without the 0.999 clip, prod_{j<=i} (1 - beta_j) telescopes to f((i + 1) / N) / f(0)
    closed = np.array([f((i + 1) / 1000) / f(0) for i in range(990)])
    np.testing.assert_allclose(schedule.alphas_cumprod[:990].numpy(), closed, rtol=2e-4, atol=1e-7)
    assert schedule.betas.max().item() == pytest.approx(0.999)


def test_quad_betas_are_squares_of_a_linear_ramp():
    schedule = Schedule.from_config({"type": "quad", "beta_start": 1e-4, "beta_end": 2e-2, "diffusion_step": 10})
    np.testing.assert_allclose(schedule.betas.numpy(), np.linspace(0.01, math.sqrt(0.02), 10) ** 2, rtol=1e-6)


def test_time_steps_of_21_have_skip_47_and_22_steps():
    grid = make_grid(Schedule.from_config(LINEAR), "uniform", 21)
    assert grid.times == tuple(float(t) for t in reversed(range(0, 1000, 47))) + (-1.0,) and grid.steps == 22
    assert grid.pairs[0] == (987, 940) and grid.pairs[-1] == (0, -1)


def test_every_step_count_from_1_to_n_runs_on_the_papers_times():
    """All 1000 step counts give the paper's seq = range(0, N, N // S); the 599 whose first step starts at
    t = 999 (where the paper's code reads ac[1000] past its table and crashes) read one entry more, the linear
    schedule's formula one step further: beta_N = beta_end + (beta_end - beta_start) / (N - 1)."""
    schedule = Schedule.from_config(LINEAR)
    beta_next = 2e-2 + (2e-2 - 1e-4) / 999
    extra = float(schedule.alphas_cumprod[-1]) * float(np.float32(1 - beta_next))
    past_the_table = []
    for steps in range(1, 1001):
        grid = make_grid(schedule, "uniform", steps)
        skip = 1000 // steps
        assert grid.times == tuple(float(t) for t in reversed(range(0, 1000, skip))) + (-1.0,)
        levels = [grid.level(t) for t in grid.times]
        assert all(0 < a < b < 1 for a, b in zip(levels, levels[1:])) and levels[-1] == float(schedule.alphas_cumprod[0])
        if grid.times[0] == 999:
            past_the_table.append(steps)
            assert levels[0] == pytest.approx(extra, rel=1e-6)
    assert len(past_the_table) == 599 and {3, 9, 27, 37, 111, 333, 999, 1000} <= set(past_the_table)


@pytest.mark.parametrize("steps", [0, -5, 1001, 2.5])
def test_impossible_step_counts_are_refused(steps):
    with pytest.raises(UserError, match="sample_step"):
        make_grid(Schedule.from_config(LINEAR), "uniform", steps)


@pytest.mark.parametrize("t,t_next", [(900, 800), (500, 475.5), (20, -1), (0, -1), (47, 23.5)])
def test_transfer_coefficients_reproduce_the_transfer_step(t, t_next):
    schedule = Schedule.from_config(LINEAR)
    x, e = torch.randn(2, 3, 5, 5, dtype=torch.float64).unbind(0)
    a_minus_1, b = schedule.transfer_coefficients(t, t_next)
    table = schedule.alphas_cumprod.double()
    expected = transfer(x, t, t_next, e, lambda time: table[int(time) + 1])
    torch.testing.assert_close(x + a_minus_1 * x + b * e, expected, rtol=1e-12, atol=1e-12)
