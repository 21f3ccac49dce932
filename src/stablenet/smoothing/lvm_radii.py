r"""Radii and bounds of Lipschitz-variance-margin randomized smoothing (LVM-RS; Delattre et al., ICLR 2024,
arXiv 2309.16883): the math, without sampling.


Instead of smoothing the hard decision :math:`\arg\max_c f_c`, LVM-RS smooths a *simplex map* of the logits,
:math:`h_s(z) = \mathrm{softmax}(s z)` or :math:`\mathrm{sparsemax}(s z)` at inverse temperature :math:`s > 0`:

.. math:: g_c(x) = \mathbb E_{\delta \sim \mathcal N(0, \sigma^2 I)}\big[h_s(f(x + \delta))_c\big] \in [0, 1],
   \qquad G(x) = \arg\max_c g_c(x).

Each :math:`g_c(x)` is estimated with the empirical-Bernstein bound of Maurer & Pontil (2009), whose width
:math:`\sqrt{2 V \ln(2/\alpha)/n} + 7\ln(2/\alpha)/(3(n-1))` shrinks with the sample variance :math:`V`. A small
:math:`s` (a more Lipschitz base model) gives low variance but a small margin between classes, a large :math:`s`
the reverse: the map and temperature are chosen per input to balance the two.

**Two radii, both sound.** Let :math:`\underline p_A \le g_A(x)` and :math:`\overline p_B \ge \max_{B \ne A} g_B(x)`.

* Cohen-style form: for any :math:`u: \mathbb R^d \to [0, 1]`, :math:`x \mapsto \Phi^{-1}(\mathbb E\,u(x+\delta))`
  is :math:`1/\sigma`-Lipschitz (Salman et al. 2019, appendix A), so :math:`g_A > g_B` on the ball of radius

  .. math:: R_\Phi = \tfrac{\sigma}{2}\big(\Phi^{-1}(\underline p_A) - \Phi^{-1}(\overline p_B)\big).

* Margin form: for :math:`u: \mathbb R^d \to [a, b]` and a unit vector :math:`v`, the directional derivative
  of :math:`U = \mathbb E\,u(\cdot + \delta)` is :math:`\sigma^{-1}\mathbb E[(u(x+\sigma z) - \tfrac{a+b}{2})
  \langle v, z\rangle] \le \tfrac{b-a}{2\sigma}\mathbb E|\langle v, z\rangle| = \tfrac{b-a}{\sigma\sqrt{2\pi}}`
  (the argument of Salman et al. 2019, appendix A, with the centring at (a+b)/2, which halves the constant
  they state for [0, 1]-valued functions). The difference
  :math:`u = h_A - h_B` takes values in :math:`[-1, 1]`, so :math:`g_A - g_B` is
  :math:`L = \sqrt{2/\pi}/\sigma`-Lipschitz and the margin survives on the ball of radius

  .. math:: R_L = \frac{\underline p_A - \overline p_B}{L} = \sigma\sqrt{\pi/2}\,(\underline p_A - \overline p_B).

Since :math:`(\Phi^{-1})' = 1/\varphi(\Phi^{-1}) \ge \sqrt{2\pi}`, :math:`R_\Phi \ge R_L` whenever both are
finite: the margin form only matters when a bound sits at 0 or 1 (where :math:`\Phi^{-1}` is infinite and the
Cohen form is unusable). The reported radius is :math:`\max(R_\Phi, R_L)`.

The certifier that samples and applies them is :class:`~stablenet.smoothing.lvm.LVMSmooth`.

# Note [alpha split]
Bonferroni over the bounds actually used: one lower bound on :math:`g_A` at level :math:`\alpha/2` and one upper
bound on each of the :math:`K-1` other classes at level :math:`\alpha/(2(K-1))`; then
:math:`\overline p_B = \max_{B\ne A}` of those upper bounds, and all :math:`K` bounds hold together with
probability at least :math:`1-\alpha`. Bounding only the runner-up :math:`\hat B` picked on the selection draws
(at :math:`\alpha/2`) would *not* be sound: nothing would then control the other classes, any of which may
overtake :math:`\hat B` (the selection draws can mis-rank them).

# Note [summation error]
The float64 sample mean and unbiased variance of ``n`` values in [0, 1] carry absolute errors below about
``n 2^-53`` and ``3 n 2^-53`` (recursive-summation bounds, valid for any summation order, so also for the device's
``index_add_``); the bounds are widened by ``4 n 2^-53`` (mean moved outwards, variance raised)
before the shared rounding of :mod:`stablenet.smoothing.stats` (Note [rounding down]). The difference of two
normal quantiles in :math:`R_\Phi` can lose relative accuracy through cancellation, so the radius is also
shrunk by the relative factor :math:`1 - 2^{-40}`.
"""

