"""The plan builders of the paper's methods (DDIM, S-PNDM, F-PNDM, FON) and iPNDM: each a pure function
TimeGrid -> Plan written as the method's mathematics reads, over the grid's levels (`grid.level(t)`), so every
method runs on every grid. The multistep solvers' builders are in `pndm_fast.multistep`; the registry that names
them all is `pndm_fast.methods`.
"""

from __future__ import annotations

import math

from .grids import TimeGrid
from .plans import EPS, NOISE, STATE, Draw, Expr, Lin, ModelCall, OnePlus, Plan, Ring, var
from .levels import Level, alpha_ratio_minus_one
from .schedule import transfer_coefficients

# Adams-Bashforth coefficients of the 2nd-, 3rd- and 4th-order multistep updates (the paper's eq. 12 and S-PNDM).
AB2 = (3 / 2, -1 / 2)
AB3 = (23 / 12, -16 / 12, 5 / 12)
AB4 = (55 / 24, -59 / 24, 37 / 24, -9 / 24)
RK4 = (1 / 6, 2 / 6, 2 / 6, 1 / 6)


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


def ddim_plan(grid: TimeGrid, eta: float = 0.0) -> Plan:
    """DDIM; with eta > 0 the generalised step of Song et al. 2021 (eq. 12), which adds fresh noise of scale
    sigma = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a') and shortens the eps direction to keep the level."""
    if eta == 0:  # the paper's transfer step, bit for bit
        steps = tuple((ModelCall("x", t, "e"), Lin("x", transfer(grid, t, t_next, X, var("e"))))
                      for t, t_next in grid.pairs)
        return _plan(grid, steps, (("x", STATE), ("e", EPS)))
    steps = []
    for t, t_next in grid.pairs:
        level, after = Level.of(grid.level(t)), Level.of(grid.level(t_next))
        a, a_next = level.ac, after.ac
        noise = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
        direction = math.sqrt(max(0.0, 1 - a_next - noise * noise))
        # x' = alpha' x0 + direction e + noise z with x0 = (x - sigma e) / alpha
        update = (OnePlus(alpha_ratio_minus_one(level, after)) * X
                  + (direction - after.alpha * level.rho) * var("e"))
        steps.append(with_noise((ModelCall("x", t, "e"),), "x", update, noise))
    return _plan(grid, steps, (("x", STATE), ("e", EPS), ("z", NOISE)))


def with_noise(entries: tuple, out: str, update: Expr, scale: float) -> tuple:
    """entries, then out = update + scale z with z a fresh draw; no draw where the scale is 0 (a last step)."""
    if scale == 0:
        return entries + (Lin(out, update),)
    return entries + (Draw("z"), Lin(out, update + scale * var("z")))


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
    return _plan(grid, steps, (("x", STATE), ("tmp", STATE), ("e", EPS), ("h0", EPS), ("h1", EPS)))


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
    return _plan(grid, steps, buffers)


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
    return _plan(grid, steps, buffers)


def ipndm_plan(grid: TimeGrid) -> Plan:
    """iPNDM (Zhang and Chen, DEIS, ICLR 2023): the transfer step with an Adams-Bashforth eps whose order ramps
    1 -> 2 -> 3 -> 4 as the history fills, instead of F-PNDM's Runge-Kutta start: one model call per step."""
    ring, steps = Ring("h", 4), []
    for t, t_next in grid.pairs:
        new = ring.push()
        coefficients = ((1.0,), AB2, AB3, AB4)[len(ring) - 1]
        history = [ring[-back] for back in range(1, len(ring) + 1)]
        steps.append((ModelCall("x", t, new), Lin("x", transfer(grid, t, t_next, X, weighted(coefficients, history)))))
    return _plan(grid, steps, (("x", STATE),) + tuple((name, EPS) for name in ring.names))


def ancestral_split(rho: float, rho_next: float, eta: float) -> tuple[float, float]:
    """(rho_down, rho_up) of an ancestral step from rho to rho_next (k-diffusion's get_ancestral_step): the ODE
    goes down to rho_down and fresh noise of scale rho_up brings the state back up to rho_next."""
    up = min(rho_next, eta * math.sqrt(rho_next**2 * (rho**2 - rho_next**2) / rho**2))
    return math.sqrt(rho_next**2 - up * up), up


