"""Tests for stablenet.smoothing.cpm_radii: the Lipschitz-aware radius against exact values (high-precision
references, the extremal ramp, both limits), the class-partitioning bounds, and argument checks."""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
import torch
from scipy import stats as sps

from stablenet.smoothing import stats
from stablenet.smoothing.cpm_radii import cpm_bounds, cpm_radius, predicted_radius, softmax_score_lipschitz


def allowed_failures(trials: int, alpha: float) -> float:
    """99.9% quantile of Binomial(trials, alpha): a sound procedure exceeds it with probability <= 0.1%."""
    return float(sps.binom.ppf(0.999, trials, alpha))


# ------------------------------------------------------------------------------------------- radius
def reference_inverse(p: float, beta: float) -> mp.mpf:
    """G_beta^-1(p) in 40-digit arithmetic, G_beta(c) = int_{-1/2}^{1/2} Phi(c + beta u) du."""
    with mp.workdps(40):
        if beta == 0:
            return mp.sqrt(2) * mp.erfinv(2 * mp.mpf(p) - 1)

        def psi(v):
            return v * mp.ncdf(v) + mp.npdf(v)

        def g(c):
            return (psi(c + beta / 2) - psi(c - beta / 2)) / beta - mp.mpf(p)

        lo, hi = mp.mpf(-60) - beta, mp.mpf(60) + beta
        for _ in range(250):  # bisection: G is increasing
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if g(mid) < 0 else (lo, mid)
        return (lo + hi) / 2


def reference_radius(p_a: float, p_b: float, sigma: float, lipschitz: float) -> float:
    beta = 0.0 if math.isinf(lipschitz) else 1 / (mp.mpf(lipschitz) * sigma)
    return float(sigma / 2 * (reference_inverse(p_a, beta) - reference_inverse(p_b, beta)))


CASES = [(0.9, 0.1), (0.6, 0.3), (0.51, 0.49), (1 - 1e-9, 0.2), (0.7, 1e-12), (0.999, 0.0005)]


@pytest.mark.parametrize("lipschitz", [math.inf, 1e6, 10.0, 1.0, 0.251, 0.249, 0.02])
def test_radius_matches_a_high_precision_reference_and_is_rounded_down(lipschitz):
    sigma = 0.5  # beta = 1 / (lipschitz sigma) covers both evaluation branches (beta <= 8 and beta > 8)
    for p_a, p_b in CASES:
        exact = reference_radius(p_a, p_b, sigma, lipschitz)
        got = float(cpm_radius(p_a, p_b, sigma, lipschitz))
        assert got <= exact, (p_a, p_b, got, exact)
        assert got >= exact - 1e-8 * max(1.0, exact), (p_a, p_b, got, exact)


def test_radius_tends_to_cohen_as_lipschitz_grows():
    p_a = np.array([0.55, 0.7, 0.9, 0.99, 0.999999, 0.6])
    p_b = np.array([0.4, 0.2, 0.05, 0.01, 1e-7, 0.5])
    cohen = stats.two_class_radius(p_a, p_b, 0.25)
    np.testing.assert_allclose(cpm_radius(p_a, p_b, 0.25, math.inf), cohen, rtol=0, atol=1e-6)
    np.testing.assert_allclose(cpm_radius(p_a, p_b, 0.25, 1e9), cohen, rtol=0, atol=1e-6)
    assert np.all(cpm_radius(p_a, p_b, 0.25, math.inf) <= cohen)


def test_radius_is_at_least_cohen_and_non_increasing_in_lipschitz():
    p_a = np.array([0.52, 0.6, 0.75, 0.9, 0.99, 0.999])
    p_b = np.array([0.45, 0.3, 0.2, 0.08, 0.005, 0.0009])
    cohen = stats.two_class_radius(p_a, p_b, 0.5)
    previous = np.full(len(p_a), np.inf)
    for lipschitz in [1e-3, 0.01, 0.1, 0.3, 1.0, 3.0, 30.0, 1e4, math.inf]:
        radius = cpm_radius(p_a, p_b, 0.5, lipschitz)
        assert np.all(radius <= previous + 1e-12)
        assert np.all(radius >= cohen - 1e-9)
        previous = radius
    # and strictly larger where the Lipschitz constant is small compared with 1 / sigma
    assert np.all(cpm_radius(p_a, p_b, 0.5, 0.5) > cohen * 1.05)


