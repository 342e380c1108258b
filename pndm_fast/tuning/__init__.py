"""A sampler tuned to the user's model: per budget of model calls, the method and call times with the least error
against a teacher, chosen on one set of noises and validated on another (docs/tuning.md).

    profile = pndm_fast.tune(model, schedule, [4, 5, 6, 8, 10], noise=n1, validation_noise=n2)
    x = pndm_fast.sample(model, noise, schedule, "auto", model_calls=6, profile=profile)

Once per run, the local errors along the teacher's trajectories from the selection noises give the call times of
least total error for every number of calls (dynamic programming, `dynamic.py`). Per budget: (1) every method
and option on every grid family and on those times, fitted to the budget, screened on the first `screen`
selection noises; (2) the best few on the bounded families again with their last call at several levels, on
every selection noise; (3) the call times of the best `optimise` moved by a pattern search; (4) the finalists,
the best diffusers configuration when diffusers is installed and auto's static choice, scored on the validation
noises: the lowest validated error is the choice, so it is never worse there than the best diffusers
configuration or auto's static table.
"""

from __future__ import annotations

import math
import time

import torch

from .. import auto
from ..adapters import Denoiser, as_denoiser
from ..errors import UserError
from ..methods import method_record
from ..sampling import cached_plan, sample
from . import dynamic
from .gather import score_together
from .peers import peer_candidates
from .profile import Profile
from .search import BOUNDED, FAMILIES, LAST_SIGMAS, Candidate, family_candidates, lowest, method_variants, \
    optimise_times
from .teacher import Teacher, relative_error

__all__ = ["tune", "Profile", "Teacher"]
# Candidates scored at once (gather.py): on the 2-core CPU, 12 candidates on the digits UNet scored 1.7x faster
# and one whole budget tuned 1.2x faster (docs/tuning.md); a GPU's idle share at small batches is larger.
TOGETHER = 16


def noise_rows(denoiser: Denoiser, start: int, stop: int, total: int) -> Denoiser:
    """The Denoiser for noises start .. stop - 1 of `total`: conditioning tensors with a row per noise sliced."""
    def cut(kwargs: dict) -> dict:
        return {k: v[start:stop] if isinstance(v, torch.Tensor) and v.dim() > 0 and len(v) == total else v
                for k, v in kwargs.items()}

    return _rebuilt(denoiser, denoiser.net, cut)


def with_net(denoiser: Denoiser, net) -> Denoiser:
    """`denoiser` calling `net` in place of its network (gathered scoring's shared network), all else kept."""
    return _rebuilt(denoiser, net, dict)


def _rebuilt(denoiser: Denoiser, net, conditioning) -> Denoiser:
    return Denoiser(net, denoiser.prediction, conditioning(denoiser.cond) or None,
                    conditioning(denoiser.uncond) or None, denoiser.guidance, denoiser.time_input,
                    denoiser.guidance_rescale, **conditioning(denoiser.model_kwargs))


