"""`method="auto"`: the (method, grid) that the side-by-side study (benchmarks/accuracy_peers.py, docs/accuracy.md,
"Side by side with diffusers") measured most accurate for a budget of model calls: of the configurations it ran,
the one whose error stays nearest each tuned problem's best (the smallest worst ratio), checked on a problem that
no choice was made on. A method may carry options ("UniPC-bh1:order=2", pndm_fast.methods.method_record).

`model_calls` is then the budget: the run makes at most that many model calls, warm-ups included. The table maps
measured budgets to a method and a grid family: a spacing, the sigma of the first call (None: the noisiest level)
and the sigma of the last call before the step to sigma = 0 (None: t = 0). A budget between two measured ones takes
the entry of the largest measured budget below it (above the last, the last; below the first, the first), and as
many steps of that grid as the budget allows. Sigmas, not times, so that the table reads the same on any schedule.
"""

from __future__ import annotations

from .errors import UserError
from .grids import TimeGrid, make_grid
from .levels import Level
from .methods import Method, check_budget, fit_grid, method_record
from .schedule import NoiseSchedule, Schedule

AUTO = "auto"
FALLBACK = "DDIM"  # one call per step and no warm-up: fits any budget of at least one call

# BEGIN TABLE (written by benchmarks/accuracy_peers.py)
# python benchmarks/accuracy_peers.py; chosen on ring-2d and images-3x8x8 (held out: pairs-16d),
# error against the common target
TABLE = {
    5: ('UniPC-bh1:order=2', 'quadratic', None, 0.2),
    6: ('UniPC-bh1:order=2', 'quadratic', None, 0.1),
    8: ('UniPC-bh1:order=2', 'quadratic', None, 0.05),
    10: ('iPNDM', 'quadratic', None, None),
    12: ('UniPC-bh1:order=2', 'quadratic', None, 0.05),
    15: ('iPNDM', 'quadratic', None, None),
    20: ('iPNDM', 'quadratic', None, None),
    25: ('iPNDM', 'quadratic', None, None),
    50: ('UniPC-bh2:order=2', 'quadratic', None, None),
}
# END TABLE


def entry_for(budget: int) -> tuple:
    """The table's entry for `budget`: the largest measured budget at or below it (the first, below all)."""
    keys = sorted(TABLE)
    below = [k for k in keys if k <= budget]
    return TABLE[below[-1] if below else keys[0]]


def family_grid(schedule: Schedule, spacing: str, steps: int, sigma_start=None, sigma_last=None) -> TimeGrid:
    """`steps` steps of the grid family `spacing` whose first call sits at sigma_start (None: the noisiest level)
    and last at sigma_last (None: t = 0), ending at sigma = 0; "uniform" is the paper's grid."""
    if spacing == "uniform":
        return make_grid(schedule, "uniform", steps)
    t_max = None if sigma_start is None else min(schedule.t_max, schedule.time_of(Level.from_sigma(sigma_start).ac))
    t_min = None if sigma_last is None else max(schedule.t_min, schedule.time_of(Level.from_sigma(sigma_last).ac))
    return make_grid(schedule, spacing, steps, "zero", t_max=t_max, t_min=t_min)


def choose(schedule: Schedule, budget, timesteps="uniform", end=None) -> tuple[Method, TimeGrid]:
    """(method, grid) for at most `budget` model calls; UserError (one line) for a budget that is not a positive
    integer, or a grid asked for beside it."""
    if not isinstance(schedule, NoiseSchedule):
        raise UserError(f"schedule must be a pndm_fast.Schedule, got {type(schedule).__name__}")
    if not (isinstance(timesteps, str) and timesteps == "uniform") or end is not None:
        raise UserError("method auto chooses its own time grid: drop timesteps and end (or name a method)")
    method, spacing, sigma_start, sigma_last = entry_for(check_budget(budget))
    record = method_record(method)
    try:
        return record, fit_grid(record, budget, lambda s: family_grid(schedule, spacing, s, sigma_start, sigma_last))
    except UserError:  # the table's method cannot run this budget: DDIM on the same family fits any
        spacing = spacing if spacing != "uniform" else "logsnr"
        return method_record(FALLBACK), family_grid(schedule, spacing, budget, sigma_start, sigma_last)


__all__ = ["AUTO", "TABLE", "choose", "entry_for", "family_grid"]
