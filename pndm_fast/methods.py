"""The one registry of sampling methods: each a plan builder, its float64 reference step, and what it costs.

A builder is a pure function TimeGrid -> Plan, written as the method's mathematics reads, over the grid's levels
(`grid.level(t)`), so every method runs on every grid. Its reference step (pndm_fast/reference.py) is written from
the method's own paper, not from the plan's algebra, and every backend is tested against it. Adding a method is one
builder here, one reference step there, and one `Method` record below (docs/design.md shows the shortest example).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Callable

from . import multistep, multistep_reference, reference
from .errors import UserError
from .grids import TimeGrid, make_grid
from .plans import EPS, STATE, Expr, Lin, ModelCall, OnePlus, Plan, var
from .schedule import Schedule, transfer_coefficients

# Adams-Bashforth coefficients of the 2nd-, 3rd- and 4th-order multistep updates (the paper's eq. 12 and S-PNDM).
AB2 = (3 / 2, -1 / 2)
AB3 = (23 / 12, -16 / 12, 5 / 12)
AB4 = (55 / 24, -59 / 24, 37 / 24, -9 / 24)
RK4 = (1 / 6, 2 / 6, 2 / 6, 1 / 6)


class Ring:
    """Names for the last `size` history values; resolved while building, so the plan holds plain names."""

    def __init__(self, prefix: str, size: int):
        self.names = [f"{prefix}{i}" for i in range(size)]
        self.count = 0

    def push(self) -> str:
        """The slot the next value goes into: the one holding the oldest value, no longer needed."""
        name = self.names[self.count % len(self.names)]
        self.count += 1
        return name

    def __getitem__(self, back: int) -> str:
        """ring[-1] is the newest value, ring[-2] the one before it, and so on."""
        assert -len(self.names) <= back < 0 and -back <= self.count
        return self.names[(self.count + back) % len(self.names)]

    def __len__(self) -> int:
        return min(self.count, len(self.names))


def transfer(grid: TimeGrid, t: float, t_next: float, x: Expr, e: Expr) -> Expr:
    """The paper's transfer step (eq. 9) T(x, t, t_next, e) = A x + B e between the grid's levels at t and t_next."""
    a_minus_1, b = transfer_coefficients(grid.level(t), grid.level(t_next))
    return OnePlus(a_minus_1) * x + b * e


def weighted(coefficients, names) -> Expr:
    """sum_j c_j names_j."""
    total = Expr()
    for c, name in zip(coefficients, names):
        total = total + c * var(name)
    return total


X = var("x")


def ddim_plan(grid: TimeGrid) -> Plan:
    steps = tuple((ModelCall("x", t, "e"), Lin("x", transfer(grid, t, t_next, X, var("e"))))
                  for t, t_next in grid.pairs)
    return _plan("DDIM", grid, steps, (("x", STATE), ("e", EPS)))


def s_pndm_plan(grid: TimeGrid) -> Plan:
    ring, steps = Ring("h", 2), []
    for t, t_next in grid.pairs:
        if len(ring) == 0:  # improved Euler start: e = (e1 + e2) / 2
            e1 = ring.push()
            steps.append((ModelCall("x", t, e1),
                          Lin("tmp", transfer(grid, t, t_next, X, var(e1))),
                          ModelCall("tmp", t_next, "e"),
                          Lin("x", transfer(grid, t, t_next, X, weighted((0.5, 0.5), (e1, "e"))))))
        else:
            new = ring.push()
            steps.append((ModelCall("x", t, new),
                          Lin("x", transfer(grid, t, t_next, X, weighted(AB2, (ring[-1], ring[-2]))))))
    return _plan("S-PNDM", grid, steps, (("x", STATE), ("tmp", STATE), ("e", EPS), ("h0", EPS), ("h1", EPS)))


def f_pndm_plan(grid: TimeGrid) -> Plan:
    ring, steps = Ring("h", 4), []
    for t, t_next in grid.pairs:
        if len(ring) < 3:  # pseudo Runge-Kutta start
            t_mid = (t + t_next) / 2
            e1 = ring.push()
            steps.append((ModelCall("x", t, e1),
                          Lin("tmp", transfer(grid, t, t_mid, X, var(e1))),
                          ModelCall("tmp", t_mid, "e2"),
                          Lin("tmp", transfer(grid, t, t_mid, X, var("e2"))),
                          ModelCall("tmp", t_mid, "e3"),
                          Lin("tmp", transfer(grid, t, t_next, X, var("e3"))),
                          ModelCall("tmp", t_next, "e4"),
                          Lin("x", transfer(grid, t, t_next, X, weighted(RK4, (e1, "e2", "e3", "e4"))))))
        else:
            new = ring.push()
            history = (ring[-1], ring[-2], ring[-3], ring[-4])
            steps.append((ModelCall("x", t, new), Lin("x", transfer(grid, t, t_next, X, weighted(AB4, history)))))
    buffers = (("x", STATE), ("tmp", STATE), ("e2", EPS), ("e3", EPS), ("e4", EPS)) + tuple(
        (name, EPS) for name in ring.names)
    return _plan("F-PNDM", grid, steps, buffers)


def fon_plan(grid: TimeGrid) -> Plan:
    """FON: the classical fourth-order method on the ODE in x, with the derivative D(e) = T(x, t, t - 1, e) - x
    always at the step's starting x and t, as the paper's code evaluates it. History holds D values."""
    ring, steps = Ring("d", 4), []
    for t, t_next in grid.pairs:
        a1, b = transfer_coefficients(grid.level(t), grid.level(t - 1))

        def derivative(e: str) -> Expr:
            return a1 * X + b * var(e)

        h = float(t - t_next)
        d_new = ring.push()
        if len(ring) <= 3:  # classical RK4 start: x + h/6 (d1 + 2 d2 + 2 d3 + d4)
            t_mid = (t + t_next) / 2
            steps.append((ModelCall("x", t, "e"),
                          Lin(d_new, derivative("e")),
                          Lin("tmp", X + (h / 2) * var(d_new)),
                          ModelCall("tmp", t_mid, "e2"),
                          Lin("tmp", X + (h / 2) * derivative("e2")),
                          ModelCall("tmp", t_mid, "e3"),
                          Lin("tmp", X + h * derivative("e3")),
                          ModelCall("tmp", t_next, "e4"),
                          Lin("x", X + (h / 6) * (var(d_new) + 2.0 * derivative("e2") + 2.0 * derivative("e3")
                                                  + derivative("e4")))))
        else:  # x + h (55 d_new - 59 d[-2] + 37 d[-3] - 9 d[-4]) / 24
            steps.append((ModelCall("x", t, "e"),
                          Lin(d_new, derivative("e")),
                          Lin("x", X + h * weighted(AB4, (d_new, ring[-2], ring[-3], ring[-4])))))
    buffers = (("x", STATE), ("tmp", STATE), ("e", EPS), ("e2", EPS), ("e3", EPS), ("e4", EPS)) + tuple(
        (name, STATE) for name in ring.names)
    return _plan("FON", grid, steps, buffers)


def ipndm_plan(grid: TimeGrid) -> Plan:
    """iPNDM (Zhang and Chen, DEIS, ICLR 2023): the transfer step with an Adams-Bashforth eps whose order ramps
    1 -> 2 -> 3 -> 4 as the history fills, instead of F-PNDM's Runge-Kutta start: one model call per step."""
    ring, steps = Ring("h", 4), []
    for t, t_next in grid.pairs:
        new = ring.push()
        coefficients = ((1.0,), AB2, AB3, AB4)[len(ring) - 1]
        history = [ring[-back] for back in range(1, len(ring) + 1)]
        steps.append((ModelCall("x", t, new), Lin("x", transfer(grid, t, t_next, X, weighted(coefficients, history)))))
    return _plan("iPNDM", grid, steps, (("x", STATE),) + tuple((name, EPS) for name in ring.names))


