"""Sampling methods as data: each method is a pure function (schedule, time steps) -> Plan.

A plan is a fixed list of steps over a fixed set of buffers. Each step is a short tuple of entries:
- `ModelCall(src, t, dst)`: dst <- eps predicted by the model for buffer src at the float time t;
- `Combine(out, weights, operands, ...)`: out <- x + (w0 x + sum_j w_j operand_j), one fused pass over memory.
Coefficients are float64, derived once from the schedule's alpha table; `w0` is A - 1, never A, so that the small
change to x keeps its precision in float32. Which history slot holds which past eps is resolved here, while the
plan is built, so an executor needs no Python state and no branch on the step number: a CUDA graph can capture it.
Adding a method means writing a builder and registering it in PLAN_BUILDERS; no executor changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Union

from .schedule import Schedule, TimeSteps

STATE = "state"
"""Buffer kind kept in float32 whatever the model's dtype: x, stage inputs, FON's derivative history."""
EPS = "eps"
"""Buffer kind holding model outputs, in the model's dtype (the fused kernel reads bf16/fp16 directly)."""

# Adams-Bashforth coefficients of the 4th- and 2nd-order multistep updates (the paper's eq. 12 and S-PNDM).
AB4 = (55 / 24, -59 / 24, 37 / 24, -9 / 24)
AB2 = (3 / 2, -1 / 2)
AB3 = (23 / 12, -16 / 12, 5 / 12)
RK4 = (1 / 6, 2 / 6, 2 / 6, 1 / 6)


@dataclass(frozen=True)
class ModelCall:
    src: str
    t: float
    dst: str

    def __str__(self) -> str:
        return f"{self.dst} = eps({self.src}, t={self.t:g})"


@dataclass(frozen=True)
class Combine:
    """out = (x if keep_x) + weights[0] x + sum_j weights[j+1] operands[j]; optionally out2 likewise."""

    out: str
    weights: tuple[float, ...]
    operands: tuple[str, ...]
    keep_x: bool = True
    out2: str | None = None
    weights2: tuple[float, ...] = ()
    keep_x2: bool = False

    def __str__(self) -> str:
        def terms(weights, keep_x):
            head = ["x"] if keep_x else []
            return " + ".join(head + [f"{w:.6g}*{n}" for w, n in zip(weights, ("x",) + self.operands)])

        text = f"{self.out} = {terms(self.weights, self.keep_x)}"
        return text + (f";  {self.out2} = {terms(self.weights2, self.keep_x2)}" if self.out2 else "")


Entry = Union[ModelCall, Combine]


@dataclass(frozen=True)
class Plan:
    """A whole sampling run. `steps[i]` leaves the state after step i in buffer "x"."""

    method: str
    steps: tuple[tuple[Entry, ...], ...]
    buffers: tuple[tuple[str, str], ...]  # (name, STATE or EPS); "x" is always first
    times: tuple[int, ...] = field(default=())  # the time-step sequence, for printing

    @property
    def model_calls(self) -> int:
        return sum(isinstance(e, ModelCall) for step in self.steps for e in step)

    def __str__(self) -> str:
        lines = [f"{self.method}: {len(self.steps)} steps, {self.model_calls} model calls, buffers "
                 + ", ".join(f"{n}:{k}" for n, k in self.buffers)]
        for i, step in enumerate(self.steps):
            lines.append(f"step {i}:")
            lines.extend(f"  {entry}" for entry in step)
        return "\n".join(lines)


class Ring:
    """Names for the last `size` history tensors; resolved while building, so the plan holds plain names."""

    def __init__(self, prefix: str, size: int):
        self.names = [f"{prefix}{i}" for i in range(size)]
        self.count = 0

    def push(self) -> str:
        """The slot the next entry goes into: the one holding the oldest entry, no longer needed."""
        name = self.names[self.count % len(self.names)]
        self.count += 1
        return name

    def __getitem__(self, back: int) -> str:
        """ring[-1] is the newest entry, ring[-2] the one before it, and so on."""
        assert -len(self.names) <= back < 0 and -back <= self.count
        return self.names[(self.count + back) % len(self.names)]

    def __len__(self) -> int:
        return min(self.count, len(self.names))


def _transfer(schedule: Schedule, out: str, t: float, t_next: float, weighted: list[tuple[float, str]]) -> Combine:
    """out = T(x, t, t_next, sum_j c_j v_j), the paper's eq. 9, as x + (A - 1) x + B sum_j c_j v_j."""
    a_minus_1, b = schedule.transfer_coefficients(t, t_next)
    return Combine(out, (a_minus_1, *(b * c for c, _ in weighted)), tuple(name for _, name in weighted))