from __future__ import annotations

import math

import numpy as np

from stablenet.smoothing.stats import (
    RADIUS_SHRINK,
    empirical_bernstein_lower,
    empirical_bernstein_upper,
    round_down,
    two_class_radius,
)

__all__ = ["lvm_bounds", "lvm_radius", "margin_radius"]


def margin_radius(p_lower: np.ndarray | float, p_upper_other: np.ndarray | float, sigma: float) -> np.ndarray:
    r"""Lipschitz-margin radius :math:`\sigma\sqrt{\pi/2}\,(\underline p_A - \overline p_B)`, 0 where not positive.

    :math:`g_A - g_B` is :math:`\sqrt{2/\pi}/\sigma`-Lipschitz when :math:`h_A - h_B \in [-1, 1]` (see the module
    docstring), so with :math:`\underline p_A \le g_A(x)` and :math:`\overline p_B \ge \max_{B\ne A} g_B(x)`
    the smoothed prediction stays :math:`A` on the open ball of this radius. Rounded down.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    gap = np.asarray(p_lower, dtype=np.float64) - np.asarray(p_upper_other, dtype=np.float64)
    radius = sigma * math.sqrt(math.pi / 2) * np.maximum(gap, 0.0)
    return round_down(radius * RADIUS_SHRINK)


def lvm_radius(p_lower: np.ndarray | float, p_upper_other: np.ndarray | float, sigma: float) -> np.ndarray:
    r"""Certified l2 radius :math:`\max(R_\Phi, R_L)` of the smoothed simplex map; 0 where :math:`\underline p_A \le
    \overline p_B`.

    Guarantee: if :math:`\underline p_A \le g_A(x)` and :math:`\overline p_B \ge \max_{B \ne A} g_B(x)` for a
    smoothed map :math:`g` with coordinates in [0, 1], then :math:`\arg\max_c g_c(x') = A` for every
    :math:`\|x' - x\|_2 <` the returned radius. :math:`R_\Phi = \tfrac\sigma2(\Phi^{-1}(\underline p_A) -
    \Phi^{-1}(\overline p_B))` (Salman et al. 2019), :math:`R_L = \sigma\sqrt{\pi/2}(\underline p_A -
    \overline p_B)` (:func:`margin_radius`). Rounded down (module Note [summation error]).

    Example:
        >>> r = lvm_radius(0.9, 0.1, sigma=1.0)  # Cohen's two-class form: Phi^-1(0.9) = 1.2815515655446004
        >>> 1.2815515 < float(r) < 1.2815515655446004
        True
    """
    cohen = two_class_radius(p_lower, p_upper_other, sigma)
    margin = margin_radius(p_lower, p_upper_other, sigma)
    return round_down(np.maximum(cohen, margin) * RADIUS_SHRINK)


def lvm_bounds(
    mean: np.ndarray, var: np.ndarray, n: int, alpha: float, top: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    r"""Simultaneous bounds :math:`(\underline p_A, \overline p_B)` from sample means and variances of ``n`` draws.

    ``mean`` and ``var`` have shape ``(..., K)`` (values in [0, 1], unbiased variance); ``top`` (shape ``(...)``)
    holds the class :math:`A`, which must have been chosen independently of these draws. With probability at
    least :math:`1 - \alpha`, :math:`\underline p_A \le g_A` and :math:`\overline p_B \ge \max_{B \ne A} g_B`:
    empirical-Bernstein lower bound on :math:`A` at :math:`\alpha/2`, upper bounds on each other class at
    :math:`\alpha/(2(K-1))`, Bonferroni (module Notes [alpha split] and [summation error]).
    """
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    num_classes = mean.shape[-1]
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes; got {num_classes}")
    slack = 4.0 * n * 2.0**-53
    var_hi = np.maximum(var, 0.0) + slack
    lower = empirical_bernstein_lower(np.clip(mean - slack, 0.0, 1.0), var_hi, n, alpha / 2)
    upper = empirical_bernstein_upper(np.clip(mean + slack, 0.0, 1.0), var_hi, n, alpha / (2 * (num_classes - 1)))
    top = np.asarray(top, dtype=np.int64)[..., None]
    p_lower = np.take_along_axis(lower, top, axis=-1)[..., 0]
    others = np.where(np.arange(num_classes) == top, -np.inf, upper)
    return p_lower, others.max(axis=-1)