def levels(grid: TimeGrid, t: float) -> tuple[float, float, float]:
    """(alpha, sigma, lambda) of the state at time t: alpha^2 = level, sigma^2 = 1 - level, lambda = log(alpha /
    sigma); lambda = inf at sigma = 0."""
    ac = grid.level(t)
    alpha, sigma = math.sqrt(ac), math.sqrt(1 - ac)
    return alpha, sigma, (math.log(alpha / sigma) if sigma > 0 else math.inf)


def dpm_solver_pp_2m_plan(grid: TimeGrid) -> Plan:
    """DPM-Solver++(2M) (Lu et al., 2022, algorithm 2): multistep, second order in lambda = log(alpha / sigma), on
    the data prediction x0 = (x - sigma e) / alpha; its first step is first order (DDIM's), and so is a final step
    to sigma = 0, where lambda is infinite (diffusers' lower_order_final does the same).

    x_next = (sigma_next / sigma) x + alpha_next (1 - e^-h) D, D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev, r = h_prev / h.
    Each step stores its x0 for the next one.
    """
    ring, steps, h_prev = Ring("x0_", 2), [], None
    for t, t_next in grid.pairs:
        (alpha, sigma, lam), (alpha_next, sigma_next, lam_next) = levels(grid, t), levels(grid, t_next)
        h = lam_next - lam
        step = alpha_next * -math.expm1(-h)  # alpha_next (1 - e^-h), without cancellation for small h
        previous = ring[-1] if len(ring) else None
        new = ring.push()
        x0 = (1 / alpha) * X - (sigma / alpha) * var("e")
        if previous is None or math.isinf(h):
            d = step * var(new)
        else:
            r = h_prev / h
            d = (step * (1 + 1 / (2 * r))) * var(new) - (step / (2 * r)) * var(previous)
        # sigma_next / sigma, written as 1 + (sigma_next - sigma) / sigma: the change to x stays exact in float32.
        steps.append((ModelCall("x", t, "e"), Lin(new, x0),
                      Lin("x", OnePlus((sigma_next - sigma) / sigma) * X + d)))
        h_prev = h
    buffers = (("x", STATE), ("e", EPS)) + tuple((name, STATE) for name in ring.names)
    return _plan("DPM-Solver++2M", grid, steps, buffers)