class _Scorer:
    """Errors of candidates against the teacher on one set of noises, counting the model calls spent. `together`
    candidates at a time share their forwards (gather.py): eager runs, one thread each."""

    def __init__(self, model, schedule, noise, truth, backend, span: tuple[int, int, int], together: int = 1):
        self.model = noise_rows(as_denoiser(model), *span)
        self.schedule, self.noise, self.truth, self.backend = schedule, noise, truth, backend
        self.together, self.forwards = together, 0

    def __call__(self, candidate: Candidate) -> float:
        error, forwards = self._score(candidate, self.model, self.backend)
        self.forwards += forwards
        return error

    def many(self, candidates) -> dict:
        """{candidate: error} of each, `together` at a time."""
        candidates = list(dict.fromkeys(candidates))
        if self.together <= 1 or len(candidates) <= 1:
            return {c: self(c) for c in candidates}
        # a CUDA graph replays its forwards without Python, where they could not meet: eager runs gather
        backend = "fused" if self.backend in ("auto", "graph") else self.backend
        scores = score_together(lambda c, net: self._score(c, with_net(self.model, net), backend),
                                self.model.net, candidates, self.together, self.model.module, self.noise.device)
        self.forwards += sum(forwards for _, forwards in scores)
        return {c: error for c, (error, _) in zip(candidates, scores)}

    def _score(self, candidate: Candidate, model: Denoiser, backend: str) -> tuple[float, int]:
        """(error, image-forwards spent) of one candidate's run."""
        try:
            with torch.inference_mode():
                x = sample(model, self.noise, self.schedule, candidate.method, backend=backend,
                           timesteps=candidate.grid)
        except UserError:  # e.g. an x0 model asked about sigma = 0
            return math.inf, 0
        forwards = cached_plan(candidate.grid, method_record(candidate.method)).model_calls * len(self.noise)
        error = relative_error(x, self.truth)
        return (error if math.isfinite(error) else math.inf), forwards


def tune(model, schedule, budgets, noise: torch.Tensor, validation_noise: torch.Tensor, guidance: float | None = None,
         *, methods=None, families=FAMILIES, screen: int = 8, finalists: int = 3, optimise: int = 2,
         evaluations: int = 24, teacher_steps: int = 100, backend: str = "auto", peers: bool = True,
         together: int = TOGETHER, profile: Profile | None = None, on_budget=None, progress=None) -> Profile:
    """The tuned profile of `model` (any `sample()` model; `guidance` overrides a Denoiser's scale) for each budget.

    `noise` selects, `validation_noise` (other noises) decides and is what the profile reports (a conditional
    Denoiser's tensors hold a row per noise of `noise`, then of `validation_noise`); `profile` continues
    an earlier run (its finished budgets are kept), `on_budget(profile)` is called after each budget (to save it),
    `progress(text)` after each stage. `together` candidates are scored at once, their forwards gathered into one
    (gather.py; 1 scores them one by one)."""
    denoiser = as_denoiser(model)
    if guidance is not None:
        denoiser = Denoiser(denoiser.net, denoiser.prediction, denoiser.cond or None, denoiser.uncond or None,
                            guidance, denoiser.time_input, denoiser.guidance_rescale, **denoiser.model_kwargs)
    budgets = sorted({int(b) for b in budgets})
    if not budgets or budgets[0] < 1:
        raise UserError(f"budgets must be integers >= 1, got {budgets}")
    if noise.shape[1:] != validation_noise.shape[1:] or len(noise) < 1 or len(validation_noise) < 1:
        raise UserError("noise and validation_noise must be non-empty batches of the same image shape")
    methods = method_variants() if methods is None else list(methods)
    started = time.perf_counter()
    teacher = Teacher.solve(denoiser, torch.cat([noise, validation_noise]), schedule, teacher_steps, backend)
    say = progress or (lambda text: None)
    say(f"teacher: {teacher.steps} steps, estimated error {teacher.error:.2e}")
    n, total = len(noise), len(noise) + len(validation_noise)
    local = dynamic.measure(noise_rows(denoiser, 0, n, total), schedule, noise, teacher.steps, backend)
    say(f"local errors at {len(local.times)} candidate times")
    if profile is None:
        profile = Profile.for_run(denoiser, schedule)
    else:
        profile.check(denoiser, schedule)
    for budget in budgets:
        if budget in profile.budgets:
            continue
        begun = time.perf_counter()
        teacher, entry = _tune_budget(denoiser, schedule, budget, noise, validation_noise, teacher, local, methods,
                                      families, screen, finalists, optimise, evaluations, backend, peers, together,
                                      say)
        entry["seconds"] = round(time.perf_counter() - begun, 1)
        profile.budgets[budget] = entry
        profile.info = {**profile.info, "teacher": {"method": "PNDM-exact", "grid": "teacher", "steps": teacher.steps,
                                    "error": teacher.error},
                        "noises": {"selection": len(noise), "validation": len(validation_noise)},
                        "local_errors": {"candidates": len(local.times), "forwards": local.forwards},
                        "seconds": round(time.perf_counter() - started, 1)}
        if on_budget is not None:
            on_budget(profile)
    return profile


