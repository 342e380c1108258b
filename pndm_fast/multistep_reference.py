"""Float64 references for the multistep methods of `pndm_fast.multistep`, written op by op from each method's
paper, on tensors, without the coefficient algebra: the yardstick the plans are tested against.

Each solver here takes (m, x, times, acs, **options): the model m(x, t) -> eps, the start state x (level acs[0]),
the grid's times and their levels ac as float64 0-d tensors (noisiest first), and returns the states at every
level [x_0, ..., x_S]. `float64_reference` turns one into a reference of `pndm_fast.reference`'s protocol
(m, x, grid, **options), computed in float64 whatever the noise's dtype. Orders ramp up with the history as in
`pndm_fast.multistep` (same `lower_order_final` meaning).
"""

from __future__ import annotations

import functools
import inspect
import math

import numpy as np
import torch

from .levels import Level, tensor_levels
from .reference import transfer


def float64_reference(solver):
    """reference(m, x, grid, **options): `solver` in float64 on the grid's levels; the model sees x in the
    noise's dtype and the states come back in it."""
    @functools.wraps(solver)
    def run(m, x, grid, threshold: float = 0.0, max_value: float = 1.0, **options):
        dtype = x.dtype
        if options.get("draws") is not None:  # a stochastic sampler's fresh noises
            options["draws"] = [z.double() for z in options["draws"]]

        def m64(state, t):
            eps = m(state.to(dtype), t).double()
            if not threshold:
                return eps
            # the model as the solver sees it: its data prediction thresholded, read back as eps
            alpha, sigma, _ = tensor_levels(torch.tensor(grid.level(t), dtype=torch.float64))
            x0 = dynamic_threshold((state - sigma * eps) / alpha, threshold, max_value)
            return (state - alpha * x0) / sigma

        acs = [torch.tensor(grid.level(t), dtype=torch.float64) for t in grid.times]
        if "time_of" in inspect.signature(solver).parameters:  # a solver that calls the model between the times
            options["time_of"] = grid.schedule.time_of
        return [s.to(dtype) for s in solver(m64, x.double(), grid.times, acs, **options)]

    return run


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, section 2.3) of a data prediction, per image: s the
    `ratio` percentile of |x0|, at least 1 and at most `max_value`; x0 clipped to [-s, s] and divided by s."""
    s = torch.stack([torch.quantile(image.abs().flatten(), ratio) for image in x0])
    s = s.clamp(min=1.0, max=max_value).view(-1, *([1] * (x0.dim() - 1)))
    return x0.clamp(-s, s) / s


def _order(i: int, num: int, order: int, lower_order_final: bool) -> int:
    return min(order, i + 1, num - i) if lower_order_final else min(order, i + 1)


def _level_of(acs):
    return lambda i: acs[i]


def _x0(x, eps, ac):
    alpha, sigma, _ = tensor_levels(ac)
    return (x - sigma * eps) / alpha


def dpm_solver_pp(m, x, times, acs, order: int = 3, lower_order_final: bool = True) -> list[torch.Tensor]:
    """DPM-Solver++ multistep (Lu et al. 2022): 2M as in its Algorithm 2,
    x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i, D_i = (1 + 1/(2 r_i)) x0_{i-1}
    - 1/(2 r_i) x0_{i-2}, r_i = h_{i-1} / h_i; 3M as the paper's code (dpmsolver++ third-order multistep) with
    phi_1 = e^{-h} - 1, phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2. A step to sigma = 0 is first order."""
    num = len(acs) - 1
    xs, x0s = [x], []
    for i in range(num):
        s, t = acs[i], acs[i + 1]
        x0s.append(_x0(xs[-1], m(xs[-1], times[i]), s))
        p = _order(i, num, order, lower_order_final)
        alpha_s, sigma_s, lam_s = tensor_levels(s)
        alpha_t, sigma_t, lam_t = tensor_levels(t)
        if float(t) == 1.0:
            xs.append(x0s[-1])  # sigma_t = 0: e^{-h} = 0, x_t = alpha_t x0 = x0
            continue
        h = lam_t - lam_s
        phi_1 = torch.expm1(-h)
        if p == 1:
            xs.append(sigma_t / sigma_s * xs[-1] - alpha_t * phi_1 * x0s[-1])
        elif p == 2:
            r = (lam_s - tensor_levels(acs[i - 1])[2]) / h
            d = (1 + 1 / (2 * r)) * x0s[-1] - 1 / (2 * r) * x0s[-2]
            xs.append(sigma_t / sigma_s * xs[-1] - alpha_t * phi_1 * d)
        else:
            lam_1, lam_2 = tensor_levels(acs[i - 1])[2], tensor_levels(acs[i - 2])[2]
            r0, r1 = (lam_s - lam_1) / h, (lam_1 - lam_2) / h
            m0, m1, m2 = x0s[-1], x0s[-2], x0s[-3]
            d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_2 = phi_1 / h + 1
            phi_3 = phi_2 / h - 0.5
            xs.append(sigma_t / sigma_s * xs[-1] - alpha_t * phi_1 * m0 + alpha_t * phi_2 * d1 - alpha_t * phi_3 * d2)
    return xs


def _unipc_coefficients(lams, k_base: int, p: int, variant: str, corrector: bool):
    """The UniPC paper's B(h) system (data prediction, h_hat = -h): returns (h, B(h), e^{h_hat} - 1, rks, rhos).
    R_p rows are r^(k-1); g_k = h_hat phi_{k+1}(h_hat) k! / B(h), by the recursion h phi_{k+1} = h phi_k / h - 1/k!."""
    h = lams[k_base + 1] - lams[k_base]
    hh = -h
    h_phi_1 = torch.expm1(hh)
    bh = hh if variant == "bh1" else torch.expm1(hh)
    rks = [(lams[k_base - m] - lams[k_base]) / h for m in range(1, p)]
    allr = torch.stack(rks + [torch.ones((), dtype=torch.float64)])
    h_phi_k = h_phi_1 / hh - 1
    fact = 1
    g = []
    for k in range(1, p + 1):
        g.append(h_phi_k * fact / bh)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    g = torch.stack(g)
    mat = torch.stack([allr**j for j in range(p)])
    if corrector:
        rhos = torch.tensor([0.5], dtype=torch.float64) if p == 1 else torch.linalg.solve(mat, g)
    elif p == 1:
        rhos = None
    else:
        rhos = torch.tensor([0.5], dtype=torch.float64) if p == 2 else torch.linalg.solve(mat[:-1, :-1], g[:-1])
    return bh, h_phi_1, rks, rhos


def unipc_states(m, x, times, acs, variant: str = "bh2", order: int = 3,
                 lower_order_final: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """UniPC (Zhao et al. 2023), data prediction: the UniP-p predictor x_t = (sigma_t / sigma_s) x - alpha_t
    (e^{h_hat} - 1) m0 - alpha_t B(h) sum_k a_k D_k / r_k, then, once the model has been called at x_t, the UniC-p
    corrector with the same formula over the history plus D_t = m_t - m0 (coefficient a_p). Returns the
    trajectory of the states the model is called at (the predicted ones) and, last, the final predicted state;
    the list of corrected states is returned as second value."""
    num = len(acs) - 1
    lams = [tensor_levels(a)[2] for a in acs]
    predicted, corrected, ms = [x], [], []
    orders = []
    for i in range(num):
        d = _x0(predicted[-1], m(predicted[-1], times[i]), acs[i])
        if i == 0:
            corrected.append(predicted[-1])
        else:
            q = orders[-1]
            bh, h_phi_1, rks, rhos = _unipc_coefficients(lams, i - 1, q, variant, corrector=True)
            alpha_t, sigma_t, _ = tensor_levels(acs[i])
            sigma_s = tensor_levels(acs[i - 1])[1]
            m0 = ms[-1]
            res = sum((rhos[k - 1] * (ms[-1 - k] - m0) / rks[k - 1] for k in range(1, q)), torch.zeros_like(m0))
            corrected.append(sigma_t / sigma_s * corrected[-1] - alpha_t * h_phi_1 * m0
                             - alpha_t * bh * (res + rhos[-1] * (d - m0)))
        ms.append(d)
        p = _order(i, num, order, lower_order_final)
        if float(acs[i + 1]) == 1.0:
            p = 1
        orders.append(p)
        alpha_t, sigma_t, _ = tensor_levels(acs[i + 1])
        sigma_s = tensor_levels(acs[i])[1]
        if float(acs[i + 1]) == 1.0:
            predicted.append(d)  # sigma_t = 0, alpha_t = 1: the state is the data prediction
            continue
        bh, h_phi_1, rks, rhos = _unipc_coefficients(lams, i, p, variant, corrector=False)
        x_t = sigma_t / sigma_s * corrected[-1] - alpha_t * h_phi_1 * d
        if p > 1:
            x_t = x_t - alpha_t * bh * sum(rhos[k - 1] * (ms[-1 - k] - d) / rks[k - 1] for k in range(1, p))
        predicted.append(x_t)
    return predicted, corrected


def unipc(m, x, times, acs, variant: str = "bh2", order: int = 3, lower_order_final: bool = True):
    """UniPC's predicted states (the ones the model is called at, then the last)."""
    return unipc_states(m, x, times, acs, variant, order, lower_order_final)[0]