@pytest.mark.parametrize(("lipschitz", "offset"), [(0.5, -0.9), (2.0, -0.3), (0.1, -6.0), (8.0, -0.05)])
def test_radius_is_tight_for_the_extremal_ramp(lipschitz, offset):
    # f(y) = clip(lipschitz * (y - s0), 0, 1) in 1-D is lipschitz-Lipschitz with values in [0, 1]; its smoothed
    # value at x crosses 1/2 exactly when the ramp's midpoint s0 + 1 / (2 lipschitz) reaches x. At x = 0 with the
    # midpoint at `offset` < 0 the true radius is -offset; the two-class radius with p_B = 1 - p_A must find it.
    sigma = 0.7
    s0 = offset - 1 / (2 * lipschitz)
    with mp.workdps(30):
        p = mp.quad(lambda t: mp.ncdf(-(s0 + t / lipschitz) / sigma), [0, 1])  # E f(sigma Z) by layer cake
        p_a, p_b = float(p), float(1 - p)
    radius = float(cpm_radius(p_a, p_b, sigma, lipschitz))
    assert radius <= -offset + 1e-12  # float(p) may be off by half an ulp
    assert radius >= -offset - 1e-7


def test_radius_tends_to_the_lipschitz_margin_radius_as_lipschitz_vanishes():
    # beta G_beta(c) = beta/2 + int_0^c (Phi(t + beta/2) - Phi(t - beta/2)) dt, so G_beta(c) <= 1/2 + c / beta for
    # c >= 0 (>= for c <= 0), with equality up to Gaussian tails when beta = 1 / (lipschitz sigma) >> |c|. Hence
    # R >= (p_A - p_B) / (2 lipschitz), the margin certificate of two lipschitz-Lipschitz smoothed scores, and
    # R tends to it as lipschitz -> 0.
    p_a, p_b = np.array([0.6, 0.9, 0.35]), np.array([0.3, 0.05, 0.33])
    for lipschitz in [1e-2, 1e-3]:
        radius = cpm_radius(p_a, p_b, 1.0, lipschitz)
        margin = (p_a - p_b) / (2 * lipschitz)
        np.testing.assert_allclose(radius, margin, rtol=1e-6)
        straddle = (p_a >= 0.5) & (p_b <= 0.5)  # then G^-1(p_A) >= beta (p_A - 1/2) and G^-1(p_B) <= beta (p_B - 1/2)
        assert np.all(radius[straddle] >= margin[straddle] * (1 - 1e-9))


def test_radius_is_zero_without_a_margin_and_broadcasts():
    assert float(cpm_radius(0.4, 0.4, 1.0, 1.0)) == 0.0
    assert float(cpm_radius(0.3, 0.5, 1.0, 1.0)) == 0.0
    assert float(cpm_radius(1.0, 0.2, 1.0, math.inf)) == 0.0  # infinite: not reported (as stats does)
    radius = cpm_radius(np.array([[0.9], [0.6]]), np.array([0.1, 0.2, 0.7]), 0.5, 2.0)
    assert radius.shape == (2, 3) and radius[1, 2] == 0.0 and np.all(radius[0] > 0)


def test_softmax_score_lipschitz_bounds_the_gradient():
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for k in [2, 3, 10]:
        logits = (3 * torch.randn(2000, k, generator=gen, dtype=torch.float64)).requires_grad_(True)
        jac = torch.func.vmap(torch.func.jacrev(lambda z: torch.softmax(z, -1)))(logits)  # (B, K, K)
        worst = max(worst, float(jac.detach().norm(dim=-1).max()))  # gradient norm of each coordinate
    assert worst <= softmax_score_lipschitz(1.0)
    # attained for two classes at equal logits: 2 * (1/2)(1/2) / sqrt(2) ... = sqrt(2)/4
    jac = torch.func.jacrev(lambda z: torch.softmax(z, -1))(torch.zeros(2, dtype=torch.float64))
    assert float(jac[0].norm()) == pytest.approx(math.sqrt(2) / 4, rel=1e-15)
    assert softmax_score_lipschitz(2.0, 3.0) == pytest.approx(6 * math.sqrt(2) / 4, rel=1e-14)
    assert softmax_score_lipschitz(2.0, 3.0) >= 6 * math.sqrt(2) / 4
    assert softmax_score_lipschitz(math.inf) == math.inf


