r"""Last-layer normalisation (LLN): a linear head whose rows have unit norm.

.. math:: f_j(x) = \frac{w_j^\top x}{\|w_j\|} + b_j

After a 1-Lipschitz body :math:`\varphi`, the margin :math:`f_y - f_j` is
:math:`\|w_y - w_j\|`-Lipschitz in :math:`\varphi(x)`, which gives the pairwise certificate of
``stablenet.certify.lipschitz`` (tighter than :math:`\sqrt2\,L`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablenet.nn.base import WeightCache, at_least_float32
from stablenet.spectral.dense import spectral_norm_upper_bound
from stablenet.spectral.rounding import (
    EVAL_SLACK,
    RoundingBound,
    gamma,
    linear_rounding,
    max_input_norm,
    pairwise_distance_upper_bounds,
    smallest_normal,
)

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
        return F.linear(x, self.used_weight().to(x.dtype), self.bias)

    def used_weight(self) -> Tensor:
        """The normalised weight ``forward`` multiplies by (the cached one in eval mode: Note [eval cache] in
        ``stablenet.nn.base``); every bound below is computed from it, so bounds and forward always agree."""
        return self._cache.get(self, [self.weight], self.normalized_weight)

    def lipschitz_bound(self) -> float:
        """Certified upper bound on the spectral norm of the normalised weight (at most sqrt(out_features))."""
        with torch.no_grad():
            return float(spectral_norm_upper_bound(self.used_weight()))

    def pairwise_distance_bounds(self) -> Tensor:
        r"""Float64 upper bounds on :math:`\|w_i - w_j\|` for the rows ``forward`` uses (proven:
        :func:`~stablenet.spectral.rounding.pairwise_distance_upper_bounds`)."""
        with torch.no_grad():
            return pairwise_distance_upper_bounds(self.used_weight())

    def rounding_bound(self, input_shape: Sequence[int], dtype: torch.dtype) -> RoundingBound:
        """How far ``forward`` in ``dtype`` can be from the exact map with the rows it uses (in l2 over all
        logits; ``stablenet.spectral.rounding``)."""
        with torch.no_grad():
            return linear_rounding(self.used_weight(), self.bias, tuple(input_shape), dtype)

    def logit_rounding(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, float]:
        r"""Per-logit rounding of ``forward`` on one ``(in_features,)`` input: ``(relative, absolute, max_norm)``
        with :math:`|\tilde f_i(z) - f_i(z)| \le \texttt{relative}_i \|z\| + \texttt{absolute}_i` for
        :math:`\|z\| \le` ``max_norm``.

        Each logit is one dot product of length :math:`n` plus the bias (Note [rounding model] in
        ``stablenet.spectral.rounding``): within :math:`\gamma_{n+1}(\|w_i\|\,\|z\| + |b_i|)`, plus underflow
        (products and sums, and inputs or weights flushed to zero).
        """
        with torch.no_grad():
            w = self.used_weight().detach().to(torch.float64)
            n = self.in_features
            g, eta = gamma(n + 1, dtype), smallest_normal(dtype)
            rows = w.norm(dim=1) * (1.0 + EVAL_SLACK + n * 2.0**-52)
            bias = torch.zeros_like(rows) if self.bias is None else self.bias.detach().to(torch.float64).abs()
            peak = float(w.abs().max()) if w.numel() else 0.0
            relative = (g * rows + eta * math.sqrt(n)) * (1.0 + EVAL_SLACK)
            absolute = (g * bias + eta * (n * peak + 4.0 * (n + 1))) * (1.0 + EVAL_SLACK)
            limit = max_input_norm(float(rows.max()) * (1.0 + g), float(bias.max()) * (1.0 + g), dtype)
            return relative, absolute, limit