def multistep_builder(name: str, coefficients: Callable[..., list], prediction: str, extra_history: int = 0):
    """A plan builder over the float64 weights of `pndm_fast.multistep` (one linear update of the state and the
    last order + `extra_history` predictions per model call; the builder's keywords, the method's options, go to
    `coefficients`). A data prediction is stored as x0 = (x - sigma e) / alpha, written in the same pass as the
    state update that first reads it; a corrector's state ("x_corrected", UniPC) lives in buffer "xc", so the
    corrector is folded into the next step's combinations and costs no model call."""
    def build(grid: TimeGrid, **options) -> Plan:
        steps = coefficients([grid.level(t) for t in grid.times], **options)
        corrected = any("x_corrected" in step.updates for step in steps)
        ring, plan_steps = Ring("d", max(step.order for step in steps) + extra_history), []
        for i, ((t, _), step) in enumerate(zip(grid.pairs, steps)):
            new = ring.push()
            if prediction == multistep.EPS:
                entries = [ModelCall("x", t, new)]
            else:
                alpha, sigma, _ = levels(grid, t)
                entries = [ModelCall("x", t, "e"), Lin(new, (1 / alpha) * X - (sigma / alpha) * var("e"))]
            start = "xc" if corrected and i > 0 else "x"
            names = {"x": start, **{f"D{k}": ring[-1 - k] for k in range(len(ring))}}

            def combination(update) -> Expr:
                total = Expr()
                for name, w in update.weights.items():
                    total = total + (OnePlus(update.x_minus_one) if name == "x" else w) * var(names[name])
                return total

            if corrected and i == 0:  # the start state is the first corrected state: kept beside the new x
                entries += [Lin("xc", X), Lin("x", combination(step.updates["x_next"]))]
            elif corrected:  # the next state first (it reads the old xc), then the corrected one in place
                entries += [Lin("x", combination(step.updates["x_next"])),
                            Lin("xc", combination(step.updates["x_corrected"]))]
            else:
                entries.append(Lin("x", combination(step.updates["x_next"])))
            plan_steps.append(tuple(entries))
        kind = EPS if prediction == multistep.EPS else STATE
        buffers = (("x", STATE),) + ((("xc", STATE),) if corrected else ()) + (
            (("e", EPS),) if prediction != multistep.EPS else ()) + tuple((n, kind) for n in ring.names)
        return _plan(name, grid, plan_steps, buffers)

    return build


def multistep_reference_run(sampler: Callable, **options) -> Callable:
    """A whole-run reference from `pndm_fast.multistep_reference` (written op by op from each method's paper, in
    float64): run(m, noise, grid) -> trajectory of the states the model is called at, then the final one."""
    def run(m, noise, grid: TimeGrid, **chosen):
        levels_ = [grid.level(t) for t in grid.times]
        time_of = dict(zip(levels_, grid.times))

        def eps_fn(x, ac):
            return m(x.to(noise.dtype), time_of[float(ac)]).double()

        states = sampler(noise.double(), levels_, eps_fn, **{**options, **chosen})
        states = states[0] if isinstance(states, tuple) else states  # UniPC: (predicted, corrected)
        return [x.to(noise.dtype) for x in states]

    return run


