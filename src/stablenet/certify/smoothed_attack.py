r"""Attacking smoothed classifiers: a differentiable surrogate for PGD, and moving a point onto an input grid.

A smoothed classifier has no usable gradient, so attacks run PGD (:func:`stablenet.certify.attack.pgd_l2`) on
:class:`ExpectedScores`, a Monte-Carlo surrogate with fresh noise at every step. Grid-noise certificates are about
a classifier of grid points, so a point an attack finds is moved onto the grid by :func:`onto_grid` before it is
checked. ``stablenet.workflows.verification`` uses both to check certification records.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stablenet.smoothing.soft import simplex_scores

__all__ = ["ExpectedScores", "onto_grid"]


class ExpectedScores(nn.Module):
    r"""A differentiable surrogate of a smoothed classifier: ``log mean_i h(s f(x + sigma delta_i))`` over
    ``draws`` fresh noise draws per call (expectation over transformation, as in SmoothAdv), ``h`` a simplex map
    (:func:`~stablenet.smoothing.soft.simplex_scores`; softmax at ``s = 1`` for hard votes), computed in float64
    and returned in the input's dtype. Maximising its margin searches for a point where the smoothed classifier
    changes its mind; what it finds must still be checked by the classifier's own Monte-Carlo ``predict``."""

    def __init__(
        self, base: nn.Module, sigma: float, draws: int, generator: torch.Generator, simplex_map: str, s: float
    ) -> None:
        super().__init__()
        self.base, self.sigma, self.draws, self.generator = base, sigma, draws, generator
        self.simplex_map, self.s = simplex_map, s

    def forward(self, x: Tensor) -> Tensor:
        batch = x.repeat_interleave(self.draws, dim=0)
        noise = torch.randn(batch.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        scores = simplex_scores(self.base(batch + self.sigma * noise), self.simplex_map, self.s)
        mean = scores.view(len(x), self.draws, -1).mean(dim=1)
        return mean.clamp_min(torch.finfo(mean.dtype).tiny).log().to(x.dtype)


def onto_grid(x: Tensor, x_adv: Tensor, steps: Tensor, levels: int, eps: Tensor) -> tuple[Tensor, list[str]]:
    """``x_adv`` moved onto the grid ``k / levels`` within ``[0, 1]`` and within ``eps`` of ``x`` (whose grid steps
    are ``steps``), and the rounding used per row: the nearest grid point when it stays within ``eps``, else each
    coordinate rounded toward ``x`` (never further from it than ``x_adv``). A grid-noise certificate's classifier
    is evaluated on the grid (Note [grid records] in ``stablenet.workflows.verification``)."""
    k = steps.to(torch.float64)
    move = (x_adv.detach().to(torch.float64) - x.to(torch.float64)) * levels
    nearest = (k + move).round().clamp(0, levels)
    # |trunc(m)| <= |m| per coordinate, and clipping to [0, levels] moves towards k: never further than x_adv.
    toward = (k + move.trunc()).clamp(0, levels)
    inside = (nearest - k).flatten(1).norm(dim=1) / levels <= eps.to(device=k.device, dtype=torch.float64)
    chosen = torch.where(inside.view(-1, *[1] * (x.dim() - 1)), nearest, toward)
    return (chosen / levels).to(x.dtype), ["nearest" if i else "toward input" for i in inside.tolist()]