# ------------------------------------------------------------------------------------------- buckets
def coverage_failures(bounds, p: np.ndarray) -> np.ndarray:
    """Rows where p_lower > p[top] or p_upper < max_{c != top} p[c]."""
    p = np.broadcast_to(p, (len(bounds.top), p.shape[-1]))
    p_top = np.take_along_axis(p, bounds.top[:, None], axis=1)[:, 0]
    others = np.where(np.arange(p.shape[1]) == bounds.top[:, None], -1.0, p).max(axis=1)
    return (bounds.p_lower > p_top) | (bounds.p_upper < others)


@pytest.mark.parametrize("lipschitz", [math.inf, 1.0])
def test_bucket_bounds_cover_the_true_probabilities(lipschitz):
    # Few selection draws, so the top class and the runner-up are often mis-ranked: the buckets must still bound
    # every other class. Exact multinomial counts, so the truth is known exactly.
    rng = np.random.default_rng(0)
    p = np.array([0.45, 0.2, 0.2, 0.1, 0.05])
    trials, alpha, n0, n = 3000, 0.05, 6, 300
    sel = rng.multinomial(n0, p, size=trials)
    est = rng.multinomial(n, p, size=trials)
    bounds = cpm_bounds(sel, est, alpha, 3, sigma=0.5, lipschitz=lipschitz)
    assert set(np.unique(bounds.num_buckets)) <= {1, 2, 3}
    assert len(np.unique(bounds.num_buckets)) > 1  # the partition really depends on the selection draws
    assert int(coverage_failures(bounds, p).sum()) <= allowed_failures(trials, alpha)
    # The check has teeth: bounding only the runner-up picked on the selection draws (at alpha / 2) is the classic
    # mistake, and it fails much more often than alpha.
    top = bounds.top
    masked = np.where(np.arange(5) == top[:, None], -1, sel)
    runner_up = masked.argmax(axis=1)
    wrong = bounds._replace(
        p_lower=stats.clopper_pearson_lower(est[np.arange(trials), top], n, alpha / 2),
        p_upper=stats.clopper_pearson_upper(est[np.arange(trials), runner_up], n, alpha / 2),
    )
    assert int(coverage_failures(wrong, p).sum()) > allowed_failures(trials, alpha)


def test_bucket_bounds_tighten_cohen_and_one_bucket_is_cohen():
    rng = np.random.default_rng(1)
    p = np.array([0.6, 0.1, 0.1, 0.1, 0.1])
    trials, alpha, n0, n, sigma = 500, 0.001, 100, 1000, 0.5
    sel = rng.multinomial(n0, p, size=trials)
    est = rng.multinomial(n, p, size=trials)
    one = cpm_bounds(sel, est, alpha, 1, sigma=sigma, lipschitz=math.inf)
    n_a = est[np.arange(trials), one.top]
    assert np.all(one.num_buckets == 1)
    np.testing.assert_array_equal(one.p_lower, stats.clopper_pearson_lower(n_a, n, alpha))
    np.testing.assert_array_equal(one.p_upper, stats.clopper_pearson_upper(n - n_a, n, alpha))
    many = cpm_bounds(sel, est, alpha, 4, sigma=sigma, lipschitz=math.inf)
    assert np.all(many.num_buckets >= 2)
    assert np.all(many.p_upper < one.p_upper)  # e.g. 0.13 instead of 0.45
    r_one = cpm_radius(one.p_lower, one.p_upper, sigma, math.inf)
    r_many = cpm_radius(many.p_lower, many.p_upper, sigma, math.inf)
    assert np.mean(r_many) > 1.2 * np.mean(r_one)
    assert int(coverage_failures(many, p).sum()) <= allowed_failures(trials, alpha)


def test_predicted_radius_is_the_radius_of_the_plugged_in_bounds():
    # One bucket, hard votes: Clopper-Pearson of the selection frequency scaled to n draws, then Cohen's radius.
    sel = np.array([[95, 5], [70, 30], [50, 50], [10, 90]])
    n, alpha, sigma = 10_000, 0.001, 0.5
    got = predicted_radius(sel, n, alpha, 1, sigma=sigma, lipschitz=math.inf)
    p = sel[:, 0] / 100  # the top class's frequency, lowered by one standard error; the other one raised
    p = p - np.sqrt(p * (1 - p) / 100)
    lower = stats.clopper_pearson_lower(p * n, n, alpha)
    upper = stats.clopper_pearson_upper((1 - p) * n, n, alpha)
    expected = 0.5 * sigma * (sps.norm.ppf(lower) - sps.norm.ppf(upper))
    np.testing.assert_allclose(got[:2], expected[:2], rtol=1e-9)
    assert got[2] < 0 and got[3] > 0  # no margin: negative; the top class is found wherever it is
    # a lead of a few votes is noise: not predicted to certify however small the Lipschitz constant
    assert predicted_radius(np.array([[17, 15]]), n, alpha, 1, sigma=sigma, lipschitz=1e-6)[0] < 0
    certified = cpm_radius(lower[:2], upper[:2], sigma, math.inf)
    assert np.all(certified <= got[:2]) and np.allclose(certified, got[:2], rtol=1e-6)


