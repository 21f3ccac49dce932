r"""Lipschitz-aware radii and class partitioning for randomized smoothing (CPM): the math, without sampling.

Delattre, Caillon, Barthélemy, Fagnou & Allauzen, "Bridging the Theoretical Gap in Randomized Smoothing",
AISTATS 2025, arXiv 2504.02412. Two independent refinements of Cohen et al.'s certificate:

1. **Lipschitz-aware radius.** If every class score :math:`f_c: \mathbb R^d \to [0, 1]` of the base classifier
   is :math:`\ell`-Lipschitz (in :math:`\ell_2`), its smoothed probability
   :math:`p_c(x) = \mathbb E f_c(x + \delta)`, :math:`\delta \sim \mathcal N(0, \sigma^2 I)`, moves more slowly
   than the :math:`\Phi(\Phi^{-1}(p) \pm \|\varepsilon\|/\sigma)` of Cohen's worst case (a half-space). With
   :math:`\beta = 1/(\ell\sigma)` (the width of the steepest admissible ramp, in units of :math:`\sigma`),

   .. math::

       G_\beta(c) = \int_{-1/2}^{1/2} \Phi(c + \beta u)\,du
                  = \frac{\Psi(c + \beta/2) - \Psi(c - \beta/2)}{\beta}, \qquad \Psi(v) = v\,\Phi(v) + \varphi(v),

   the Gaussian CDF averaged over a window of width :math:`\beta` (:math:`G_0 = \Phi`, :math:`G_\beta(-c) = 1 -
   G_\beta(c)`). **Theorem** (proved below): for every :math:`\varepsilon`,

   .. math::

       p_c(x + \varepsilon) \ge G_\beta\big(G_\beta^{-1}(p_c(x)) - \|\varepsilon\|/\sigma\big), \qquad
       p_c(x + \varepsilon) \le G_\beta\big(G_\beta^{-1}(p_c(x)) + \|\varepsilon\|/\sigma\big),

   with equality for a one-dimensional ramp :math:`f(y) = \mathrm{clip}(\ell\langle u, y\rangle - t, 0, 1)`.
   Hence, if :math:`\underline p_A \le p_A(x)` and :math:`\overline p_B \ge \max_{c \ne A} p_c(x)`, the smoothed
   classifier :math:`g = \arg\max_c p_c` is :math:`A` on the open ball of radius

   .. math::

       R = \frac{\sigma}{2}\Big(G_\beta^{-1}(\underline p_A) - G_\beta^{-1}(\overline p_B)\Big)

   (:func:`cpm_radius`). As :math:`\ell \to \infty` this is Cohen's two-class radius
   :math:`\tfrac\sigma2(\Phi^{-1}(\underline p_A) - \Phi^{-1}(\overline p_B))`; as :math:`\ell \to 0` it tends to
   the Lipschitz-margin radius :math:`(\underline p_A - \overline p_B)/(2\ell)`; it is non-increasing in
   :math:`\ell` (the admissible score functions form a smaller set for smaller :math:`\ell`).

2. **Class partitioning (CPM).** Instead of :math:`\overline p_B = 1 - \underline p_A`, the classes other than
   the top class :math:`A` are split into buckets *chosen on the* ``n0`` *selection draws*; each bucket's total
   probability gets a Clopper–Pearson upper bound from the ``n`` fresh estimation draws, and
   :math:`\overline p_B` is the largest of them (a bucket's probability bounds each of its classes). See
   :func:`cpm_bounds` and Note [alpha split].

**Proof of the theorem.** Fix :math:`x` and write :math:`\gamma_x = \mathcal N(x, \sigma^2 I)`. By the layer-cake
formula :math:`p(x) = \int_0^1 \gamma_x(S_\tau)\,d\tau` with the open level sets :math:`S_\tau = \{f > \tau\}`. Let
:math:`a_\tau = \Phi^{-1}(\gamma_x(S_\tau))`. (i) Per level set, Cohen's Neyman–Pearson argument gives
:math:`\gamma_{x+\varepsilon}(S_\tau) \ge \Phi(a_\tau - \rho)`, :math:`\rho = \|\varepsilon\|/\sigma`. (ii) For
:math:`\tau' < \tau`, :math:`S_{\tau'}` contains the :math:`(\tau - \tau')/\ell`-neighbourhood of :math:`S_\tau`
(:math:`f` is :math:`\ell`-Lipschitz), so the Gaussian isoperimetric inequality (Borell; Sudakov–Tsirelson) gives
:math:`a_{\tau'} \ge a_\tau + \beta(\tau - \tau')`: :math:`\tau \mapsto a_\tau` falls at least as fast as the
line :math:`a^*_\tau = c^* + \beta(\tfrac12 - \tau)`, where :math:`c^*` is chosen so that
:math:`\int_0^1 \Phi(a^*_\tau)\,d\tau = G_\beta(c^*) = p(x)`. (iii) Hence :math:`a - a^*` is non-increasing, so
:math:`u = \Phi(a)` crosses :math:`u^* = \Phi(a^*)` once, from above, with the same integral: :math:`u`
majorizes :math:`u^*`. The map :math:`\psi(u) = \Phi(\Phi^{-1}(u) - \rho)` is convex
(:math:`\psi' = e^{\rho\Phi^{-1}(u) - \rho^2/2}` increases), so by the Hardy–Littlewood–Pólya (Karamata)
inequality :math:`p(x + \varepsilon) \ge \int_0^1 \psi(u_\tau)\,d\tau \ge \int_0^1 \psi(u^*_\tau)\,d\tau =
G_\beta(c^* - \rho)`. The upper bound is the lower bound applied to :math:`1 - f`, with
:math:`G_\beta(-c) = 1 - G_\beta(c)`. Then :math:`p_A(x+\varepsilon) > p_c(x+\varepsilon)` for all :math:`c \ne A`
as soon as :math:`G_\beta^{-1}(\underline p_A) - \rho > G_\beta^{-1}(\overline p_B) + \rho`. :math:`\square`

The certifier that samples and applies them is :class:`~stablenet.smoothing.cpm.CPMSmooth`; why its votes are
soft, and so what the Lipschitz constant bounds, is Note [what L means] in :mod:`stablenet.smoothing.cpm`.

# Note [alpha split]
With :math:`k` buckets for the non-top classes, :math:`\underline p_A` and the :math:`k` bucket bounds are each at
level :math:`\alpha/(k+1)` (Bonferroni over the :math:`k + 1` buckets, the top class's included), so all hold
together with probability :math:`\ge 1 - \alpha`. For :math:`k = 1` the single bucket's count is
:math:`n - n_A`, its upper bound is exactly :math:`1 - \underline p_A` (the same event), and the level stays
:math:`\alpha`: this is Cohen's certificate. The top class and the buckets are chosen from the selection draws
only (the estimation draws are fresh, Note [noise generator] in :mod:`stablenet.smoothing.sampling`), so the
bounds hold at their nominal levels conditionally on the choice. :math:`1 - \underline p_A` also bounds every
other class, so :math:`\overline p_B` never exceeds it.

# Note [safe inverse]
:math:`G_\beta^{-1}` is found by bisection on a bracket :math:`[c_-, c_+]` with
:math:`G_\beta(c_-) \le q \le G_\beta(c_+)`, always in the lower tail (:math:`q \le 1/2`, via
:math:`G_\beta^{-1}(p) = -G_\beta^{-1}(1-p)`, where :math:`1 - p` is exact), where :math:`\Phi` is accurate
relatively. The lower end is used for :math:`\underline p_A`, the upper end for :math:`\overline p_B`, and the
targets are moved outwards by a relative :math:`10^{-10}` first, far above the :math:`\sim 10^{-12}` relative
error of evaluating :math:`G_\beta` (Gauss–Legendre for :math:`\beta \le 8`, the :math:`\Psi` difference above).
The radius is then shrunk by :math:`2^{-40}` relatively and rounded down (Note [rounding down] in
:mod:`stablenet.smoothing.stats`).

# Note [paper]
The paper's text could not be read here; its authors' public code computes the slope of
:math:`\Phi^{-1}\circ p` at :math:`x` for the same extremal ramp and divides :math:`\Phi^{-1}(\underline p_A)` by
it, i.e. a local (first-order) bound. The theorem above integrates the worst case over the whole ball instead,
which gives the closed form and needs no local approximation. The bucket rule is ours too (the candidate
partitions "top :math:`j` runner-ups alone, the rest together", choosing :math:`j` by the radius predicted from the
selection counts); any rule that looks only at the selection draws is sound.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import special

from stablenet.smoothing import stats
from stablenet.smoothing.arguments import check_alpha as _check_alpha
from stablenet.smoothing.arguments import check_count as _check_count
from stablenet.smoothing.arguments import check_lipschitz as _check_lipschitz
from stablenet.smoothing.arguments import check_positive as _check_positive

__all__ = ["CPMBounds", "cpm_bounds", "cpm_radius", "lower_top", "predicted_radius", "softmax_score_lipschitz"]


_TARGET_SLACK = 1e-10  # Note [safe inverse]
_SOFTMAX_SLOPE = math.sqrt(2.0) / 4.0
_QUAD_MAX_BETA = 8.0
_PANELS, _NODES = 8, 16


def _quadrature() -> tuple[np.ndarray, np.ndarray]:
    """Composite Gauss–Legendre rule on [-1/2, 1/2] (weights sum to 1)."""
    x, w = np.polynomial.legendre.leggauss(_NODES)
    width = 1.0 / _PANELS
    centres = -0.5 + width * (np.arange(_PANELS) + 0.5)
    nodes = (centres[:, None] + 0.5 * width * x[None, :]).ravel()
    weights = np.tile(0.5 * width * w, _PANELS)
    return nodes, weights


_QUAD_NODES, _QUAD_WEIGHTS = _quadrature()


def softmax_score_lipschitz(lipschitz: float, inverse_temperature: float = 1.0) -> float:
    r"""Lipschitz constant :math:`\ell = s L \sqrt2/4` of each coordinate of :math:`\mathrm{softmax}(s\,z(x))`.

    For :math:`q = \mathrm{softmax}(y)`, :math:`\nabla_y q_c = q_c(e_c - q)` and :math:`\|e_c - q\|^2 = (1-q_c)^2 +
    \sum_{j \ne c} q_j^2 \le 2(1-q_c)^2`, so :math:`\|\nabla_y q_c\| \le \sqrt2\,q_c(1-q_c) \le \sqrt2/4` (equality
    for two classes at :math:`q = (\tfrac12, \tfrac12)`). Composed with :math:`y = s\,z(x)`, :math:`z` being
    :math:`L`-Lipschitz in :math:`\ell_2`, this gives :math:`s L\sqrt2/4`, rounded up. ``inf`` stays ``inf``.

    Example:
        >>> softmax_score_lipschitz(2 ** 0.5)  # logits (t, -t) with t = <w, x>, ||w|| = 1: sigmoid(2t) has slope <= 1/2
        0.5000000000000001
    """
    lipschitz = _check_lipschitz(lipschitz)
    s = _check_positive("inverse_temperature", inverse_temperature)
    if math.isinf(lipschitz):
        return math.inf
    return math.nextafter(math.nextafter(s * lipschitz, math.inf) * _SOFTMAX_SLOPE, math.inf)


# ----------------------------------------------------------------------------------------- radius
def _ramp_cdf(c: np.ndarray, beta: float) -> np.ndarray:
    r""":math:`G_\beta(c) = \int_{-1/2}^{1/2}\Phi(c + \beta u)\,du` (module docstring), for :math:`c \le` a little."""
    if beta == 0.0:
        return special.ndtr(c)
    if beta <= _QUAD_MAX_BETA:
        # All terms positive: no cancellation, relative accuracy in the lower tail.
        return special.ndtr(c[..., None] + beta * _QUAD_NODES) @ _QUAD_WEIGHTS

    def psi(v: np.ndarray) -> np.ndarray:
        return np.exp(-0.5 * v * v) / math.sqrt(2.0 * math.pi) + v * special.ndtr(v)

    return (psi(c + 0.5 * beta) - psi(c - 0.5 * beta)) / beta


def _bracket(target: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    r"""``(lo, hi)`` with :math:`G_\beta(lo) \le` target :math:`\le G_\beta(hi)` (as computed), hi - lo tiny.

    ``target`` lies in ``[0, 1/2 + 1e-9]``; a zero target gives ``(-inf, -inf)``.
    """
    target = np.asarray(target, dtype=np.float64)
    zero = target <= 0.0
    safe = np.where(zero, 0.25, target)
    centre = special.ndtri(safe)
    # Phi(c - beta/2) <= G(c) <= Phi(c + beta/2), so the root lies within beta/2 of Phi^-1(target).
    lo = centre - 0.5 * beta - 1.0
    hi = centre + 0.5 * beta + 1.0
    for _ in range(400):
        width = hi - lo
        open_ = width > 1e-12 + 4e-16 * np.maximum(np.abs(lo), np.abs(hi))
        if not open_.any():
            break
        mid = np.where(open_, 0.5 * (lo + hi), lo)
        below = _ramp_cdf(mid, beta) <= safe
        lo = np.where(open_ & below, mid, lo)
        hi = np.where(open_ & ~below, mid, hi)
    return np.where(zero, -np.inf, lo), np.where(zero, -np.inf, hi)


def _inverse_lower(p: np.ndarray, beta: float) -> np.ndarray:
    r"""A lower bound on :math:`G_\beta^{-1}(p)` (Note [safe inverse])."""
    upper_half = p > 0.5
    q = np.where(upper_half, 1.0 - p, p)  # exact for p > 1/2
    lo, hi = _bracket(np.where(upper_half, q * (1 + _TARGET_SLACK), q * (1 - _TARGET_SLACK)), beta)
    return np.where(upper_half, -hi, lo)


def _inverse_upper(p: np.ndarray, beta: float) -> np.ndarray:
    r"""An upper bound on :math:`G_\beta^{-1}(p)`: minus a lower bound on :math:`G_\beta^{-1}(1 - p)`."""
    upper_half = p > 0.5
    q = np.where(upper_half, 1.0 - p, p)
    lo, hi = _bracket(np.where(upper_half, q * (1 - _TARGET_SLACK), q * (1 + _TARGET_SLACK)), beta)
    return np.where(upper_half, -lo, hi)


def _probit_gap(p_lower: np.ndarray, p_upper: np.ndarray, beta: float) -> np.ndarray:
    r"""A lower bound on :math:`G_\beta^{-1}(\underline p_A) - G_\beta^{-1}(\overline p_B)` (may be negative or inf)."""
    with np.errstate(invalid="ignore"):
        gap = _inverse_lower(p_lower, beta) - _inverse_upper(p_upper, beta)
    return np.where(np.isnan(gap), -np.inf, gap)


def _beta(sigma: float, lipschitz: float) -> float:
    if math.isinf(lipschitz):
        return 0.0
    beta = 1.0 / (lipschitz * sigma)
    if not math.isfinite(beta):
        raise ValueError(f"lipschitz * sigma must be a normal float > 0; got {lipschitz} * {sigma}")
    return beta


def cpm_radius(
    p_lower: np.ndarray | float, p_upper_other: np.ndarray | float, sigma: float, lipschitz: float
) -> np.ndarray:
    r"""Certified :math:`\ell_2` radius of the Lipschitz-aware certificate; 0 where not positive or not finite.

    .. math:: R = \tfrac\sigma2\big(G_\beta^{-1}(\underline p_A) - G_\beta^{-1}(\overline p_B)\big), \qquad
       \beta = 1/(\ell\sigma),

    rounded down (module Note [safe inverse]).

    Guarantee: if every class score of the base classifier maps into :math:`[0, 1]` and is ``lipschitz``-Lipschitz
    in :math:`\ell_2`, :math:`\underline p_A \le p_A(x)` and :math:`\overline p_B \ge \max_{c \ne A} p_c(x)`, then
    :math:`\arg\max_c p_c(x') = A` for every :math:`\|x' - x\|_2 <` the returned radius (module docstring).
    ``lipschitz = inf`` gives Cohen's two-class radius; a smaller ``lipschitz`` never gives a smaller radius.

    Args:
        p_lower: :math:`\underline p_A` in [0, 1] (array or float).
        p_upper_other: :math:`\overline p_B` in [0, 1], broadcastable with ``p_lower``.
        sigma: noise level, > 0.
        lipschitz: :math:`\ell`, the Lipschitz constant of each class score (not of the logits; see
            :func:`softmax_score_lipschitz`), > 0 or ``inf``.

    Example:
        >>> float(cpm_radius(0.9, 0.1, sigma=1.0, lipschitz=float("inf")))  # Phi^-1(0.9) = 1.2815515655446004
        1.28155156...
        >>> float(cpm_radius(0.9, 0.1, sigma=1.0, lipschitz=1e-3))  # the margin limit (0.9 - 0.1) / (2 * 1e-3)
        399.99999997...
    """
    sigma = _check_positive("sigma", sigma)
    lipschitz = _check_lipschitz(lipschitz)
    p_a = _check_probability("p_lower", p_lower)
    p_b = _check_probability("p_upper_other", p_upper_other)
    p_a, p_b = np.broadcast_arrays(p_a, p_b)
    gap = _probit_gap(p_a, p_b, _beta(sigma, lipschitz))
    with np.errstate(invalid="ignore", over="ignore"):
        radius = 0.5 * sigma * gap * stats.RADIUS_SHRINK
    radius = np.where(np.isfinite(radius) & (radius > 0) & (p_a > p_b), radius, 0.0)
    return stats.round_down(radius)


# ----------------------------------------------------------------------------------------- buckets
class CPMBounds(NamedTuple):
    """Per-image result of :func:`cpm_bounds` (numpy arrays of length ``N``)."""

    top: np.ndarray
    """The class :math:`A` (most frequent in the selection draws)."""
    p_lower: np.ndarray
    """Lower bound on :math:`p_A(x)`."""
    p_upper: np.ndarray
    """Upper bound on :math:`\\max_{c \\ne A} p_c(x)`."""
    num_buckets: np.ndarray
    """Number :math:`k` of buckets used for the non-top classes (each bound at level :math:`\\alpha/(k+1)`)."""


def _bucket_bounds(
    counts: np.ndarray, n: np.ndarray, top: np.ndarray, order: np.ndarray, k: int, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(p_lower, p_upper)`` for the partition "the ``k - 1`` first classes of ``order`` alone, the rest together"."""

    def clip(v: np.ndarray, total: np.ndarray) -> np.ndarray:  # plug-in counts are floats; keep 0 <= k <= n
        return np.clip(v, 0, total)

    n_a = np.take_along_axis(counts, top[:, None], axis=1)[:, 0]
    level = alpha if k == 1 else alpha / (k + 1)  # Note [alpha split]
    p_lower = stats.clopper_pearson_lower(clip(n_a, n), n, level)
    p_upper = stats.clopper_pearson_upper(clip(n - n_a, n), n, level)  # = 1 - p_lower: bounds every other class
    if k > 1:
        ranked = np.take_along_axis(counts, order, axis=1)
        singles = stats.clopper_pearson_upper(clip(ranked[:, : k - 1], n[:, None]), n[:, None], level).max(axis=1)
        rest = stats.clopper_pearson_upper(clip(ranked[:, k - 1 :].sum(axis=1), n), n, level)
        p_upper = np.minimum(p_upper, np.maximum(singles, rest))
    return p_lower, p_upper


