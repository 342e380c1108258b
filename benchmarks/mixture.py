"""A Gaussian mixture under the sampler's noise schedule: its exact eps-predictor and exact probability-flow ODE.

A problem with a known answer. Data x0 ~ sum_k pi_k N(mu_k, diag(s_k^2)); noised as in training,
x = sqrt(a) x0 + sqrt(1 - a) eps, its marginal at noise level a is

    p_a(x) = sum_k pi_k N(x; sqrt(a) mu_k, diag(a s_k^2 + 1 - a)),

and the exact noise prediction is eps*(x, a) = -sqrt(1 - a) grad log p_a(x) (the posterior mean of the noise).
`MixtureEps` wraps it as a model with the UNets' signature, so every backend of `pndm_fast.sample` runs it.

Time convention. The model's time input follows training: network time t means noise level ac(t) (training
reads ac[t]), where `ac` is the schedule's float32 alpha table read in float64. Fractional t (F-PNDM's
midpoints) reads ac(t) by linear interpolation of log ac between integer indices, with ac(-1) := 1 (no noise
before the first step), so t ranges over [-1, N - 1]. The sampler's transfer step instead places the state at
time t at level ac[int(t) + 1] (docs/design.md, "Time and noise level"): one index later than the level
the model is asked about.

The exact solutions (`exact_solutions`) integrate the probability-flow ODE in DDIM's variables,
y = x / sqrt(a_s), sigma = sqrt((1 - a_s) / a_s), dy/dsigma = eps, where a_s is the state's own level, from the
sampler's start (the noise at time seq[-1], level ac[seq[-1] + 1]) in two conventions:
- "true": the probability-flow ODE itself, eps evaluated at the state's own level a_s;
- "sampler": the ODE the samplers discretise, state at level ac(t + 1) and eps at the model's level ac(t),
  down to t = 0, followed by the one-index final step T(x, 0, -1, eps*(x, ac[0])) that every method takes
  with the model at t = 0 (no refinement of sample_step shrinks that step, so it belongs to the limit).
"""

from __future__ import annotations

import math
import numpy as np
import torch

from pndm_fast.errors import UserError
from pndm_fast.schedule import Schedule

TRUE = "true"
SAMPLER = "sampler"
CONVENTIONS = (TRUE, SAMPLER)


