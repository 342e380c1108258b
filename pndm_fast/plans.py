"""Plans: a whole sampling run as data, written the way a method's mathematics reads.

A plan is a fixed list of steps over named, typed buffers. Each step is a short tuple of entries:
- `ModelCall(src, t, dst)`: dst <- the eps the model predicts for buffer src at (possibly fractional) time t;
- `Lin(out, expr)`: out <- a linear combination of buffers with float64 coefficients, e.g.
  `Lin("x", A * var("x") + B * var("e"))`;
- `Draw(dst)`: dst <- fresh standard Gaussian noise (the stochastic samplers); the run's k-th draw is the same
  tensor on every backend (image i's depends on (seed, i, k) only: `pndm_fast.noise.step_noise`).
Builders compose expressions with + and scalar *, freely: `lowering.py` turns a plan into fused-op launches (the
x + (A - 1) x form, second outputs, operand limits, buffer dtypes), so a builder never folds algebra into the
kernel's argument list. Which history slot holds which past value is resolved while building, so a plan has no
state and no branch on the step number: a CUDA graph can capture it. docs/design.md has the whole picture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

STATE = "state"
"""Buffer kind kept in float32 (float64 for a float64 run) whatever the model's dtype: x, stage inputs, histories
of combinations. Every `Lin` writes a state buffer."""
EPS = "eps"
"""Buffer kind holding a model call's eps, in the model's dtype (the fused kernel reads bf16/fp16 directly)."""
NOISE = "noise"
"""Buffer kind holding a fresh Gaussian draw (`Draw`), in the state's dtype; combinations read it as an operand."""


class OnePlus(float):
    """The coefficient 1 + delta that remembers delta exactly: a transfer step's A = 1 + (A - 1) with A - 1 ~ 1e-3,
    whose delta the float32 kernel adds to x (1 + delta rounded to float64 then minus 1 would lose bits of it)."""

    delta: float

    def __new__(cls, delta: float) -> "OnePlus":
        value = super().__new__(cls, 1.0 + delta)
        value.delta = float(delta)
        return value

    def __repr__(self) -> str:
        return f"1 {'-' if self.delta < 0 else '+'} {abs(self.delta):.6g}"


def _add(a: float, b: float) -> float:
    if isinstance(a, OnePlus) and not isinstance(b, OnePlus):
        return OnePlus(a.delta + b)
    if isinstance(b, OnePlus) and not isinstance(a, OnePlus):
        return OnePlus(b.delta + a)
    return float(a) + float(b)


def _is_one(c: float) -> bool:
    return c.delta == 0.0 if isinstance(c, OnePlus) else c == 1.0


def _scale(s: float, c: float) -> float:
    if _is_one(s):
        return c
    if _is_one(c):
        return s
    if isinstance(s, OnePlus) and isinstance(c, OnePlus):
        return OnePlus(s.delta + c.delta + s.delta * c.delta)
    return float(s) * float(c)


class Expr:
    """sum_j c_j buffer_j with float64 coefficients; terms keep the order they were first written in, which is the
    order the kernel accumulates them (so float32 results do not depend on how a builder grouped its algebra)."""

    __slots__ = ("terms",)

    def __init__(self, terms: dict[str, float] | None = None):
        self.terms: dict[str, float] = dict(terms or {})

    def __add__(self, other: "Expr") -> "Expr":
        if not isinstance(other, Expr):
            return NotImplemented
        out = dict(self.terms)
        for name, c in other.terms.items():
            out[name] = _add(out[name], c) if name in out else c
        return Expr(out)

    def __sub__(self, other: "Expr") -> "Expr":
        return self + (-1.0) * other

    def __rmul__(self, s: float) -> "Expr":
        return Expr({name: _scale(s, c) for name, c in self.terms.items()})

    __mul__ = __rmul__

    def __truediv__(self, s: float) -> "Expr":
        return (1.0 / s) * self

    def __neg__(self) -> "Expr":
        return (-1.0) * self

    def __eq__(self, other) -> bool:
        return isinstance(other, Expr) and list(self.terms.items()) == list(other.terms.items())

    def __hash__(self) -> int:
        return hash(tuple(self.terms.items()))

    def __str__(self) -> str:
        parts = [name if _is_one(c) else f"({c!r})*{name}" if isinstance(c, OnePlus) else f"{c:.6g}*{name}"
                 for name, c in self.terms.items()]
        return " + ".join(parts) if parts else "0"


