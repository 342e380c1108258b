"""The noise schedule and the time steps of a sampling run (SPEC sections 1 to 3)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import validate_schedule
from .errors import UserError


def make_betas(kind: str, num_steps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> np.ndarray:
    """Betas in float64, exactly as the reference computes them."""
    if kind == "linear":
        return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    if kind == "quad":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2
    if kind == "cosine":
        def f(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - f((i + 1) / num_steps) / f(i / num_steps), 0.999) for i in range(num_steps)])
    raise UserError(f"unknown Schedule.type {kind!r}: expected linear, quad or cosine")


@dataclass(frozen=True)
class TimeSteps:
    """The (t, t_next) pairs of a run, from the largest t down to t_next = -1 (SPEC section 2)."""

    seq: tuple[int, ...]

    @property
    def pairs(self) -> list[tuple[int, int]]:
        seq_next = (-1,) + self.seq[:-1]
        return list(zip(reversed(self.seq), reversed(seq_next)))

    def __len__(self) -> int:
        return len(self.seq)


class Schedule:
    """Betas and the float32 cumulative product `ac` the sampler reads.

    `ac` is a float32 cumprod on purpose: the reference computes it that way, and matching its outputs to 1e-6
    needs the same rounding. Coefficients are then derived from it in float64.
    """

    def __init__(self, betas: np.ndarray):
        self.betas = torch.from_numpy(np.asarray(betas, dtype=np.float64)).float()
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.num_steps = len(betas)
        self._ac64 = self.alphas_cumprod.double().numpy()  # host-side table: coefficients never touch a tensor

    @classmethod
    def from_config(cls, section: dict) -> "Schedule":
        """The schedule of a config's Schedule section; bad values are refused with one line naming the key."""
        validate_schedule(section)
        kind = section.get("type", "linear")
        schedule = cls(make_betas(kind, int(section.get("diffusion_step", 1000)),
                                  section.get("beta_start", 1e-4), section.get("beta_end", 2e-2)))
        # The transfer coefficients (eq. 9) divide by sqrt(ac) and by sqrt(1 - ac): a table that reaches 0 in
        # float32 (large betas over many steps, e.g. beta 0.5 underflows after ~150) or never leaves 1 (betas below
        # float32's 6e-8) would divide by zero when a plan is built.
        last, second = float(schedule.alphas_cumprod[-1]), float(schedule.alphas_cumprod[1])
        if not (last > 0.0 and second < 1.0):
            raise UserError(f"Schedule ({kind}, beta_start {section.get('beta_start', 1e-4)!r}, beta_end "
                            f"{section.get('beta_end', 2e-2)!r}, diffusion_step {schedule.num_steps}) gives an "
                            f"alpha_cumprod table from {second:g} to {last:g} in float32: expected it strictly "
                            "between 0 and 1; lower beta_end or diffusion_step, or raise beta_start")
        return schedule

    def ac(self, t: float) -> float:
        """The alpha the sampler reads for time t: ac[int(t) + 1], int() truncating toward zero (SPEC section 3)."""
        return float(self._ac64[int(t) + 1])

    def time_steps(self, sample_step: int) -> TimeSteps:
        """The sequence for `sample_step`, refused when it is impossible or would read past the alpha table."""
        n = self.num_steps
        if not isinstance(sample_step, int) or isinstance(sample_step, bool) or sample_step < 1 or sample_step > n:
            raise UserError(f"sample_step must be an integer from 1 to {n} (the schedule's diffusion_step), "
                            f"got {sample_step!r}")
        skip = n // sample_step
        seq = tuple(range(0, n, skip))
        if seq[-1] + 1 >= n:
            raise UserError(
                f"sample_step {sample_step} gives time step {seq[-1]}, whose transfer step would read alpha "
                f"index {seq[-1] + 1} past the table of {n}; choose another sample_step (e.g. {sample_step + 1})")
        return TimeSteps(seq)

    def transfer_coefficients(self, t: float, t_next: float) -> tuple[float, float]:
        """(A - 1, B) in float64 with T(x, t, t_next, e) = x + (A - 1) x + B e (the paper's eq. 9).

        A - 1 rather than A keeps the small change to x representable in float32.
        """
        a, a_next = self.ac(t), self.ac(t_next)
        sa, sn = math.sqrt(a), math.sqrt(a_next)
        a_minus_1 = (a_next - a) / (sa * (sa + sn))
        b = -(a_next - a) / (sa * (math.sqrt((1 - a_next) * a) + math.sqrt((1 - a) * a_next)))
        return a_minus_1, b
