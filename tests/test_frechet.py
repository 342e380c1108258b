"""The Frechet distance against closed forms on known Gaussians, and sample statistics against their limits."""

import numpy as np
import pytest
import torch

from pndm_fast.errors import UserError
from pndm_fast.frechet import frechet_distance, statistics


def random_spd(rng, d: int, floor: float = 0.1) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + floor * np.eye(d)


def random_rotation(rng, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def test_one_dimension_is_mean_gap_plus_std_gap():
    # N(m1, s1^2) vs N(m2, s2^2): W2^2 = (m1 - m2)^2 + (s1 - s2)^2
    for m1, s1, m2, s2 in [(1.5, 2.0, -0.5, 0.5), (0.0, 1.0, 0.0, 3.0), (3.0, 0.1, 3.0, 0.1), (-2.0, 4.0, 7.0, 1e-3)]:
        got = frechet_distance([m1], [[s1 ** 2]], [m2], [[s2 ** 2]])
        assert got == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-12, abs=1e-12)


def test_commuting_covariances_are_a_sum_over_eigenvalues():
    rng = np.random.default_rng(1)
    d = 12
    a, b = rng.uniform(0.01, 5.0, d), rng.uniform(0.01, 5.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    q = random_rotation(rng, d)  # same eigenvectors, rotated: the covariances still commute
    rotated = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-9)


def test_equal_gaussians_are_at_zero():
    rng = np.random.default_rng(2)
    for d in (1, 5, 64):
        mu, sigma = rng.standard_normal(d), random_spd(rng, d)
        assert frechet_distance(mu, sigma, mu, sigma) <= 1e-10 * np.trace(sigma)


def test_non_commuting_2x2_against_the_closed_form_trace():
    # For 2x2 SPD A, tr sqrt(A) = sqrt(tr A + 2 sqrt(det A)); with A = S1^1/2 S2 S1^1/2, tr A = tr(S1 S2) and
    # det A = det S1 det S2, so the trace term needs no matrix square root at all.
    rng = np.random.default_rng(3)
    for _ in range(20):
        s1, s2 = random_spd(rng, 2, 0.01), random_spd(rng, 2, 0.01)
        assert np.abs(s1 @ s2 - s2 @ s1).max() > 1e-3  # really non-commuting
        mu1, mu2 = rng.standard_normal(2), rng.standard_normal(2)
        tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_high_dimension_against_eigenvalues_of_the_product():
    # tr (S1 S2)^1/2 = sum sqrt(eig(S1 S2)): S1 S2 is similar to S1^1/2 S2 S1^1/2, so its (complex-typed, but
    # real positive) eigenvalues give the trace by a route that shares nothing with the implementation's.
    rng = np.random.default_rng(4)
    d = 40
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2)).real.sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_agrees_with_pytorch_fids_scipy_formula():
    # pytorch-fid's calculate_frechet_distance: scipy's sqrtm of S1 S2, its real part, eps * I when singular.
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(9)
    feats1 = rng.standard_normal((500, 32)) @ rng.standard_normal((32, 32))
    feats2 = rng.standard_normal((400, 32)) @ rng.standard_normal((32, 32)) + 0.3
    (mu1, s1), (mu2, s2) = statistics(feats1), statistics(feats2)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)


def test_symmetric_in_its_two_arguments():
    rng = np.random.default_rng(5)
    s1, s2 = random_spd(rng, 16), random_spd(rng, 16, 1e-4)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)


def test_singular_and_slightly_indefinite_covariances_stay_finite():
    # Fewer samples than dimensions gives a singular covariance; rounding can push its zero eigenvalues to -1e-17.
    rng = np.random.default_rng(6)
    d = 30
    q = random_rotation(rng, d)
    eig = np.concatenate([rng.uniform(0.5, 2.0, 10), np.zeros(d - 10)])
    psd = q @ np.diag(eig) @ q.T
    indefinite = psd - 1e-12 * np.eye(d)
    assert np.linalg.eigvalsh(indefinite).min() < 0
    other = random_spd(rng, d)
    mu = np.zeros(d)
    clean = frechet_distance(mu, psd, mu, other)
    assert np.isfinite(clean) and clean > 0
    assert frechet_distance(mu, indefinite, mu, other) == pytest.approx(clean, rel=1e-6)
    assert frechet_distance(mu, psd, mu, psd) == pytest.approx(0.0, abs=1e-9)


def test_statistics_are_mean_and_unbiased_covariance():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((50, 6)) * np.arange(1, 7) + 3
    mu, sigma = statistics(x)
    centred = x - x.sum(0) / 50
    np.testing.assert_allclose(mu, x.sum(0) / 50, rtol=1e-13)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-12)
    mu_t, sigma_t = statistics(torch.from_numpy(x).float())  # tensors are accepted, computed in float64
    np.testing.assert_allclose(mu_t, mu, rtol=1e-6)
    assert sigma_t.dtype == np.float64 and sigma_t.shape == (6, 6)


def test_statistics_of_large_draws_converge_to_the_closed_form():
    rng = np.random.default_rng(8)
    d, n = 4, 400_000
    s1, s2 = random_spd(rng, d, 0.2), random_spd(rng, d, 0.2)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    exact = frechet_distance(mu1, s1, mu2, s2)
    draws1 = rng.multivariate_normal(mu1, s1, n)
    draws2 = rng.multivariate_normal(mu2, s2, n)
    estimate = frechet_distance(*statistics(draws1), *statistics(draws2))
    # standard error of each moment ~ 1/sqrt(n) = 0.0016 times its scale (~1 here): a few percent of exact at most
    assert estimate == pytest.approx(exact, rel=0.03, abs=0.01)
    # two draws of one Gaussian: what is left is the estimator's bias, O(tr(S) / n), far below the signal
    same = frechet_distance(*statistics(draws1), *statistics(rng.multivariate_normal(mu1, s1, n)))
    assert same < 1e-3 * exact


def test_bad_shapes_are_one_line_user_errors():
    with pytest.raises(UserError, match="different sizes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(UserError, match="at least 2"):
        statistics(np.zeros((1, 5)))
    with pytest.raises(UserError, match="NaN"):
        statistics(np.full((3, 2), np.nan))
    with pytest.raises(UserError, match="dimension"):
        frechet_distance(np.zeros((2, 2)), np.eye(2), np.zeros(2), np.eye(2))
