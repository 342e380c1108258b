"""diffusers' schedulers as candidates of the tuner: each configuration's own time steps for the run's schedule,
run by pndm_fast's equivalent method (tests/test_peers_diffusers.py holds the methods equal per step). Empty when
diffusers is not installed.
"""

from __future__ import annotations

import warnings

from ..errors import UserError
from ..grids import make_grid
from .search import Candidate

DPM = ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"})
# label -> (scheduler class, settings, method for a run of S steps, where the run ends)
CONFIGS = {
    "DDIM": ("DDIMScheduler", {"clip_sample": False}, lambda s: "DDIM", "zero"),
    "DDIM trailing": ("DDIMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"}, lambda s: "DDIM",
                      "zero"),
    "Euler karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, lambda s: "DDIM", "zero"),
    **{f"DPM++2M{suffix}": (DPM[0], {**DPM[1], **extra}, lambda s: "DPM-Solver++2M", "zero")
       for suffix, extra in (("", {}), (" karras", {"use_karras_sigmas": True}), (" lu", {"use_lu_lambdas": True}),
                             (" trailing", {"timestep_spacing": "trailing"}))},
    **{f"DPM++3M{suffix}": (DPM[0], {**DPM[1], "solver_order": 3, **extra},
                            lambda s: "DPM-Solver++3M" if s < 15 else "DPM-Solver++3M:lower_order_final=false", "zero")
       for suffix, extra in (("", {}), (" karras", {"use_karras_sigmas": True}))},
    **{f"UniPC-bh2{suffix}": ("UniPCMultistepScheduler", extra, lambda s: "UniPC-bh2:order=2", "zero")
       for suffix, extra in (("", {}), (" karras", {"use_karras_sigmas": True}),
                             (" trailing", {"timestep_spacing": "trailing"}))},
    "UniPC-bh2 o3": ("UniPCMultistepScheduler", {"solver_order": 3}, lambda s: "UniPC-bh2", "zero"),
    "DEIS": ("DEISMultistepScheduler", {},
             lambda s: "DEIS:order=2" if s < 15 else "DEIS:order=2,lower_order_final=false", "min"),
}


def peer_candidates(schedule, budget: int) -> list[Candidate]:
    """Every configuration at `budget` steps (one model call each), on `schedule`'s own betas (none on a
    continuous schedule: these are diffusers' spacings of a table)."""
    if not schedule.discrete:
        return []
    try:
        import diffusers
    except ImportError:
        return []
    out = []
    for label, (cls_name, settings, method, end) in CONFIGS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scheduler = getattr(diffusers, cls_name)(num_train_timesteps=schedule.num_steps,
                                                         trained_betas=schedule.betas.double().numpy(), **settings)
                scheduler.set_timesteps(budget)
            calls = [float(t) for t in scheduler.timesteps]
            grid = make_grid(schedule, calls + ([0.0] if end == "min" else []), end=end)
        except (UserError, ValueError, RuntimeError, IndexError):  # a configuration that cannot take this budget
            continue
        out.append(Candidate(method(budget), grid, f"diffusers {label}"))
    return out