def _plan(method: str, grid: TimeGrid, steps, buffers) -> Plan:
    return Plan(method, tuple(steps), buffers, grid.times, grid.name)


@dataclass(frozen=True)
class Method:
    """Everything the package knows of a method, in one place.

    `options` names the settings a method takes, each with its default and the values it accepts (first the
    default); the builder and the whole-run reference take them as keywords. A method is asked for by its name,
    then the settings that differ from the defaults: "DEIS:order=4", "UniPC-bh2:order=2,lower_order_final=false"
    (`method_record`). An option named "order" is also the nominal order."""

    name: str
    build: Callable[..., Plan]
    reference_step: Callable | None
    model_calls: Callable[[int], int]  # model calls for a grid of this many steps
    order: float  # nominal order of global error in the step size
    description: str
    min_steps: int = 1
    reference_run: Callable | None = None  # a whole-run reference, for methods whose reference is written so
    options: dict = field(default_factory=dict)  # option -> (default, accepted values...)

    def __post_init__(self):
        if self.options:  # the defaults bound once: build(grid) and reference_run(m, noise, grid) need no keywords
            defaults = {k: v[0] for k, v in self.options.items()}
            object.__setattr__(self, "build", functools.partial(self.build, **defaults))
            if self.reference_run is not None:
                object.__setattr__(self, "reference_run", functools.partial(self.reference_run, **defaults))

    def configured(self, chosen: dict) -> Method:
        """This method with the options `chosen` (the others at their defaults), named canonically: the options
        that differ from the defaults, in the record's order."""
        unknown = sorted(set(chosen) - set(self.options))
        if unknown:
            takes = ", ".join(f"{k} ({'/'.join(map(_spell, v))})" for k, v in self.options.items()) or "no options"
            raise UserError(f"{self.name} has no option {unknown[0]!r}: it takes {takes}")
        for key, value in chosen.items():
            if value not in self.options[key]:
                raise UserError(f"{self.name} option {key}={_spell(value)} is not one of "
                                f"{', '.join(map(_spell, self.options[key]))}")
        changed = {k: chosen[k] for k in self.options if k in chosen and chosen[k] != self.options[k][0]}
        if not changed:
            return self
        settings = {k: v[0] for k, v in self.options.items()} | changed
        spelled = ",".join(f"{k}={_spell(v)}" for k, v in changed.items())
        name = f"{self.name}:{spelled}"
        return replace(self, name=name, build=functools.partial(_named_plan, self.build, name, settings),
                       reference_run=functools.partial(self.reference_run, **settings),
                       order=settings.get("order", self.order), options={},
                       description=f"{self.description}; here {spelled}")


def _named_plan(build: Callable[..., Plan], name: str, settings: dict, grid: TimeGrid) -> Plan:
    """The plan of `build` with `settings`, under the configured method's name (what `print(plan)` shows)."""
    return replace(build(grid, **settings), method=name)


