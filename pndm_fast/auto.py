"""`method="auto"`: the (method, grid) that the side-by-side study (benchmarks/accuracy_peers.py, docs/accuracy.md,
"Side by side with diffusers") measured most accurate for a budget of model calls.

`sample_step` is then the budget: the run makes at most that many model calls, warm-ups included. The table maps
measured budgets to a method and a grid family: a spacing, the sigma of the first call (None: the noisiest level)
and the sigma of the last call before the step to sigma = 0 (None: t = 0). A budget between two measured ones takes
the entry of the largest measured budget below it (above the last, the last; below the first, the first), and as
many steps of that grid as the budget allows. Sigmas, not times, so that the table reads the same on any schedule.
"""

from __future__ import annotations

from .errors import UserError
from .grids import TimeGrid, make_grid
from .methods import METHODS
from .schedule import Schedule

AUTO = "auto"
FALLBACK = "DDIM"  # one call per step and no warm-up: fits any budget of at least one call

# BEGIN TABLE (written by benchmarks/accuracy_peers.py)
TABLE = {}
# END TABLE


def entry_for(budget: int) -> tuple:
    keys = sorted(TABLE)
    below = [k for k in keys if k <= budget]
    return TABLE[below[-1] if below else keys[0]]


def _grid(schedule: Schedule, spacing: str, steps: int, sigma_start, sigma_last) -> TimeGrid:
    if spacing == "uniform":
        return make_grid(schedule, "uniform", steps)
    n = schedule.num_steps

    def time_at(sigma):
        return schedule.time_of(1.0 / (1.0 + sigma * sigma))

    t_max = None if sigma_start is None else min(n - 1.0, time_at(sigma_start))
    t_min = None if sigma_last is None else max(0.0, time_at(sigma_last))
    return make_grid(schedule, spacing, steps, "zero", t_max=t_max, t_min=t_min)


def choose(schedule: Schedule, budget) -> tuple[str, TimeGrid]:
    """(method, grid) for at most `budget` model calls; UserError for a budget that is not a positive integer."""
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise UserError(f"with method auto, sample_step is the budget of model calls: expected an integer >= 1, "
                        f"got {budget!r}")
    method, spacing, sigma_start, sigma_last = entry_for(budget)
    record = METHODS[method]
    # the most steps the method's call count allows, then down until the built plan fits (the uniform grid can
    # have a step more than asked: 21 gives 22)
    steps = max((s for s in range(1, budget + 1) if record.model_calls(s) <= budget), default=0)
    best = None
    while steps >= max(1, record.min_steps) and best is None:
        try:
            grid = _grid(schedule, spacing, steps, sigma_start, sigma_last)
            if grid.steps >= record.min_steps and record.build(grid).model_calls <= budget:
                best = grid
        except UserError:  # a grid too fine for its bounds at this many steps
            pass
        steps -= 1
    if best is None:  # the table's method cannot run this budget (e.g. one call): DDIM on the same grid family
        method = FALLBACK
        best = _grid(schedule, spacing if spacing != "uniform" else "logsnr", budget, sigma_start, sigma_last)
    return method, best


def describe(schedule: Schedule, budget: int) -> str:
    method, grid = choose(schedule, budget)
    return f"auto, {budget} model calls: {method} on the {grid}"


__all__ = ["AUTO", "TABLE", "choose", "describe", "entry_for"]
