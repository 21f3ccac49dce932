r"""Confidence bounds and radii for randomized smoothing, with rounding that errs on the safe side.

* One-sided Clopper–Pearson bounds on a binomial proportion (exact: beta quantiles, ``scipy.stats.beta``).
* The two-sided binomial test of Cohen et al.'s ``predict`` (``scipy.stats.binomtest``).
* The empirical-Bernstein bound of Maurer & Pontil (2009) for the mean of variables in ``[0, 1]``:
  with probability at least :math:`1-\delta`,
  :math:`\mathbb E X \ge \bar X - \sqrt{2 V \ln(2/\delta)/n} - 7\ln(2/\delta)/(3(n-1))`, :math:`V` the
  unbiased sample variance.
* Cohen's radius :math:`\sigma\,\Phi^{-1}(\underline p_A)` and the two-class form
  :math:`\tfrac{\sigma}{2}(\Phi^{-1}(\underline p_A) - \Phi^{-1}(\overline p_B))`.

# Note [rounding down]
A radius is a certificate, so every float step that could round it up is pushed down instead: lower
confidence bounds are moved one ulp down, upper bounds one ulp up, and the radius one ulp towards zero.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

__all__ = [
    "binomial_test_pvalue",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "cohen_radius",
    "empirical_bernstein_lower",
    "empirical_bernstein_upper",
    "round_down",
    "two_class_radius",
]


def _check_alpha(alpha: float) -> None:
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")


def _down(x: np.ndarray | float) -> np.ndarray:
    return np.nextafter(np.asarray(x, dtype=np.float64), -np.inf)


def _up(x: np.ndarray | float) -> np.ndarray:
    return np.nextafter(np.asarray(x, dtype=np.float64), np.inf)


def round_down(radius: np.ndarray | float) -> np.ndarray:
    """One ulp towards zero, and never below 0 (see Note [rounding down])."""
    r = np.asarray(radius, dtype=np.float64)
    return np.where(r > 0, np.nextafter(r, 0.0), 0.0)


def clopper_pearson_lower(successes: np.ndarray | int, trials: np.ndarray | int, alpha: float) -> np.ndarray:
    """One-sided lower bound: ``P(p >= bound) >= 1 - alpha``; 0 when there is no success."""
    _check_alpha(alpha)
    k, n = np.asarray(successes, dtype=np.float64), np.asarray(trials, dtype=np.float64)
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise ValueError("need 0 <= successes <= trials and trials >= 1")
    with np.errstate(invalid="ignore"):
        bound = np.where(k > 0, stats.beta.ppf(alpha, k, n - k + 1), 0.0)
    return np.clip(_down(bound), 0.0, 1.0)


def clopper_pearson_upper(successes: np.ndarray | int, trials: np.ndarray | int, alpha: float) -> np.ndarray:
    """One-sided upper bound: ``P(p <= bound) >= 1 - alpha``; 1 when every trial succeeded."""
    _check_alpha(alpha)
    k, n = np.asarray(successes, dtype=np.float64), np.asarray(trials, dtype=np.float64)
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise ValueError("need 0 <= successes <= trials and trials >= 1")
    with np.errstate(invalid="ignore"):
        bound = np.where(k < n, stats.beta.ppf(1.0 - alpha, k + 1, n - k), 1.0)
    return np.clip(_up(bound), 0.0, 1.0)


def binomial_test_pvalue(count_a: int, count_b: int) -> float:
    """Two-sided p-value of ``count_a`` successes in ``count_a + count_b`` trials against p = 1/2."""
    n = int(count_a) + int(count_b)
    if n == 0:
        return 1.0
    return float(stats.binomtest(int(count_a), n, 0.5).pvalue)


def empirical_bernstein_lower(mean: np.ndarray, var: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """Maurer–Pontil lower bound on the mean of ``[0, 1]`` variables, at level ``1 - alpha`` (one-sided)."""
    _check_alpha(alpha)
    if n < 2:
        raise ValueError(f"the empirical-Bernstein bound needs n >= 2 samples; got {n}")
    log_term = math.log(2.0 / alpha)
    width = np.sqrt(2.0 * np.maximum(var, 0.0) * log_term / n) + 7.0 * log_term / (3.0 * (n - 1))
    return np.clip(_down(np.asarray(mean, dtype=np.float64) - _up(width)), 0.0, 1.0)


def empirical_bernstein_upper(mean: np.ndarray, var: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """Maurer–Pontil upper bound on the mean of ``[0, 1]`` variables, at level ``1 - alpha`` (one-sided)."""
    return 1.0 - empirical_bernstein_lower(1.0 - np.asarray(mean, dtype=np.float64), var, n, alpha)


def cohen_radius(p_lower: np.ndarray | float, sigma: float) -> np.ndarray:
    r""":math:`\sigma\,\Phi^{-1}(\underline p_A)` where :math:`\underline p_A > 1/2`, else 0 (rounded down)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    p = np.asarray(p_lower, dtype=np.float64)
    radius = np.where(p > 0.5, sigma * stats.norm.ppf(np.clip(p, 0.5, 1.0)), 0.0)
    return round_down(np.where(np.isfinite(radius), radius, 0.0))


def two_class_radius(p_lower: np.ndarray | float, p_upper_other: np.ndarray | float, sigma: float) -> np.ndarray:
    r""":math:`\tfrac\sigma2(\Phi^{-1}(\underline p_A) - \Phi^{-1}(\overline p_B))` where positive, else 0."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    pa = np.clip(np.asarray(p_lower, dtype=np.float64), 0.0, 1.0)
    pb = np.clip(np.asarray(p_upper_other, dtype=np.float64), 0.0, 1.0)
    with np.errstate(invalid="ignore"):
        radius = 0.5 * sigma * (stats.norm.ppf(pa) - stats.norm.ppf(pb))
    radius = np.where((pa > pb) & np.isfinite(radius), radius, 0.0)
    return round_down(np.maximum(radius, 0.0))
