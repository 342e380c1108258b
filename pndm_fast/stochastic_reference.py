"""Float64 references of EDM's and k-diffusion's samplers, written from their papers in their own variables
(y = x / alpha against rho = sigma / alpha), in `pndm_fast.multistep_reference`'s protocol
(m, x, times, acs, [draws,] **options) -> states: `draws` are the fresh standard Gaussian noises of the stochastic
ones, read in order, one per step that adds noise (none on a step to sigma = 0)."""

from __future__ import annotations

import torch

from .levels import tensor_levels
from .multistep_reference import _order, _x0


def heun(m, x, times, acs) -> list[torch.Tensor]:
    """EDM's Algorithm 1 (Karras et al. 2022) without churn: d = (y - D(y; rho)) / rho, y' = y + (rho' - rho) d,
    then, unless rho' = 0, y' = y + (rho' - rho) (d + d') / 2 with d' at (y', rho'); states returned as
    x = alpha y."""
    xs = [x]
    for i in range(len(acs) - 1):
        alpha, sigma, _ = tensor_levels(acs[i])
        alpha_next, sigma_next, _ = tensor_levels(acs[i + 1])
        rho, rho_next = sigma / alpha, sigma_next / alpha_next
        y = xs[-1] / alpha
        d = (y - _x0(xs[-1], m(xs[-1], times[i]), acs[i])) / rho
        y_next = y + (rho_next - rho) * d
        if rho_next > 0 and i < len(acs) - 2:
            x_next = alpha_next * y_next
            d_next = (y_next - _x0(x_next, m(x_next, times[i + 1]), acs[i + 1])) / rho_next
            y_next = y + (rho_next - rho) * (d + d_next) / 2
        xs.append(alpha_next * y_next)
    return xs


def _ancestral(m, x, times, acs, draws, eta: float, s_noise: float, descend) -> list[torch.Tensor]:
    """k-diffusion's ancestral loop on y = x / alpha, noise scale rho = sigma / alpha: `descend(i, y, denoised,
    rho, rho_down)` takes y down to rho_down (rho_up = min(rho', eta sqrt(rho'^2 (rho^2 - rho'^2) / rho^2)),
    rho_down = sqrt(rho'^2 - rho_up^2)), then fresh noise s_noise rho_up z brings it up to the next level; the
    states are returned as x = alpha y (the model is called on x)."""
    fresh, xs = iter(draws), [x]
    for i in range(len(acs) - 1):
        alpha, sigma, _ = tensor_levels(acs[i])
        alpha_next, sigma_next, _ = tensor_levels(acs[i + 1])
        rho, rho_next = sigma / alpha, sigma_next / alpha_next
        denoised = _x0(xs[-1], m(xs[-1], times[i]), acs[i])
        rho_up = torch.minimum(rho_next, eta * (rho_next**2 * (rho**2 - rho_next**2) / rho**2).sqrt())
        rho_down = (rho_next**2 - rho_up**2).sqrt()
        y = descend(i, xs[-1] / alpha, denoised, rho, rho_down)
        if rho_up > 0:  # no draw where no noise is added (eta 0, the last step)
            y = y + next(fresh) * s_noise * rho_up
        xs.append(alpha_next * y)
    return xs


def _euler(i, y, denoised, rho, rho_down):
    return y + (y - denoised) / rho * (rho_down - rho)  # d = (y - D) / rho


def euler_ancestral(m, x, times, acs, draws=(), eta: float = 1.0, s_noise: float = 1.0) -> list[torch.Tensor]:
    """k-diffusion's sample_euler_ancestral: an Euler step d = (y - denoised) / rho down to rho_down."""
    return _ancestral(m, x, times, acs, draws, eta, s_noise, _euler)


def dpm_2s_ancestral(m, x, times, acs, draws=(), eta: float = 1.0, s_noise: float = 1.0, time_of=None):
    """k-diffusion's sample_dpmpp_2s_ancestral, with t = -log(rho): from t to t_next = -log(rho_down) the
    midpoint s = t + h / 2, y_2 = (rho_s / rho_t) y - expm1(-h / 2) D, D_2 the model there, y = (rho_down /
    rho_t) y - expm1(-h) D_2 (the last step Euler's, k-diffusion's step to rho_down = 0). The model is called on
    x = alpha y at the time `time_of` gives the midpoint's level."""
    def second_order(i, y, denoised, rho, rho_down):
        if i == len(acs) - 2:
            return _euler(i, y, denoised, rho, rho_down)
        h = torch.log(rho) - torch.log(rho_down)
        rho_mid = (rho * rho_down).sqrt()  # exp(-s) at the midpoint s = t + h / 2
        ac_mid = 1 / (1 + rho_mid**2)
        x_mid = ((rho_mid / rho) * y - torch.expm1(-h / 2) * denoised) * ac_mid.sqrt()
        denoised_mid = _x0(x_mid, m(x_mid, time_of(float(ac_mid))), ac_mid)
        return (rho_down / rho) * y - torch.expm1(-h) * denoised_mid

    return _ancestral(m, x, times, acs, draws, eta, s_noise, second_order)


def sde_dpm_solver_pp(m, x, times, acs, draws, order: int = 2, lower_order_final: bool = True):
    """SDE-DPM-Solver++(1, 2M) of the DPM-Solver++ paper (its appendix), with h = lambda_t - lambda_s:
    x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) D + sigma_t sqrt(1 - e^{-2h}) z, with D = x0_s
    (first order) or x0_s + (x0_s - x0_{s'}) / (2 r), r = h_{last} / h (2M, midpoint)."""
    num, fresh = len(acs) - 1, iter(draws)
    xs, x0s = [x], []
    for i in range(num):
        x0s.append(_x0(xs[-1], m(xs[-1], times[i]), acs[i]))
        if float(acs[i + 1]) == 1.0:
            xs.append(x0s[-1])  # sigma_t = 0: e^{-h} = 0 and no noise
            continue
        alpha_s, sigma_s, lam_s = tensor_levels(acs[i])
        alpha_t, sigma_t, lam_t = tensor_levels(acs[i + 1])
        h = lam_t - lam_s
        d = x0s[-1]
        if _order(i, num, order, lower_order_final) == 2:
            r = (lam_s - tensor_levels(acs[i - 1])[2]) / h
            d = x0s[-1] + (x0s[-1] - x0s[-2]) / (2 * r)
        xs.append(sigma_t / sigma_s * torch.exp(-h) * xs[-1] + alpha_t * (1 - torch.exp(-2 * h)) * d
                  + sigma_t * (1 - torch.exp(-2 * h)).sqrt() * next(fresh))
    return xs
