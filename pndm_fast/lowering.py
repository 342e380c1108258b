"""Lowering: a plan and a model adapter -> the fused-op launches an executor runs (docs/design.md, "Lowering").

A plan says what the method computes (`Lin(out, expr)` over named buffers); this pass decides how, in four steps:
1. expand each model call through the adapter: the network's outputs land in slots (its own output tensors, never
   copied), and eps becomes an expression of them, e.g. (1 - w) out_u + w out_c with guidance, or
   x / sigma - (alpha / sigma) out for an x0-predicting model;
2. substitute: such an eps expression goes straight into the combinations of its step that consume it, and a
   combination that the next one reads (FON's derivative, DPM-Solver's x0) into that next one, when the two can
   then share one pass; a value still needed later is written to its buffer, in the same pass when it fits;
3. pair: two adjacent combinations over one base state buffer and at most `MAX_OPERANDS` other operands become
   one launch with a second output;
4. base and split: each launch is written as out = base + (c - 1) base + sum_j w_j v_j when the base's coefficient
   is near 1 (the form that keeps a transfer step's A - 1 ~ 1e-3 exact in float32), and a sum past the kernel's
   operand limit is split into launches that add to the output;
5. blend: inpainting's mask blend joins the launch that last wrote its buffer, as that launch's epilogue, when
   nothing read the buffer in between (it then costs three more reads in that pass instead of passes of its own).
Terms keep the order the builder wrote them in, which is the order the kernel accumulates them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Union

from .adapters import Denoiser
from .ops import MAX_OPERANDS
from .plans import POINTWISE, STATE, Blend, Draw, Expr, ModelCall, OnePlus, Plan, Threshold
from .schedule import Schedule


@dataclass(frozen=True)
class Forward:
    """outputs <- the network at (src, t): one tensor per branch (conditional first), held as slots."""

    src: str
    t: float
    outputs: tuple[str, ...]

    def __str__(self) -> str:
        return f"{', '.join(self.outputs)} = net({self.src}, t={self.t:g})"


@dataclass(frozen=True)
class Launch:
    """One fused-op call: out = (base if keep) + weights[0] base + sum_j weights[j+1] operands[j]; out2 likewise
    from the same loads when given."""

    out: str
    base: str
    keep: bool
    weights: tuple[float, ...]
    operands: tuple[str, ...]
    out2: str | None = None
    keep2: bool = False
    weights2: tuple[float, ...] = ()
    blend: tuple[float, float] | None = None  # then out <- mask out + blend[0] K + blend[1] N (plans.Blend)

    def __str__(self) -> str:
        def terms(keep, weights):
            head = [self.base] if keep else []
            return " + ".join(head + [f"{w:.6g}*{n}" for w, n in zip(weights, (self.base,) + self.operands) if w])

        text = f"{self.out} = {terms(self.keep, self.weights)}"
        if self.blend:
            text += f", blended ({self.blend[0]:.6g} image, {self.blend[1]:.6g} noise)"
        return text + (f";  {self.out2} = {terms(self.keep2, self.weights2)}" if self.out2 else "")


@dataclass(frozen=True)
class Noise:
    """dst <- the run's draw `index`: a slice of the runner's noise tensor, bound before the loop (no work)."""

    dst: str
    index: int

    def __str__(self) -> str:
        return f"{self.dst} = draw {self.index}"


Op = Union[Forward, Launch, Noise, Threshold, Blend]  # a plan's pointwise entries run as they are


@dataclass(frozen=True)
class Program:
    """A plan lowered for one adapter: `state` buffers are allocated (float32, or float64), `slots` are the
    network's own output tensors, bound as each forward returns them."""

    method: str
    steps: tuple[tuple[Op, ...], ...]
    state: tuple[str, ...]
    slots: tuple[str, ...]
    times: tuple[float, ...]
    draws: int = 0

    @property
    def launches(self) -> int:
        return sum(isinstance(op, Launch) for step in self.steps for op in step)

    @property
    def masked(self) -> bool:
        """Whether the program blends a mask (inpainting), reading the runner's mask inputs."""
        return any(isinstance(op, Blend) or isinstance(op, Launch) and op.blend for step in self.steps for op in step)

    def __str__(self) -> str:
        lines = [f"{self.method}: {len(self.steps)} steps, {self.launches} fused launches; state "
                 f"{', '.join(self.state)}; slots {', '.join(self.slots)}"]
        for i, step in enumerate(self.steps):
            lines.append(f"step {i}:")
            lines.extend(f"  {op}" for op in step)
        return "\n".join(lines)


@dataclass
class _Assign:
    out: str
    expr: Expr
    virtual: bool  # made by the adapter (eps of a model call), not written by the plan
    keep: bool = True  # still written to its buffer after substitution

    def reads(self) -> tuple[str, ...]:
        return tuple(self.expr.terms)