def cpm_bounds(
    counts_selection: np.ndarray,
    counts_estimation: np.ndarray,
    alpha: float,
    num_buckets: int,
    *,
    sigma: float,
    lipschitz: float,
) -> CPMBounds:
    r"""Top class and simultaneous bounds :math:`(\underline p_A, \overline p_B)` by class partitioning.

    Guarantee: if ``counts_estimation`` are multinomial counts (``n`` draws per row) independent of
    ``counts_selection``, then for each row, with probability at least :math:`1 - \alpha`,
    :math:`\underline p_A \le p_A` and :math:`\overline p_B \ge \max_{c \ne A} p_c` (Note [alpha split]).

    From the selection counts alone: :math:`A` is the most frequent class (lowest index on ties), the other classes
    are ranked by count (ties by index), and for :math:`k = 1, \dots, \min(\text{num\_buckets}, K-1)` the partition
    :math:`P_k` puts the :math:`k-1` first-ranked classes in buckets of their own and the others in one bucket.
    :math:`k` is chosen to maximise the radius *predicted* by plugging the selection frequencies, scaled to ``n``
    draws, into the bounds below and :func:`cpm_radius`. From the estimation counts: Clopper–Pearson lower bound on
    :math:`A` and upper bound on each bucket's total, all at :math:`\alpha/(k+1)` (at :math:`\alpha` for
    :math:`k = 1`, where this is Cohen's :math:`\overline p_B = 1 - \underline p_A`), and
    :math:`\overline p_B = \min(\max_b \overline p_b, 1 - \underline p_A)`.

    Args:
        counts_selection: ``(N, K)`` non-negative integer counts from the ``n0`` selection draws.
        counts_estimation: ``(N, K)`` non-negative integer counts from fresh draws (``n`` = row sum >= 1).
        alpha: failure probability in (0, 1).
        num_buckets: largest number of buckets for the non-top classes, >= 1 (1: Cohen's bound).
        sigma: noise level (only used to choose :math:`k`).
        lipschitz: class-score Lipschitz constant :math:`\ell` or ``inf`` (only used to choose :math:`k`).

    Example:
        >>> sel = np.array([[60, 10, 10, 10, 10]]); est = np.array([[6000, 1000, 1000, 1000, 1000]])
        >>> b = cpm_bounds(sel, est, 0.001, 2, sigma=0.5, lipschitz=float("inf"))
        >>> int(b.num_buckets[0]), bool(b.p_upper[0] < 1 - b.p_lower[0])  # runner-up alone, rest together
        (2, True)
    """
    alpha = _check_alpha(alpha)
    num_buckets = _check_count("num_buckets", num_buckets)
    sigma = _check_positive("sigma", sigma)
    lipschitz = _check_lipschitz(lipschitz)
    sel = _check_counts("counts_selection", counts_selection)
    est = _check_counts("counts_estimation", counts_estimation)
    if sel.shape != est.shape:
        raise ValueError(
            f"counts_selection and counts_estimation must have the same shape; got {sel.shape} and {est.shape}"
        )
    n = est.sum(axis=1)
    if np.any(n < 1):
        raise ValueError("every row of counts_selection and counts_estimation needs at least one draw")
    top, order, candidates, gaps = _plan(sel, n, alpha, num_buckets, sigma, lipschitz)
    k_best = np.asarray(candidates)[np.argmax(gaps, axis=1)] if len(top) else np.zeros(0, int)

    p_lower = np.zeros(len(top))
    p_upper = np.ones(len(top))
    for k in candidates:
        rows = k_best == k
        if rows.any():
            lo, up = _bucket_bounds(est[rows], n[rows], top[rows], order[rows], k, alpha)
            p_lower[rows], p_upper[rows] = lo, up
    return CPMBounds(top, p_lower, p_upper, k_best.astype(np.int64))