def _tune_budget(model, schedule, budget, noise, validation_noise, teacher, local, methods, families, screen,
                 finalists, optimise, evaluations, backend, peers, together, say):
    n, total = len(noise), len(noise) + len(validation_noise)
    screen = min(screen, n)
    select = _Scorer(model, schedule, noise, teacher.x[:n], backend, (0, n, total), together)
    first = _Scorer(model, schedule, noise[:screen], teacher.x[:screen], backend, (0, screen, total), together)
    candidates = family_candidates(schedule, budget, methods, families) + \
        dynamic.dp_candidates(local, schedule, budget, methods)
    theirs = peer_candidates(schedule, budget) if peers else []
    screened = first.many(candidates + theirs)
    say(f"{budget} calls: {len(screened)} candidates screened")
    best = lowest(screened, 2 * finalists)
    screened.update(first.many([more for cand in best if cand.grid.name in BOUNDED for sigma in LAST_SIGMAS
                                for more in family_candidates(schedule, budget, [cand.method], [cand.grid.name],
                                                              sigma)]))
    selected = select.many(lowest(screened, 2 * finalists))
    say(f"{budget} calls: {len(selected)} candidates on every selection noise")
    for cand in lowest(selected, optimise):
        tuned, value = optimise_times(select, cand, schedule, evaluations)
        say(f"{budget} calls: {cand.label} {selected[cand]:.4g} -> tuned times {value:.4g}")
        selected[tuned] = value
    best_error = min(selected.values())
    while teacher.error > 0.1 * best_error and teacher.steps < 3200:
        say(f"{budget} calls: teacher error {teacher.error:.1e} is not 10x below {best_error:.1e}: refining")
        teacher = teacher.refined(model, torch.cat([noise, validation_noise]), schedule, backend)
        select.truth = teacher.x[:n]
        selected = select.many(selected)
        best_error = min(selected.values())
    validate = _Scorer(model, schedule, validation_noise, teacher.x[n:], backend, (n, total, total), together)
    finals = lowest(selected, finalists, distinct=lambda c: c)
    peer_best = min(((c, screened[c]) for c in theirs), key=lambda cv: cv[1], default=(None, None))[0]
    static = _static_choice(schedule, budget)  # never worse than what `auto` runs without a profile
    final = validate.many(finals + [c for c in (peer_best, static) if c is not None])
    say(f"{budget} calls: validated " + ", ".join(f"{c.label} {final[c]:.4g}" for c in finals))
    peer_error = None if peer_best is None else final[peer_best]
    choice = min(final, key=final.get)
    say(f"{budget} calls: {choice.label}, validated error {final[choice]:.4g}")
    entry = {"method": choice.method, "times": list(choice.grid.times), "convention": choice.grid.convention,
             "grid": choice.grid.name, "label": choice.label, "error": final[choice], "teacher_error": teacher.error,
             "model_calls": method_record(choice.method).plan(choice.grid).model_calls,
             "tuning_forwards": first.forwards + select.forwards + validate.forwards}
    if peer_best is not None:
        entry["diffusers"] = {"label": peer_best.label, "error": peer_error, "ratio": final[choice] / peer_error}
    if static is not None:
        entry["static"] = {"label": static.label, "error": final[static]}
    return teacher, entry


def _static_choice(schedule, budget: int) -> Candidate | None:
    """auto's fixed table's configuration for `budget` (pndm_fast/auto.py), as a candidate."""
    try:
        method, grid = auto.choose(schedule, budget)
    except UserError:
        return None
    return Candidate(method.name, grid, f"{method.name} on {grid.name} (the static table)")
