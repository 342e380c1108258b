"""Float64 coefficients of higher-order multistep solvers on any grid of noise levels (no torch).

Levels. A state at level ac (alpha-bar, 0 < ac <= 1) is x = alpha x0 + sigma eps with alpha = sqrt(ac),
sigma = sqrt(1 - ac), lambda = log(alpha / sigma), rho = sigma / alpha. A grid is ac_0 < ac_1 < ... < ac_S
(noisiest first); the model is called at the first S levels and only the last level may be 1 (the data: sigma = 0,
lambda = +inf).

Representation. `steps = method(grid, ...)` returns one `Step` per model call, in order. Step i writes each of
its `updates` (name -> `Update`) as one linear combination of named inputs:
  "x"  the state the step starts from (level ac_i);
  "Dk" the model prediction k calls ago, in the method's own prediction type (eps, or x0 for the data-prediction
       solvers):
       D0 the newest (made at level ac_i), D1 the one before (level ac_{i-1}), ...
  "Z"  a fresh standard Gaussian draw (the stochastic samplers; drawn once per step that weighs it);
`Update.weights` maps those names to float64 weights; `Update.x_minus_one` is weights["x"] - 1 computed without
cancellation (steps near the data move x by ~1e-4 of itself, which float32 would lose as 1 + delta).
Every step writes "x_next" (the state at level ac_{i+1}).

UniPC (a corrector) differs in what "x" is: step i >= 1 writes "x_corrected", the corrected state at level ac_i,
and "x_next", the predicted state at level ac_{i+1} with the corrector folded in; both are combinations of the
same inputs, where "x" is the corrected state at level ac_{i-1} (the previous step's "x_corrected") and D0 is the
model's output at the predicted state of level ac_i. Step 0 writes "x_corrected" = x (identity). The model is
called at each "x_next", so the corrector costs no call, and the last state, which no call follows, is never
corrected (as diffusers' UniPCMultistepScheduler).

Orders ramp up with the history, order_i = min(order, i + 1), and with `lower_order_final` also
order_i <= S - i (the last steps use no more points than steps remain, as diffusers' lower_order_final). A step
in data prediction (DPM-Solver++, UniPC) landing on ac = 1 is first order whatever the option: its lambda-step is
infinite and only a constant x0 has a finite exponential integral there (diffusers does the same with
final_sigmas_type="zero"). Eps-form steps (DEIS, PNDM-exact) integrate over rho, which stays finite (rho -> 0), so
they keep their order up to the data.

Methods (all take S model calls for S steps):
  dpm_solver_pp  DPM-Solver++(2M, 3M), Lu et al. 2022: data prediction, exponential integrator in lambda.
  unipc          UniPC (Zhao et al. 2023), bh1 / bh2, UniP-p predictor + UniC corrector, data prediction.
  deis           DEIS tAB (Zhang and Chen 2023): eps, Lagrange basis in log rho (= -lambda), integrated exactly
                 over d rho; this is the basis diffusers' DEISMultistepScheduler uses ("log-rho"), chosen
                 because the grid is given as levels, not as the paper's training time t.
  pndm_exact     PNDM's pseudo linear multistep (Liu et al. 2022, eq. 12) with exact weights: the transfer step
                 x_next = (alpha_n / alpha) x + alpha_n (rho_n - rho) e', e' the mean over [rho, rho_n] of the
                 Lagrange interpolant of the past eps, in basis "rho", "lambda" or "log_sigma" (docs/multistep.md
                 compares them and says why "lambda" is the default).

`linear_multistep_plan` writes such a list of steps as a plan: one builder style for every method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .levels import Level, alpha_ratio_minus_one
from .plans import EPS as EPS_BUFFER
from .plans import NOISE, STATE, Draw, Expr, Lin, ModelCall, OnePlus, Plan, Ring, Threshold, var

X0, EPS = "x0", "eps"
BASES = ("rho", "lambda", "log_sigma")


@dataclass(frozen=True)
class Update:
    weights: dict  # input name ("x", "D0", "D1", ...) -> float weight
    x_minus_one: float  # weights["x"] - 1 without cancellation


@dataclass(frozen=True)
class Step:
    order: int  # points of history used (1 = first order)
    updates: dict  # output name ("x_next", "x_corrected") -> Update


def levels_of(grid) -> list[Level]:
    """Checks a grid (ac_0 < ... < ac_S in (0, 1], only the last may be 1, at least one step)."""
    try:
        acs = [float(a) for a in grid]
    except (TypeError, ValueError):
        raise UserError("a grid must be a sequence of noise levels ac (floats in (0, 1])") from None
    if len(acs) < 2:
        raise UserError(f"a grid needs at least 2 levels (one step), got {len(acs)}")
    if not all(math.isfinite(a) and 0 < a <= 1 for a in acs):
        raise UserError(f"grid levels must lie in (0, 1], got min {min(acs)!r} max {max(acs)!r}")
    if any(b <= a for a, b in zip(acs, acs[1:])):
        raise UserError("grid levels must increase strictly (noisiest first, ac_0 < ac_1 < ... < ac_S)")
    if any(a == 1 for a in acs[:-1]):
        raise UserError("only the last grid level may be ac = 1 (the model is never called at sigma = 0)")
    return [Level.of(a) for a in acs]


def _check_order(order: int, top: int) -> int:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or not 1 <= order <= top:
        raise UserError(f"order must be an integer from 1 to {top}, got {order!r}")
    return int(order)


def _orders(num_steps: int, order: int, lower_order_final: bool) -> list[int]:
    return [min(order, i + 1, num_steps - i) if lower_order_final else min(order, i + 1)
            for i in range(num_steps)]


def _sigma_ratio_minus_one(a: Level, b: Level) -> float:
    """sigma_b / sigma_a - 1 = (sigma_b - sigma_a) / sigma_a with sigma_b - sigma_a = (ac_a - ac_b) / (sigma_a +
    sigma_b): the level difference is taken once, from the inputs."""
    return (a.ac - b.ac) / (a.sigma + b.sigma) / a.sigma


def _update(weights: dict, x_minus_one: float) -> Update:
    return Update({k: float(v) for k, v in weights.items()}, float(x_minus_one))


# ---------------------------------------------------------------- stable exponential functions

def _psi(k: int, z: float) -> float:
    """psi_k(z) = sum_{n>=0} z^n / (n + k)! = (e^z - sum_{n<k} z^n / n!) / z^k, without cancellation for small z
    (the series, 30 terms reach 1e-17 for |z| < 1) and by the closed form otherwise (|z| >= 1 loses < 2 digits)."""
    if abs(z) < 1:
        term, total = 1.0 / math.factorial(k), 0.0
        for n in range(30):
            total += term
            term *= z / (n + k + 1)
        return total
    partial = sum(z**n / math.factorial(n) for n in range(k))
    return (math.exp(z) - partial) / z**k


# ---------------------------------------------------------------- DPM-Solver++ (multistep)

def dpm_solver_pp(grid, order: int = 3, lower_order_final: bool = True, exact_third: bool = False) -> list[Step]:
    """DPM-Solver++(2M) (order=2) and (3M) (order=3), data prediction D = x0.

    With h = lambda_{i+1} - lambda_i and the step ratios r0 = (lambda_i - lambda_{i-1}) / h,
    r1 = (lambda_{i-1} - lambda_{i-2}) / h of the paper, the step is
    x_next = (sigma_n / sigma) x - alpha_n expm1(-h) D0 + corrections from the divided differences of D:
    2M: - 0.5 alpha_n expm1(-h) (D0 - D1) / r0;
    3M: + alpha_n (expm1(-h) / h + 1) D1' - alpha_n ((expm1(-h) + h) / h^2 - 1/2) D2' with D1', D2' the
    3-point differences of the paper (the same as diffusers' DPMSolverMultistepScheduler, algorithm "dpmsolver++").

    D2' = (D1_0 - D1_1) / (r0 + r1) is h^2 x0''/2 (a second divided difference), yet its weight
    -alpha_n (psi_2(-h) - 1/2) ~ alpha_n h / 6 is the exponential integral of (tau/h)^2 / 2: the published 3M
    integrates half of the quadratic term, which leaves an O(h^3) local error and makes it second order in the
    limit (docs/multistep.md: error ratios 1.7, 2.9, 3.5 per doubling from 80 to 640 steps, tending to 4).
    exact_third=True doubles that weight (the exact integral of the 3-point interpolant), which is third order.
    """
    levels = levels_of(grid)
    order = _check_order(order, 3)
    num = len(levels) - 1
    steps = []
    for i, p in enumerate(_orders(num, order, lower_order_final)):
        a, b = levels[i], levels[i + 1]
        if b.sigma == 0:
            p = 1
        em = -1.0 if b.sigma == 0 else math.expm1(-(b.lam - a.lam))
        w = {"x": b.sigma / a.sigma, "D0": -b.alpha * em}
        if p >= 2:
            h = b.lam - a.lam
            r0 = (a.lam - levels[i - 1].lam) / h
            if p == 2:
                c = -0.5 * b.alpha * em  # on (D0 - D1) / r0
                w["D0"] += c / r0
                w["D1"] = -c / r0
            else:
                r1 = (levels[i - 1].lam - levels[i - 2].lam) / h
                # (expm1(-h) + h) / h^2 = psi_2(-h); expm1(-h) / h + 1 = h psi_2(-h); psi_2 - 1/2 = -h psi_3(-h)
                c1 = b.alpha * h * _psi(2, -h)
                c2 = b.alpha * h * _psi(3, -h)  # -(psi_2 - 1/2) alpha_n
                if exact_third:
                    c2 *= 2
                # D1' = (1 + r0/(r0+r1)) D1_0 - r0/(r0+r1) D1_1, D2' = (D1_0 - D1_1)/(r0+r1),
                # D1_0 = (D0 - D1)/r0, D1_1 = (D1 - D2)/r1
                on_d10 = c1 * (1 + r0 / (r0 + r1)) + c2 / (r0 + r1)
                on_d11 = -c1 * r0 / (r0 + r1) - c2 / (r0 + r1)
                w["D0"] += on_d10 / r0
                w["D1"] = -on_d10 / r0 + on_d11 / r1
                w["D2"] = -on_d11 / r1
        steps.append(Step(p, {"x_next": _update(w, _sigma_ratio_minus_one(a, b))}))
    return steps


def sde_dpm_solver_pp(grid, order: int = 2, lower_order_final: bool = True) -> list[Step]:
    """SDE-DPM-Solver++ (1 and 2M, Lu et al. 2022, DPM-Solver++ appendix; diffusers' "sde-dpmsolver++" with the
    midpoint solver type): with e = exp(-h),
    x_next = (sigma_n / sigma) e x + alpha_n (1 - e^2) D + sigma_n sqrt(1 - e^2) z, z fresh noise, and
    D = D0 (order 1) or D0 + (D0 - D1) / (2 r0) (order 2). Weight "Z" is the noise's."""
    levels = levels_of(grid)
    order = _check_order(order, 2)
    num = len(levels) - 1
    steps = []
    for i, p in enumerate(_orders(num, order, lower_order_final)):
        a, b = levels[i], levels[i + 1]
        if b.sigma == 0:  # e = 0: x_next = x0, no noise
            steps.append(Step(1, {"x_next": _update({"x": 0.0, "D0": 1.0}, -1.0)}))
            continue
        h = b.lam - a.lam
        keep = -math.expm1(-2 * h)  # 1 - e^2
        log_x = math.log1p(_sigma_ratio_minus_one(a, b)) - h
        w = {"x": math.exp(log_x), "D0": b.alpha * keep, "Z": b.sigma * math.sqrt(keep)}
        if p == 2:
            r0 = (a.lam - levels[i - 1].lam) / h
            w["D0"] += b.alpha * keep / (2 * r0)
            w["D1"] = -b.alpha * keep / (2 * r0)
        steps.append(Step(p, {"x_next": _update(w, math.expm1(log_x))}))
    return steps


# ---------------------------------------------------------------- UniPC

def _unipc_system(levels: list[Level], base: int, p: int, variant: str):
    """For the step from level `base` to base + 1 with p points: (rks (p-1,), b (p,), B_h, hphi1, h)."""
    a, n = levels[base], levels[base + 1]
    h = n.lam - a.lam
    hh = -h  # data prediction integrates e^{-lambda}
    hphi1 = math.expm1(hh)
    bh = hh if variant == "bh1" else hphi1
    rks = np.array([(levels[base - k].lam - a.lam) / h for k in range(1, p)], dtype=np.float64)
    # b_k = hh psi_{k+1}(hh) k! / B(h), k = 1..p
    b = np.array([hh * _psi(k + 1, hh) * math.factorial(k) / bh for k in range(1, p + 1)], dtype=np.float64)
    return rks, b, bh, hphi1, h


def unipc(grid, order: int = 3, variant: str = "bh2", lower_order_final: bool = True) -> list[Step]:
    """UniPC with data prediction: UniP-p predictor and UniC-p corrector, B(h) = -h ("bh1") or expm1(-h) ("bh2").

    Order schedule and the fixed rho = 1/2 of UniP-2 and UniC-1 follow diffusers' UniPCMultistepScheduler (its
    defaults: lower_order_final=True, disable_corrector=[]); the corrector of step i uses the predictor order of
    step i - 1 and the model output at the predicted state as its newest point.
    """
    levels = levels_of(grid)
    order = _check_order(order, 3)
    if variant not in ("bh1", "bh2"):
        raise UserError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    num = len(levels) - 1
    orders = _orders(num, order, lower_order_final)
    orders = [1 if levels[i + 1].sigma == 0 else p for i, p in enumerate(orders)]
    steps = []
    for i, p in enumerate(orders):
        # corrector: from level i - 1 to i; inputs x (corrected, level i-1), D0 = m_i, D1 = m_{i-1}, ...
        if i == 0:
            corr, corr_m1 = {"x": 1.0}, 0.0
        else:
            q = orders[i - 1]
            a, n = levels[i - 1], levels[i]
            rks, b, bh, hphi1, _ = _unipc_system(levels, i - 1, q, variant)
            if q == 1:
                rhos = np.array([0.5])
            else:
                mat = np.vstack([np.append(rks, 1.0) ** j for j in range(q)])
                rhos = np.linalg.solve(mat, b)
            corr = {"x": n.sigma / a.sigma, "D1": -n.alpha * hphi1}
            # - alpha_n B_h (sum_k rho_k (m_{i-1-k} - m_{i-1}) / r_k + rho_last (m_i - m_{i-1}))
            c = -n.alpha * bh
            corr["D0"] = c * rhos[-1]
            corr["D1"] -= c * rhos[-1]
            for k in range(1, q):
                corr["D1"] -= c * rhos[k - 1] / rks[k - 1]
                corr[f"D{k + 1}"] = c * rhos[k - 1] / rks[k - 1]
            corr_m1 = _sigma_ratio_minus_one(a, n)
        # predictor from level i (the corrected state) to i + 1, over m_i = D0, m_{i-1} = D1, ...
        a, n = levels[i], levels[i + 1]
        rks, b, bh, hphi1, _ = _unipc_system(levels, i, p, variant) if n.sigma > 0 else (None, None, 0.0, -1.0, 0)
        pred = {"D0": -n.alpha * hphi1}
        if p >= 2:
            rhos = np.array([0.5]) if p == 2 else np.linalg.solve(
                np.vstack([rks ** j for j in range(p - 1)]), b[:-1])
            c = -n.alpha * bh
            for k in range(1, p):
                pred["D0"] -= c * rhos[k - 1] / rks[k - 1]
                pred[f"D{k}"] = c * rhos[k - 1] / rks[k - 1]
        sx = n.sigma / a.sigma
        sx_m1 = _sigma_ratio_minus_one(a, n)
        folded = {key: sx * v for key, v in corr.items()}
        for key, v in pred.items():
            folded[key] = folded.get(key, 0.0) + v
        folded_m1 = sx_m1 + corr_m1 + sx_m1 * corr_m1  # (1 + d1)(1 + d2) - 1
        steps.append(Step(p, {"x_corrected": _update(corr, corr_m1), "x_next": _update(folded, folded_m1)}))
    return steps


# ---------------------------------------------------------------- eps-form Lagrange steps (DEIS, PNDM-exact)

def _lagrange_monomials(nodes: np.ndarray) -> np.ndarray:
    """c[j, k]: the Lagrange basis polynomial of node j is sum_k c[j, k] s^k (nodes O(1): a well-conditioned
    Vandermonde of at most 4 x 4)."""
    vander = np.vander(nodes, increasing=True)  # V[j, k] = s_j^k
    return np.linalg.inv(vander).T


def _exp_moments(count: int, h: float) -> np.ndarray:
    """mu_k = int_0^1 s^k e^{-h s} ds for k < count (h finite >= 0), or int_0^inf s^k e^{-s} ds = k! (h = inf)."""
    if math.isinf(h):
        return np.array([math.factorial(k) for k in range(count)], dtype=np.float64)
    if h < 1:  # series in h: sum_n (-h)^n / (n! (n + k + 1)), 30 terms reach 1e-17
        return np.array([sum((-h) ** n / (math.factorial(n) * (n + k + 1)) for n in range(30))
                         for k in range(count)], dtype=np.float64)
    mu = [-math.expm1(-h) / h]  # upward recursion mu_k = (k mu_{k-1} - e^{-h}) / h: amplifies by k / h <= 3
    for k in range(1, count):
        mu.append((k * mu[-1] - math.exp(-h)) / h)
    return np.array(mu, dtype=np.float64)


def _weights_rho(levels: list[Level], i: int, p: int) -> np.ndarray:
    """int_{rho_i}^{rho_{i+1}} L_j(rho) d rho: a polynomial, integrated exactly by 4-point Gauss-Legendre
    (exact to degree 7) in s = (rho - rho_i) / (rho_{i+1} - rho_i)."""
    a, n = levels[i], levels[i + 1]
    span = n.rho - a.rho
    nodes = np.array([(levels[i - j].rho - a.rho) / span for j in range(p)])
    x, w = np.polynomial.legendre.leggauss(4)
    s = 0.5 * (x + 1)
    return span * (_lagrange_monomials(nodes) @ np.array([(0.5 * w * s**k).sum() for k in range(p)]))


def _weights_lambda(levels: list[Level], i: int, p: int) -> np.ndarray:
    """int L_j(lambda) d rho over the step, rho = e^{-lambda}: with lambda = lambda_i + H s,
    = -rho_i H sum_k c_jk int s^k e^{-H s} ds, H = h (finite step) or 1 (a step to the data, lambda -> inf)."""
    a, n = levels[i], levels[i + 1]
    h = n.lam - a.lam
    scale = 1.0 if math.isinf(h) else h
    nodes = np.array([(levels[i - j].lam - a.lam) / scale for j in range(p)])
    return -a.rho * scale * (_lagrange_monomials(nodes) @ _exp_moments(p, h))


def log_sigma_of_log_rho(u: np.ndarray) -> np.ndarray:
    """log sigma as a function of u = log rho: sigma^2 = rho^2 / (1 + rho^2), so log sigma = -log1p(rho^-2) / 2,
    written for each sign of u so that neither form subtracts two large numbers (at rho = 50, u - log1p(rho^2) / 2
    would lose 4 of the 16 digits of log sigma = -2e-4, which the close nodes of the basis then amplify)."""
    neg = np.minimum(u, 0.0)
    pos = np.maximum(u, 0.0)
    return np.where(u > 0, -0.5 * np.log1p(np.exp(-2 * pos)), neg - 0.5 * np.log1p(np.exp(2 * neg)))


GAUSS_POINTS = 20  # per panel; panels at most PANEL wide in u = log rho
PANEL = 0.5
TAIL = 80.0  # a step to the data is integrated down to u_i - 80: e^{-80} ~ 2e-35 of rho_i is left out


def quadrature_weights(node_values: np.ndarray, basis_of_log_rho, u_from: float, u_to: float) -> np.ndarray:
    """w_j = int_{rho(u_from)}^{rho(u_to)} L_j(v) d rho = int L_j(v(u)) e^u du, L_j the Lagrange basis over the
    nodes v_j = node_values[j] of the variable v = basis_of_log_rho(u); composite Gauss-Legendre in u = log rho
    (singularities of log sigma(u) lie pi/2 off the real axis, so 20 points per 0.5-wide panel converge to
    rounding: tests/test_multistep.py checks 1e-12 against the closed forms). u_to = -inf is the data."""
    end = u_from - TAIL if math.isinf(u_to) else u_to
    panels = max(1, math.ceil(abs(end - u_from) / PANEL))
    x, w = np.polynomial.legendre.leggauss(GAUSS_POINTS)
    edges = np.linspace(u_from, end, panels + 1)
    half = 0.5 * np.diff(edges)[:, None]
    u = (0.5 * (edges[:-1] + edges[1:]))[:, None] + half * x[None, :]
    weight = (half * w[None, :] * np.exp(u)).ravel()
    v = basis_of_log_rho(u.ravel())
    nodes = np.asarray(node_values, dtype=np.float64)
    out = np.empty(len(nodes))
    for j in range(len(nodes)):
        basis = np.ones_like(v)
        for m in range(len(nodes)):
            if m != j:
                basis *= (v - nodes[m]) / (nodes[j] - nodes[m])
        out[j] = (basis * weight).sum()
    return out


def _weights_log_sigma(levels: list[Level], i: int, p: int) -> np.ndarray:
    a, n = levels[i], levels[i + 1]
    nodes = np.array([0.5 * math.log(levels[i - j].one_minus_ac) for j in range(p)])
    u_to = -math.inf if n.rho == 0 else math.log(n.rho)
    return quadrature_weights(nodes, log_sigma_of_log_rho, math.log(a.rho), u_to)


_WEIGHTS = {"rho": _weights_rho, "lambda": _weights_lambda, "log_sigma": _weights_log_sigma}


def _eps_lagrange(grid, order: int, basis: str, lower_order_final: bool, top: int) -> list[Step]:
    levels = levels_of(grid)
    order = _check_order(order, top)
    if basis not in _WEIGHTS:
        raise UserError(f"basis must be one of {', '.join(BASES)}, got {basis!r}")
    steps = []
    for i, p in enumerate(_orders(len(levels) - 1, order, lower_order_final)):
        a, n = levels[i], levels[i + 1]
        # order 1: int d rho = rho_n - rho = (sigma_n alpha - sigma alpha_n) / (alpha alpha_n), exact for all bases
        w = np.array([n.rho - a.rho]) if p == 1 else _WEIGHTS[basis](levels, i, p)
        weights = {"x": n.alpha / a.alpha, **{f"D{j}": n.alpha * w[j] for j in range(p)}}
        steps.append(Step(p, {"x_next": _update(weights, alpha_ratio_minus_one(a, n))}))
    return steps


def deis(grid, order: int = 3, lower_order_final: bool = True) -> list[Step]:
    """DEIS tAB, orders 1-4, eps prediction: Lagrange basis in log rho, integrated exactly over d rho."""
    return _eps_lagrange(grid, order, "lambda", lower_order_final, 4)


def pndm_exact(grid, order: int = 4, basis: str = "lambda",
               lower_order_final: bool = False) -> list[Step]:
    """PNDM's pseudo linear multistep with exact weights for any grid, orders 1-4, low-order start."""
    return _eps_lagrange(grid, order, basis, lower_order_final, 4)


# ---------------------------------------------------------------- plans

def linear_multistep_plan(grid, steps: list[Step], prediction: str, threshold: float = 0.0,
                          max_value: float = 1.0) -> Plan:
    """The plan that runs `steps` (weights over the state and the last predictions) on the TimeGrid `grid`.

    A data prediction is stored as x0 = (x - sigma e) / alpha, written in the same pass as the state update that
    first reads it; a corrector's state ("x_corrected", UniPC) lives in buffer "xc", so the corrector is folded
    into the next step's combinations and costs no model call. `threshold` > 0 thresholds each data prediction
    (quantile `threshold`, at most `max_value`: `Threshold`) before anything reads it."""
    corrected = any("x_corrected" in step.updates for step in steps)
    ring = Ring("d", max(step.order for step in steps) + (1 if corrected else 0))
    x, plan_steps = var("x"), []
    for i, ((t, _), step) in enumerate(zip(grid.pairs, steps)):
        new = ring.push()
        if prediction == EPS:
            entries = [ModelCall("x", t, new)]
        else:
            level = Level.of(grid.level(t))
            entries = [ModelCall("x", t, "e"), Lin(new, (1 / level.alpha) * x - (level.sigma / level.alpha) * var("e"))]
            if threshold:
                entries.append(Threshold(new, threshold, max_value))
        names = {"x": "xc" if corrected and i > 0 else "x", "Z": "z",
                 **{f"D{k}": ring[-1 - k] for k in range(len(ring))}}

        def combination(update: Update) -> Expr:
            total = Expr()
            for name, w in update.weights.items():
                total = total + (OnePlus(update.x_minus_one) if name == "x" else w) * var(names[name])
            return total

        if any(w for update in step.updates.values() for name, w in update.weights.items() if name == "Z"):
            entries.append(Draw("z"))  # a fresh noise for this step, weight "Z"

        if corrected and i == 0:  # the start state is the first corrected state: kept beside the new x
            entries += [Lin("xc", x), Lin("x", combination(step.updates["x_next"]))]
        elif corrected:  # the next state first (it reads the old xc), then the corrected one in place
            entries += [Lin("x", combination(step.updates["x_next"])),
                        Lin("xc", combination(step.updates["x_corrected"]))]
        else:
            entries.append(Lin("x", combination(step.updates["x_next"])))
        plan_steps.append(tuple(entries))
    kind = EPS_BUFFER if prediction == EPS else STATE
    drawn = any("Z" in u.weights for step in steps for u in step.updates.values())
    buffers = (("x", STATE),) + ((("xc", STATE),) if corrected else ()) + (
        (("e", EPS_BUFFER),) if prediction != EPS else ()) + tuple((n, kind) for n in ring.names) + (
        (("z", NOISE),) if drawn else ())
    return Plan("", tuple(plan_steps), buffers, grid.times, grid.name)


def _levels(grid) -> list[float]:
    return [grid.level(t) for t in grid.times]


def dpm_solver_pp_plan(grid, order: int = 3, lower_order_final: bool = True, threshold: float = 0.0,
                       max_value: float = 1.0) -> Plan:
    return linear_multistep_plan(grid, dpm_solver_pp(_levels(grid), order, lower_order_final), X0,
                                 threshold, max_value)


def sde_dpm_solver_pp_plan(grid, order: int = 2, lower_order_final: bool = True, threshold: float = 0.0,
                           max_value: float = 1.0) -> Plan:
    return linear_multistep_plan(grid, sde_dpm_solver_pp(_levels(grid), order, lower_order_final), X0,
                                 threshold, max_value)


def unipc_plan(grid, variant: str = "bh2", order: int = 3, lower_order_final: bool = True, threshold: float = 0.0,
               max_value: float = 1.0) -> Plan:
    return linear_multistep_plan(grid, unipc(_levels(grid), order, variant, lower_order_final), X0,
                                 threshold, max_value)


def deis_plan(grid, order: int = 3, lower_order_final: bool = True) -> Plan:
    return linear_multistep_plan(grid, deis(_levels(grid), order, lower_order_final), EPS)


def pndm_exact_plan(grid, order: int = 4, basis: str = "lambda", lower_order_final: bool = False) -> Plan:
    return linear_multistep_plan(grid, pndm_exact(_levels(grid), order, basis, lower_order_final), EPS)