def euler_ancestral_plan(grid: TimeGrid, eta: float = 1.0, s_noise: float = 1.0) -> Plan:
    """Euler ancestral (k-diffusion's sample_euler_ancestral, diffusers' EulerAncestralDiscreteScheduler): in the
    variance-exploding variable x / alpha with noise scale rho = sigma / alpha, a step to rho' goes down to
    rho_down by Euler and adds noise rho_up back, rho_up = min(rho', eta sqrt(rho'^2 (rho^2 - rho'^2) / rho^2)),
    rho_down = sqrt(rho'^2 - rho_up^2); written here on x = alpha (x / alpha)."""
    steps = []
    for t, t_next in grid.pairs:
        level, after = Level.of(grid.level(t)), Level.of(grid.level(t_next))
        rho, rho_next = level.rho, after.rho
        down, up = ancestral_split(rho, rho_next, eta)
        update = OnePlus(alpha_ratio_minus_one(level, after)) * X + after.alpha * (down - rho) * var("e")
        steps.append(with_noise((ModelCall("x", t, "e"),), "x", update, after.alpha * s_noise * up))
    return _plan(grid, steps, (("x", STATE), ("e", EPS), ("z", NOISE)))


def heun_plan(grid: TimeGrid) -> Plan:
    """Heun's method of EDM (Karras et al. 2022, Algorithm 1 without churn; diffusers' HeunDiscreteScheduler):
    in x / alpha against rho, an Euler step (the transfer step) to the next level, the model there, and the
    step again with the mean of the two eps; the last step is Euler's alone (EDM's step to sigma = 0)."""
    steps, pairs = [], grid.pairs
    for i, (t, t_next) in enumerate(pairs):
        if i == len(pairs) - 1:
            steps.append((ModelCall("x", t, "e1"), Lin("x", transfer(grid, t, t_next, X, var("e1")))))
            continue
        steps.append((ModelCall("x", t, "e1"), Lin("tmp", transfer(grid, t, t_next, X, var("e1"))),
                      ModelCall("tmp", t_next, "e2"),
                      Lin("x", transfer(grid, t, t_next, X, 0.5 * var("e1") + 0.5 * var("e2")))))
    return _plan(grid, steps, (("x", STATE), ("tmp", STATE), ("e1", EPS), ("e2", EPS)))


def dpm_2s_ancestral_plan(grid: TimeGrid, eta: float = 1.0, s_noise: float = 1.0) -> Plan:
    """DPM-Solver++(2S) ancestral (k-diffusion's sample_dpmpp_2s_ancestral): the ODE from rho down to rho_down by
    the data-prediction solver's second-order singlestep, its midpoint at the geometric mean sqrt(rho rho_down)
    (half the step in lambda), then fresh noise rho_up. The last step is Euler's alone, one call (k-diffusion's
    step to sigma = 0; on a grid ending above it, as Heun's), so S steps make 2S - 1 calls.
    Written on the variance-preserving state: DPM-Solver++(1) from a to b is x_b = (sigma_b / sigma_a) x_a -
    alpha_b (e^{-h} - 1) D with h = lambda_b - lambda_a."""
    schedule, steps, pairs = grid.schedule, [], grid.pairs
    for i, (t, t_next) in enumerate(pairs):
        level, after = Level.of(grid.level(t)), Level.of(grid.level(t_next))
        down, up = ancestral_split(level.rho, after.rho, eta)
        data = (X - level.sigma * var("e1")) / level.alpha  # D at the step's start
        if i == len(pairs) - 1:  # Euler in x / alpha down to rho_down, then the noise up to the next level
            ratio = down / level.rho
            update = (after.alpha * ratio / level.alpha) * X + after.alpha * (1 - ratio) * data
            steps.append(with_noise((ModelCall("x", t, "e1"),), "x", update, after.alpha * s_noise * up))
            continue
        low, mid = Level.from_sigma(down), Level.from_sigma(math.sqrt(level.rho * down))
        h = low.lam - level.lam
        x_mid = (mid.sigma / level.sigma) * X - mid.alpha * math.expm1(-h / 2) * data
        data_mid = (var("x2") - mid.sigma * var("e2")) / mid.alpha
        # down to rho_down, then up to the next level by the noise, in x / alpha: one combination
        scale = after.alpha / low.alpha
        update = (scale * low.sigma / level.sigma) * X - scale * low.alpha * math.expm1(-h) * data_mid
        steps.append(with_noise((ModelCall("x", t, "e1"), Lin("x2", x_mid), ModelCall("x2", schedule.time_of(mid.ac),
                                                                                          "e2")),
                                "x", update, after.alpha * s_noise * up))
    return _plan(grid, steps, (("x", STATE), ("x2", STATE), ("e1", EPS), ("e2", EPS), ("z", NOISE)))


def _plan(grid: TimeGrid, steps, buffers) -> Plan:
    return Plan("", tuple(steps), buffers, grid.times, grid.name)