def test_predicted_radius_takes_the_best_bucket_count_and_the_lipschitz_gain():
    sel = np.array([[60, 10, 10, 10, 10], [90, 4, 3, 2, 1]])
    one = predicted_radius(sel, 100_000, 0.001, 1, sigma=0.5, lipschitz=math.inf)
    many = predicted_radius(sel, 100_000, 0.001, 4, sigma=0.5, lipschitz=math.inf)
    assert np.all(many >= one) and many[0] > 1.2 * one[0]
    soft = predicted_radius(sel, 100_000, 0.001, 4, sigma=0.5, lipschitz=0.1)
    assert np.all(soft > many)  # a small score Lipschitz constant only adds (cpm_radius is monotone in it)
    with pytest.raises(ValueError, match="n must be"):
        predicted_radius(sel, 0, 0.001, 1, sigma=0.5, lipschitz=1.0)


def test_predicted_radius_plugs_in_given_frequencies_as_they_are():
    # Given frequencies replace the pessimistic selection frequencies: no further lowering, the same bounds.
    sel = np.array([[100, 0], [70, 30]])
    n, alpha, sigma = 100_000, 0.001, 0.5
    freq = np.array([[0.9999, 0.0001], [0.7, 0.3]])
    got = predicted_radius(sel, n, alpha, 1, sigma=sigma, lipschitz=math.inf, frequencies=freq)
    lower = stats.clopper_pearson_lower(freq[:, 0] * n, n, alpha)
    upper = stats.clopper_pearson_upper(freq[:, 1] * n, n, alpha)
    np.testing.assert_allclose(got, 0.5 * sigma * (sps.norm.ppf(lower) - sps.norm.ppf(upper)), rtol=1e-9)
    counts_only = predicted_radius(sel, n, alpha, 1, sigma=sigma, lipschitz=math.inf)
    assert got[1] > counts_only[1]  # 0.7 as given, not lowered by a standard error
    with pytest.raises(ValueError, match="frequencies must have the shape"):
        predicted_radius(sel, n, alpha, 1, sigma=sigma, lipschitz=1.0, frequencies=freq[:1])
    with pytest.raises(ValueError, match="frequencies must hold probabilities"):
        predicted_radius(sel, n, alpha, 1, sigma=sigma, lipschitz=1.0, frequencies=freq + 1)


# ------------------------------------------------------------------------------------------- checks
def test_pure_functions_reject_bad_arguments():
    with pytest.raises(ValueError, match="sigma"):
        cpm_radius(0.9, 0.1, 0.0, 1.0)
    with pytest.raises(ValueError, match="lipschitz"):
        cpm_radius(0.9, 0.1, 1.0, 0.0)
    with pytest.raises(ValueError, match="p_lower"):
        cpm_radius(float("nan"), 0.1, 1.0, 1.0)
    with pytest.raises(ValueError, match="p_upper_other"):
        cpm_radius(0.9, 1.1, 1.0, 1.0)
    sel = np.array([[5, 1, 0]])
    with pytest.raises(ValueError, match="alpha"):
        cpm_bounds(sel, sel, 1.5, 2, sigma=1.0, lipschitz=1.0)
    with pytest.raises(ValueError, match="num_buckets"):
        cpm_bounds(sel, sel, 0.1, 0, sigma=1.0, lipschitz=1.0)
    with pytest.raises(ValueError, match="counts_estimation"):
        cpm_bounds(sel, np.array([[5.0, 1.0, 0.0]]), 0.1, 2, sigma=1.0, lipschitz=1.0)
    with pytest.raises(ValueError, match="same shape"):
        cpm_bounds(sel, np.array([[5, 1]]), 0.1, 2, sigma=1.0, lipschitz=1.0)
    with pytest.raises(ValueError, match="at least one draw"):
        cpm_bounds(sel, np.zeros((1, 3), dtype=int), 0.1, 2, sigma=1.0, lipschitz=1.0)
