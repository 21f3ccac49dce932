r"""SDP-based Lipschitz Layers (SLL), the corrected formulation (Araujo et al., ICLR 2023, arXiv 2303.03169 v2).

A residual layer

.. math::
    h(x) = x - 2\, W^\top \operatorname{diag}(t)\, \mathrm{ReLU}(W x + b), \qquad
    t_i = \Big(\sum_j |W W^\top|_{ij}\, q_j / q_i\Big)^{-1},\quad q = \exp(\texttt{q\_log}) > 0,

is 1-Lipschitz for any :math:`W, b, q`: :math:`\operatorname{diag}(1/t) \succeq W W^\top` (a weighted
Gershgorin bound), and the activation has slopes in :math:`[0, 1]`.

Pitfalls of published code that this file avoids: ``q`` is broadcast over the inner (output) dimension so
it does not cancel; no epsilon is added to the denominator (that breaks the bound); the reciprocal is safe
(a zero row of ``W`` gets ``t = 0``, and a smaller ``t`` only strengthens the bound).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablenet.nn.base import LAYER_ROUNDING_SLACK, WeightCache, at_least_float32

__all__ = ["SLLLinear", "sll_rescaling"]


def sll_rescaling(gram_abs: Tensor, q_log: Tensor) -> Tensor:
    r"""The SLL scaling :math:`t_i = q_i / \sum_j |WW^\top|_{ij} q_j`, computed without overflow.

    ``q`` is shifted by its maximum first (the ratio is scale-invariant), so ``exp`` never overflows; an
    underflowing :math:`q_i` gives :math:`t_i = 0`, which is sound.

    Args:
        gram_abs: ``(k, k)`` non-negative matrix :math:`|W W^\top|` (or any upper bound of it entrywise).
        q_log: ``(k,)`` free log-weights.
    """
    q = torch.exp(q_log - q_log.max().detach())
    denom = gram_abs @ q
    positive = denom > 0
    return torch.where(positive, q / torch.where(positive, denom, torch.ones_like(denom)), torch.zeros_like(q))


class SLLLinear(nn.Module):
    r"""Dense SLL residual layer, 1-Lipschitz by construction.

    Args:
        features: input and output size (the layer is residual).
        inner_features: rows of :math:`W` (default ``features``).
        bias: learn :math:`b`.

    Example:
        >>> layer = SLLLinear(8, 16).double()
        >>> x = torch.randn(8, dtype=torch.float64)
        >>> J = torch.autograd.functional.jacobian(layer, x)
        >>> bool(torch.linalg.matrix_norm(J, 2) <= 1 + 1e-12)
        True
    """

    def __init__(
        self,
        features: int,
        inner_features: int | None = None,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if features < 1:
            raise ValueError(f"features must be >= 1; got {features}")
        inner = features if inner_features is None else inner_features
        if inner < 1:
            raise ValueError(f"inner_features must be >= 1; got {inner}")
        kw = {"device": device, "dtype": dtype}
        self.features, self.inner_features = features, inner
        self.weight = nn.Parameter(torch.empty(inner, features, **kw))
        self.bias = nn.Parameter(torch.empty(inner, **kw)) if bias else None
        self.q_log = nn.Parameter(torch.zeros(inner, **kw))
        self._cache = WeightCache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.weight)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.features)
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.q_log)
        self._cache.clear()

    def rescaling(self) -> Tensor:
        """The vector :math:`t` (computed in at least float32, also under autocast)."""
        with torch.autocast(self.weight.device.type, enabled=False):
            w = at_least_float32(self.weight)
            return sll_rescaling((w @ w.T).abs(), at_least_float32(self.q_log))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.features:
            raise ValueError(f"SLLLinear expects inputs with last dimension {self.features}; got {tuple(x.shape)}")
        params = [self.weight, self.q_log]
        t = self._cache.get(self, params, self.rescaling)
        z = F.linear(x, self.weight, self.bias)
        h = torch.relu(z) * t.to(z.dtype)
        return x - 2.0 * F.linear(h, self.weight.T)

    def lipschitz_bound(self) -> float:
        """``1 + LAYER_ROUNDING_SLACK`` (see Note [rounding slack] in ``stablenet.nn.base``)."""
        return 1.0 + LAYER_ROUNDING_SLACK

    def extra_repr(self) -> str:
        return f"features={self.features}, inner_features={self.inner_features}, bias={self.bias is not None}"
