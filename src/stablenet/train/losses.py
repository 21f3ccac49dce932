r"""Losses for Lipschitz training, by name.

* ``ce``: cross-entropy.
* ``offset_ce``: :math:`\tau\,\mathrm{CE}((z - u\,e_y)/\tau)`: cross-entropy on logits whose true class is
  handicapped by an offset :math:`u`, which pushes margins beyond :math:`u` (SLL used :math:`u = 1.5\sqrt2`,
  :math:`\tau = 0.25` on CIFAR-10). With an LLN head and a 1-Lipschitz body the radius is at least
  margin / 2, so :math:`u \approx 2\varepsilon` targets radius :math:`\varepsilon`.
* ``hinge``: multi-class hinge :math:`\sum_{j\ne y}\max(0, u - (z_y - z_j))`, averaged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

__all__ = ["LOSSES", "create_loss", "multiclass_hinge", "offset_cross_entropy"]


def offset_cross_entropy(logits: Tensor, target: Tensor, offset: float, temperature: float) -> Tensor:
    shifted = logits - offset * F.one_hot(target, logits.shape[1]).to(logits.dtype)
    return temperature * F.cross_entropy(shifted / temperature, target)


def multiclass_hinge(logits: Tensor, target: Tensor, offset: float) -> Tensor:
    true = logits.gather(1, target[:, None])
    violations = (offset - (true - logits)).clamp_min(0.0)
    violations = violations.scatter(1, target[:, None], 0.0)
    return violations.sum(dim=1).mean()


LOSSES = ("ce", "hinge", "offset_ce")


def create_loss(name: str, offset: float = 0.0, temperature: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss ``name`` as a function ``(logits, target) -> scalar``."""
    if name == "ce":
        return F.cross_entropy
    if name == "offset_ce":
        return lambda z, y: offset_cross_entropy(z, y, offset, temperature)
    if name == "hinge":
        return lambda z, y: multiclass_hinge(z, y, offset)
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {name!r}")