def lower(plan: Plan, denoiser: Denoiser, schedule: Schedule) -> Program:
    """The launches that run `plan` with `denoiser`'s network; model levels read from `schedule.alpha`."""
    state = {name for name, kind in plan.buffers if kind == STATE}
    ops, step_of = _expand(plan, denoiser, schedule, state)
    _substitute(ops, step_of, state)
    steps: list[list[Op]] = [[] for _ in plan.steps]
    kept = [(op, step) for op, step in zip(ops, step_of) if not (isinstance(op, _Assign) and not op.keep)]
    live, live_steps = [op for op, _ in kept], [step for _, step in kept]
    i = 0
    while i < len(live):
        op, step = live[i], live_steps[i]
        if isinstance(op, (Forward, Noise, *POINTWISE)):
            steps[step].append(op)
            i += 1
            continue
        nxt = live[i + 1] if i + 1 < len(live) and live_steps[i + 1] == step else None
        paired = _pair(op, nxt, state) if isinstance(nxt, _Assign) else None
        if paired is not None:
            steps[step].append(paired)
            i += 2
        else:
            steps[step].extend(_launches(op, state))
            i += 1
    steps = [_fold_blends(s) for s in steps]
    used = {n for step in steps for op in step for n in _names(op)}
    slots = tuple(dict.fromkeys(n for step in steps for op in step if isinstance(op, Forward) for n in op.outputs))
    buffers = tuple(n for n in dict.fromkeys(["x", *(name for name, _ in plan.buffers), *sorted(state)])
                    if n in state and (n in used or n == "x"))
    times = tuple(dict.fromkeys(op.t for step in steps for op in step if isinstance(op, Forward)))
    return Program(plan.method, tuple(tuple(s) for s in steps), buffers, slots, times, plan.draws)


def _fold_blends(step: list[Op]) -> list[Op]:
    """`step` with each Blend made the epilogue of the launch that last wrote its buffer, when no op between the
    two reads or writes that buffer; a Blend that cannot join stays a pass of its own."""
    out: list[Op] = []
    for op in step:
        if isinstance(op, Blend):
            touching = [i for i, prior in enumerate(out) if op.buf in _names(prior)]
            last = out[touching[-1]] if touching else None
            if isinstance(last, Launch) and last.out2 == op.buf:
                # The kernel blends its first output; either output may be the base (each element is read first).
                last = replace(last, out=last.out2, keep=last.keep2, weights=last.weights2, out2=last.out,
                               keep2=last.keep, weights2=last.weights)
            if isinstance(last, Launch) and last.out == op.buf and last.blend is None:
                out[touching[-1]] = replace(last, blend=(op.image_weight, op.noise_weight))
                continue
        out.append(op)
    return out


def _names(op: Op) -> tuple[str, ...]:
    if isinstance(op, Forward):
        return (op.src, *op.outputs)
    if isinstance(op, Noise):
        return (op.dst,)
    if isinstance(op, POINTWISE):
        return (op.buf,)
    return (op.out, op.base, *op.operands) + ((op.out2,) if op.out2 else ())


def _expand(plan: Plan, denoiser: Denoiser, schedule: Schedule, state: set):
    """Model calls through the adapter; a plain eps network's output is the eps buffer itself (a slot)."""
    plain = denoiser.prediction == "eps" and denoiser.outputs == 1
    ops, step_of, draws = [], [], 0
    for index, step in enumerate(plan.steps):
        for entry in step:
            if isinstance(entry, Draw):
                ops.append(Noise(entry.dst, draws))
                draws += 1
                step_of.append(index)
            elif isinstance(entry, POINTWISE):
                ops.append(entry)
                step_of.append(index)
            elif isinstance(entry, ModelCall) and plain:
                ops.append(Forward(entry.src, entry.t, (entry.dst,)))
                step_of.append(index)
            elif isinstance(entry, ModelCall):
                outputs = (f"{entry.dst}.c", f"{entry.dst}.u")[:denoiser.outputs]
                ops.append(Forward(entry.src, entry.t, outputs))
                ops.append(_Assign(entry.dst, denoiser.eps_expression(entry.src, outputs, schedule.alpha(entry.t)),
                                   virtual=True))
                state.add(entry.dst)  # written, when at all, by a combination: a float32 buffer
                step_of += [index, index]
            else:
                ops.append(_Assign(entry.out, entry.expr, virtual=False))
                step_of.append(index)
    return ops, step_of


def _writes(op) -> tuple[str, ...]:
    if isinstance(op, Forward):
        return op.outputs
    return (op.dst,) if isinstance(op, Noise) else (op.buf,) if isinstance(op, POINTWISE) else (op.out,)


def _reads(op) -> tuple[str, ...]:
    return (op.src,) if isinstance(op, Forward) else () if isinstance(op, Noise) else op.reads()


