"""`method="auto"`: the (method, grid) that the side-by-side study (benchmarks/accuracy_peers.py, docs/accuracy.md,
"Side by side with diffusers") measured most accurate for a budget of model calls: of the configurations it ran,
the one whose error stays nearest each tuned problem's best (the smallest worst ratio), checked on a problem that
no choice was made on. A method may carry options ("UniPC-bh1:order=2", pndm_fast.methods.method_record).

`sample_step` is then the budget: the run makes at most that many model calls, warm-ups included. The table maps
measured budgets to a method and a grid family: a spacing, the sigma of the first call (None: the noisiest level)
and the sigma of the last call before the step to sigma = 0 (None: t = 0). A budget between two measured ones takes
the entry of the largest measured budget below it (above the last, the last; below the first, the first), and as
many steps of that grid as the budget allows. Sigmas, not times, so that the table reads the same on any schedule.
"""

from __future__ import annotations

from .errors import UserError
from .grids import TimeGrid, make_grid
from .methods import method_record
from .schedule import Schedule

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


def _choose(schedule: Schedule, budget, timesteps="uniform", end=None) -> tuple[str, int, TimeGrid]:
    if not isinstance(schedule, Schedule):
        raise UserError(f"schedule must be a pndm_fast.Schedule, got {type(schedule).__name__}")
    if not (isinstance(timesteps, str) and timesteps == "uniform") or end is not None:
        raise UserError("method auto chooses its own time grid: drop timesteps and end (or name a method)")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise UserError(f"with method auto, sample_step is the budget of model calls: expected an integer >= 1, "
                        f"got {budget!r}")
    method, spacing, sigma_start, sigma_last = entry_for(budget)
    record = method_record(method)
    # the most steps the method's call count allows, then down until the built plan fits (the uniform grid can
    # have a step more than asked: 21 gives 22)
    steps = max((s for s in range(1, budget + 1) if record.model_calls(s) <= budget), default=0)
    while steps >= max(1, record.min_steps):
        try:
            grid = _grid(schedule, spacing, steps, sigma_start, sigma_last)
            if grid.steps >= record.min_steps and record.build(grid).model_calls <= budget:
                return method, steps, grid
        except UserError:  # a grid too fine for its bounds at this many steps
            pass
        steps -= 1
    # the table's method cannot run this budget (e.g. F-PNDM in fewer than 4 calls): DDIM on the same family
    spacing = spacing if spacing != "uniform" else "logsnr"
    return FALLBACK, budget, _grid(schedule, spacing, budget, sigma_start, sigma_last)


def choose(schedule: Schedule, budget, timesteps="uniform", end=None) -> tuple[str, TimeGrid]:
    """(method, grid) for at most `budget` model calls; UserError (one line) for a budget that is not a positive
    integer, or a grid asked for beside it."""
    method, _, grid = _choose(schedule, budget, timesteps, end)
    return method, grid


def as_flags(config: dict, args) -> tuple:
    """The command line's (method, timesteps, sample_step, timesteps_end) for --method auto, said on stderr."""
    import sys

    schedule = Schedule.from_config(config["Schedule"])
    method, steps, grid = _choose(schedule, args.sample_step, args.timesteps, args.timesteps_end)
    print(f"pndm-fast: auto, {args.sample_step} model calls: {method} on the {grid}", file=sys.stderr)
    if grid.name == "uniform":
        return method, "uniform", steps, None
    return method, tuple(reversed(grid.times[:-1])), steps, "zero"  # the same times, as an explicit list


__all__ = ["AUTO", "TABLE", "as_flags", "choose", "entry_for"]
