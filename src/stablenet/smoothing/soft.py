r"""The smoothed *soft* classifier and a Monte-Carlo ``predict`` for it (LVM-RS, and CPM with soft votes).

A simplex map :math:`h` (softmax or sparsemax, :data:`~stablenet.smoothing.simplex.SIMPLEX_MAPS`) at inverse
temperature :math:`s > 0`, averaged over Gaussian noise :math:`\delta \sim \mathcal N(0, \sigma^2 I)`:

.. math::

    g_c(x) = \mathbb E\big[h(s\,f(x + \delta))_c\big] \in [0, 1], \qquad G(x) = \arg\max_c g_c(x).

This is the classifier that

* LVM-RS certifies (:mod:`stablenet.smoothing.lvm`), with the map and the temperature chosen *per input* on
  its selection draws;
* CPM certifies when the base model's logits have a finite Lipschitz bound (:mod:`stablenet.smoothing.cpm`,
  Note [what L means]): :math:`h` = softmax at its ``inverse_temperature``. Each of CPM's noisy copies votes
  for a class drawn from :math:`\mathrm{softmax}(s\,f(x+\delta))` (Gumbel-max), so the expected vote frequencies
  are exactly :math:`g_c(x)`; averaging the softmax itself (as here) estimates the same :math:`g` with less
  variance. With an unbounded model CPM falls back to Cohen's hard votes, :data:`HARD_VOTES`, whose
  ``predict`` is :meth:`stablenet.smoothing.cohen.Smooth.predict`.

:func:`soft_predict` is the soft analogue of Cohen et al.'s ``PREDICT``: it returns :math:`G(x)` or abstains,
and is wrong (returns a class other than :math:`G(x)`) with probability at most :math:`\alpha`. With
``noise="grid"`` it evaluates the classifier that :class:`~stablenet.smoothing.lvm.LVMSmooth` certifies with grid
noise: :math:`G` of the grid base model :math:`f(\mathrm{round}(L\,\cdot)/L)`, at grid points (Note [grid
noise] in :mod:`stablenet.smoothing.lvm`).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor, nn

from stablenet.abstain import ABSTAIN
from stablenet.smoothing.arguments import check_alpha, check_count, eval_mode, model_device
from stablenet.smoothing.grid_noise import GridNoise
from stablenet.smoothing.sampling import NOISE_KINDS, make_generator, mean_and_variance
from stablenet.smoothing.simplex import SIMPLEX_MAPS
from stablenet.smoothing.stats import empirical_bernstein_lower, empirical_bernstein_upper

__all__ = ["HARD_VOTES", "simplex_scores", "soft_predict", "soft_vote_decision"]

HARD_VOTES: str = "argmax"
"""The ``simplex_map`` of a record whose certificate is about Cohen's hard-vote classifier (one-hot argmax)."""


def _check_map(simplex_map: object, inverse_temperature: object) -> tuple[str, float]:
    if simplex_map not in SIMPLEX_MAPS:
        raise ValueError(f"simplex_map must be one of {', '.join(repr(m) for m in SIMPLEX_MAPS)}; got {simplex_map!r}")
    s = inverse_temperature
    if isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Real) or not 0 < s < math.inf:
        raise ValueError(f"inverse_temperature must be a finite number > 0; got {s!r}")
    return str(simplex_map), float(s)


def simplex_scores(logits: Tensor, simplex_map: str = "softmax", inverse_temperature: float = 1.0) -> Tensor:
    r""":math:`h(s\,z)` in float64, clamped to [0, 1], for logits :math:`z` of shape ``(..., K)`` (differentiable).

    The same values as :meth:`stablenet.smoothing.lvm.LVMSmooth.simplex_values` for one candidate.

    Example:
        >>> simplex_scores(torch.tensor([[2.0, 0.5, 0.0]]), "sparsemax", 1.0)  # the far-ahead class takes all
        tensor([[1., 0., 0.]], dtype=torch.float64)
    """
    simplex_map, s = _check_map(simplex_map, inverse_temperature)
    return SIMPLEX_MAPS[simplex_map](logits.to(torch.float64) * s).clamp(0.0, 1.0)