def var(name: str) -> Expr:
    """The buffer `name` as an expression, coefficient exactly 1."""
    return Expr({name: OnePlus(0.0)})


@dataclass(frozen=True)
class ModelCall:
    src: str
    t: float
    dst: str

    def reads(self) -> tuple[str, ...]:
        return (self.src,)

    def __str__(self) -> str:
        return f"{self.dst} = eps({self.src}, t={self.t:g})"


@dataclass(frozen=True)
class Lin:
    """out = expr. `out` may appear in expr: every term is read before out is written."""

    out: str
    expr: Expr

    def reads(self) -> tuple[str, ...]:
        return tuple(self.expr.terms)

    def __str__(self) -> str:
        return f"{self.out} = {self.expr}"


@dataclass(frozen=True)
class Draw:
    """dst = fresh N(0, I) noise, one draw per image: the plan's k-th Draw reads the run's draw k."""

    dst: str

    def reads(self) -> tuple[str, ...]:
        return ()

    def __str__(self) -> str:
        return f"{self.dst} = N(0, I)"


@dataclass(frozen=True)
class Threshold:
    """buf = Imagen's dynamic thresholding of the data prediction in buf, per image: s = the `ratio` quantile of
    |buf|, clamped to [1, max_value]; buf = clamp(buf, -s, s) / s (ratio 1 with max_value 1 is plain clipping to
    [-1, 1]). The one pointwise step a plan may hold: it reads and writes a state buffer in place."""

    buf: str
    ratio: float
    max_value: float

    def reads(self) -> tuple[str, ...]:
        return (self.buf,)

    def __str__(self) -> str:
        return f"{self.buf} = threshold({self.buf}, quantile {self.ratio:g}, max {self.max_value:g})"


@dataclass(frozen=True)
class Blend:
    """buf = mask buf + image_weight K + noise_weight N: inpainting's blend of the kept pixels back at a level, with
    the run's inputs mask, K = (1 - mask) image and N = (1 - mask) noise (pndm_fast/editing.py). Pointwise, in
    place, like Threshold; the runner holds the three inputs, and lowering folds the blend into the fused pass that
    wrote buf."""

    buf: str
    image_weight: float
    noise_weight: float

    def reads(self) -> tuple[str, ...]:
        return (self.buf,)

    def __str__(self) -> str:
        return (f"{self.buf} = mask {self.buf} + {self.image_weight:.6g} (1 - mask) image + "
                f"{self.noise_weight:.6g} (1 - mask) noise")


POINTWISE = (Threshold, Blend)
"""Entries that change a state buffer in place, elementwise or per image, outside the fused combinations."""

Entry = Union[ModelCall, Lin, Draw, Threshold, Blend]


class PlanError(ValueError):
    """A plan that cannot run: an undeclared buffer, a read before any write, a write to the wrong kind."""


