"""Tests for stablenet.smoothing.stats: exact values, coverage by simulation, and rounding towards safety."""

from __future__ import annotations

import functools
import math

import mpmath
import numpy as np
import pytest
from scipy import stats as sps

from stablenet.smoothing import stats

# The number of coverage failures allowed in `trials` independent trials at level alpha: the 99.9% quantile of
# Binomial(trials, alpha), so a sound bound fails these tests with probability at most 0.1% per case.


def allowed_failures(trials: int, alpha: float) -> float:
    return float(sps.binom.ppf(0.999, trials, alpha))


# High-precision references (mpmath, 50 significant digits) for the directed-rounding tests: every float input is
# converted exactly by mpmath.mpf, so the reference is the exact value for the very float the code received.
DIGITS = 50


@functools.cache  # shared by the sigma cases
def exact_probit(p: float) -> mpmath.mpf:
    """Phi^{-1}(p) = sqrt(2) erfinv(2p - 1) for the float p, to DIGITS digits."""
    # 2p - 1 needs about -log10(p) more digits to stay exact when p is tiny (near 1 it is exact anyway).
    with mpmath.workdps(DIGITS + max(0, -int(math.log10(p)))):
        return +(mpmath.sqrt(2) * mpmath.erfinv(2 * mpmath.mpf(p) - 1))


