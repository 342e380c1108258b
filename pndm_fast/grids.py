"""Time grids: where a sampling run calls the model, and which noise level each state sits at.

A grid is the decreasing sequence of times t_0 > t_1 > ... > t_S of one run: the model is called at t_0 .. t_{S-1}
and the run ends at t_S. `level(t)` is the noise level (alpha-bar) of the state at time t, under one of two
conventions (docs/design.md, "Time and noise level"):
- "paper": ac[int(t) + 1], the paper's sampler (the `uniform` grid only, so that its runs stay number for number);
- "model": `Schedule.alpha(t)`, the level the model is asked about at t; t = -1 is sigma = 0, the data.

Grids (each one function of (schedule, steps, end, **its parameters) -> times in GRIDS; add a grid by adding one):
- uniform: the paper's integer skip, seq = 0, skip, 2 skip, ... < N, ending at t = -1 read as ac[0];
- quadratic: DDIM's quadratic spacing in t; logsnr: uniform in log(alpha / (1 - alpha)); karras: EDM's rho = 7
  spacing of sigma = sqrt((1 - alpha) / alpha). These place their model calls between t_max (default N - 1, the
  noisiest level of the table) and t_min (default 0), and end either at sigma = 0 (`end="zero"`, t = -1: the last
  call at t_min, then a step to the data) or at t_min itself (`end="min"`: S + 1 points, the paper's habit of
  landing on ac[0]).
- diffusers' spacings of its multistep schedulers, `linspace`, `leading` (with its steps_offset as `offset`) and
  `trailing`: integer call times, then sigma = 0 (`end="zero"`) or t = 0 (`end="min"`, its "sigma_min");
- an explicit list of times in [0, N - 1], increasing or decreasing: the model is called at each, largest first,
  and the run ends at sigma = 0 (t = -1), as DDIM's code reads such a list; `end="min"` ends at the smallest.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np

from .errors import UserError
from .levels import Level
from .schedule import NoiseSchedule

PAPER = "paper"
MODEL = "model"
ENDS = ("zero", "min")
MAX_STEPS = 100_000


@dataclass(frozen=True, eq=False)
class TimeGrid:
    """The times of one run, largest first, the last being where it ends; `convention` says how a time reads as a
    noise level. Equal (and hashed) by value, so plans built on equal grids are shared."""

    schedule: NoiseSchedule
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


def uniform_times(schedule: NoiseSchedule, steps: int) -> tuple[float, ...]:
    """The paper's times for `sample_step` = steps: seq = range(0, N, N // steps), run from its largest down to -1.
    The number of steps is len(seq), which can exceed `steps` (21 gives skip 47 and 22 steps)."""
    seq = range(0, schedule.num_steps, schedule.num_steps // steps)
    return tuple(float(t) for t in reversed(seq)) + (-1.0,)


def bounds(schedule: NoiseSchedule, t_max: float | None, t_min: float | None) -> tuple[float, float]:
    """(t_max, t_min) of a grid placed between two times: by default the schedule's (N - 1 and 0 on the
    discrete table)."""
    t_max = float(schedule.t_max if t_max is None else t_max)
    t_min = float(schedule.t_min if t_min is None else t_min)
    low, high = schedule.t_low, schedule.t_high
    if not low <= t_min < t_max <= high:
        raise UserError(f"grid bounds must satisfy {low:g} <= t_min < t_max <= {high:g}, got t_min {t_min:g}, "
                        f"t_max {t_max:g}")
    return t_max, t_min


def spaced(steps: int, end: str, t_max: float, t_min: float,
           spacing: Callable[[np.ndarray], np.ndarray], t_data: float = -1.0) -> tuple[float, ...]:
    """Times from t_max down to t_min at `spacing(u)`, u uniform in [0, 1] (spacing(0) = t_max, spacing(1) = t_min):
    S calls and a step to sigma = 0 (time `t_data`) with end "zero", S + 1 points ending on t_min with end "min"."""
    if end == "zero" and steps == 1:
        return t_max, t_data
    points = steps if end == "zero" else steps + 1
    times = [float(t) for t in spacing(np.linspace(0.0, 1.0, points))]
    times[0], times[-1] = t_max, t_min  # exactly, whatever the spacing's rounding
    return tuple(times) + ((t_data,) if end == "zero" else ())


def quadratic_times(schedule, steps, end, t_max=None, t_min=None):
    """DDIM's quadratic spacing: t = t_min + (t_max - t_min) v^2, v uniform, fine steps near the data."""
    t_max, t_min = bounds(schedule, t_max, t_min)
    return spaced(steps, end, t_max, t_min, lambda u: t_min + (t_max - t_min) * (1 - u) ** 2, schedule.t_data)