@dataclass(frozen=True)
class Plan:
    """A whole sampling run. `steps[i]` leaves the state after step i in buffer "x", which holds the noise first.
    `times` are the grid's, from the first call's time to where the run ends. Validated when built."""

    method: str
    steps: tuple[tuple[Entry, ...], ...]
    buffers: tuple[tuple[str, str], ...]  # (name, STATE or EPS); "x" is first
    times: tuple[float, ...] = ()
    grid: str = ""

    def __post_init__(self):
        validate(self)

    @property
    def seq(self) -> tuple[float, ...]:
        """The model-call times in increasing order (on the paper's grid, its seq = 0, skip, 2 skip, ...)."""
        return tuple(reversed(self.times[:-1]))

    @property
    def model_calls(self) -> int:
        return sum(isinstance(e, ModelCall) for step in self.steps for e in step)

    @property
    def masked(self) -> bool:
        """Whether a run blends a mask (inpainting): it then reads the mask and the kept image and noise."""
        return any(isinstance(e, Blend) for step in self.steps for e in step)

    @property
    def draws(self) -> int:
        """Fresh noises a run reads (0 for an ODE solver): one (B, C, H, W) tensor each."""
        return sum(isinstance(e, Draw) for step in self.steps for e in step)

    def __str__(self) -> str:
        lines = [f"{self.method} on the {self.grid or 'given'} grid: {len(self.steps)} steps, {self.model_calls} "
                 "model calls, buffers " + ", ".join(f"{n}:{k}" for n, k in self.buffers)]
        for i, step in enumerate(self.steps):
            lines.append(f"step {i}:")
            lines.extend(f"  {entry}" for entry in step)
        return "\n".join(lines)


def validate(plan: Plan) -> None:
    """Raise PlanError, naming the step and entry, unless every buffer is declared once with a known kind, "x" is
    a state buffer, every read follows a write, a model reads a state buffer and writes an eps buffer, and every
    combination writes a state buffer from at least one state buffer."""
    kinds: dict[str, str] = {}
    for name, kind in plan.buffers:
        if kind not in (STATE, EPS, NOISE):
            raise PlanError(f"{plan.method}: buffer {name!r} has kind {kind!r}; expected {STATE!r}, {EPS!r} or "
                            f"{NOISE!r}")
        if name in kinds:
            raise PlanError(f"{plan.method}: buffer {name!r} is declared twice")
        kinds[name] = kind
    if kinds.get("x") != STATE:
        raise PlanError(f"{plan.method}: a plan needs a state buffer named 'x' (the noise, then the sample)")
    written = {"x"}
    for i, step in enumerate(plan.steps):
        for entry in step:
            where = f"{plan.method}, step {i}, `{entry}`"
            if not isinstance(entry, (ModelCall, Lin, Draw, *POINTWISE)):
                raise PlanError(f"{where}: a step holds ModelCall, Lin, Draw, Threshold and Blend entries, not "
                                f"{type(entry).__name__}")
            wrote = entry.out if isinstance(entry, Lin) else entry.buf if isinstance(entry, POINTWISE) else entry.dst
            for name in entry.reads() + (wrote,):
                if name not in kinds:
                    raise PlanError(f"{where}: buffer {name!r} is not declared (declared: {', '.join(kinds)})")
            missing = [name for name in entry.reads() if name not in written]
            if missing:
                raise PlanError(f"{where}: reads {', '.join(missing)} before anything wrote it")
            if isinstance(entry, POINTWISE):
                if kinds[entry.buf] != STATE:
                    raise PlanError(f"{where}: {type(entry).__name__} works on a state buffer, not {entry.buf!r}")
            elif isinstance(entry, Draw):
                if kinds[entry.dst] != NOISE:
                    raise PlanError(f"{where}: a draw writes a noise buffer, not the {kinds[entry.dst]} buffer "
                                    f"{entry.dst!r}")
                written.add(entry.dst)
            elif isinstance(entry, ModelCall):
                if kinds[entry.src] != STATE or kinds[entry.dst] != EPS:
                    raise PlanError(f"{where}: a model call reads a state buffer and writes an eps buffer")
                written.add(entry.dst)
            else:
                if kinds[entry.out] != STATE:
                    raise PlanError(f"{where}: a combination writes a state buffer, not the eps buffer {entry.out!r}")
                if not entry.expr.terms:
                    raise PlanError(f"{where}: an empty combination")
                if not any(kinds[name] == STATE for name in entry.reads()):
                    raise PlanError(f"{where}: a combination needs at least one state-buffer term (the fused "
                                    "kernel's float32 base)")
                written.add(entry.out)


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
