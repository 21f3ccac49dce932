r"""Last-layer normalisation (LLN): a linear head whose rows have unit norm.

.. math:: f_j(x) = \frac{w_j^\top x}{\|w_j\|} + b_j

After a 1-Lipschitz body :math:`\varphi`, the margin :math:`f_y - f_j` is
:math:`\|w_y - w_j\|`-Lipschitz in :math:`\varphi(x)`, which gives the pairwise certificate of
``stablenet.certify.lipschitz`` (tighter than :math:`\sqrt2\,L`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablenet.nn.base import WeightCache, at_least_float32
from stablenet.spectral.dense import GRAM_ROUNDING_SLACK, spectral_norm_upper_bound

__all__ = ["LinearNormalized"]


class LinearNormalized(nn.Linear):
    """``nn.Linear`` with each weight row divided by its l2 norm (zero rows stay zero).

    Example:
        >>> head = LinearNormalized(16, 10)
        >>> torch.allclose(head.normalized_weight().norm(dim=1), torch.ones(10))
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._cache = WeightCache()

    def normalized_weight(self) -> Tensor:
        with torch.autocast(self.weight.device.type, enabled=False):
            w = at_least_float32(self.weight)
            norms = w.norm(dim=1, keepdim=True)
            return w / norms.clamp_min(torch.finfo(w.dtype).tiny)

    def forward(self, x: Tensor) -> Tensor:
        w = self._cache.get(self, [self.weight], self.normalized_weight)
        return F.linear(x, w.to(x.dtype), self.bias)

    def lipschitz_bound(self) -> float:
        """Certified upper bound on the spectral norm of the normalised weight (at most sqrt(out_features))."""
        return float(spectral_norm_upper_bound(self.normalized_weight()))

    def pairwise_distance_bounds(self) -> Tensor:
        r"""Float64 upper bounds on :math:`\|w_i - w_j\|` for the rows actually used in ``forward``.

        Computed in float64 from the float weights and inflated by a relative ``GRAM_ROUNDING_SLACK``.
        """
        with torch.no_grad():
            w = self.normalized_weight().to(torch.float64)
            dist = torch.cdist(w[None], w[None])[0]
            return dist * (1.0 + GRAM_ROUNDING_SLACK) + math.ulp(1.0)