def ddim_plan(schedule: Schedule, times: TimeSteps) -> Plan:
    steps = tuple((ModelCall("x", t, "e"), _transfer(schedule, "x", t, t_next, [(1.0, "e")]))
                  for t, t_next in times.pairs)
    return Plan("DDIM", steps, (("x", STATE), ("e", EPS)), times.seq)


def s_pndm_plan(schedule: Schedule, times: TimeSteps) -> Plan:
    ring, steps = Ring("h", 2), []
    for t, t_next in times.pairs:
        if len(ring) == 0:  # improved Euler start: e = (e1 + e2) / 2
            e1 = ring.push()
            steps.append((ModelCall("x", t, e1),
                          _transfer(schedule, "tmp", t, t_next, [(1.0, e1)]),
                          ModelCall("tmp", t_next, "e"),
                          _transfer(schedule, "x", t, t_next, [(0.5, e1), (0.5, "e")])))
        else:
            new = ring.push()
            steps.append((ModelCall("x", t, new),
                          _transfer(schedule, "x", t, t_next, list(zip(AB2, (ring[-1], ring[-2]))))))
    return Plan("S-PNDM", tuple(steps), (("x", STATE), ("tmp", STATE), ("e", EPS), ("h0", EPS), ("h1", EPS)),
                times.seq)


def f_pndm_plan(schedule: Schedule, times: TimeSteps) -> Plan:
    ring, steps = Ring("h", 4), []
    for t, t_next in times.pairs:
        if len(ring) < 3:  # pseudo Runge-Kutta start
            t_mid = (t + t_next) / 2
            e1 = ring.push()
            steps.append((ModelCall("x", t, e1),
                          _transfer(schedule, "tmp", t, t_mid, [(1.0, e1)]),
                          ModelCall("tmp", t_mid, "e2"),
                          _transfer(schedule, "tmp", t, t_mid, [(1.0, "e2")]),
                          ModelCall("tmp", t_mid, "e3"),
                          _transfer(schedule, "tmp", t, t_next, [(1.0, "e3")]),
                          ModelCall("tmp", t_next, "e4"),
                          _transfer(schedule, "x", t, t_next, list(zip(RK4, (e1, "e2", "e3", "e4"))))))
        else:
            new = ring.push()
            history = (ring[-1], ring[-2], ring[-3], ring[-4])
            steps.append((ModelCall("x", t, new), _transfer(schedule, "x", t, t_next, list(zip(AB4, history)))))
    buffers = (("x", STATE), ("tmp", STATE), ("e2", EPS), ("e3", EPS), ("e4", EPS)) + tuple(
        (name, EPS) for name in ring.names)
    return Plan("F-PNDM", tuple(steps), buffers, times.seq)


def fon_plan(schedule: Schedule, times: TimeSteps) -> Plan:
    """FON with D(e) = T(x, t, t - 1, e) - x = (A - 1) x + B e, always at the step's starting x and t.

    The history holds D values (float32 state); each step's new D is written as the second output of the
    combination that also forms the next stage input, so D is never a separate pass.
    """
    ring, steps = Ring("d", 4), []
    for t, t_next in times.pairs:
        a1, b = schedule.transfer_coefficients(t, t - 1)
        h = float(t - t_next)
        d_new = ring.push()
        if len(ring) <= 3:  # classical RK4 start: x + h/6 (d1 + 2 d2 + 2 d3 + d4), d_i = a1 x + b e_i
            t_mid = (t + t_next) / 2
            steps.append((ModelCall("x", t, "e"),
                          Combine("tmp", (h / 2 * a1, h / 2 * b), ("e",), out2=d_new, weights2=(a1, b)),
                          ModelCall("tmp", t_mid, "e2"),
                          Combine("tmp", (h / 2 * a1, h / 2 * b), ("e2",)),
                          ModelCall("tmp", t_mid, "e3"),
                          Combine("tmp", (h * a1, h * b), ("e3",)),
                          ModelCall("tmp", t_next, "e4"),
                          Combine("x", (5 * h / 6 * a1, h / 6, h / 3 * b, h / 3 * b, h / 6 * b),
                                  (d_new, "e2", "e3", "e4"))))
        else:  # x + h (55 d_new - 59 d[-2] + 37 d[-3] - 9 d[-4]) / 24, d_new folded in as a1 x + b e
            c_new = AB4[0] * h
            steps.append((ModelCall("x", t, "e"),
                          Combine("x", (c_new * a1, c_new * b, *(c * h for c in AB4[1:])),
                                  ("e", ring[-2], ring[-3], ring[-4]), out2=d_new, weights2=(a1, b, 0.0, 0.0, 0.0))))
    buffers = (("x", STATE), ("tmp", STATE), ("e", EPS), ("e2", EPS), ("e3", EPS), ("e4", EPS)) + tuple(
        (name, STATE) for name in ring.names)
    return Plan("FON", tuple(steps), buffers, times.seq)


