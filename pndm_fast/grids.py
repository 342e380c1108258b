"""Time grids: where a sampling run calls the model, and which noise level each state sits at.

A grid is the decreasing sequence of times t_0 > t_1 > ... > t_S of one run: the model is called at t_0 .. t_{S-1}
and the run ends at t_S. `level(t)` is the noise level (alpha-bar) of the state at time t, under one of two
conventions (docs/design.md, "Time and noise level"):
- "paper": ac[int(t) + 1], the paper's sampler (the `uniform` grid only, so that its runs stay number for number);
- "model": `Schedule.alpha(t)`, the level the model is asked about at t; t = -1 is sigma = 0, the data.

Grids (each one function of (schedule, steps, end, t_max, t_min) -> times; add a grid by adding a function):
- uniform: the paper's integer skip, seq = 0, skip, 2 skip, ... < N, ending at t = -1 read as ac[0];
- quadratic: DDIM's quadratic spacing in t; logsnr: uniform in log(alpha / (1 - alpha)); karras: EDM's rho = 7
  spacing of sigma = sqrt((1 - alpha) / alpha). These place their model calls between t_max (default N - 1, the
  noisiest level of the table) and t_min (default 0), and end either at sigma = 0 (`end="zero"`, t = -1: the last
  call at t_min, then a step to the data) or at t_min itself (`end="min"`: S + 1 points, the paper's habit of
  landing on ac[0]).
- an explicit increasing list of times in [0, N - 1]: the model is called at each, largest first, and the run
  ends at sigma = 0 (t = -1), as DDIM's code reads such a list; `end="min"` ends at the smallest listed time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np

from .errors import UserError
from .levels import Level
from .schedule import Schedule

PAPER = "paper"
MODEL = "model"
ENDS = ("zero", "min")
MAX_STEPS = 100_000


@dataclass(frozen=True, eq=False)
class TimeGrid:
    """The times of one run, largest first, the last being where it ends; `convention` says how a time reads as a
    noise level. Equal (and hashed) by value, so plans built on equal grids are shared."""

    schedule: Schedule
    times: tuple[float, ...]
    convention: str
    name: str

    def level(self, t: float) -> float:
        """alpha-bar of the state at time t."""
        return self.schedule.paper_level(t) if self.convention == PAPER else self.schedule.alpha(t)

    @property
    def pairs(self) -> list[tuple[float, float]]:
        """(t, t_next) of every step, in the order they run."""
        return list(zip(self.times[:-1], self.times[1:]))

    @property
    def steps(self) -> int:
        return len(self.times) - 1

    def _key(self):
        return (id(self.schedule), self.times, self.convention)

    def __eq__(self, other) -> bool:
        return isinstance(other, TimeGrid) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        shown = ", ".join(f"{t:g}" for t in self.times[:4]) + (", ..." if len(self.times) > 5 else "")
        if len(self.times) > 4:
            shown += f", {self.times[-1]:g}"
        return (f"{self.name} grid, {self.steps} steps: t = {shown} (levels {self.level(self.times[0]):.4g} to "
                f"{self.level(self.times[-1]):.4g}, {self.convention} convention)")


def uniform_times(schedule: Schedule, steps: int) -> tuple[float, ...]:
    """The paper's times for `sample_step` = steps: seq = range(0, N, N // steps), run from its largest down to -1.
    The number of steps is len(seq), which can exceed `steps` (21 gives skip 47 and 22 steps)."""
    seq = range(0, schedule.num_steps, schedule.num_steps // steps)
    return tuple(float(t) for t in reversed(seq)) + (-1.0,)


def _spaced(schedule: Schedule, steps: int, end: str, t_max: float, t_min: float,
            spacing: Callable[[np.ndarray], np.ndarray]) -> tuple[float, ...]:
    """Times from t_max down to t_min at fractions `spacing(u)` of the way, u uniform in [0, 1]."""
    points = steps if end == "zero" else steps + 1
    u = np.linspace(0.0, 1.0, points) if points > 1 else np.zeros(1)
    times = [float(t) for t in spacing(u)]
    times[0] = t_max  # exactly, whatever the spacing's rounding
    if points > 1:
        times[-1] = t_min
    return tuple(times) + ((-1.0,) if end == "zero" else ())


def quadratic_times(schedule, steps, end, t_max, t_min):
    """DDIM's quadratic spacing: t = t_min + (t_max - t_min) v^2, v uniform, fine steps near the data."""
    return _spaced(schedule, steps, end, t_max, t_min, lambda u: t_min + (t_max - t_min) * (1 - u) ** 2)


def logsnr_times(schedule, steps, end, t_max, t_min):
    """Uniform in the log-SNR between the levels at t_max and t_min."""
    def lam(t):
        return Level.of(schedule.alpha(t)).lam

    def spacing(u):
        lams = lam(t_max) + (lam(t_min) - lam(t_max)) * u
        return np.array([schedule.time_of(Level.from_lambda(v).ac) for v in lams])

    return _spaced(schedule, steps, end, t_max, t_min, spacing)


