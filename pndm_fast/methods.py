"""The one registry of sampling methods: each a plan builder, its float64 reference, and what it costs.

A method is a builder `build(grid, **options) -> Plan` (pndm_fast/solvers.py, pndm_fast/multistep.py) and a
reference `reference(m, x, grid, **options) -> states` written from the method's own paper, not from the plan's
algebra (pndm_fast/reference.py, pndm_fast/multistep_reference.py); every backend is tested against it.
`register_method` adds one (docs/design.md, "Adding a solver", shows the shortest example).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Callable

from . import multistep, multistep_reference, reference, solvers, stochastic_reference
from .errors import UserError
from .grids import TimeGrid, make_grid
from .multistep_reference import float64_reference
from .plans import Plan
from .schedule import Schedule


def one_call_per_step(steps: int) -> int:
    return steps


@dataclass(frozen=True)
class Real:
    """An option that takes any number in [low, high] (e.g. DDIM's eta), not a list of values; the tuner, which
    tries every listed value, leaves it at its default."""

    low: float
    high: float

    def parse(self, text: str) -> float | None:
        try:
            value = float(text)
        except ValueError:
            return None
        return value if self.low <= value <= self.high else None

    def __str__(self) -> str:
        return f"a number in [{self.low:g}, {self.high:g}]"


@dataclass(frozen=True, eq=False)
class Method:
    """Everything the package knows of a method, in one place.

    `options` names the settings a method takes, each with its default and the values it accepts (first the
    default); the builder and the reference take them as keywords. A method is asked for by its name, then the
    settings that differ from the defaults: "DEIS:order=4", "UniPC-bh2:order=2,lower_order_final=false"
    (`method_record`). An option named "order" is also the nominal order."""

    name: str
    build: Callable[..., Plan]
    reference: Callable[..., list]
    order: float  # nominal order of global error in the step size
    description: str
    model_calls: Callable[[int], int] = one_call_per_step  # model calls for a grid of this many steps
    min_steps: int = 1
    options: dict = field(default_factory=dict)  # option -> (default, accepted values...)
    settings: dict = field(default_factory=dict)  # the options' values this record runs with (default: defaults)
    reference_float64: bool = False  # the reference computes in float64 whatever the noise's dtype
    stochastic: bool = False  # its plans draw fresh noise (`Draw`): a sampler of the SDE, not a solver of the ODE

    def __post_init__(self):
        object.__setattr__(self, "settings", {k: v[0] for k, v in self.options.items()} | self.settings)

    def plan(self, grid: TimeGrid) -> Plan:
        """The plan of this method on `grid`, under this record's (configured) name."""
        if grid.steps < self.min_steps:
            raise UserError(f"{self.name} needs at least {self.min_steps} steps, the grid has {grid.steps}")
        return replace(self.build(grid, **self.settings), method=self.name)

    def run_reference(self, m, x, grid: TimeGrid, draws=None) -> list:
        """The reference's states [x_0, ..., x_S] from the noise x, with this record's settings; a stochastic
        method reads the fresh noises `draws` (its plan's draws, in order)."""
        if draws is not None:
            return self.reference(m, x, grid, draws=draws, **self.settings)
        return self.reference(m, x, grid, **self.settings)

    def configured(self, chosen: dict) -> Method:
        """This method with the options `chosen` (spelled as text: "4", "false"; the others at their defaults),
        named canonically: the options that differ from the defaults, in the record's order."""
        unknown = sorted(set(chosen) - set(self.options))
        if unknown:
            takes = ", ".join(f"{k} ({'/'.join(map(_spell, v))})" for k, v in self.options.items()) or "no options"
            raise UserError(f"{self.name} has no option {unknown[0]!r}: it takes {takes}")
        values = {}
        for key, text in chosen.items():
            spelled = {_spell(v): v for v in self.options[key] if not isinstance(v, Real)}
            ranges = [v for v in self.options[key] if isinstance(v, Real)]
            value = spelled.get(text.lower(), next((r.parse(text) for r in ranges if r.parse(text) is not None),
                                                   None))
            if value is None:
                raise UserError(f"{self.name} option {key}={text} is not one of "
                                f"{', '.join([*spelled, *map(str, ranges)])}")
            values[key] = value
        changed = {k: values[k] for k in self.options if k in values and values[k] != self.options[k][0]}
        if not changed:
            return self
        spelled = ",".join(f"{k}={_spell(v)}" for k, v in changed.items())
        return replace(self, name=f"{self.name}:{spelled}", settings=self.settings | changed,
                       order=changed.get("order", self.order), description=f"{self.description}; here {spelled}")


def _spell(value) -> str:
    return str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add `method` to the registry (the command line, `sample()` and `auto` see it at once); a name already
    registered, or one with the option separator ':', is refused."""
    if not isinstance(method, Method):
        raise UserError(f"register_method takes a pndm_fast.Method, got {type(method).__name__}")
    if method.name in METHODS or ":" in method.name or method.name == "auto":
        raise UserError(f"method name {method.name!r} is taken or not allowed (':' starts the options)")
    METHODS[method.name] = method
    _record.cache_clear()
    return method


def method_record(method: str) -> Method:
    """The record of a method named as `Method` says ("DEIS", "DEIS:order=4,lower_order_final=false"), with its
    options applied; UserError (one line) for an unknown name, option or value."""
    if not isinstance(method, str):
        raise UserError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    return _record(method)


@functools.lru_cache(maxsize=256)
def _record(method: str) -> Method:
    base, _, settings = method.partition(":")
    if base not in METHODS:
        raise UserError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    chosen = {}
    for item in filter(None, settings.split(",")):
        key, eq, text = (part.strip() for part in item.partition("="))
        if not eq or not key or not text or key in chosen:
            raise UserError(f"method {method!r}: options are written name:key=value,key=value (each key once), "
                            f"e.g. DEIS:order=4")
        chosen[key] = text
    return METHODS[base].configured(chosen)


def as_method(method) -> Method:
    """A Method as given, or the record a name stands for."""
    return method if isinstance(method, Method) else method_record(method)


def build_plan(schedule: Schedule, method, sample_step: int | None = 50, timesteps="uniform",
               end: str | None = None) -> Plan:
    """The plan of `method` (a name or a Method) on the grid `timesteps` with `sample_step` steps; UserError for
    an unknown method or an impossible grid."""
    return as_method(method).plan(make_grid(schedule, timesteps, sample_step, end))


def check_budget(budget) -> int:
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise UserError(f"model_calls is a budget of model calls: expected an integer >= 1, got {budget!r}")
    return budget


def fit_grid(method: Method, budget: int, grid_of: Callable[[int], TimeGrid]) -> TimeGrid:
    """The grid `grid_of(steps)` with the most steps on which `method` makes at most `budget` model calls, warm-ups
    included (the paper's grid can have a step more than asked: 21 gives 22); UserError when none fits."""
    steps = max((s for s in range(1, check_budget(budget) + 1) if method.model_calls(s) <= budget), default=0)
    while steps >= max(1, method.min_steps):
        try:
            grid = grid_of(steps)
            if grid.steps >= method.min_steps and method.model_calls(grid.steps) <= budget:
                return grid
        except UserError:  # a grid too fine for its bounds at this many steps
            pass
        steps -= 1
    raise UserError(f"{method.name} cannot run in {budget} model calls: its fewest steps need "
                    f"{method.model_calls(max(1, method.min_steps))}")


def _fon_calls(steps: int) -> int:
    return 4 * min(3, steps) + max(0, steps - 3)


LOWER_FINAL = {"lower_order_final": (True, False)}  # the last steps use no more points than steps remain
FULL_FINAL = {"lower_order_final": (False, True)}
THRESHOLD = {"threshold": (0.0, Real(0.0, 1.0)), "max_value": (1.0, Real(1.0, 1e9))}
"""Dynamic thresholding of the data prediction (the data-prediction methods): threshold = the quantile ratio (0
off; diffusers' default 0.995), max_value its upper bound (threshold=1,max_value=1 clips x0 to [-1, 1])."""


for _method in (
    Method("DDIM", solvers.ddim_plan, reference.ddim, 1,
           "DDIM (Song et al. 2021): the transfer step with the model's eps, one call per step; eta > 0 adds fresh "
           "noise (eta = 1: the DDPM posterior)", options={"eta": (0.0, Real(0.0, 1.0))}),
    Method("S-PNDM", solvers.s_pndm_plan, reference.s_pndm, 2,
           "the paper's second-order pseudo linear multistep, improved Euler start", lambda s: s + 1),
    Method("F-PNDM", solvers.f_pndm_plan, reference.f_pndm, 4,
           "the paper's fourth-order pseudo linear multistep, three pseudo Runge-Kutta steps first", _fon_calls),
    Method("FON", solvers.fon_plan, reference.fon, 4,
           "the paper's classical fourth-order method on the ODE in x (Runge-Kutta start, then Adams-Bashforth)",
           _fon_calls),
    Method("iPNDM", solvers.ipndm_plan, reference.ipndm, 4,
           "Adams-Bashforth eps ramping from order 1 to 4, one call per step (Zhang and Chen 2023)"),
    Method("DPM-Solver++2M", functools.partial(multistep.dpm_solver_pp_plan, order=2),
           functools.partial(float64_reference(multistep_reference.dpm_solver_pp), order=2), 2,
           "DPM-Solver++(2M) (Lu et al. 2022): second-order multistep on the data prediction, in log-SNR",
           options={**FULL_FINAL, **THRESHOLD}, reference_float64=True),
    Method("DPM-Solver++3M", functools.partial(multistep.dpm_solver_pp_plan, order=3),
           functools.partial(float64_reference(multistep_reference.dpm_solver_pp), order=3), 3,
           "DPM-Solver++(3M) (Lu et al. 2022) as published and in diffusers: third-order multistep on the data "
           "prediction, lower-order final steps", options={**LOWER_FINAL, **THRESHOLD}, reference_float64=True),
    Method("PNDM-exact", multistep.pndm_exact_plan, float64_reference(multistep_reference.eps_lagrange), 4,
           "PNDM's pseudo linear multistep with exact weights on any grid: the Lagrange basis (in log-SNR by "
           "default) integrated over the true step, order ramping 1 to 4, one call per step",
           options={"order": (4, 1, 2, 3), "basis": ("lambda", "rho", "log_sigma"), **FULL_FINAL},
           reference_float64=True),
    Method("DEIS", multistep.deis_plan, functools.partial(float64_reference(multistep_reference.eps_lagrange),
                                                          basis="lambda"), 3,
           "DEIS tAB (Zhang and Chen 2023), order 3 (options: 2, 4): eps, Lagrange basis in log rho, lower-order "
           "final steps", options={"order": (3, 2, 4), **LOWER_FINAL}, reference_float64=True),
    *(Method(f"UniPC-{variant}", functools.partial(multistep.unipc_plan, variant=variant),
             functools.partial(float64_reference(multistep_reference.unipc), variant=variant), 3,
             f"UniPC (Zhao et al. 2023), B(h) = {bh}, order 3 (option: 2): UniP predictor with the UniC corrector "
             "folded into the next step's combination (no extra model call)",
             options={"order": (3, 2), **LOWER_FINAL, **THRESHOLD},
             reference_float64=True)
      for variant, bh in (("bh1", "h"), ("bh2", "e^h - 1"))),
    Method("Heun", solvers.heun_plan, float64_reference(stochastic_reference.heun), 2,
           "Heun's method of EDM (Karras et al. 2022; diffusers' HeunDiscreteScheduler): Euler in x / alpha against "
           "sigma / alpha, then the trapezoid with the model at the step's end; the last step Euler's alone",
           lambda steps: 2 * steps - 1, reference_float64=True),
    Method("Euler-a", solvers.euler_ancestral_plan, float64_reference(stochastic_reference.euler_ancestral), 1,
           "Euler ancestral (k-diffusion; diffusers' EulerAncestralDiscreteScheduler): an Euler step down to "
           "rho_down and fresh noise up to the next level, one call per step", stochastic=True,
           options={"eta": (1.0, Real(0.0, 1.0)), "s_noise": (1.0, Real(0.0, 2.0))}, reference_float64=True),
    Method("DPM-Solver++2S-a", solvers.dpm_2s_ancestral_plan, float64_reference(stochastic_reference.dpm_2s_ancestral),
           2, "DPM-Solver++(2S) ancestral (k-diffusion's sample_dpmpp_2s_ancestral): the second-order singlestep "
           "data-prediction solver down to rho_down, its midpoint half the step in lambda, then fresh noise up to "
           "the next level; two calls per step, one on the last", lambda steps: 2 * steps - 1, stochastic=True,
           options={"eta": (1.0, Real(0.0, 1.0)), "s_noise": (1.0, Real(0.0, 2.0))}, reference_float64=True),
    Method("DPM-Solver++2M-SDE", multistep.sde_dpm_solver_pp_plan,
           float64_reference(stochastic_reference.sde_dpm_solver_pp), 1,
           "SDE-DPM-Solver++(2M) (Lu et al. 2022; diffusers' algorithm_type sde-dpmsolver++, midpoint): the data "
           "prediction solver of the reverse SDE, fresh noise each step (option order=1: the first-order one)",
           stochastic=True, options={"order": (2, 1), **LOWER_FINAL, **THRESHOLD}, reference_float64=True),
):
    register_method(_method)
