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
A radius is a certificate, so every float step that could round it up is pushed down instead, by margins that
cover the error of scipy's special functions as measured against a 50-digit ``mpmath`` reference, not only the
last rounding; then lower bounds move one ulp down, upper bounds one ulp up and radii one ulp towards zero.

* ``scipy.stats.norm.ppf`` is off by up to 2.4 ulps (:math:`5.3\cdot10^{-16}` relative) on :math:`(0, 1)`, tiny
  :math:`p` included, in either direction: with the one-ulp move alone 12–16% of the radii
  :math:`\sigma\Phi^{-1}(p)`, :math:`p \in (1/2, 1)`, came out above the exact value (by up to
  :math:`3.3\cdot10^{-16}` relative). Radii are therefore multiplied by :data:`RADIUS_SHRINK`
  :math:`= 1 - 2^{-40}` (:math:`2^{-40} \approx 9.1\cdot10^{-13}`, over a thousand times the few ulps of the
  quantile and the products), the factor the other certifiers use too. In the two-class form the difference
  :math:`\Phi^{-1}(\underline p_A) - \Phi^{-1}(\overline p_B)` cancels when the two are close, so a relative
  shrink of the difference does not cover the quantiles' errors (for adjacent floats the float formula gave up
  to 5.8 times the exact radius): each quantile is first moved outwards by :math:`2^{-40}` of its own magnitude.
