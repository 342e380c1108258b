"""How the tuner's local errors are weighted: call times by dynamic programming under three weightings, on the
digits UNet, each scored on noises the weighting never saw.

The candidate times, the teacher's states and the DDIM local errors are those of pndm_fast/tuning/dynamic.py;
only the weight of a local error at level (alpha, sigma) differs:
- `ve`: the error in the variance-exploding variable x / alpha, GITS' own measure;
- `vp`: the error in the variance-preserving state, as the solvers hold it;
- `gauss`: the `vp` error scaled by s / sqrt(alpha^2 s^2 + sigma^2), how much of it the ODE carries to the data
  for data of spread s (the tuner's).
For each weighting and emphasis (dynamic.py), three methods run on the least-cost times at each budget; the table
gives their error against the teacher on 128 noises other than the 32 whose trajectories chose the times, as a
ratio to the best diffusers configuration on those 128.

    python benchmarks/local_error_grids.py [--budgets 6 8 10] [--validation 128]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as a script from anywhere, like the other benchmarks
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402
from pndm_fast import pretrained, sample  # noqa: E402
from pndm_fast.levels import Level  # noqa: E402
from pndm_fast.pretrained import image_shape  # noqa: E402
from pndm_fast.runners.sample import noise_for  # noqa: E402
from pndm_fast.tuning import dynamic  # noqa: E402
from pndm_fast.tuning.peers import peer_candidates  # noqa: E402
from pndm_fast.tuning.search import explicit  # noqa: E402
from pndm_fast.tuning.teacher import Teacher, relative_error  # noqa: E402

WEIGHTS = ("ve", "vp", "gauss")
METHODS = ("DPM-Solver++2M", "UniPC-bh2:order=2", "PNDM-exact:order=2")
SELECTION = 32


def reweighted(errors: dynamic.LocalErrors, schedule, weight: str) -> dynamic.LocalErrors:
    """The same local errors under another weight (the tuner's is `gauss`); the step to the data keeps weight 1."""
    if weight == "gauss":
        return errors
    costs = errors.costs.copy()
    for j, t in enumerate(errors.times):
        level = Level.of(schedule.alpha(t))
        costs[:, j] *= (1 / level.alpha if weight == "ve" else 1.0) / dynamic.reaching_data(level, errors.spread)
    return dynamic.LocalErrors(errors.times, costs, errors.spread, errors.forwards)


def main(argv: list[str] | None = None, log=print) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", type=int, nargs="+", default=[6, 8, 10])
    p.add_argument("--validation", type=int, default=128)
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "tuning.md")
    args = p.parse_args(argv)
    model, schedule = pretrained("digits")
    noise = noise_for(range(SELECTION + args.validation), image_shape(model), 0)
    selection, validation = noise[:SELECTION], noise[SELECTION:]
    truth = Teacher.solve(model, validation, schedule, 100).x
    errors = dynamic.measure(model, schedule, selection, 200)

    def score(method, grid):
        with torch.inference_mode():
            return relative_error(sample(model, validation, schedule, method, timesteps=grid), truth)

    rows = []
    for budget in args.budgets:
        peer = min(score(c.method, c.grid) for c in peer_candidates(schedule, budget))
        for weight in WEIGHTS:
            costs = reweighted(errors, schedule, weight)
            for emphasis in dynamic.EMPHASES:
                grid = explicit(schedule, costs.calls(budget, emphasis), "dp")
                ratios = [score(m, grid) / peer for m in METHODS]
                rows.append({"budget": budget, "weight": weight, "emphasis": emphasis, "diffusers": peer,
                             **dict(zip(METHODS, ratios)), "best": float(np.min(ratios))})
                log(f"{budget} calls, {weight} e={emphasis:g}: " + ", ".join(f"{r:.2f}" for r in ratios))
    lines = ["## Weighting the local errors", "",
             f"`python benchmarks/local_error_grids.py {' '.join(argv or [])}`".replace(" `", "`"), "",
             f"Error on {args.validation} held-out noises as a ratio to the best diffusers configuration's, for each "
             "method on the least-cost times (the tuner's weight is gauss).", "",
             "| calls | weight | emphasis | " + " | ".join(METHODS) + " | best |",
             "|---|---|---|" + "---|" * (len(METHODS) + 1)]
    lines += [f"| {r['budget']} | {r['weight']} | {r['emphasis']:g} | " +
              " | ".join(f"{r[m]:.2f}" for m in METHODS) + f" | {r['best']:.2f} |" for r in rows]
    common.write_marked_section(args.doc, "benchmarks/local_error_grids.py", "\n".join(lines))
    return rows


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(sys.argv[1:])