# ------------------------------------------------- eps-form Lagrange steps (DEIS, PNDM-exact) by brute force

def basis_variable(basis: str, ac: float) -> float:
    """The interpolation variable of a level: rho = sigma / alpha, lambda = log(alpha / sigma), log sigma."""
    if basis == "rho":
        return Level.of(ac).rho
    if basis == "lambda":
        return Level.of(ac).lam
    return 0.5 * math.log1p(-float(ac))  # log sigma, without rounding 1 - ac first


def _variable_of_log_rho(basis: str, u: np.ndarray) -> np.ndarray:
    rho = np.exp(u)
    if basis == "rho":
        return rho
    if basis == "lambda":
        return -u
    return -0.5 * np.log1p(1 / (rho * rho))  # log sigma, sigma^2 = rho^2 / (1 + rho^2)


def _neville(nodes: list[float], values: list[torch.Tensor], v: float) -> torch.Tensor:
    """The interpolating polynomial through (nodes[j], values[j]) at v, by Neville's recursion on tensors."""
    p = list(values)
    n = len(nodes)
    for level in range(1, n):
        p = [((v - nodes[j + level]) * p[j] + (nodes[j] - v) * p[j + 1]) / (nodes[j] - nodes[j + level])
             for j in range(n - level)]
    return p[0]