def unit_interval_cases(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` random floats in (1/2, 1), plus the floats next to 1/2 and to 1 and decades towards both."""
    ulp = 2.0**-53  # the spacing of floats in [1/2, 1)
    near = np.concatenate([np.arange(1, 6) * ulp, 10.0 ** -np.arange(1, 16), rng.uniform(0, 1, 20) * 1e-12])
    return np.concatenate([rng.uniform(0.5, 1.0, count), 0.5 + near, 1.0 - near])


# ---------------------------------------------------------------------------------------------- Clopper–Pearson


@pytest.mark.parametrize("n", [1, 2, 7, 100, 100_000])
@pytest.mark.parametrize("alpha", [0.001, 0.05, 0.5])
def test_clopper_pearson_all_or_nothing_closed_forms(n, alpha):
    # P(X = n | p) = p^n = alpha  <=>  p = alpha^(1/n), and symmetrically for k = 0.
    lower = float(stats.clopper_pearson_lower(n, n, alpha))
    upper = float(stats.clopper_pearson_upper(0, n, alpha))
    # rel=1e-9: the bounds are moved outwards by 2^-32 min(b, 1 - b) (stats Note [rounding down])
    assert lower == pytest.approx(alpha ** (1.0 / n), rel=1e-9)
    assert upper == pytest.approx(1.0 - alpha ** (1.0 / n), rel=1e-9)
    assert lower <= alpha ** (1.0 / n)
    assert float(stats.clopper_pearson_lower(0, n, alpha)) == 0.0
    assert float(stats.clopper_pearson_upper(n, n, alpha)) == 1.0


@pytest.mark.parametrize(("k", "n"), [(1, 10), (5, 10), (9, 10), (37, 100), (480, 500)])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_clopper_pearson_solves_the_binomial_tail_equation(k, n, alpha):
    # The lower bound p_L is defined by P(X >= k | p_L) = alpha, the upper p_U by P(X <= k | p_U) = alpha;
    # checked with the binomial distribution, independently of the beta quantiles used by the implementation.
    p_lower = float(stats.clopper_pearson_lower(k, n, alpha))
    p_upper = float(stats.clopper_pearson_upper(k, n, alpha))
    assert sps.binom.sf(k - 1, n, p_lower) == pytest.approx(alpha, rel=1e-8)
    assert sps.binom.cdf(k, n, p_upper) == pytest.approx(alpha, rel=1e-8)


def test_clopper_pearson_known_value():
    # 5 successes in 10 trials: the two-sided 90% Clopper–Pearson interval is (0.2224, 0.7776).
    assert float(stats.clopper_pearson_lower(5, 10, 0.05)) == pytest.approx(0.22244, abs=5e-5)
    assert float(stats.clopper_pearson_upper(5, 10, 0.05)) == pytest.approx(0.77756, abs=5e-5)


def test_clopper_pearson_brackets_the_estimate_and_is_monotone():
    n = 50
    k = np.arange(n + 1)
    for alpha in (0.001, 0.05, 0.3):
        lower = stats.clopper_pearson_lower(k, n, alpha)
        upper = stats.clopper_pearson_upper(k, n, alpha)
        assert np.all(lower <= k / n) and np.all(k / n <= upper)
        assert np.all(np.diff(lower) > 0) and np.all(np.diff(upper) > 0)
        # symmetry: lower(k) = 1 - upper(n - k), up to the outward rounding of both
        np.testing.assert_allclose(lower, 1.0 - upper[::-1], atol=1e-12)
    # a smaller alpha (more confidence) gives a wider interval
    strict, loose = stats.clopper_pearson_lower(k, n, 0.001), stats.clopper_pearson_lower(k, n, 0.1)
    assert np.all(strict[1:] < loose[1:])


@pytest.mark.parametrize(("p", "n"), [(0.5, 20), (0.7, 100), (0.95, 200), (0.03, 50)])
@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_clopper_pearson_coverage_by_simulation(p, n, alpha):
    trials = 4000
    rng = np.random.default_rng(1234)
    k = rng.binomial(n, p, size=trials)
    lower = stats.clopper_pearson_lower(k, n, alpha)
    upper = stats.clopper_pearson_upper(k, n, alpha)
    assert np.sum(lower > p) <= allowed_failures(trials, alpha)
    assert np.sum(upper < p) <= allowed_failures(trials, alpha)


CP_CASES = [(k, n) for n in (1, 2, 5, 10, 37) for k in range(n + 1)] + [
    (k, n) for n in (100, 366, 1000) for k in (0, 1, 2, n // 7, n // 2, n - n // 7, n - 2, n - 1, n)
]


@pytest.mark.parametrize("alpha", [1e-10, 1e-6, 0.001, 0.05, 0.3])
def test_clopper_pearson_is_on_the_safe_side_of_the_exact_quantile(alpha):
    # beta.ppf's own error reaches about a hundred ulps here (e.g. k = 51 of n = 100 at alpha = 1e-6), beyond the
    # one-ulp move; the bounds must still be conservative for the float alpha. With X ~ Binomial(n, p),
    # P(X >= k | p) = I_p(k, n - k + 1) is increasing in p, so lower <= exact quantile iff I_lower(k, n-k+1) <= alpha;
    # symmetrically upper >= exact quantile iff P(X <= k | upper) = 1 - I_upper(k + 1, n - k) <= alpha.
    a = mpmath.mpf(alpha)
    too_high, too_low = [], []
    with mpmath.workdps(DIGITS):
        for k, n in CP_CASES:
            lower = float(stats.clopper_pearson_lower(k, n, alpha))
            upper = float(stats.clopper_pearson_upper(k, n, alpha))
            if 0 < lower < 1 and mpmath.betainc(k, n - k + 1, 0, lower, regularized=True) > a:
                too_high.append((k, n, lower))
            if 0 < upper < 1 and mpmath.betainc(k + 1, n - k, upper, 1, regularized=True) > a:
                too_low.append((k, n, upper))
    assert not too_high, f"lower bounds above the exact quantile (k, n, bound): {too_high[:5]}"
    assert not too_low, f"upper bounds below the exact quantile (k, n, bound): {too_low[:5]}"


def test_clopper_pearson_rejects_bad_counts():
    for k, n in [(-1, 5), (6, 5), (0, 0)]:
        with pytest.raises(ValueError, match="successes <= trials"):
            stats.clopper_pearson_lower(k, n, 0.05)
        with pytest.raises(ValueError, match="successes <= trials"):
            stats.clopper_pearson_upper(k, n, 0.05)


# ---------------------------------------------------------------------------------------------- empirical Bernstein


def test_empirical_bernstein_hand_value():
    mean, var, n, alpha = 0.5, 0.25, 100, 0.05
    log_term = math.log(2.0 / alpha)
    width = math.sqrt(2.0 * var * log_term / n) + 7.0 * log_term / (3.0 * (n - 1))
    lower = float(stats.empirical_bernstein_lower(mean, var, n, alpha))
    upper = float(stats.empirical_bernstein_upper(mean, var, n, alpha))
    assert lower == pytest.approx(mean - width, rel=1e-12) and lower <= mean - width
    assert upper == pytest.approx(mean + width, rel=1e-12) and upper >= mean + width


def test_empirical_bernstein_is_clipped_and_pays_for_variance():
    assert float(stats.empirical_bernstein_lower(0.01, 0.0, 10, 0.05)) == 0.0
    assert float(stats.empirical_bernstein_upper(0.99, 0.0, 10, 0.05)) == 1.0
    low_var = float(stats.empirical_bernstein_lower(0.8, 0.01, 1000, 0.05))
    high_var = float(stats.empirical_bernstein_lower(0.8, 0.2, 1000, 0.05))
    assert high_var < low_var < 0.8


@pytest.mark.parametrize(("a", "b"), [(2.0, 5.0), (0.3, 0.3), (20.0, 1.0)])
@pytest.mark.parametrize("alpha", [0.05, 0.3])
def test_empirical_bernstein_coverage_by_simulation(a, b, alpha):
    trials, n = 2000, 50
    rng = np.random.default_rng(99)
    samples = rng.beta(a, b, size=(trials, n))
    mean, var = samples.mean(axis=1), samples.var(axis=1, ddof=1)
    true_mean = a / (a + b)
    lower = stats.empirical_bernstein_lower(mean, var, n, alpha)
    upper = stats.empirical_bernstein_upper(mean, var, n, alpha)
    assert lower.shape == (trials,)
    assert np.sum(lower > true_mean) <= allowed_failures(trials, alpha)
    assert np.sum(upper < true_mean) <= allowed_failures(trials, alpha)
    assert np.all(lower <= mean) and np.all(mean <= upper)


def test_empirical_bernstein_is_on_the_safe_side_of_the_exact_bound():
    # The width sqrt(2 V ln(2/alpha) / n) + 7 ln(2/alpha) / (3 (n - 1)) carries a few ulps of float error, and
    # 1 - mean is not exact: both must be absorbed in the safe direction.
    rng = np.random.default_rng(2024)
    with mpmath.workdps(DIGITS):
        for _ in range(400):
            n = int(10 ** rng.uniform(0.31, 7))
            alpha = float(10 ** rng.uniform(-12, -0.01))
            mean, var = float(rng.uniform()), float(rng.uniform(0, 0.25)) * float(rng.uniform() < 0.9)
            log_term = mpmath.log(2 / mpmath.mpf(alpha))
            width = mpmath.sqrt(2 * mpmath.mpf(var) * log_term / n) + 7 * log_term / (3 * (n - 1))
            lower = float(stats.empirical_bernstein_lower(mean, var, n, alpha))
            upper = float(stats.empirical_bernstein_upper(mean, var, n, alpha))
            assert lower == 0.0 or lower <= mean - width, (mean, var, n, alpha)
            assert upper == 1.0 or upper >= mean + width, (mean, var, n, alpha)


def test_empirical_bernstein_needs_two_samples():
    with pytest.raises(ValueError, match="n >= 2"):
        stats.empirical_bernstein_lower(0.5, 0.1, 1, 0.05)


# ---------------------------------------------------------------------------------------------- radii and rounding


@pytest.mark.parametrize("sigma", [0.12, 0.25, 1.0, 3.0])
@pytest.mark.parametrize("z", [0.1, 1.0, 2.5])
def test_cohen_radius_hand_cases(sigma, z):
    p = sps.norm.cdf(z)
    radius = float(stats.cohen_radius(p, sigma))
    exact = sigma * sps.norm.ppf(p)  # the float64 formula
    # abs=1e-11: the radius is shrunk by the relative 2^-40 (stats Note [rounding down])
    assert radius == pytest.approx(sigma * z, abs=1e-11 * max(1.0, sigma))
    assert radius < exact


@pytest.mark.parametrize("sigma", [0.12, 0.25, 1 / 3, 0.5, 1.0, 3.0, 1e3])
def test_cohen_radius_never_exceeds_the_exact_radius(sigma):
    # norm.ppf is off by up to about 2.4 ulps on (1/2, 1), in either direction, so a one-ulp move is not enough.
    rng = np.random.default_rng(16)
    p = unit_interval_cases(rng, 300)
    radius = stats.cohen_radius(p, sigma)
    with mpmath.workdps(DIGITS):
        exact = [mpmath.mpf(sigma) * exact_probit(float(q)) for q in p]
        above = [(float(q), float(r)) for q, r, e in zip(p, radius, exact, strict=True) if mpmath.mpf(float(r)) > e]
    assert not above, f"{len(above)} of {len(p)} radii above sigma * Phi^-1(p), e.g. {above[:3]}"
    assert np.all(radius > 0)
    np.testing.assert_allclose(radius, [float(e) for e in exact], rtol=1e-11)


def test_cohen_radius_is_zero_without_a_majority():
    p = np.array([0.0, 0.2, 0.5, np.nextafter(0.5, 1.0), 0.9, 1.0])
    radius = stats.cohen_radius(p, 0.5)
    assert radius[0] == radius[1] == radius[2] == 0.0
    assert radius[3] >= 0.0 and radius[4] > 0.0
    assert np.all(np.isfinite(radius))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        stats.cohen_radius(0.9, 0.0)


def test_two_class_radius():
    sigma = 0.5
    pa, pb = sps.norm.cdf(1.2), sps.norm.cdf(-0.4)
    radius = float(stats.two_class_radius(pa, pb, sigma))
    exact = 0.5 * sigma * (sps.norm.ppf(pa) - sps.norm.ppf(pb))
    assert radius == pytest.approx(0.5 * sigma * 1.6, abs=1e-12) and radius < exact
    # with p_B = 1 - p_A the two-class radius is Cohen's radius
    for p in (0.6, 0.9, 0.999):
        assert float(stats.two_class_radius(p, 1.0 - p, sigma)) == pytest.approx(
            float(stats.cohen_radius(p, sigma)), rel=1e-9
        )
    # no margin, no radius; degenerate probabilities give 0 rather than inf or nan
    assert float(stats.two_class_radius(0.4, 0.4, sigma)) == 0.0
    assert float(stats.two_class_radius(0.3, 0.6, sigma)) == 0.0
    assert float(stats.two_class_radius(1.0, 0.0, sigma)) == 0.0
    with pytest.raises(ValueError, match="sigma must be > 0"):
        stats.two_class_radius(0.9, 0.1, -1.0)


@pytest.mark.parametrize("sigma", [0.12, 1 / 3, 1.0, 3.0])
def test_two_class_radius_never_exceeds_the_exact_radius(sigma):
    # Phi^-1(p_A) - Phi^-1(p_B) cancels when p_A is close to p_B: each quantile's few-ulp error, relative to the
    # quantile, is then a large error relative to the difference (up to 5.8 times the exact radius for adjacent floats).
    rng = np.random.default_rng(17)
    p_a = np.concatenate([rng.uniform(0.01, 1.0, 150), unit_interval_cases(rng, 0)[::3]])
    gap = p_a * np.where(
        rng.uniform(size=p_a.size) < 0.5, rng.uniform(0, 1, p_a.size), 10.0 ** rng.uniform(-15, -3, p_a.size)
    )
    p_b = p_a - gap
    p_b[::5] = np.nextafter(p_a[::5], 0.0)
    p_b[1::7] = 10.0 ** rng.uniform(-300, -2, p_b[1::7].size)
    keep = (p_a > p_b) & (p_b > 0) & (p_a < 1)
    p_a, p_b = p_a[keep], p_b[keep]
    radius = stats.two_class_radius(p_a, p_b, sigma)
    with mpmath.workdps(DIGITS):
        exact = [
            mpmath.mpf(sigma) / 2 * (exact_probit(float(a)) - exact_probit(float(b)))
            for a, b in zip(p_a, p_b, strict=True)
        ]
        above = [
            (float(a), float(b)) for a, b, r, e in zip(p_a, p_b, radius, exact, strict=True) if mpmath.mpf(float(r)) > e
        ]
    assert not above, f"{len(above)} of {len(p_a)} radii above the exact two-class radius, e.g. {above[:3]}"
    wide = p_a - p_b > 1e-3  # away from cancellation the shrink costs nothing visible
    np.testing.assert_allclose(radius[wide], [float(e) for e, w in zip(exact, wide, strict=True) if w], rtol=1e-10)


def test_round_down_never_increases():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.exponential(size=1000), [0.0, -1.0, 5e-324, 1e300]])
    rounded = stats.round_down(values)
    assert np.all(rounded <= np.maximum(values, 0.0))
    assert np.all(rounded >= 0.0)
    assert np.all(rounded[values > 0] < values[values > 0])
    assert float(stats.round_down(2.0)) == np.nextafter(2.0, 0.0)


# ---------------------------------------------------------------------------------------------- binomial test


def test_binomial_test_pvalue():
    assert stats.binomial_test_pvalue(0, 0) == 1.0
    assert stats.binomial_test_pvalue(10, 0) == pytest.approx(2 * 0.5**10, rel=1e-12)
    assert stats.binomial_test_pvalue(30, 30) == pytest.approx(1.0)
    assert stats.binomial_test_pvalue(70, 30) == pytest.approx(stats.binomial_test_pvalue(30, 70), rel=1e-12)
    assert stats.binomial_test_pvalue(70, 30) < 0.001 < stats.binomial_test_pvalue(55, 45)


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan")])
@pytest.mark.parametrize(
    "call",
    [
        lambda a: stats.clopper_pearson_lower(3, 10, a),
        lambda a: stats.clopper_pearson_upper(3, 10, a),
        lambda a: stats.empirical_bernstein_lower(0.5, 0.1, 10, a),
        lambda a: stats.empirical_bernstein_upper(0.5, 0.1, 10, a),
    ],
)
def test_alpha_outside_the_open_unit_interval_is_rejected(call, alpha):
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)") as excinfo:
        call(alpha)
    assert "\n" not in str(excinfo.value)
