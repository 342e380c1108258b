"""Noise levels, written once: a state at level ac (alpha-bar) is x = alpha x0 + sigma eps with alpha = sqrt(ac),
sigma = sqrt(1 - ac), lambda = log(alpha / sigma) (the log-SNR over two) and rho = sigma / alpha.

`Level` holds them in float64 for the plan builders; `tensor_levels` gives (alpha, sigma, lambda) of a 0-d tensor
for the references; `PREDICTIONS` reads what a network predicts (eps, x0, v, a flow's velocity, EDM's raw
network) as eps; `FAMILIES` says how a model family's own state is a multiple of this one. At ac = 1 (the data)
sigma = 0, lambda = +inf and rho = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import UserError


@dataclass(frozen=True)
class Level:
    ac: float
    one_minus_ac: float
    alpha: float
    sigma: float
    lam: float  # +inf at ac = 1
    rho: float  # 0 at ac = 1

    @classmethod
    def of(cls, ac: float) -> "Level":
        ac = float(ac)
        om = 1.0 - ac
        alpha, sigma = math.sqrt(ac), math.sqrt(om)
        lam = math.inf if om == 0 else 0.5 * (math.log(ac) - math.log(om))
        return cls(ac, om, alpha, sigma, lam, sigma / alpha)

    @classmethod
    def from_sigma(cls, rho: float) -> "Level":
        """The level whose noise scale of x / alpha, rho = sigma / alpha (EDM's and diffusers' "sigma"), is given;
        1 - ac as rho^2 / (1 + rho^2) itself, not 1 minus ac (near the data that subtraction loses ~1e-10)."""
        rho = float(rho)
        ac, om = 1.0 / (1.0 + rho * rho), rho * rho / (1.0 + rho * rho)
        return cls(ac, om, math.sqrt(ac), math.sqrt(om), math.inf if rho == 0 else -math.log(rho), rho)

    @classmethod
    def from_lambda(cls, lam: float) -> "Level":
        """The level whose lambda = log(alpha / sigma) is given."""
        return cls.of(1.0 / (1.0 + math.exp(-2.0 * lam)))


def alpha_ratio_minus_one(a: Level, b: Level) -> float:
    """alpha_b / alpha_a - 1 = (ac_b - ac_a) / (alpha_a (alpha_a + alpha_b)), without the cancellation of the
    ratio minus one (steps near the data change alpha by ~1e-4)."""
    return (b.ac - a.ac) / (a.alpha * (a.alpha + b.alpha))


def tensor_levels(ac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha, sigma, lambda) of a 0-d tensor level, in its dtype; lambda = inf at ac = 1."""
    alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
    return alpha, sigma, torch.log(alpha) - torch.log(sigma)


def _from_x0(level: Level) -> tuple[float, float]:
    if level.sigma == 0.0:
        raise UserError("an x0-predicting model cannot give eps at sigma = 0 (t = -1); use a grid whose model "
                        "calls stay at t >= 0")
    return 1.0 / level.sigma, -level.alpha / level.sigma  # x = alpha x0 + sigma eps


SIGMA_DATA = 0.5  # EDM's sigma_data, the data's standard deviation its preconditioning assumes


def _edm_skip(level: Level) -> float:
    return SIGMA_DATA**2 / (level.rho**2 + SIGMA_DATA**2)


def _from_edm(level: Level) -> tuple[float, float]:
    """EDM's raw network F (Karras et al. 2022, table 1): D = c_skip x_ve + c_out F with x_ve = x / alpha,
    c_skip = sd^2 / (rho^2 + sd^2), c_out = rho sd / sqrt(rho^2 + sd^2); eps = (x - alpha D) / sigma."""
    if level.sigma == 0.0:
        raise UserError("an EDM network cannot give eps at sigma = 0; use a grid whose model calls stay at "
                        "sigma > 0")
    c_out = level.rho * SIGMA_DATA / math.sqrt(level.rho**2 + SIGMA_DATA**2)
    return (1.0 - _edm_skip(level)) / level.sigma, -level.alpha * c_out / level.sigma


PREDICTIONS = {
    "eps": lambda level: (0.0, 1.0),
    "x0": _from_x0,
    "v": lambda level: (level.sigma, level.alpha),  # v = alpha eps - sigma x0
    # a rectified flow's velocity u = eps - x0: x = alpha (eps - u) + sigma eps
    "flow": lambda level: (1.0 / (level.alpha + level.sigma), level.alpha / (level.alpha + level.sigma)),
    "edm": _from_edm,
}
"""What a network may predict: each a function of the level to (c_x, c_out) with eps = c_x x + c_out out."""

INPUT_SCALES = {"edm": lambda level: 1.0 / math.sqrt(level.rho**2 + SIGMA_DATA**2)}
"""A prediction whose network reads its state multiplied by a factor of the level (EDM's c_in); others read it
as it is."""

FAMILIES = {
    "vp": lambda level: 1.0,                                    # x = alpha x0 + sigma eps
    "ve": lambda level: 1.0 / level.alpha,                      # x = x0 + rho eps (EDM, VE)
    "flow": lambda level: 1.0 / (level.alpha + level.sigma),    # x = (1 - s) x0 + s eps
}
"""Each schedule family's state as a multiple of the variance-preserving one the solvers run on, at a level."""

PREDICTION_FAMILIES = {"v": ("vp",), "flow": ("flow",), "edm": ("ve",)}
"""Predictions defined for some families only (the others read the same on every one)."""


def network_input_scale(family: str, prediction: str, ac: float) -> float:
    """The factor the network's input is the solver's state times, at level ac: its family's state, then the
    prediction's own input scaling."""
    level = Level.of(ac)
    factor = INPUT_SCALES.get(prediction)
    return FAMILIES[family](level) * (1.0 if factor is None else factor(level))


def eps_weights(prediction: str, ac: float) -> tuple[float, float]:
    """(c_x, c_out) with eps = c_x x + c_out out for a model predicting `prediction` at level ac."""
    return PREDICTIONS[prediction](Level.of(ac))