class GaussianMixture:
    """weights (K,), means (K, d), stds (K, d) (isotropic components repeat one std over d), all float64;
    `shape` (C, H, W) with C * H * W = d is how a sample is laid out for the sampler. Build with `create`."""

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, shape: tuple[int, int, int]):
        self.weights, self.means, self.stds, self.shape = weights, means, stds, shape
        # Each component's std is the same in every coordinate: then eps needs only (B, K) work and matmuls.
        self.isotropic = bool((stds == stds[:, :1]).all())
        self._cast: dict = {}

    @classmethod
    def create(cls, weights, means, stds, shape) -> "GaussianMixture":
        """Checks and normalises: weights > 0 (rescaled to sum 1), stds > 0 of shape (K,) or (K, d)."""
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        mu = torch.as_tensor(means, dtype=torch.float64)
        s = torch.as_tensor(stds, dtype=torch.float64)
        shape = tuple(int(n) for n in shape)
        if mu.dim() != 2 or mu.shape[0] != w.numel():
            raise UserError(f"means must be (K, d) with K = {w.numel()} weights, got shape {tuple(mu.shape)}")
        if len(shape) != 3 or math.prod(shape) != mu.shape[1]:
            raise UserError(f"shape {shape} must be (C, H, W) with C*H*W = d = {mu.shape[1]}")
        if s.dim() == 1:
            s = s[:, None].expand(mu.shape).clone()
        if s.shape != mu.shape:
            raise UserError(f"stds must be (K,) or (K, d) = {tuple(mu.shape)}, got shape {tuple(s.shape)}")
        if not bool((w > 0).all()) or not bool((s > 0).all()) or not bool(torch.isfinite(mu).all()):
            raise UserError("mixture weights and stds must be positive and the means finite")
        return cls(w / w.sum(), mu, s, shape)

    def _params(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(means, stds^2, log weights, ||mu_k||^2) in like's dtype and device, cast once and kept."""
        key = (like.dtype, like.device)
        if key not in self._cast:
            mu = self.means.to(like)
            self._cast[key] = (mu, (self.stds**2).to(like), self.weights.log().to(like), (mu * mu).sum(1))
        return self._cast[key]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of x0, (n, d) float64."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[k] + self.stds[k] * z

    def log_prob(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """log p_a(x) for x (B, d) at levels a (B,), in x's dtype: the plain per-coordinate form, as a check."""
        mu, s2, lw, _ = self._params(x)
        a = a.to(x)[:, None, None]
        v = a * s2 + (1 - a)  # (B, K, d)
        diff = x[:, None, :] - a.sqrt() * mu
        log_n = -0.5 * (diff**2 / v + torch.log(2 * math.pi * v)).sum(-1)
        return torch.logsumexp(lw + log_n, dim=1)

    def eps(self, x: torch.Tensor, a: torch.Tensor, one_minus_a: torch.Tensor | None = None) -> torch.Tensor:
        """eps*(x, a) = -sqrt(1 - a) grad log p_a(x) for x (B, d) at levels a (B,); returns (B, d) in x's dtype.

        Responsibilities are a softmax of the component log-densities (log-sum-exp, so a far component
        underflows to 0 instead of making 0/0). Pass `one_minus_a` when it is known more accurately than 1 - a
        (near a = 1 the subtraction loses digits).
        """
        dt = x.dtype
        a = a.to(dt)
        om = (1 - a) if one_minus_a is None else one_minus_a.to(dt)
        c = a.sqrt()[:, None]
        mu, s2, lw, m2 = self._params(x)
        if self.isotropic:
            # ||x - c mu_k||^2 by one matmul: (B, d) x (d, K) instead of a (B, K, d) difference (d = 192 images)
            v = a[:, None] * s2[None, :, 0] + om[:, None]  # (B, K)
            dist2 = ((x * x).sum(1, keepdim=True) - 2 * c * (x @ mu.T) + c**2 * m2).clamp_min(0)
            logits = lw - 0.5 * dist2 / v - 0.5 * self.dim * v.log()
            rv = torch.softmax(logits, dim=1) / v  # r_k / v_k
            grad_neg = x * rv.sum(1, keepdim=True) - c * (rv @ mu)  # sum_k r_k (x - c mu_k) / v_k
        else:
            v = a[:, None, None] * s2 + om[:, None, None]  # (B, K, d)
            diff = x[:, None, :] - c[:, :, None] * mu
            logits = lw - 0.5 * (diff**2 / v + v.log()).sum(-1)
            r = torch.softmax(logits, dim=1)
            grad_neg = (r[:, :, None] * diff / v).sum(1)
        return om.sqrt()[:, None] * grad_neg


class MixtureEps(torch.nn.Module):
    """The exact eps-predictor of `mixture` as a model: forward(x (B, C, H, W), t (B,) float) -> eps (B, C, H, W).

    Network time t means noise level ac(t), log ac linearly interpolated between integer indices, ac(-1) = 1;
    t is clamped to [-1, N - 1] (a check would read the tensor on the host, which a CUDA graph cannot). eps is
    computed in x's dtype. The one (frozen) parameter only tells the sampler which dtype to feed: float64 by
    default, so the fast backends keep a float64 state.
    """

    def __init__(self, mixture: GaussianMixture, schedule: Schedule, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.mixture = mixture
        self.num_steps = schedule.num_steps
        log_ac = torch.log(schedule.alphas_cumprod.double())
        # index i of the table is time i - 1: entry 0 is ac(-1) = 1
        self.register_buffer("log_ac", torch.cat([torch.zeros(1, dtype=torch.float64), log_ac]))
        self.dtype_anchor = torch.nn.Parameter(torch.zeros((), dtype=dtype), requires_grad=False)

    def log_level(self, t: torch.Tensor) -> torch.Tensor:
        """log ac(t), (B,) float64, interpolated linearly between integer t."""
        pos = t.to(device=self.log_ac.device, dtype=torch.float64).clamp(-1, self.num_steps - 1) + 1
        i = pos.floor().clamp(max=self.num_steps - 1)
        frac = pos - i
        i = i.long()
        return self.log_ac[i] * (1 - frac) + self.log_ac[i + 1] * frac

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if x[0].numel() != self.mixture.dim:
            raise UserError(f"input {tuple(x.shape)} does not hold the mixture's d = {self.mixture.dim} per sample; "
                            f"expected (B, {', '.join(map(str, self.mixture.shape))})")
        log_a = self.log_level(t).to(x.device)
        flat = self.mixture.eps(x.reshape(b, -1), log_a.exp(), -torch.expm1(log_a))
        return flat.reshape(x.shape)


def _sigma(log_a: float) -> float:
    """sigma = sqrt((1 - a) / a) from log a, without cancellation near a = 1."""
    return math.sqrt(math.expm1(-log_a))


def exact_solutions(mixture: GaussianMixture, schedule: Schedule, noise: torch.Tensor, starts, refine: int = 1,
                    h0: float = 0.01, at=(0,)) -> dict:
    """Float64 RK4 solutions of the probability-flow ODE from each start time, in both conventions.

    noise: (B, d). Returns {(start, convention): {t: x}} with x (B, d) float64 for each t in `at` (integer times
    from 0 up to the smallest start; time t is state level ac[t + 1]) and for t = -1, the final x (level ac[0]).

    One sweep runs every start and both conventions together, from the largest start down: a start's rows join
    when the sweep reaches it. Each index interval [k, k + 1] is integrated on its own, in lambda = log sigma,
    with refine * max(1, ceil(|d lambda| / h0)) RK4 steps: inside an interval the log-linear levels are smooth,
    while across integer t the sampler convention's model level has kinks that would cost RK4 its order.
    Doubling `refine` doubles every interval's steps, which is what a convergence check needs.
    """
    logac = np.log(schedule.alphas_cumprod.double().numpy())  # logac[i] = log ac[i]
    starts = sorted({int(s) for s in starts}, reverse=True)
    at = sorted({int(t) for t in at} | {0})
    n = schedule.num_steps
    if not starts or starts[-1] < 1 or starts[0] + 1 >= n:
        raise UserError(f"start times must lie in [1, {n - 2}], got {starts}")
    if at[0] < 0 or at[-1] > starts[-1]:
        raise UserError(f"times to record must lie in [0, {starts[-1]}] (the smallest start), got {at}")
    noise = noise.to(torch.float64)
    b = noise.shape[0]
    keys: list[tuple[int, str]] = []  # rows of y, B at a time: y = x / sqrt(a_s)
    y = noise.new_zeros((0, noise.shape[1]))
    out: dict = {}

    def record(t: int) -> None:
        x = y * math.exp(0.5 * logac[t + 1])
        for i, key in enumerate(keys):
            out.setdefault(key, {})[t] = x[i * b:(i + 1) * b]

    for k in range(starts[0] - 1, -1, -1):  # interval t in [k, k + 1], integrated from k + 1 down to k
        if k + 1 in starts:  # the noise joins at the state level of its start time s: ac[s + 1]
            keys += [(k + 1, conv) for conv in CONVENTIONS]
            y = torch.cat([y, *(noise / math.exp(0.5 * logac[k + 2]),) * len(CONVENTIONS)])
        is_sampler = torch.tensor([conv == SAMPLER for _, conv in keys]).repeat_interleave(b)
        y = _integrate_interval(mixture, logac, y, is_sampler, k, refine, h0)
        if k in at:
            record(k)
    # t = 0 -> -1. The sampler convention ends with the one-index transfer at the model's level ac[0]; the true
    # ODE integrates the interval with eps at the state's own level.
    a_minus_1, coef_b = schedule.transfer_coefficients(0, -1)
    true_rows = ~is_sampler
    y_true = _integrate_interval(mixture, logac, y[true_rows], torch.zeros(int(true_rows.sum()), dtype=torch.bool),
                                 -1, refine, h0)
    x_true = y_true * math.exp(0.5 * logac[0])
    a0 = torch.full((b,), math.exp(logac[0]), dtype=torch.float64)
    om0 = torch.full((b,), -math.expm1(logac[0]), dtype=torch.float64)
    j = 0
    for key in keys:
        xz = out[key][0]
        if key[1] == SAMPLER:
            out[key][-1] = xz + a_minus_1 * xz + coef_b * mixture.eps(xz, a0, om0)
        else:
            out[key][-1] = x_true[j * b:(j + 1) * b]
            j += 1
    return out


def _integrate_interval(mixture, logac, y, is_sampler, k, refine, h0):
    """RK4 in lambda = log sigma over t in [k, k + 1] (from k + 1 down to k); y (R, d), is_sampler (R,) bool."""
    ls_hi, ls_lo = logac[k + 2], logac[k + 1]  # state log level at t = k + 1 and t = k
    lam_hi, lam_lo = math.log(_sigma(ls_hi)), math.log(_sigma(ls_lo))
    steps = refine * max(1, math.ceil(abs(lam_hi - lam_lo) / h0))
    h = (lam_lo - lam_hi) / steps
    if k >= 0:
        lm_hi, lm_lo = logac[k + 1], logac[k]  # the model's log level at t = k + 1 and t = k
    any_sampler = bool(is_sampler.any())

    def f(lam: float, y: torch.Tensor) -> torch.Tensor:
        sigma2 = math.exp(2 * lam)
        a_s, om_s = 1 / (1 + sigma2), sigma2 / (1 + sigma2)
        rows = y.shape[0]
        a = torch.full((rows,), a_s, dtype=torch.float64)
        om = torch.full((rows,), om_s, dtype=torch.float64)
        if any_sampler:
            # the time t with state level ac(t + 1) = a_s, then the model's level ac(t) at that t
            frac = (-math.log1p(sigma2) - ls_lo) / (ls_hi - ls_lo)
            lm = lm_lo + frac * (lm_hi - lm_lo)
            a = torch.where(is_sampler, math.exp(lm), a)
            om = torch.where(is_sampler, -math.expm1(lm), om)
        return math.sqrt(sigma2) * mixture.eps(y * math.sqrt(a_s), a, om)

    lam = lam_hi
    for _ in range(steps):
        k1 = f(lam, y)
        k2 = f(lam + h / 2, y + (h / 2) * k1)
        k3 = f(lam + h / 2, y + (h / 2) * k2)
        k4 = f(lam + h, y + h * k3)
        y = y + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        lam += h
    return y


def ring_2d() -> GaussianMixture:
    """d = 2, laid out (2, 1, 1): six anisotropic (diagonal) components on a circle of radius 0.8, unequal weights,
    stds 0.04 to 0.2 so that near the data some components are sharp (eps varies fast) and some broad."""
    k = 6
    angles = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    means = 0.8 * torch.stack([angles.cos(), angles.sin()], dim=1)
    stds = torch.tensor([[0.04, 0.12], [0.2, 0.06], [0.08, 0.08], [0.05, 0.15], [0.15, 0.05], [0.1, 0.2]],
                        dtype=torch.float64)
    weights = torch.tensor([0.25, 0.1, 0.2, 0.15, 0.2, 0.1], dtype=torch.float64)
    return GaussianMixture.create(weights, means, stds, (2, 1, 1))


def little_images() -> GaussianMixture:
    """d = 192, laid out (3, 8, 8): six isotropic components whose means are little images in [-1, 1]
    (stripes both ways, a checkerboard, a disc, a ring, a diagonal ramp, each in its own colour), std 0.1 to 0.2.

    Image-like means rather than random vectors: the components are far apart in 192 dimensions (distances
    ~10 against stds ~0.15) yet share most pixels' values, as images of different classes do, so the sampler
    must decide a component during the run; isotropic stds keep eps to matmuls, cheap enough for float64 ODE
    solves over batches of hundreds.
    """
    yy, xx = torch.meshgrid(torch.arange(8, dtype=torch.float64), torch.arange(8, dtype=torch.float64),
                            indexing="ij")
    r = ((yy - 3.5) ** 2 + (xx - 3.5) ** 2).sqrt()
    patterns = [
        (xx // 2 % 2) * 2 - 1,  # vertical stripes
        (yy // 2 % 2) * 2 - 1,  # horizontal stripes
        ((xx + yy) % 2) * 2 - 1,  # checkerboard
        (r < 2.5).double() * 2 - 1,  # disc
        ((r > 2) & (r < 3.5)).double() * 2 - 1,  # ring
        (xx + yy) / 7 - 1,  # diagonal ramp
    ]
    colours = torch.tensor([[1.0, 0.2, -0.5], [0.1, 0.9, 0.3], [-0.4, 0.3, 1.0], [0.8, 0.8, -0.2],
                            [0.6, -0.6, 0.7], [0.5, 0.5, 0.5]], dtype=torch.float64)
    means = torch.stack([c[:, None, None] * p for c, p in zip(colours, patterns)]).reshape(6, -1)
    stds = torch.tensor([0.1, 0.15, 0.2, 0.12, 0.1, 0.18], dtype=torch.float64)
    weights = torch.tensor([0.2, 0.15, 0.15, 0.2, 0.15, 0.15], dtype=torch.float64)
    return GaussianMixture.create(weights, means, stds, (3, 8, 8))


def close_pairs_16d() -> GaussianMixture:
    """d = 16, laid out (1, 4, 4): eight diagonal components with means drawn once (seed 0) in [-1, 1], two pairs
    of them only ~0.25 apart, so that the sampler must split those late, near the data; per-coordinate stds from
    0.02 to 0.5, log-uniform, so each component is sharp in some directions and broad in others (sharper and
    broader than ring-2d and images-3x8x8); unequal weights (0.07 to 0.17)."""
    gen = torch.Generator().manual_seed(0)
    k, d = 8, 16
    means = torch.rand(k, d, generator=gen, dtype=torch.float64) * 2 - 1
    for near, of in ((1, 0), (3, 2)):
        means[near] = means[of] + 0.075 * torch.randn(d, generator=gen, dtype=torch.float64)
    stds = torch.exp(math.log(0.02) + math.log(0.5 / 0.02) * torch.rand(k, d, generator=gen, dtype=torch.float64))
    weights = 0.05 + 0.2 * torch.rand(k, generator=gen, dtype=torch.float64)
    return GaussianMixture.create(weights, means, stds, (1, 4, 4))


MIXTURES = {"ring-2d": ring_2d, "images-3x8x8": little_images, "pairs-16d": close_pairs_16d}
