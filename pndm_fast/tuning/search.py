"""The candidates the tuner measures, and the optimiser of a candidate's call times.

A candidate is a method (with its options) and a TimeGrid. The families are every registered method and option on
every grid family, fitted to the budget with `fit_grid` (as `auto` and the accuracy study fit them), and, for the
grid families placed between two times, the level of their last call. The optimiser moves the call times one at a
time in log-SNR (a pattern search): derivative-free, monotone by construction, and a model call per candidate
step is all it needs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from ..auto import family_grid
from ..errors import UserError
from ..grids import MODEL, TimeGrid
from ..levels import Level
from ..methods import METHODS, Real, fit_grid, method_record

FAMILIES = ("uniform", "quadratic", "logsnr", "karras", "linspace", "trailing", "leading")
BOUNDED = ("quadratic", "logsnr", "karras")
LAST_SIGMAS = (0.4, 0.2, 0.1, 0.05)  # the sigma of a bounded grid's last call before the step to sigma = 0


@dataclass(frozen=True)
class Candidate:
    method: str
    grid: TimeGrid
    label: str


def method_variants() -> list[str]:
    """Every registered ODE method (not the stochastic samplers: the teacher is the ODE's solution) with every
    combination of its listed options' values (a `Real` option stays at its default), by canonical name."""
    names = []
    for record in METHODS.values():
        if record.stochastic:
            continue
        keys = list(record.options)
        for values in itertools.product(*([v for v in record.options[k] if not isinstance(v, Real)] for k in keys)):
            spelled = {k: str(v).lower() for k, v in zip(keys, values)}
            name = record.configured(spelled).name
            if name not in names:
                names.append(name)
    return names


def family_candidates(schedule, budget: int, methods, families=FAMILIES, last_sigma=None) -> list[Candidate]:
    """Each method on each family, with as many steps as `budget` model calls allow (those that fit at all)."""
    out = []
    for method, family in itertools.product(methods, families):
        if last_sigma is not None and family not in BOUNDED:
            continue
        record = method_record(method)
        try:
            grid = fit_grid(record, budget, lambda steps: family_grid(schedule, family, steps, None, last_sigma))
        except UserError:
            continue
        where = "" if last_sigma is None else f", last call at sigma {last_sigma:g}"
        out.append(Candidate(method, grid, f"{method} on {family}{where}"))
    return out


def explicit(schedule, calls, name: str = "tuned") -> TimeGrid:
    """The grid that calls the model at `calls` (decreasing) and ends at sigma = 0."""
    return TimeGrid(schedule, tuple(float(t) for t in calls) + (schedule.t_data,), MODEL, name)


def optimise_times(evaluate, candidate: Candidate, schedule, evaluations: int) -> tuple[Candidate, float]:
    """Pattern search on the candidate's call times in lambda = log(alpha / sigma): each call moved by +-step while
    that lowers `evaluate(candidate)`, the steps halved when no move does; at most `evaluations` evaluations.
    Returns the best candidate found and its value (the start's, if nothing beat it)."""
    grid = candidate.grid
    calls = list(grid.times[:-1]) if grid.times[-1] == schedule.t_data else list(grid.times)
    lams = [Level.of(schedule.alpha(t)).lam for t in calls]
    # the calls stay within the schedule: the first at most at its noisiest time, the last at least at t_min
    bottom, top = (Level.of(schedule.alpha(t)).lam for t in (schedule.t_max, schedule.t_min))

    def at(values) -> Candidate:
        times = [min(schedule.t_max, max(schedule.t_min, schedule.time_of(Level.from_lambda(v).ac))) for v in values]
        return Candidate(candidate.method, explicit(schedule, times), f"{candidate.method}, tuned times")

    best = at(lams)
    best_value = evaluate(best)
    used = 1
    gaps = [b - a for a, b in zip([bottom] + lams, lams + [top])]  # below and above each call
    steps = [0.5 * max(below, above) for below, above in zip(gaps, gaps[1:])]
    while used < evaluations and max(steps, default=0) > 1e-3:
        improved = False
        for i in range(len(lams)):
            for sign in (1, -1):
                trial = list(lams)
                trial[i] += sign * steps[i]
                lower = trial[i - 1] if i > 0 else bottom
                upper = trial[i + 1] if i + 1 < len(trial) else top
                if not lower + 1e-6 < trial[i] < upper - 1e-6 and not (i == 0 and trial[i] == bottom):
                    continue
                value = evaluate(at(trial))
                used += 1
                if value < best_value:
                    lams, best_value, best, improved = trial, value, at(trial), True
                    break
                if used >= evaluations:
                    return best, best_value
        if not improved:
            steps = [s / 2 for s in steps]
    return best, best_value


def lowest(scored: dict, count: int, distinct=lambda c: c.label) -> list:
    """The `count` candidates of {candidate: value} with the lowest finite values, one per `distinct` key."""
    seen, out = set(), []
    for cand, value in sorted(scored.items(), key=lambda kv: kv[1]):
        key = distinct(cand)
        if key in seen or not math.isfinite(value):
            continue
        seen.add(key)
        out.append(cand)
        if len(out) == count:
            break
    return out
