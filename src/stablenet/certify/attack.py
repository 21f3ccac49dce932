r"""PGD in l2 with a margin loss: the empirical check that certified predictions do not change.

Maximises :math:`\max_{j\ne c} f_j(x+\delta) - f_c(x+\delta)` over :math:`\|\delta\|_2 \le \varepsilon_i`
(a radius per example), with normalised-gradient steps, a step size that decays from
:math:`2\varepsilon/\sqrt{\text{steps}}` (cosine), random starts inside the ball, and several restarts.
An attack finding nothing proves nothing; an attack that flips a certified prediction proves the
certificate wrong, which is what the tests look for.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["pgd_l2"]


def _flat_norm(x: Tensor) -> Tensor:
    return x.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))


def pgd_l2(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    radius: Tensor | float,
    *,
    steps: int = 50,
    restarts: int = 3,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Search the l2 ball of ``radius`` around each input for a point where the prediction is not ``target``.

    Args:
        model: classifier (its parameters are not modified).
        x: ``(N, ...)`` inputs.
        target: ``(N,)`` classes to move away from (usually the certified predictions).
        radius: per-example radii ``(N,)`` or one radius.
        steps: gradient steps per restart.
        restarts: random restarts (the first starts at ``x``).
        generator: for the random starts.

    Returns:
        ``(x_adv, flipped)``: the best point found per example and whether its prediction differs from
        ``target``.
    """
    if steps < 1 or restarts < 1:
        raise ValueError(f"steps and restarts must be >= 1; got {steps} and {restarts}")
    radius = torch.as_tensor(radius, dtype=x.dtype, device=x.device).expand(len(x))
    shape = (-1, *([1] * (x.dim() - 1)))
    eps = radius.view(shape)
    best = x.clone()
    best_margin = torch.full((len(x),), -math.inf, device=x.device)
    flipped = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for restart in range(restarts):
            if restart == 0:
                delta = torch.zeros_like(x)
            else:
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
                u = torch.rand(len(x), generator=generator, dtype=x.dtype).to(x.device).view(shape)
                delta = noise / _flat_norm(noise) * eps * u ** (1.0 / x[0].numel())
            for step in range(steps + 1):
                delta.requires_grad_(True)
                logits = model(x + delta)
                true = logits.gather(1, target[:, None]).squeeze(1)
                other = logits.scatter(1, target[:, None], -math.inf).amax(dim=1)
                margin = other - true
                with torch.no_grad():
                    improved = margin.detach() > best_margin
                    best_margin = torch.where(improved, margin.detach(), best_margin)
                    best[improved] = (x + delta.detach())[improved]
                    flipped |= logits.argmax(1) != target
                if step == steps:
                    break
                (grad,) = torch.autograd.grad(margin.sum(), delta)
                lr = 2.0 * eps / math.sqrt(steps) * 0.5 * (1 + math.cos(math.pi * step / steps)) + 1e-3 * eps
                with torch.no_grad():
                    delta = delta.detach() + lr * grad / _flat_norm(grad)
                    delta = delta * torch.clamp(eps / _flat_norm(delta), max=1.0)
    finally:
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
    return best, flipped