def _substitute(ops: list, step_of: list, state: set) -> None:
    """Fold values into the combinations that read them (see the module docstring, step 2); mark the assigns
    whose buffer is then never read as not kept."""
    for i, op in enumerate(ops):
        if not isinstance(op, _Assign):
            continue
        readers, live_at_end = _readers(ops, i)
        inputs = set(op.reads())
        remaining = False
        for j in readers:
            reader = ops[j]
            intact = not any(set(_writes(ops[k])) & inputs for k in range(i + 1, j))
            can = (isinstance(reader, _Assign) and intact and step_of[j] == step_of[i]
                   and (op.virtual or (j == i + 1 and _pair(op, _folded(reader, op), state) is not None)))
            if can:
                folded = _folded(reader, op)
                if len(_operands(folded, state)) <= MAX_OPERANDS or not op.virtual:
                    reader.expr = folded.expr
                    continue
            remaining = True
        op.keep = remaining or live_at_end


def _readers(ops: list, i: int) -> tuple[list[int], bool]:
    """Indices that read ops[i]'s output before it is written again, and whether it is live when the run ends
    (only "x", the sample, is)."""
    name, readers = ops[i].out, []
    for j in range(i + 1, len(ops)):
        if name in _reads(ops[j]):
            readers.append(j)
        if name in _writes(ops[j]):
            return readers, False
    return readers, name == "x"


def _folded(reader: _Assign, value: _Assign) -> _Assign:
    """reader with value.out replaced by value.expr, in place of the term it replaces."""
    coefficient = reader.expr.terms[value.out]
    out: dict[str, float] = {}
    for name, c in reader.expr.terms.items():
        additions = (coefficient * value.expr).terms.items() if name == value.out else ((name, c),)
        for n, v in additions:
            out[n] = (Expr({n: out[n]}) + Expr({n: v})).terms[n] if n in out else v
    return _Assign(reader.out, Expr(out), reader.virtual, reader.keep)


def _is_near_one(c: float) -> bool:
    return isinstance(c, OnePlus) or abs(c - 1.0) < 0.5


def _base(a: _Assign, state: set) -> str | None:
    """The buffer the kernel reads as its float32 x: the output itself when read (in place), else a state term
    whose coefficient is near 1, else any state term; None when every term is a model output slot."""
    terms = a.expr.terms
    if a.out in terms:
        return a.out
    states = [n for n in terms if n in state]
    for n in states:
        if _is_near_one(terms[n]):
            return n
    return states[0] if states else None


def _operands(a: _Assign, state: set, base: str | None = None) -> list[str]:
    base = _base(a, state) if base is None else base
    return [n for n in a.expr.terms if n != base]


def _weights(a: _Assign, base: str, operands: list[str]) -> tuple[bool, tuple[float, ...]]:
    """(keep, weights) of `a` over base then operands: keep adds the base itself, its weight being c - 1."""
    terms = a.expr.terms
    c = terms.get(base, 0.0)
    keep = base in terms and _is_near_one(c)
    w0 = (c.delta if isinstance(c, OnePlus) else float(c) - 1.0) if keep else float(c)
    return keep, (w0, *(float(terms.get(n, 0.0)) for n in operands))


def _pair(first: _Assign, second: _Assign, state: set) -> Launch | None:
    """One launch computing both (first runs before second in the plan), or None when they cannot share a pass."""
    if first.out == second.out or first.out in second.reads():
        return None
    for base in dict.fromkeys(b for b in (_base(second, state), _base(first, state)) if b is not None):
        reads = set(first.reads()) | set(second.reads())
        if any(out != base and out in reads for out in (first.out, second.out)):
            continue
        operands = list(dict.fromkeys(n for a in (first, second) for n in a.expr.terms if n != base))
        if len(operands) > MAX_OPERANDS:
            continue
        # The in-place output, if any, is the kernel's `out`; the other is its `out2`.
        main, other = (first, second) if first.out == base else (second, first)
        keep, weights = _weights(main, base, operands)
        keep2, weights2 = _weights(other, base, operands)
        return Launch(main.out, base, keep, weights, tuple(operands), other.out, keep2, weights2)
    return None


def _launches(a: _Assign, state: set) -> list[Launch]:
    """One combination as launches: one, or a chain when its operands pass the kernel's limit."""
    base = _base(a, state)
    if base is None:  # only model outputs: base on x with weight 0 (read, never used; the rare unpaired case)
        base = "x"
    operands = _operands(a, state, base)
    keep, weights = _weights(a, base, operands)
    first = Launch(a.out, base, keep, weights[:MAX_OPERANDS + 1], tuple(operands[:MAX_OPERANDS]))
    chain = [first]
    for start in range(MAX_OPERANDS, len(operands), MAX_OPERANDS):
        chunk = operands[start:start + MAX_OPERANDS]
        chain.append(Launch(a.out, a.out, True, (0.0, *weights[1 + start:1 + start + len(chunk)]), tuple(chunk)))
    return chain