def ipndm_plan(schedule: Schedule, times: TimeSteps) -> Plan:
    """iPNDM (Zhang and Chen, DEIS, ICLR 2023): the transfer step with an Adams-Bashforth eps whose order ramps
    1 -> 2 -> 3 -> 4 as the history fills, instead of F-PNDM's Runge-Kutta start: one model call per step."""
    ring, steps = Ring("h", 4), []
    for t, t_next in times.pairs:
        new = ring.push()
        coefficients = ((1.0,), AB2, AB3, AB4)[len(ring) - 1]
        history = [ring[-back] for back in range(1, len(ring) + 1)]
        steps.append((ModelCall("x", t, new), _transfer(schedule, "x", t, t_next, list(zip(coefficients, history)))))
    return Plan("iPNDM", tuple(steps), (("x", STATE),) + tuple((name, EPS) for name in ring.names), times.seq)


def dpm_solver_pp_2m_plan(schedule: Schedule, times: TimeSteps) -> Plan:
    """DPM-Solver++(2M) (Lu et al., 2022, algorithm 2): multistep, second order in lambda = log(alpha / sigma),
    on the data prediction x0 = (x - sigma e) / alpha; its first step is first order, which is DDIM's step.

    The noise levels are the ones the transfer step reads (schedule.ac, index int(t) + 1), so that every method
    here solves the same discretised problem. With D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev, r = h_prev / h:
    x_next = (sigma_next / sigma) x + alpha_next (1 - e^-h) D; x0 is itself a combination of x and e, so the step
    is one combination over (x, e, x0_prev) whose second output stores this step's x0 for the next one.
    """
    ring, steps, h_prev = Ring("x0_", 2), [], None
    for t, t_next in times.pairs:
        (alpha, sigma, lam), (alpha_next, sigma_next, lam_next) = _levels(schedule, t), _levels(schedule, t_next)
        h = lam_next - lam
        step = -alpha_next * math.expm1(-h)  # alpha_next (1 - e^-h), without cancellation for small h
        previous = ring[-1] if len(ring) else None
        new = ring.push()
        if previous is None:
            c_new, c_prev = step, 0.0
        else:
            r = h_prev / h
            c_new, c_prev = step * (1 + 1 / (2 * r)), -step / (2 * r)
        # (sigma_next / sigma) x + c_new (x - sigma e) / alpha, as x + w_x x + w_e e: w_x stays small near 1.
        weights = ((sigma_next - sigma) / sigma + c_new / alpha, -c_new * sigma / alpha)
        x0_weights = (1 / alpha, -sigma / alpha)
        operands = ("e",)
        if previous is not None:
            weights, x0_weights, operands = weights + (c_prev,), x0_weights + (0.0,), ("e", previous)
        steps.append((ModelCall("x", t, "e"),
                      Combine("x", weights, operands, out2=new, weights2=x0_weights)))
        h_prev = h
    buffers = (("x", STATE), ("e", EPS)) + tuple((name, STATE) for name in ring.names)
    return Plan("DPM-Solver++2M", tuple(steps), buffers, times.seq)


def _levels(schedule: Schedule, t: float) -> tuple[float, float, float]:
    """(alpha, sigma, lambda) of the state at time t: alpha^2 = ac, sigma^2 = 1 - ac, lambda = log(alpha/sigma)."""
    ac = schedule.ac(t)
    alpha, sigma = math.sqrt(ac), math.sqrt(1 - ac)
    return alpha, sigma, math.log(alpha / sigma)


PLAN_BUILDERS: dict[str, Callable[[Schedule, TimeSteps], Plan]] = {
    "DDIM": ddim_plan, "S-PNDM": s_pndm_plan, "F-PNDM": f_pndm_plan, "FON": fon_plan,
    "iPNDM": ipndm_plan, "DPM-Solver++2M": dpm_solver_pp_2m_plan}


def build_plan(schedule: Schedule, method: str, sample_step: int) -> Plan:
    """The plan of `method` at `sample_step`; raises UserError for an unknown method or impossible step count."""
    from .errors import UserError

    if method not in PLAN_BUILDERS:
        raise UserError(f"unknown method {method!r}: expected one of {', '.join(PLAN_BUILDERS)}")
    return PLAN_BUILDERS[method](schedule, schedule.time_steps(sample_step))