def soft_vote_decision(mean: np.ndarray, var: np.ndarray, n: int, alpha: float, *, tv: float = 0.0) -> np.ndarray:
    r"""The top class of ``mean``, or ``ABSTAIN`` unless its lower bound beats every other class's upper bound.

    ``mean`` and ``var`` (shape ``(..., K)``) are the sample mean and unbiased sample variance of ``n`` i.i.d.
    draws of a random vector in :math:`[0, 1]^K` with expectation :math:`g`. With :math:`\hat A` the argmax of
    ``mean`` (lowest index on ties) and Maurer–Pontil empirical-Bernstein bounds
    :math:`\underline g_c \le g_c \le \overline g_c` for *every* class, each of the :math:`2K` one-sided bounds at
    level :math:`\alpha/(2K)`, the answer is :math:`\hat A` if :math:`\underline g_{\hat A} > \max_{c \ne \hat A}
    \overline g_c`, else ``ABSTAIN``; also ``ABSTAIN`` where an input is not finite.

    Guarantee: with probability at least :math:`1 - \alpha` the answer is ``ABSTAIN`` or the unique
    :math:`\arg\max_c g_c`. Proof: all :math:`2K` bounds hold together with that probability (Bonferroni), and
    then :math:`g_{\hat A} \ge \underline g_{\hat A} > \overline g_c \ge g_c` for every :math:`c \ne \hat A`.
    Bounding every class (not only :math:`\hat A` and a runner-up) is what makes choosing :math:`\hat A` on the
    same draws harmless. Summation errors widen the bounds as in :mod:`stablenet.smoothing.lvm_radii`, Note
    [summation error].

    ``tv`` > 0 is for draws from a law within total variation ``tv`` of the one whose expectation :math:`g` is
    meant (grid noise, Note [grid noise] in :mod:`stablenet.smoothing.lvm`): each lower bound is lowered and
    each upper bound raised by ``tv`` (rounded outwards, clipped to [0, 1]), which keeps the guarantee for that
    :math:`g`, since a :math:`[0, 1]`-valued mean moves by at most ``tv`` between the two laws.

    Example:
        >>> soft_vote_decision(np.array([[0.7, 0.3], [0.505, 0.495]]), np.full((2, 2), 0.01), 10_000, 0.001)
        array([ 0, -1])
    """
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    if mean.shape != var.shape or mean.ndim < 1 or mean.shape[-1] < 2:
        raise ValueError(
            f"mean and var must have the same shape (..., K) with K >= 2 classes; got {mean.shape} and {var.shape}"
        )
    num_classes = mean.shape[-1]
    finite = np.isfinite(mean).all(axis=-1) & np.isfinite(var).all(axis=-1)
    mean = np.where(finite[..., None], mean, 0.5)
    var = np.where(finite[..., None], var, 0.25)
    slack = 4.0 * n * 2.0**-53
    var_hi = np.maximum(var, 0.0) + slack
    level = check_alpha(alpha) / (2 * num_classes)
    if isinstance(tv, (bool, np.bool_)) or not isinstance(tv, numbers.Real) or not 0 <= tv <= 1:
        raise ValueError(f"tv must be a number in [0, 1]; got {tv!r}")
    lower = empirical_bernstein_lower(np.clip(mean - slack, 0.0, 1.0), var_hi, n, level)
    upper = empirical_bernstein_upper(np.clip(mean + slack, 0.0, 1.0), var_hi, n, level)
    if tv > 0:
        lower = np.maximum(np.nextafter(lower - tv, -np.inf), 0.0)
        upper = np.minimum(np.nextafter(upper + tv, np.inf), 1.0)
    top = mean.argmax(axis=-1)
    lower_top = np.take_along_axis(lower, top[..., None], axis=-1)[..., 0]
    upper_other = np.where(np.arange(num_classes) == top[..., None], -np.inf, upper).max(axis=-1)
    return np.where(finite & (lower_top > upper_other), top, ABSTAIN)


