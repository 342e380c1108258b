"""Noise levels, written once: a state at level ac (alpha-bar) is x = alpha x0 + sigma eps with alpha = sqrt(ac),
sigma = sqrt(1 - ac), lambda = log(alpha / sigma) (the log-SNR over two) and rho = sigma / alpha.

`Level` holds them in float64 for the plan builders; `tensor_levels` gives (alpha, sigma, lambda) of a 0-d tensor
for the references; `PREDICTIONS` reads what a network predicts (eps, x0, v) as eps. At ac = 1 (the data)
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
        """The level whose noise scale of x / alpha, rho = sigma / alpha (EDM's and diffusers' "sigma"), is given."""
        return cls.of(1.0 / (1.0 + rho * rho))

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


PREDICTIONS = {
    "eps": lambda level: (0.0, 1.0),
    "x0": _from_x0,
    "v": lambda level: (level.sigma, level.alpha),  # v = alpha eps - sigma x0
}
"""What a network may predict: each a function of the level to (c_x, c_out) with eps = c_x x + c_out out."""


def eps_weights(prediction: str, ac: float) -> tuple[float, float]:
    """(c_x, c_out) with eps = c_x x + c_out out for a model predicting `prediction` at level ac."""
    return PREDICTIONS[prediction](Level.of(ac))
