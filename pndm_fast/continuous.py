"""Continuous noise schedules: rectified flow (SD3, Flux), EDM / VE, and continuous VP (docs/design.md, "Schedules").

Each is a description on its own time variable: the flow's s in [0, 1], EDM's sigma itself, VP's t in [0, 1]. The
solvers never see that variable: they read the level alpha(t) (alpha-bar of the variance-preserving state) and
work in log-SNR, so every method and grid runs on every schedule. The data sit at t = 0 on all three.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import UserError
from .grids import spaced
from .levels import Level
from .schedule import NoiseSchedule


def _positive(name: str, value, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{owner} {name} must be a finite number > 0, got {value!r}")
    return float(value)


def _steps(owner: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 2 <= value <= 1_000_000:
        raise UserError(f"{owner} num_train_timesteps must be an integer from 2 to 1000000, got {value!r}")
    return int(value)


def shifted(s, shift: float):
    """SD3's resolution shift of a flow time: shift s / (1 + (shift - 1) s) (identity at shift 1)."""
    return shift * s / (1 + (shift - 1) * s)


def flux_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
               max_shift: float = 1.15) -> float:
    """Flux's dynamic shift for an image of `image_seq_len` latent tokens: exp(mu), mu linear in the length from
    base_shift at base_seq_len to max_shift at max_seq_len (diffusers' `calculate_shift`)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return math.exp(image_seq_len * slope + base_shift - slope * base_seq_len)


class FlowSchedule(NoiseSchedule):
    """Rectified flow: x_s = (1 - s) x0 + s eps, s in [0, 1]. `shift` (SD3 3.0; Flux's from `flux_shift`) places
    the `uniform` grid's times at shifted(u), u uniform; the levels do not depend on it. The model is called at
    s <= 1 - 1/N at most: at s = 1 the state holds no trace of the data, and a solver written in eps cannot step
    from there (diffusers' flow-sigma multistep solvers start at 1 - 1/N too)."""

    family = "flow"

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = 1000):
        self.shift = _positive("shift", shift, "FlowSchedule")
        self.num_steps = _steps("FlowSchedule", num_train_timesteps)
        self.description = f"rectified flow, shift {self.shift:g}"

    @property
    def t_max(self) -> float:
        return float(shifted(1.0 - 1.0 / self.num_steps, self.shift))

    @property
    def t_min(self) -> float:
        return float(shifted(1.0 / self.num_steps, self.shift))

    @property
    def t_low(self) -> float:
        return 0.0

    @property
    def t_high(self) -> float:
        return float(np.nextafter(1.0, 0.0))

    def alpha(self, t: float) -> float:
        s = self.check_time(t) if t != self.t_data else 0.0
        return (1 - s) ** 2 / ((1 - s) ** 2 + s * s)

    def time_of(self, level: float) -> float:
        rho = Level.of(level).rho  # s / (1 - s)
        return rho / (1.0 + rho)

    def uniform_times(self, steps: int, end: str) -> tuple[float, ...]:
        """diffusers' flow sigmas (its multistep solvers' use_flow_sigmas): shifted(u) for u = linspace(1 - 1/N,
        0, S + 1), the last being the data; with end "min", u from 1 - 1/N to 1/N."""
        low = 0.0 if end == "zero" else 1.0 / self.num_steps
        u = np.linspace(1.0 - 1.0 / self.num_steps, low, steps + 1)
        return tuple(float(s) for s in shifted(u, self.shift))

    def fingerprint(self) -> bytes:
        return np.array([self.num_steps], dtype=np.float64).tobytes()  # levels are fixed; bounds from N


class EDMSchedule(NoiseSchedule):
    """EDM / variance exploding: x = x0 + sigma eps, its time sigma itself, model calls in [sigma_min,
    sigma_max]. Its `uniform` grid is EDM's own (Karras et al. 2022, eq. 5: sigma^(1/rho) uniform, rho 7)."""

    family = "ve"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        self.sigma_min = _positive("sigma_min", sigma_min, "EDMSchedule")
        self.sigma_max = _positive("sigma_max", sigma_max, "EDMSchedule")
        self.rho = _positive("rho", rho, "EDMSchedule")
        if self.sigma_min >= self.sigma_max:
            raise UserError(f"EDMSchedule sigma_min {sigma_min!r} must be below sigma_max {sigma_max!r}")
        self.description = f"EDM, sigma {self.sigma_min:g} to {self.sigma_max:g}"

    @property
    def t_max(self) -> float:
        return self.sigma_max

    @property
    def t_min(self) -> float:
        return self.sigma_min

    def alpha(self, t: float) -> float:
        sigma = self.check_time(t) if t != self.t_data else 0.0
        return 1.0 / (1.0 + sigma * sigma)

    def time_of(self, level: float) -> float:
        return Level.of(level).rho

    def uniform_times(self, steps: int, end: str) -> tuple[float, ...]:
        hi, lo = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
        return spaced(steps, end, self.sigma_max, self.sigma_min, lambda u: (hi + (lo - hi) * u) ** self.rho,
                      self.t_data)

    def fingerprint(self) -> bytes:
        return np.array([self.sigma_min, self.sigma_max, self.rho], dtype=np.float64).tobytes()


class VPSchedule(NoiseSchedule):
    """Continuous variance preserving (Song et al. 2021; DPM-Solver's NoiseScheduleVP), t in [0, 1]:
    "linear", log alpha = -(beta_max - beta_min) t^2 / 2 - beta_min t; "cosine", alpha = f(t) / f(0) with
    f = cos((t + 0.008) / 1.008 pi / 2)^2, up to DPM-Solver's t_max 0.9946 (where f vanishes too fast)."""

    family = "vp"
    COSINE_S, COSINE_T_MAX = 0.008, 0.9946

    def __init__(self, kind: str = "linear", beta_min: float = 0.1, beta_max: float = 20.0, t_eps: float = 1e-3):
        if kind not in ("linear", "cosine"):
            raise UserError(f"VPSchedule kind must be linear or cosine, got {kind!r}")
        self.kind = kind
        self.beta_min = _positive("beta_min", beta_min, "VPSchedule")
        self.beta_max = _positive("beta_max", beta_max, "VPSchedule")
        self.t_eps = _positive("t_eps", t_eps, "VPSchedule")
        if self.beta_min >= self.beta_max or self.t_eps >= 0.5:
            raise UserError(f"VPSchedule needs beta_min < beta_max and t_eps < 0.5, got {beta_min!r}, {beta_max!r}, "
                            f"{t_eps!r}")
        self.description = (f"continuous VP linear, beta {self.beta_min:g} to {self.beta_max:g}" if kind == "linear"
                            else "continuous VP cosine")

    @property
    def t_max(self) -> float:
        return 1.0 if self.kind == "linear" else self.COSINE_T_MAX

    @property
    def t_min(self) -> float:
        return self.t_eps

    def _log_alpha(self, t: float) -> float:
        if self.kind == "linear":
            return -0.5 * (self.beta_max - self.beta_min) * t * t - self.beta_min * t
        s = self.COSINE_S
        f = math.cos((t + s) / (1 + s) * math.pi / 2)
        return 2 * (math.log(f) - math.log(math.cos(s / (1 + s) * math.pi / 2)))

    def alpha(self, t: float) -> float:
        t = self.check_time(t) if t != self.t_data else 0.0
        return math.exp(self._log_alpha(t))

    def time_of(self, level: float) -> float:
        log_alpha = math.log(level)
        if self.kind == "linear":  # the positive root of (b1 - b0) t^2 / 2 + b0 t + log alpha = 0
            a, b = 0.5 * (self.beta_max - self.beta_min), self.beta_min
            return 2 * -log_alpha / (b + math.sqrt(b * b - 4 * a * log_alpha))
        s = self.COSINE_S
        f0 = math.cos(s / (1 + s) * math.pi / 2)
        return (1 + s) * 2 / math.pi * math.acos(math.exp(0.5 * log_alpha) * f0) - s

    def uniform_times(self, steps: int, end: str) -> tuple[float, ...]:
        """Uniform in t from t_max to t_eps (S + 1 points with end "min"; S calls and the data with "zero")."""
        return spaced(steps, end, self.t_max, self.t_min, lambda u: self.t_max + (self.t_min - self.t_max) * u,
                      self.t_data)

    def fingerprint(self) -> bytes:
        kind = 0.0 if self.kind == "linear" else 1.0
        return np.array([kind, self.beta_min, self.beta_max, self.t_eps], dtype=np.float64).tobytes()


def schedule_from_config(section: dict) -> NoiseSchedule:
    """The schedule of a config's Schedule section: a rectified flow for `type: flow` (with its `shift` and
    `diffusion_step`, the N of its bounds), else the paper's discrete table (`Schedule.from_config`)."""
    from .config import validate_schedule
    from .schedule import Schedule

    if isinstance(section, dict) and section.get("type") == "flow":
        validate_schedule(section)
        return FlowSchedule(section.get("shift", 1.0), int(section.get("diffusion_step", 1000)))
    return Schedule.from_config(section)  # which validates the section itself