def soft_predict(
    base_model: nn.Module,
    x: Tensor,
    sigma: float,
    n: int,
    alpha: float,
    batch_size: int,
    *,
    simplex_map: str = "softmax",
    inverse_temperature: float = 1.0,
    generator: int | torch.Generator | None = None,
    noise: str = "float",
    levels: int = 255,
) -> Tensor:
    r"""Monte-Carlo prediction of the smoothed soft classifier :math:`G(x) = \arg\max_c \mathbb E[h(s\,f(x +
    \delta))_c]`, or ``ABSTAIN``, per input.

    Guarantee, for each input separately: the probability (over the noise) that the answer is a class other
    than :math:`G(x)` is at most :math:`\alpha`; otherwise it is :math:`G(x)` or ``ABSTAIN`` (always ``ABSTAIN``,
    with that probability, where the top of :math:`g(x)` is tied).

    The mean and variance of :math:`h(s\,f(x + \delta))` over ``n`` noisy copies, then
    :func:`soft_vote_decision`. Inputs are not range-checked (a point found by an attack may leave the pixel
    box, and the smoothed classifier is defined everywhere). The base model runs in eval mode (Note [eval mode]
    in :mod:`stablenet.smoothing.arguments`).

    With ``noise="grid"`` the noise is :class:`~stablenet.smoothing.grid_noise.GridNoise` (inputs must lie on the
    grid ``k / levels``; a ``ValueError`` otherwise), :math:`G` is that of the grid base model
    :math:`f(\mathrm{round}(L\,\cdot)/L)` (what :class:`~stablenet.smoothing.lvm.LVMSmooth` certifies with the
    same noise), and the bounds of :func:`soft_vote_decision` are widened by the noise's ``tv_bound`` for one
    input, so the guarantee above holds for that :math:`G`.

    Args:
        base_model: maps ``(B, ...)`` inputs to ``(B, K)`` logits.
        x: inputs ``(N, ...)``, floating point.
        sigma: noise level, > 0.
        n: noisy copies per input, >= 2 (the empirical-Bernstein bound needs two).
        alpha: failure probability in (0, 1).
        batch_size: rows per forward pass, >= 1.
        simplex_map: one of :data:`~stablenet.smoothing.simplex.SIMPLEX_MAPS`.
        inverse_temperature: :math:`s > 0`.
        generator: ``None`` (fresh randomness), an int seed, or a ``torch.Generator`` on the model's device.
        noise: ``"float"`` or ``"grid"``, as in :class:`~stablenet.smoothing.lvm.LVMSmooth`.
        levels: grid steps per input unit for ``noise="grid"``; unused otherwise.

    Returns:
        A long tensor ``(N,)`` of classes or ``ABSTAIN``, on the model's device.

    Example:
        >>> model = nn.Linear(2, 3)
        >>> soft_predict(model, torch.rand(4, 2), 0.25, 1000, 0.001, 4000, simplex_map="sparsemax").shape
        torch.Size([4])
    """
    simplex_map, s = _check_map(simplex_map, inverse_temperature)
    n = check_count("n", n)
    if n < 2:
        raise ValueError(f"n must be an int >= 2 (the empirical-Bernstein bound needs 2 samples); got {n}")
    batch_size = check_count("batch_size", batch_size)
    alpha = check_alpha(alpha)
    if isinstance(sigma, (bool, np.bool_)) or not isinstance(sigma, numbers.Real) or not 0 < sigma < math.inf:
        raise ValueError(f"sigma must be a finite number > 0; got {sigma!r}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise ValueError(f"x must be a floating-point tensor of shape (N, ...); got {getattr(x, 'shape', x)!r}")
    if noise not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {', '.join(repr(k) for k in NOISE_KINDS)}; got {noise!r}")
    grid = GridNoise(float(sigma), levels) if noise == "grid" else None
    device = model_device(base_model, x.device)
    x = x.detach().to(device)
    if len(x) == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    gen = make_generator(generator, device)
    with eval_mode(base_model):
        mean, var = mean_and_variance(
            base_model, x, n, float(sigma), batch_size, gen, lambda z: simplex_scores(z, simplex_map, s), grid=grid
        )
    tv = 0.0 if grid is None else grid.tv_bound(math.prod(x.shape[1:]))
    decision = soft_vote_decision(mean.cpu().numpy(), var.cpu().numpy(), n, alpha, tv=tv)
    return torch.as_tensor(decision, dtype=torch.long).to(device)
