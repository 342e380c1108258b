"""The Frechet distance between two Gaussians, the measure behind FID (Heusel et al., 2017, eq. 6):

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)

The trace term is computed from symmetric eigendecompositions in float64, without scipy: S1^1/2 from eigh(S1),
then the eigenvalues of the symmetric PSD matrix S1^1/2 S2 S1^1/2, whose square roots sum to the trace. This is
the same quantity as tr((S1 S2)^1/2), which scipy's sqrtm computes through a complex Schur form and which
pytorch-fid patches with an eps * I when it turns singular; here eigenvalues a rounding error below zero (sample
covariances of fewer points than dimensions, dead ReLU features) are clipped to zero, so the result stays real.
"""

from __future__ import annotations

import numpy as np

from .errors import UserError


def _as_float64(a, name: str, ndim: int) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor, on any device
        a = a.detach().cpu().double().numpy()
    out = np.asarray(a, dtype=np.float64)
    if out.ndim != ndim:
        raise UserError(f"{name} must have {ndim} dimension(s), got shape {out.shape}")
    if not np.isfinite(out).all():
        raise UserError(f"{name} holds NaN or Inf: the features it was computed from are not finite")
    return out


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root of a symmetric (D, D) matrix; eigenvalues below zero are taken as zero."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1^1/2 S2 S1^1/2)^1/2) for symmetric PSD (D, D) matrices."""
    root = sqrtm_psd(sigma1)
    inner = root @ sigma2 @ root
    w = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); mu (D,), sigma (D, D), arrays or
    tensors. Computed in float64; never negative (tiny negative rounding is returned as 0)."""
    mu1, mu2 = _as_float64(mu1, "mu1", 1), _as_float64(mu2, "mu2", 1)
    sigma1, sigma2 = _as_float64(sigma1, "sigma1", 2), _as_float64(sigma2, "sigma2", 2)
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise UserError(f"statistics of different sizes: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / "
                        f"{sigma2.shape}; both sides must come from the same feature extractor")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    return max(float(value), 0.0)


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mu (D,), sigma (D, D)) in float64; sigma is the unbiased sample covariance (N - 1),
    as pytorch-fid and the TTUR reference compute it."""
    feats = _as_float64(features, "features", 2)
    if feats.shape[0] < 2:
        raise UserError(f"statistics need at least 2 feature vectors to estimate a covariance, got {feats.shape[0]}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])