def _plan(
    sel: np.ndarray,
    n: np.ndarray,
    alpha: float,
    num_buckets: int,
    sigma: float,
    lipschitz: float,
    freq: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, range, np.ndarray]:
    """From the selection counts alone: the top class, the ranking of the others, the bucket counts tried and the
    probit gap each is predicted to give with ``n`` estimation draws (shape ``(N, len(candidates))``) if the
    estimation frequencies were ``freq`` (default: the selection frequencies)."""
    num_classes = sel.shape[1]
    n0 = sel.sum(axis=1)
    if np.any(n0 < 1):
        raise ValueError("every row of counts_selection and counts_estimation needs at least one draw")
    top = sel.argmax(axis=1)
    # Rank the other classes by selection count (stable: ties by index); the top class goes last.
    masked = np.where(np.arange(num_classes)[None, :] == top[:, None], -1, sel)
    order = np.argsort(-masked, axis=1, kind="stable")[:, : num_classes - 1]
    candidates = range(1, min(num_buckets, num_classes - 1) + 1)
    beta = _beta(sigma, lipschitz)
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), n0.shape)
    plug_in = (sel / n0[:, None] if freq is None else freq) * n[:, None]
    gaps = [_probit_gap(*_bucket_bounds(plug_in, n, top, order, k, alpha), beta) for k in candidates]
    return top, order, candidates, np.stack(gaps, axis=1) if len(top) else np.zeros((0, len(candidates)))