def karras_times(schedule, steps, end, t_max, t_min, rho: float = 7.0):
    """EDM's spacing (Karras et al. 2022, eq. 5): sigma^(1/rho) uniform between sigma(t_max) and sigma(t_min),
    with sigma = sqrt((1 - alpha) / alpha) the noise scale of x / sqrt(alpha)."""
    def sigma(t):
        return Level.of(schedule.alpha(t)).rho

    def spacing(u):
        hi, lo = sigma(t_max) ** (1 / rho), sigma(t_min) ** (1 / rho)
        sigmas = (hi + (lo - hi) * u) ** rho
        return np.array([schedule.time_of(Level.from_sigma(s).ac) for s in sigmas])

    return _spaced(schedule, steps, end, t_max, t_min, spacing)


GRIDS: dict[str, Callable] = {"quadratic": quadratic_times, "logsnr": logsnr_times, "karras": karras_times}


def grid_names() -> tuple[str, ...]:
    """Every named grid: the paper's uniform grid, then GRIDS (a grid added there is named at once)."""
    return ("uniform",) + tuple(GRIDS)

Timesteps = Union[str, Sequence[float]]


def make_grid(schedule: Schedule, timesteps: Timesteps = "uniform", steps: int | None = 50, end: str | None = None,
              t_max: float | None = None, t_min: float | None = None) -> TimeGrid:
    """The grid named `timesteps` (or given as an increasing list of times) with `steps` steps; UserError, one
    line, for anything that cannot make a grid."""
    n = schedule.num_steps
    if not isinstance(timesteps, str):
        return explicit_grid(schedule, timesteps, end or "zero")
    if timesteps not in grid_names():
        raise UserError(f"unknown time grid {timesteps!r}: expected one of {', '.join(grid_names())}, or an "
                        "increasing list of times")
    if steps is None:
        steps = 50
    limit = n if timesteps == "uniform" else MAX_STEPS
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= limit:
        what = " (the schedule's diffusion_step)" if timesteps == "uniform" else ""
        raise UserError(f"sample_step must be an integer from 1 to {limit}{what} for the {timesteps} grid, "
                        f"got {steps!r}")
    steps = int(steps)
    if timesteps == "uniform":
        if end not in (None, "min") or t_max is not None or t_min is not None:
            raise UserError("the uniform grid is the paper's: it takes no end, t_max or t_min; use quadratic, logsnr "
                            "or karras to choose where a run starts and ends")
        return TimeGrid(schedule, uniform_times(schedule, steps), PAPER, "uniform")
    end = end or "zero"
    if end not in ENDS:
        raise UserError(f"unknown grid end {end!r}: expected zero (finish at sigma = 0) or min (finish at t_min)")
    t_max = float(n - 1 if t_max is None else t_max)
    t_min = float(0 if t_min is None else t_min)
    if not 0 <= t_min < t_max <= n - 1:
        raise UserError(f"grid bounds must satisfy 0 <= t_min < t_max <= {n - 1}, got t_min {t_min:g}, "
                        f"t_max {t_max:g}")
    if end == "zero" and steps == 1:
        times = (t_max, -1.0)
    else:
        times = GRIDS[timesteps](schedule, steps, end, t_max, t_min)
    return TimeGrid(schedule, _checked_decreasing(times, timesteps), MODEL, timesteps)


def explicit_grid(schedule: Schedule, times: Sequence[float], end: str = "zero") -> TimeGrid:
    """A grid from an increasing list of times (the model is called at each, largest first)."""
    n = schedule.num_steps
    try:
        values = [float(t) for t in times]
    except (TypeError, ValueError):
        raise UserError(f"timesteps must be a grid name or a list of numbers, got {times!r}") from None
    if end not in ENDS:
        raise UserError(f"unknown grid end {end!r}: expected zero (finish at sigma = 0) or min (finish at the "
                        "smallest listed time)")
    if len(values) < (1 if end == "zero" else 2):
        raise UserError(f"a list of times needs at least {1 if end == 'zero' else 2} entries, got {len(values)}")
    if not all(math.isfinite(t) and 0 <= t <= n - 1 for t in values):
        raise UserError(f"every listed time must be in [0, {n - 1}], got {values}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise UserError(f"the listed times must be strictly increasing, got {values}")
    descending = tuple(reversed(values)) + ((-1.0,) if end == "zero" else ())
    return TimeGrid(schedule, descending, MODEL, "explicit")


def _checked_decreasing(times: tuple[float, ...], name: str) -> tuple[float, ...]:
    if any(b >= a for a, b in zip(times, times[1:])):
        raise UserError(f"the {name} grid collapses at these settings (two steps at one time: {times}); use fewer "
                        "steps or a wider [t_min, t_max]")
    return times