* ``scipy.stats.beta.ppf`` and ``beta.isf`` (Boost's ``ibeta_inv``, a Halley iteration stopped at half the
  float64 digits) are off by far more than one ulp: against the reference, about a thousand ulps for
  :math:`n \le 10^5` and :math:`5.2\cdot10^{-12}` relative to :math:`\min(b, 1-b)` for :math:`n \le 10^7`,
  growing roughly like :math:`\sqrt n`. The Clopper–Pearson bounds are therefore moved by
  :math:`2^{-32} \min(b, 1-b)` (:math:`2^{-32} \approx 2.3\cdot10^{-10}`, 45 times the largest error seen)
  before the ulp. A lower bound :math:`\underline p_A > 1/2` moves by :math:`2^{-32}(1 - \underline p_A)`, which
  lowers :math:`\sigma\Phi^{-1}(\underline p_A)` by at most :math:`\sqrt{\pi/2}\,2^{-32}\sigma \approx
  3\cdot10^{-10}\sigma` (Mills' ratio :math:`(1-\Phi(z))/\varphi(z) \le \sqrt{\pi/2}` for :math:`z \ge 0`). The
  upper bound solves for :math:`\alpha` in the upper tail (``isf``) rather than for ``1 - alpha``, whose rounding
  moved it by up to :math:`3\cdot10^{-9}` relative at :math:`\alpha = 10^{-10}`.
* The empirical-Bernstein width carries a few ulps of float error (``log``, ``sqrt``, products): it is widened by
  the relative :math:`2^{-40}`, and the upper bound is :math:`\bar X` plus the width, not one minus the lower
  bound of :math:`1 - \bar X` (that subtraction is not exact).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

__all__ = [
    "RADIUS_SHRINK",
    "binomial_test_pvalue",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "cohen_radius",
    "empirical_bernstein_lower",
    "empirical_bernstein_upper",
    "round_down",
    "two_class_radius",
]


RADIUS_SHRINK = 1.0 - 2.0**-40
"""Relative factor every certified radius is multiplied by before :func:`round_down` (Note [rounding down])."""

_FLOAT_SLACK = 2.0**-40  # relative; far above the few-ulp error of norm.ppf or of a short float formula
_BETA_SLACK = 2.0**-32  # relative to min(b, 1 - b); covers beta.ppf / beta.isf (Note [rounding down])


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


def _beta_margin(bound: np.ndarray) -> np.ndarray:
    """How far a beta quantile is moved before its ulp (Note [rounding down])."""
    return _BETA_SLACK * np.minimum(bound, 1.0 - bound)


def clopper_pearson_lower(successes: np.ndarray | int, trials: np.ndarray | int, alpha: float) -> np.ndarray:
    r"""One-sided lower bound :math:`\underline p` with :math:`P(p \ge \underline p) \ge 1 - \alpha`.

    .. math:: \underline p = \mathrm B(\alpha;\, k,\, n - k + 1) \iff P(X \ge k \mid \underline p) = \alpha,
        \quad X \sim \mathrm{Binomial}(n, \underline p),

    :math:`\mathrm B(\cdot; a, b)` the beta quantile; 0 when :math:`k = 0`. Moved down by the margin of Note
    [rounding down], which keeps it below the exact quantile.
    """
    _check_alpha(alpha)
    k, n = np.asarray(successes, dtype=np.float64), np.asarray(trials, dtype=np.float64)
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise ValueError("need 0 <= successes <= trials and trials >= 1")
    with np.errstate(invalid="ignore"):
        bound = np.where(k > 0, stats.beta.ppf(alpha, k, n - k + 1), 0.0)
    return np.clip(_down(bound - _beta_margin(bound)), 0.0, 1.0)


def clopper_pearson_upper(successes: np.ndarray | int, trials: np.ndarray | int, alpha: float) -> np.ndarray:
    r"""One-sided upper bound :math:`\overline p` with :math:`P(p \le \overline p) \ge 1 - \alpha`.

    .. math:: \overline p = \mathrm B(1 - \alpha;\, k + 1,\, n - k) \iff P(X \le k \mid \overline p) = \alpha;

    1 when :math:`k = n`. Computed from the upper tail at :math:`\alpha` (``1 - alpha`` is not exact) and moved up
    by the margin of Note [rounding down].
    """
    _check_alpha(alpha)
    k, n = np.asarray(successes, dtype=np.float64), np.asarray(trials, dtype=np.float64)
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise ValueError("need 0 <= successes <= trials and trials >= 1")
    with np.errstate(invalid="ignore"):
        bound = np.where(k < n, stats.beta.isf(alpha, k + 1, n - k), 1.0)
    return np.clip(_up(bound + _beta_margin(bound)), 0.0, 1.0)


def binomial_test_pvalue(count_a: int, count_b: int) -> float:
    """Two-sided p-value of ``count_a`` successes in ``count_a + count_b`` trials against p = 1/2."""
    n = int(count_a) + int(count_b)
    if n == 0:
        return 1.0
    return float(stats.binomtest(int(count_a), n, 0.5).pvalue)


def _bernstein_width(var: np.ndarray, n: int, alpha: float) -> np.ndarray:
    r"""An upper bound on :math:`\sqrt{2 V \ln(2/\alpha)/n} + 7\ln(2/\alpha)/(3(n-1))` (Note [rounding down])."""
    _check_alpha(alpha)
    if n < 2:
        raise ValueError(f"the empirical-Bernstein bound needs n >= 2 samples; got {n}")
    log_term = math.log(2.0 / alpha)
    width = np.sqrt(2.0 * np.maximum(var, 0.0) * log_term / n) + 7.0 * log_term / (3.0 * (n - 1))
    return _up(width * (1.0 + _FLOAT_SLACK))


def empirical_bernstein_lower(mean: np.ndarray, var: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """Maurer–Pontil lower bound on the mean of ``[0, 1]`` variables, at level ``1 - alpha`` (one-sided)."""
    width = _bernstein_width(var, n, alpha)
    return np.clip(_down(np.asarray(mean, dtype=np.float64) - width), 0.0, 1.0)


def empirical_bernstein_upper(mean: np.ndarray, var: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """Maurer–Pontil upper bound on the mean of ``[0, 1]`` variables, at level ``1 - alpha`` (one-sided)."""
    width = _bernstein_width(var, n, alpha)
    return np.clip(_up(np.asarray(mean, dtype=np.float64) + width), 0.0, 1.0)


def cohen_radius(p_lower: np.ndarray | float, sigma: float) -> np.ndarray:
    r""":math:`\sigma\,\Phi^{-1}(\underline p_A)` where :math:`\underline p_A > 1/2`, else 0.

    Never above the exact value for the given float :math:`\underline p_A`: scaled by :data:`RADIUS_SHRINK`
    and rounded down (Note [rounding down]). 0 also where it is infinite (:math:`\underline p_A = 1`).

    Example:
        >>> r = float(cohen_radius(0.9, sigma=1.0))  # Phi^-1(0.9) = 1.2815515655446004
        >>> 1.28155156554 < r < 1.2815515655446004
        True
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    p = np.asarray(p_lower, dtype=np.float64)
    radius = np.where(p > 0.5, sigma * stats.norm.ppf(np.clip(p, 0.5, 1.0)) * RADIUS_SHRINK, 0.0)
    return round_down(np.where(np.isfinite(radius), radius, 0.0))


def two_class_radius(p_lower: np.ndarray | float, p_upper_other: np.ndarray | float, sigma: float) -> np.ndarray:
    r""":math:`\tfrac\sigma2(\Phi^{-1}(\underline p_A) - \Phi^{-1}(\overline p_B))` where positive, else 0.

    Never above the exact value for the given floats: each quantile is moved outwards by :math:`2^{-40}` of its
    magnitude before the difference, which can cancel, then the radius is scaled by :data:`RADIUS_SHRINK` and
    rounded down (Note [rounding down]). 0 also where it is infinite or undefined.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    pa = np.clip(np.asarray(p_lower, dtype=np.float64), 0.0, 1.0)
    pb = np.clip(np.asarray(p_upper_other, dtype=np.float64), 0.0, 1.0)
    with np.errstate(invalid="ignore"):
        z_a, z_b = stats.norm.ppf(pa), stats.norm.ppf(pb)
        gap = (z_a - _FLOAT_SLACK * np.abs(z_a)) - (z_b + _FLOAT_SLACK * np.abs(z_b))
        radius = 0.5 * sigma * gap * RADIUS_SHRINK
    radius = np.where((pa > pb) & np.isfinite(radius), radius, 0.0)
    return round_down(np.maximum(radius, 0.0))
