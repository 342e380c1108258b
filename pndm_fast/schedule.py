"""The noise schedule: betas, the float32 alpha table, and the noise level at any (possibly fractional) time.

`NoiseSchedule` is what every schedule shares (docs/design.md, "Schedules"): the level alpha(t) (alpha-bar of the
variance-preserving state the solvers run on) at the schedule's own time t, its inverse, and the time range. This
module holds the paper's discrete table; `pndm_fast/continuous.py` the continuous VP, EDM and rectified-flow ones.

Two readings of the table meet here (docs/design.md, "Time and noise level"):
- the model's: network time t means noise level alpha(t) = ac[t] at integer t, as training noises the data;
  between integers log ac is interpolated linearly, and alpha(-1) = 1 (no noise);
- the paper's sampler: the state at time t sits at level ac[int(t) + 1], one index later (`paper_level`).
"""

from __future__ import annotations

import math

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
        return np.array([_cosine_beta(i, num_steps) for i in range(num_steps)])
    raise UserError(f"unknown Schedule.type {kind!r}: expected linear, quad or cosine")


def _cosine_beta(i: int, num_steps: int) -> float:
    def f(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    # Past the last step f(s) climbs again (cos squared beyond pi / 2): the formula's own 0.999 cap holds there.
    if i + 1 > num_steps:
        return 0.999
    return min(1 - f((i + 1) / num_steps) / f(i / num_steps), 0.999)


def next_beta(kind: str, num_steps: int, beta_start: float, beta_end: float) -> float:
    """beta[N], the schedule's own formula one step past its last: the linear and quad spacings continued, the
    cosine schedule's cap. The paper's sampler reads ac[N] when its first step starts at t = N - 1."""
    if kind == "linear":
        return beta_end + (beta_end - beta_start) / (num_steps - 1)
    if kind == "quad":
        root = beta_end**0.5 + (beta_end**0.5 - beta_start**0.5) / (num_steps - 1)
        return root**2
    return _cosine_beta(num_steps, num_steps)


class NoiseSchedule:
    """A noise schedule: `alpha(t)`, the level (alpha-bar) at the schedule's time t, from `t_data` (level 1, the
    data) up to `t_high`, and `time_of(level)`, its inverse. The solvers run on the variance-preserving state
    x = sqrt(alpha) x0 + sqrt(1 - alpha) eps; `family` says how the network's own state relates to it
    (`pndm_fast.levels.FAMILIES`: "vp" the same, "ve" x / sqrt(alpha), "flow" (1 - s) x0 + s eps)."""

    family = "vp"
    discrete = False
    t_data = 0.0
    description = ""

    @property
    def t_max(self) -> float:
        """The default noisiest time of a grid (its first model call)."""
        raise NotImplementedError

    @property
    def t_min(self) -> float:
        """The default least noisy model call of a grid placed between two times."""
        raise NotImplementedError

    @property
    def t_low(self) -> float:
        """The least time the model may be called at."""
        return self.t_min

    @property
    def t_high(self) -> float:
        """The largest time the model may be called at."""
        return self.t_max

    def alpha(self, t: float) -> float:
        raise NotImplementedError

    def time_of(self, level: float) -> float:
        raise NotImplementedError

    def fingerprint(self) -> bytes:
        """Bytes that differ between schedules reading some time as different levels (profiles key on them)."""
        raise NotImplementedError

    def same_levels(self, other: "NoiseSchedule") -> bool:
        """Whether `other` reads every time as the same noise level."""
        return other is self or (type(other) is type(self) and other.fingerprint() == self.fingerprint())

    def check_time(self, t: float, what: str = "time") -> float:
        """t as a float, or UserError (one line) when it is outside [t_low, t_high]."""
        t = float(t)
        if not (math.isfinite(t) and self.t_low <= t <= self.t_high):
            raise UserError(f"{what} {t:g} is outside the {self.description} schedule's [{self.t_low:g}, "
                            f"{self.t_high:g}]")
        return t


class Schedule(NoiseSchedule):
    """Betas and the float32 cumulative product `alphas_cumprod` (ac) the sampler reads.

    `ac` is a float32 cumprod on purpose: the reference computes it that way, and matching its outputs to 1e-6
    needs the same rounding. Every coefficient is then derived from it in float64.
    """

    def __init__(self, betas: np.ndarray, next_beta: float | None = None, description: str = ""):
        self.betas = torch.from_numpy(np.asarray(betas, dtype=np.float64)).float()
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.num_steps = len(betas)
        self.description = description or f"{self.num_steps} betas from {float(self.betas[0]):g} " \
                                          f"to {float(self.betas[-1]):g}"
        # One entry past the table (the formula one step further, else the last beta again), in float32 like the
        # rest: the paper's first step from t = N - 1 reads it (docs/design.md, "Every step count runs").
        extra = float(self.betas[-1]) if next_beta is None else next_beta
        ac_next = self.alphas_cumprod[-1:] * (1.0 - torch.tensor([extra], dtype=torch.float64).float())
        self.paper_table = torch.cat([self.alphas_cumprod, ac_next]).double().numpy()
        # log alpha at times -1, 0, ..., N - 1 (alpha(-1) = 1), for the model's continuous reading.
        self._log_alpha = np.concatenate([[0.0], np.log(self.paper_table[:-1])])

    @classmethod
    def from_config(cls, section: dict) -> "Schedule":
        """The schedule of a config's Schedule section; bad values are refused with one line naming the key."""
        validate_schedule(section)
        kind = section.get("type", "linear")
        if kind == "flow":
            raise UserError("Schedule.type flow is a rectified flow, not a table of betas: read the section with "
                            "pndm_fast.continuous.schedule_from_config")
        start, end = section.get("beta_start", 1e-4), section.get("beta_end", 2e-2)
        n = int(section.get("diffusion_step", 1000))
        schedule = cls(make_betas(kind, n, start, end), next_beta(kind, n, start, end),
                       f"{kind}, {n} steps, beta {start:g} to {end:g}")
        # The transfer coefficients (eq. 9) divide by sqrt(ac) and by sqrt(1 - ac): a table that reaches 0 in
        # float32 (large betas over many steps, e.g. beta 0.5 underflows after ~150) or never leaves 1 (betas below
        # float32's 6e-8) would divide by zero when a plan is built.
        last, second = float(schedule.paper_table[-1]), float(schedule.alphas_cumprod[1])
        if not (last > 0.0 and second < 1.0):
            raise UserError(f"Schedule ({kind}, beta_start {start!r}, beta_end {end!r}, diffusion_step {n}) gives an "
                            f"alpha_cumprod table from {second:g} to {last:g} in float32: expected it strictly "
                            "between 0 and 1; lower beta_end or diffusion_step, or raise beta_start")
        return schedule

    def __repr__(self) -> str:
        return (f"Schedule({self.description}; alpha_cumprod {float(self.alphas_cumprod[0]):.6g} at t=0 to "
                f"{float(self.alphas_cumprod[-1]):.3g} at t={self.num_steps - 1})")

    discrete = True
    t_data = -1.0

    @property
    def t_max(self) -> float:
        return float(self.num_steps - 1)

    @property
    def t_min(self) -> float:
        return 0.0

    def fingerprint(self) -> bytes:
        return np.ascontiguousarray(self.paper_table).tobytes()

    def alpha(self, t: float) -> float:
        """The noise level (alpha-bar, the cumulative product) the model is asked about at time t in [-1, N - 1]:
        ac[t] at integer t, log ac linear in between, 1 at t = -1. Float64."""
        t = float(t)
        if not -1.0 <= t <= self.num_steps - 1:
            raise UserError(f"time {t:g} is outside the schedule's [-1, {self.num_steps - 1}]")
        i = min(int(math.floor(t + 1.0)), self.num_steps)
        frac = t + 1.0 - i
        if frac == 0.0:  # the table itself, not exp(log()) of it
            return 1.0 if i == 0 else float(self.paper_table[i - 1])
        return math.exp((1.0 - frac) * self._log_alpha[i] + frac * self._log_alpha[i + 1])

    def time_of(self, level: float) -> float:
        """The inverse of `alpha`: the time in [-1, N - 1] whose level is `level` (alpha is strictly decreasing)."""
        ascending = self._log_alpha[::-1]  # log alpha at times N - 1, ..., -1
        times = np.arange(self.num_steps - 1, -2, -1, dtype=np.float64)
        return float(np.interp(math.log(level), ascending, times))

    def paper_level(self, t: float) -> float:
        """The level the paper's sampler places the state at for time t: ac[int(t) + 1], int() truncating toward
        zero, so t = -1 reads ac[0] and t = N - 1 reads the one entry past the table."""
        return float(self.paper_table[int(t) + 1])

    def transfer_coefficients(self, t: float, t_next: float) -> tuple[float, float]:
        """(A - 1, B) of the paper's transfer step from t to t_next at its own levels (`paper_level`)."""
        return transfer_coefficients(self.paper_level(t), self.paper_level(t_next))


def transfer_coefficients(a: float, a_next: float) -> tuple[float, float]:
    """(A - 1, B) in float64 with T(x, e) = x + (A - 1) x + B e: the paper's eq. 9 from level a to level a_next.

    A - 1 rather than A keeps the small change to x representable in float32. a_next = 1 (sigma = 0) is allowed:
    the step then lands on the data prediction (x - sqrt(1 - a) e) / sqrt(a).
    """
    sa, sn = math.sqrt(a), math.sqrt(a_next)
    a_minus_1 = (a_next - a) / (sa * (sa + sn))
    b = -(a_next - a) / (sa * (math.sqrt((1 - a_next) * a) + math.sqrt((1 - a) * a_next)))
    return a_minus_1, b