def logsnr_times(schedule, steps, end, t_max=None, t_min=None):
    """Uniform in the log-SNR between the levels at t_max and t_min."""
    t_max, t_min = bounds(schedule, t_max, t_min)
    hi, lo = Level.of(schedule.alpha(t_max)).lam, Level.of(schedule.alpha(t_min)).lam
    return spaced(steps, end, t_max, t_min,
                  lambda u: [schedule.time_of(Level.from_lambda(hi + (lo - hi) * v).ac) for v in u], schedule.t_data)


def karras_times(schedule, steps, end, t_max=None, t_min=None, rho: float = 7.0):
    """EDM's spacing (Karras et al. 2022, eq. 5): sigma^(1/rho) uniform between sigma(t_max) and sigma(t_min),
    with sigma = sqrt((1 - alpha) / alpha) the noise scale of x / sqrt(alpha)."""
    t_max, t_min = bounds(schedule, t_max, t_min)
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise UserError(f"the karras grid's rho must be a number > 0, got {rho!r}")
    hi, lo = (Level.of(schedule.alpha(t)).rho ** (1 / rho) for t in (t_max, t_min))
    return spaced(steps, end, t_max, t_min,
                  lambda u: [schedule.time_of(Level.from_sigma((hi + (lo - hi) * v) ** rho).ac) for v in u],
                  schedule.t_data)


def _diffusers_end(calls: np.ndarray, end: str) -> tuple[float, ...]:
    """diffusers' integer call times, then sigma = 0 (its final_sigmas_type "zero") or t = 0 ("sigma_min")."""
    return tuple(float(t) for t in calls) + ((-1.0,) if end == "zero" else (0.0,))


def linspace_times(schedule, steps, end):
    """diffusers' "linspace" spacing of its multistep schedulers (DPM-Solver, UniPC, DEIS): the model is called at
    round(linspace(0, N - 1, S + 1)) but the last, largest first."""
    calls = np.linspace(0, schedule.num_steps - 1, steps + 1).round()[::-1][:-1]
    return _diffusers_end(calls, end)


