r"""Simplex maps: from scaled logits to points of the probability simplex, by name.

LVM-RS (:mod:`stablenet.smoothing.lvm`) and the soft classifiers of :mod:`stablenet.smoothing.soft` smooth
:math:`h(s\,z)` for one of these maps :math:`h` at an inverse temperature :math:`s > 0`; a map must return
values in [0, 1], which is all the bounds on its smoothed mean need.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["SIMPLEX_MAPS", "sparsemax"]


def sparsemax(z: Tensor, dim: int = -1) -> Tensor:
    r"""Euclidean projection of ``z`` onto the probability simplex along ``dim`` (Martins & Astudillo 2016).

    .. math:: \mathrm{sparsemax}(z) = \arg\min_{p \in \Delta^{K-1}} \|p - z\|_2 = (z - \tau(z))_+,

    where, with :math:`z_{(1)} \ge \dots \ge z_{(K)}` sorted and :math:`k^* = \max\{k : 1 + k z_{(k)} >
    \sum_{j \le k} z_{(j)}\}`, the threshold is :math:`\tau = (\sum_{j \le k^*} z_{(j)} - 1)/k^*`. Unlike softmax it
    returns exact zeros. Batched over all other dimensions.

    Example:
        >>> sparsemax(torch.tensor([2.0, 0.5, 0.0]))  # a far-ahead coordinate takes all the mass
        tensor([1., 0., 0.])
    """
    z = z.movedim(dim, -1)
    # Translation invariance: subtracting the max keeps the cumulative sums small and accurate.
    z = z - z.amax(dim=-1, keepdim=True)
    z_sorted = torch.sort(z, dim=-1, descending=True).values
    cumsum = z_sorted.cumsum(dim=-1)
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    support = (1 + k * z_sorted > cumsum).sum(dim=-1, keepdim=True).clamp_min(1)
    tau = (cumsum.gather(-1, support - 1) - 1) / support.to(z.dtype)
    return (z - tau).clamp_min(0).movedim(-1, dim)


def _softmax(z: Tensor) -> Tensor:
    return torch.softmax(z, dim=-1)


SIMPLEX_MAPS: dict[str, Callable[[Tensor], Tensor]] = {"softmax": _softmax, "sparsemax": sparsemax}
"""Maps from ``(..., K)`` scaled logits to points of the simplex, by name. A map must return values in [0, 1]."""