def mean_eps(basis: str, nodes_ac: list[float], eps: list[torch.Tensor], ac: float, ac_next: float) -> torch.Tensor:
    """e' = (1 / (rho_n - rho)) int_rho^rho_n P(v(rho')) d rho', P the interpolant of eps over the levels
    nodes_ac in `basis`: composite 24-point Gauss-Legendre in u = log rho over 0.25-wide panels (down to
    u - 90 for a step to the data)."""
    nodes = [basis_variable(basis, a) for a in nodes_ac]
    rho, rho_n = Level.of(ac).rho, Level.of(ac_next).rho
    u0 = math.log(rho)
    u1 = u0 - 90.0 if rho_n == 0 else math.log(rho_n)
    panels = max(1, math.ceil(abs(u1 - u0) / 0.25))
    gx, gw = np.polynomial.legendre.leggauss(24)
    total = torch.zeros_like(eps[0])
    edges = np.linspace(u0, u1, panels + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        us = 0.5 * (lo + hi) + 0.5 * (hi - lo) * gx
        vs = _variable_of_log_rho(basis, us)
        for uq, vq, wq in zip(us, vs, gw):
            total = total + (0.5 * (hi - lo) * wq * math.exp(uq)) * _neville(nodes, eps, float(vq))
    return total / (rho_n - rho)


def eps_lagrange(m, x, times, acs, order: int, basis: str, lower_order_final: bool = False) -> list[torch.Tensor]:
    """PNDM's pseudo linear multistep (Liu et al. 2022, eq. 12), x_next = phi(x, e', t, t - d), with e' the exact
    mean of the eps interpolant over the step in d rho (rho = sigma / alpha, the variable in which the transfer
    integrates a constant eps exactly); with basis "lambda" this is DEIS's log-rho tAB."""
    num = len(acs) - 1
    levels = [float(a) for a in acs]
    xs, eps = [x], []
    for i in range(num):
        eps.append(m(xs[-1], times[i]))
        p = _order(i, num, order, lower_order_final)
        e = eps[-1] if p == 1 else mean_eps(basis, levels[i - p + 1:i + 1][::-1], eps[::-1][:p], levels[i],
                                            levels[i + 1])
        xs.append(transfer(xs[-1], i, i + 1, e, _level_of(acs)))
    return xs