def leading_times(schedule, steps, end, offset: int = 0):
    """diffusers' "leading" spacing: k (N // (S + 1)) for k = S, ..., 1, plus its `steps_offset`."""
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or not 0 <= offset < schedule.num_steps:
        raise UserError(f"the leading grid's offset (diffusers' steps_offset) must be an integer from 0 to "
                        f"{schedule.num_steps - 1}, got {offset!r}")
    calls = (np.arange(0, steps + 1) * (schedule.num_steps // (steps + 1))).round()[::-1][:-1] + offset
    return _diffusers_end(calls, end)


def trailing_times(schedule, steps, end):
    """diffusers' "trailing" spacing: round(N - k N / S) - 1 for k = 0, ..., S - 1, the first call at N - 1."""
    calls = np.arange(schedule.num_steps, 0, -schedule.num_steps / steps).round() - 1
    return _diffusers_end(calls, end)


GRIDS: dict[str, Callable] = {"quadratic": quadratic_times, "logsnr": logsnr_times, "karras": karras_times,
                              "linspace": linspace_times, "leading": leading_times, "trailing": trailing_times}
"""Named grids besides the paper's: each a function (schedule, steps, end, **parameters) -> times, largest first,
the last being where the run ends; its keyword parameters (t_max, t_min, rho, offset) are the grid's own."""


INTEGER_SPACINGS = ("linspace", "leading", "trailing")
"""diffusers' spacings of integer training times: grids of the discrete table only."""


def grid_names() -> tuple[str, ...]:
    """Every named grid: the paper's uniform grid, then GRIDS (a grid added there is named at once)."""
    return ("uniform",) + tuple(GRIDS)


Timesteps = Union[str, Sequence[float]]


def make_grid(schedule: NoiseSchedule, timesteps: Timesteps = "uniform", steps: int | None = 50,
              end: str | None = None, **parameters) -> TimeGrid:
    """The grid named `timesteps` (or given as a list of times) with `steps` steps and the grid's own parameters
    (t_max, t_min for quadratic, logsnr and karras; rho for karras; offset for leading); UserError, one line, for
    anything that cannot make a grid."""
    if not isinstance(timesteps, str):
        if parameters:
            raise UserError(f"a list of times takes no grid parameters, got {', '.join(parameters)}")
        return explicit_grid(schedule, timesteps, end or "zero")
    if timesteps not in grid_names():
        raise UserError(f"unknown time grid {timesteps!r}: expected one of {', '.join(grid_names())}, or a list of "
                        "times")
    steps = 50 if steps is None else steps
    limit = schedule.num_steps if timesteps == "uniform" and schedule.discrete else MAX_STEPS
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= limit:
        what = " (the schedule's diffusion_step)" if timesteps == "uniform" else ""
        raise UserError(f"sample_step must be an integer from 1 to {limit}{what} for the {timesteps} grid, "
                        f"got {steps!r}")
    parameters = {k: v for k, v in parameters.items() if v is not None}
    if timesteps == "uniform" and not schedule.discrete:
        if end not in (None, *ENDS) or parameters:
            raise UserError(f"the uniform grid of a {schedule.description} schedule is its own: it takes no grid "
                            "parameters, and end zero or min")
        return TimeGrid(schedule, schedule.uniform_times(int(steps), end or "zero"), MODEL, "uniform")
    if timesteps in INTEGER_SPACINGS and not schedule.discrete:
        raise UserError(f"the {timesteps} grid spaces the integer times of a discrete table; on a "
                        f"{schedule.description} schedule use uniform, quadratic, logsnr, karras or a list of times")
    if timesteps == "uniform":
        if end not in (None, "min") or parameters:
            raise UserError("the uniform grid is the paper's: it takes no end or grid parameters; use quadratic, "
                            "logsnr or karras to choose where a run starts and ends")
        return TimeGrid(schedule, uniform_times(schedule, int(steps)), PAPER, "uniform")
    end = end or "zero"
    if end not in ENDS:
        raise UserError(f"unknown grid end {end!r}: expected zero (finish at sigma = 0) or min (finish at t_min)")
    build = GRIDS[timesteps]
    takes = [p for p in inspect.signature(build).parameters if p not in ("schedule", "steps", "end")]
    unknown = sorted(set(parameters) - set(takes))
    if unknown:
        raise UserError(f"the {timesteps} grid has no parameter {unknown[0]!r}: it takes "
                        f"{', '.join(takes) or 'none'}")
    times = build(schedule, int(steps), end, **parameters)
    return TimeGrid(schedule, _checked_decreasing(tuple(times), timesteps), MODEL, timesteps)


def explicit_grid(schedule: NoiseSchedule, times: Sequence[float], end: str = "zero") -> TimeGrid:
    """A grid from a list of times in either order, increasing or decreasing (diffusers' `scheduler.timesteps`):
    the model is called at each, largest first."""
    low, high = schedule.t_low, schedule.t_high
    try:
        values = [float(t) for t in times]
    except (TypeError, ValueError):
        raise UserError(f"timesteps must be a grid name or a list of numbers, got {times!r}") from None
    if end not in ENDS:
        raise UserError(f"unknown grid end {end!r}: expected zero (finish at sigma = 0) or min (finish at the "
                        "smallest listed time)")
    if len(values) < (1 if end == "zero" else 2):
        raise UserError(f"a list of times needs at least {1 if end == 'zero' else 2} entries, got {len(values)}")
    if not all(math.isfinite(t) and low <= t <= high for t in values):
        raise UserError(f"every listed time must be in [{low:g}, {high:g}], got {values}")
    if len(values) > 1 and values[0] > values[-1]:
        values = values[::-1]
    if any(b <= a for a, b in zip(values, values[1:])):
        raise UserError(f"the listed times must be strictly increasing or strictly decreasing, got {times!r}")
    descending = tuple(reversed(values)) + ((schedule.t_data,) if end == "zero" else ())
    return TimeGrid(schedule, descending, MODEL, "explicit")


def _checked_decreasing(times: tuple[float, ...], name: str) -> tuple[float, ...]:
    if any(b >= a for a, b in zip(times, times[1:])):
        raise UserError(f"the {name} grid collapses at these settings (two steps at one time: {times}); use fewer "
                        "steps or a wider [t_min, t_max]")
    return times