def predicted_radius(
    counts_selection: np.ndarray,
    n: int,
    alpha: float,
    num_buckets: int,
    *,
    sigma: float,
    lipschitz: float,
    frequencies: np.ndarray | None = None,
) -> np.ndarray:
    r"""The radius :func:`cpm_bounds` and :func:`cpm_radius` are predicted to give with ``n`` estimation draws.

    The selection frequencies, made pessimistic by one standard error (the top class's lowered by
    :math:`\sqrt{\hat p(1-\hat p)/n_0}`, the others raised in proportion to keep the sum), are plugged in as if
    they were the estimation ones (scaled to ``n`` draws), with the bucket count :func:`cpm_bounds` would choose
    and the top class of the raw counts. Without that margin a tiny ``lipschitz`` would make a noise-level lead
    among ``n0`` draws look like a huge radius. ``frequencies`` (shape ``(N, K)``, rows summing to 1), when given,
    replaces that plug-in: a better estimate of the vote probabilities from the same draws (e.g. mean softmax
    scores), already made pessimistic by the caller. It is a *selection rule*, not a certificate: a certifier may pick
    among candidate classifiers (e.g. temperatures, each with its own ``lipschitz``) by it, because the bounds are
    then computed on fresh draws (:class:`~stablenet.smoothing.cpm.CPMSmooth`, Note [temperature selection]).
    Negative where no certificate is predicted (the closer to 0, the closer to certifying), ``-inf`` where the
    gap is undefined.

    Example:
        >>> sel = np.array([[95, 5], [50, 50]])
        >>> r = predicted_radius(sel, 100_000, 0.001, 1, sigma=1.0, lipschitz=float("inf"))
        >>> bool(r[0] > 1.5 and r[1] < 0)
        True
    """
    alpha = _check_alpha(alpha)
    n = _check_count("n", n)
    num_buckets = _check_count("num_buckets", num_buckets)
    sigma = _check_positive("sigma", sigma)
    lipschitz = _check_lipschitz(lipschitz)
    sel = _check_counts("counts_selection", counts_selection)
    if frequencies is not None:
        freq = _check_probability("frequencies", frequencies)
        if freq.shape != sel.shape:
            raise ValueError(f"frequencies must have the shape of counts_selection {sel.shape}; got {freq.shape}")
    else:
        n0 = np.maximum(sel.sum(axis=1, keepdims=True), 1).astype(np.float64)
        freq = sel / n0
        top = sel.argmax(axis=1)[:, None]
        p_top = np.take_along_axis(freq, top, axis=1)
        freq = lower_top(freq, top, np.maximum(p_top - np.sqrt(p_top * (1.0 - p_top) / n0), 0.0))
    *_, gaps = _plan(sel, np.full(len(sel), n), alpha, num_buckets, sigma, lipschitz, freq)
    with np.errstate(invalid="ignore"):
        return 0.5 * sigma * gaps.max(axis=1, initial=-np.inf)


def lower_top(freq: np.ndarray, top: np.ndarray, lowered: np.ndarray) -> np.ndarray:
    """``freq`` (``(N, K)``, rows summing to 1) with the ``top`` column (``(N, 1)``) set to ``lowered`` and the
    other columns raised in proportion, so that rows still sum to 1 (unchanged where the others are all 0)."""
    p_top = np.take_along_axis(freq, top, axis=1)
    others = 1.0 - p_top
    scale = np.divide(1.0 - lowered, others, out=np.ones_like(others), where=others > 0)
    freq = freq * scale
    np.put_along_axis(freq, top, lowered, axis=1)
    return freq


# ----------------------------------------------------------------------------------------- checks
def _check_probability(name: str, value: object) -> np.ndarray:
    p = np.asarray(value, dtype=np.float64)
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"{name} must hold probabilities in [0, 1]; got values outside it or NaN")
    return p


def _check_counts(name: str, value: object) -> np.ndarray:
    counts = np.asarray(value)
    if counts.ndim != 2 or counts.shape[1] < 2 or not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        raise ValueError(f"{name} must be an (N, K) array of non-negative integer counts with K >= 2")
    return counts.astype(np.int64)