def _spell(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _parse_value(key: str, text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        raise UserError(f"option {key}={text!r}: expected an integer, true or false") from None


FINAL_LOWER = {"lower_order_final": (True, False)}  # the last steps use no more points than steps remain
FINAL_FULL = {"lower_order_final": (False, True)}


def _fon_calls(steps: int) -> int:
    return 4 * min(3, steps) + max(0, steps - 3)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("DDIM", ddim_plan, reference.ddim_step, lambda s: s, 1,
           "DDIM (Song et al. 2021): the transfer step with the model's eps, one call per step"),
    Method("S-PNDM", s_pndm_plan, reference.s_pndm_step, lambda s: s + 1, 2,
           "the paper's second-order pseudo linear multistep, improved Euler start"),
    Method("F-PNDM", f_pndm_plan, reference.f_pndm_step, _fon_calls, 4,
           "the paper's fourth-order pseudo linear multistep, three pseudo Runge-Kutta steps first"),
    Method("FON", fon_plan, reference.fon_step, _fon_calls, 4,
           "the paper's classical fourth-order method on the ODE in x (Runge-Kutta start, then Adams-Bashforth)"),
    Method("iPNDM", ipndm_plan, reference.ipndm_step, lambda s: s, 4,
           "Adams-Bashforth eps ramping from order 1 to 4, one call per step (Zhang and Chen 2023)"),
    Method("DPM-Solver++2M", dpm_solver_pp_2m_plan, reference.dpm_solver_pp_2m_step, lambda s: s, 2,
           "DPM-Solver++(2M) (Lu et al. 2022): second-order multistep on the data prediction, in log-SNR"),
    Method("PNDM-exact", multistep_builder("PNDM-exact", functools.partial(
               multistep.pndm_exact, basis=multistep.PNDM_EXACT_DEFAULT_BASIS), multistep.EPS), None,
           multistep.model_calls, 4, "PNDM's pseudo linear multistep with exact weights on any grid: the Lagrange "
           "basis in log-SNR integrated over the true step, order ramping 1 to 4, one call per step",
           reference_run=multistep_reference_run(multistep_reference.eps_lagrange_sample,
                                                 basis=multistep.PNDM_EXACT_DEFAULT_BASIS),
           options={"order": (4, 1, 2, 3), **FINAL_FULL}),
    Method("DEIS", multistep_builder("DEIS", multistep.deis, multistep.EPS), None, multistep.model_calls, 3,
           "DEIS tAB (Zhang and Chen 2023), order 3 (options: 2, 4): eps, Lagrange basis in log rho, lower-order "
           "final steps",
           reference_run=multistep_reference_run(multistep_reference.eps_lagrange_sample, basis="lambda"),
           options={"order": (3, 2, 4), **FINAL_LOWER}),
    Method("DPM-Solver++3M", multistep_builder("DPM-Solver++3M", multistep.dpm_solver_pp, multistep.X0), None,
           multistep.model_calls, 3, "DPM-Solver++(3M) (Lu et al. 2022) as published and in diffusers: third-order "
           "multistep on the data prediction, lower-order final steps",
           reference_run=multistep_reference_run(multistep_reference.dpm_solver_pp_sample, order=3),
           options=FINAL_LOWER),
    Method("UniPC-bh1", multistep_builder("UniPC-bh1", functools.partial(multistep.unipc, variant="bh1"),
                                          multistep.X0, extra_history=1), None, multistep.model_calls, 3,
           "UniPC (Zhao et al. 2023), B(h) = h, order 3 (option: 2): UniP predictor with the UniC corrector "
           "folded into the next step's combination (no extra model call)",
           reference_run=multistep_reference_run(multistep_reference.unipc_sample, variant="bh1"),
           options={"order": (3, 2), **FINAL_LOWER}),
    Method("UniPC-bh2", multistep_builder("UniPC-bh2", functools.partial(multistep.unipc, variant="bh2"),
                                          multistep.X0, extra_history=1), None, multistep.model_calls, 3,
           "UniPC (Zhao et al. 2023), B(h) = e^h - 1, order 3 (option: 2), corrector folded in as UniPC-bh1",
           reference_run=multistep_reference_run(multistep_reference.unipc_sample, variant="bh2"),
           options={"order": (3, 2), **FINAL_LOWER}),
)}


def method_record(method: str) -> Method:
    """The record of a method named as `Method` says ("DEIS", "DEIS:order=4,lower_order_final=false"), with its
    options applied; UserError (one line) for an unknown name, option or value."""
    base, _, settings = method.partition(":") if isinstance(method, str) else (None, "", "")
    if base not in METHODS:
        raise UserError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    chosen = {}
    for item in filter(None, settings.split(",")):
        key, eq, text = (part.strip() for part in item.partition("="))
        if not eq or not key or key in chosen:
            raise UserError(f"method {method!r}: options are written name:key=value,key=value (each key once), "
                            f"e.g. DEIS:order=4")
        chosen[key] = _parse_value(key, text)
    return METHODS[base].configured(chosen)


def build_plan(schedule: Schedule, method: str, sample_step: int | None = 50, timesteps="uniform",
               end: str | None = None) -> Plan:
    """The plan of `method` on the grid `timesteps` with `sample_step` steps; UserError for an unknown method or
    an impossible grid."""
    record = method_record(method)
    grid = make_grid(schedule, timesteps, sample_step, end)
    if grid.steps < record.min_steps:
        raise UserError(f"{method} needs at least {record.min_steps} steps, the grid has {grid.steps}")
    return record.build(grid)
