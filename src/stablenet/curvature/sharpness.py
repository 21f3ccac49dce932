r"""ε-sharpness: the largest loss increase within an :math:`\ell_2` ball around the weights.

Keskar et al., 2017 ("On Large-Batch Training for Deep Learning"), with an :math:`\ell_2` ball instead of a box:

.. math::

    S_\varepsilon(w) = \max_{\lVert \delta \rVert_2 \le \varepsilon} L(w + \delta) - L(w),

found by projected gradient ascent. For a quadratic :math:`L(w) = \tfrac12 (w - w^*)^\top A (w - w^*)` at
its minimum, :math:`S_\varepsilon(w^*) = \tfrac12 \varepsilon^2 \lambda_{\max}(A)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from stablenet.curvature.landscape_directions import _parameters
from stablenet.curvature.landscape_eval import Data, LossFn, _batches, _evaluate, _scope, _set_point

__all__ = ["epsilon_sharpness"]


def epsilon_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    epsilon: float,
    steps: int = 20,
    *,
    relative: bool = False,
    step_size: float | None = None,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> float:
    r"""Largest increase of the mean loss within an :math:`\ell_2` ball in parameter space.

    .. math::

        S_\varepsilon(w) = \max_{\lVert \delta \rVert_2 \le r} L(w + \delta) - L(w), \qquad
        r = \varepsilon \ \text{(absolute)} \quad\text{or}\quad r = \varepsilon \lVert w \rVert_2
        \ \text{(``relative=True``)},

    over all parameters that require grad (biases included), with the model in eval mode. Projected
    normalised gradient ascent: from a random point at radius :math:`r/2` (a zero start would stall at a
    critical point), :math:`\delta \leftarrow \Pi_r(\delta + \eta\, g / \lVert g \rVert)` with
    :math:`g = \nabla L(w + \delta)` and :math:`\eta = r/2` by default. The result is the best increase seen,
    a lower bound on :math:`S_\varepsilon` that is at least 0 (:math:`\delta = 0` is feasible). For a quadratic
    at its minimum the ascent is a shifted power iteration and reaches
    :math:`\tfrac12 r^2 \lambda_{\max}(A)`.

    Args:
        model: The network; weights and modes are restored exactly afterwards.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean (differentiable).
        data: An ``(inputs, targets)`` pair or an iterable of pairs.
        epsilon: Radius (``>= 0``).
        steps: Gradient-ascent steps.
        relative: Radius :math:`\varepsilon \lVert w \rVert_2` instead of :math:`\varepsilon`.
        step_size: :math:`\eta`; default ``r / 2``.
        batch_size: Examples per forward pass (pairs only).
        generator: Seeds the random start; ``None`` means ``torch.Generator().manual_seed(0)``.

    Returns:
        The loss increase (a float ``>= 0``).
    """
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite number >= 0; got {epsilon}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if step_size is not None and not (step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"step_size must be None or a finite number > 0; got {step_size}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    batches = _batches(data, batch_size, _parameters(model)[0].device)
    count = sum(len(x) for x, _ in batches)
    with _scope(model) as (params, originals), torch.enable_grad():
        base, _ = _evaluate(model, loss_fn, batches)
        radius = epsilon * math.sqrt(sum(float(w.double().square().sum()) for w in originals)) if relative else epsilon
        if radius == 0.0:
            return 0.0
        eta = radius / 2 if step_size is None else float(step_size)

        def norm(ts: Sequence[Tensor]) -> float:
            return math.sqrt(sum(float(t.double().square().sum()) for t in ts))

        start = [torch.randn(w.shape, generator=generator, device=generator.device, dtype=w.dtype) for w in originals]
        scale = radius / 2 / max(norm(start), 1e-30)
        delta = [s.to(w.device) * scale for s, w in zip(start, originals, strict=True)]
        best = 0.0
        for _ in range(steps + 1):
            _set_point(params, originals, [delta], [1.0])
            total = 0.0
            grads = [torch.zeros_like(w) for w in originals]
            for x, y in batches:
                loss = loss_fn(model(x), y) * (len(x) / count)
                total += float(loss.detach())
                for g, gi in zip(grads, torch.autograd.grad(loss, params, allow_unused=True), strict=True):
                    if gi is not None:
                        g.add_(gi)
            best = max(best, total - base)
            g_norm = norm(grads)
            if g_norm == 0.0:
                break
            delta = [d + (eta / g_norm) * g for d, g in zip(delta, grads, strict=True)]
            d_norm = norm(delta)
            if d_norm > radius:
                delta = [d * (radius / d_norm) for d in delta]
    return best
