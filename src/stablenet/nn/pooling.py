r"""1-Lipschitz pooling: average pooling rescaled to operator norm at most 1, and l2-norm pooling.

**Average pooling.** With square :math:`k \times k` windows and stride :math:`s`, sum pooling is separable,
:math:`S = S_h \otimes S_w`, where :math:`S_h` has :math:`k` ones per row and at most :math:`c = \lceil k/s \rceil`
ones per column. By the Schur test :math:`\|S_h\| \le \sqrt{k c}`, so :math:`\|S\| \le k c` and

.. math:: \mathrm{LipAvgPool}(x) = \frac{1}{k\,\lceil k/s \rceil} \sum_{\text{window}} x

has operator norm at most 1. For non-overlapping windows (:math:`s \ge k`, the default :math:`s = k`) the
divisor is :math:`k` and the norm is exactly 1 (orthogonal rows of norm :math:`\sqrt{k^2}/k`); plain average
pooling (divisor :math:`k^2`) has norm :math:`1/k` there, so it wastes a factor :math:`k` of margin. For
overlapping windows the norm depends on the input size and is below 1 in general (the Schur test is tight only
for periodic inputs); the divisor keeps the guarantee for every size.

**l2-norm pooling** :math:`x \mapsto (\|x_w\|_2)_w` over windows :math:`w`: each window's norm is 1-Lipschitz,
and with disjoint windows :math:`\sum_w (\|x_w\| - \|y_w\|)^2 \le \sum_w \|x_w - y_w\|^2 \le \|x - y\|^2`.
Overlapping windows (stride :math:`s < k`) count each pixel up to :math:`\lceil k/s \rceil^2` times, giving the
constant :math:`\lceil k/s \rceil`; we reject them rather than rescale (``nn.LPPool2d`` could not export the
rescaled map).

Both expose ``lipschitz_bound()`` (``1 + LAYER_ROUNDING_SLACK``, Note [rounding slack] in
``stablenet.nn.base``) and ``export()`` to plain torch pooling modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablenet.nn.base import LAYER_ROUNDING_SLACK
from stablenet.spectral.rounding import RoundingBound, gamma, max_input_norm, overflow_limit, smallest_normal

__all__ = ["L2NormPool2d", "LipAvgPool2d"]


def _window(kernel_size: int, stride: int | None, name: str) -> tuple[int, int]:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"{name} needs kernel_size, a positive int (square windows); got {kernel_size!r}")
    stride = kernel_size if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"{name} needs stride, a positive int or None (= kernel_size); got {stride!r}")
    return kernel_size, stride


def _pooled_outputs(input_shape: Sequence[int], k: int, s: int) -> int:
    """Outputs per example of a ``k x k`` window with stride ``s`` (no padding, floor mode) on ``(C, H, W)``."""
    c, h, w = (int(v) for v in input_shape[-3:])
    return c * max(0, (h - k) // s + 1) * max(0, (w - k) // s + 1)


def _check_input(x: Tensor, k: int, name: str) -> None:
    if x.dim() != 4 or x.shape[-1] < k or x.shape[-2] < k:
        raise ValueError(f"{name}(kernel_size={k}) expects inputs (N, C, H, W) with H, W >= {k}; got {tuple(x.shape)}")


class LipAvgPool2d(nn.Module):
    r"""Average pooling divided by :math:`k \lceil k/s \rceil` instead of :math:`k^2`: operator norm at most 1.

    Non-overlapping windows (the default, ``stride = kernel_size``) give sum pooling divided by :math:`k`, which
    is exactly ``nn.AvgPool2d(k, divisor_override=k)`` as in the SLL networks (Araujo et al., ICLR 2023).

    Args:
        kernel_size: side :math:`k` of the square window.
        stride: step :math:`s` (default :math:`k`); no padding, floor mode (trailing pixels are dropped).

    Example:
        >>> pool = LipAvgPool2d(2)
        >>> pool(torch.ones(1, 1, 4, 4))  # each output: (1 + 1 + 1 + 1) / 2
        tensor([[[[2., 2.],
                  [2., 2.]]]])
    """

    def __init__(self, kernel_size: int, stride: int | None = None) -> None:
        super().__init__()
        self.kernel_size, self.stride = _window(kernel_size, stride, "LipAvgPool2d")
        overlap = -(-self.kernel_size // self.stride)
        self.divisor = self.kernel_size * overlap

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.kernel_size, "LipAvgPool2d")
        return F.avg_pool2d(x, self.kernel_size, self.stride, divisor_override=self.divisor)

    def lipschitz_bound(self) -> float:
        """``1 + LAYER_ROUNDING_SLACK`` (exact norm 1 for non-overlapping windows, at most 1 otherwise)."""
        return 1.0 + LAYER_ROUNDING_SLACK

    def rounding_bound(self, input_shape: Sequence[int], dtype: torch.dtype) -> RoundingBound:
        r"""Each output is a sum of :math:`k^2` inputs, then divided: within :math:`\gamma_{k^2+2}` of the exact
        value relative to the same sum of absolute values (Note [rounding model] in
        ``stablenet.spectral.rounding``). The pooling matrix is non-negative, so that sum has l2 norm at most the
        operator norm (:math:`\le 1`) times :math:`\|z\|`."""
        terms = self.kernel_size**2
        outputs = _pooled_outputs(input_shape, self.kernel_size, self.stride)
        g = gamma(terms + 2, dtype)
        absolute = smallest_normal(dtype) * math.sqrt(outputs) * (terms + 2)
        # a window sum is at most k ||z|| (Cauchy-Schwarz on k^2 entries)
        return RoundingBound(g, absolute, max_input_norm(self.kernel_size * (1.0 + g), 0.0, dtype))

    def export(self) -> nn.AvgPool2d:
        """``nn.AvgPool2d(k, s, divisor_override=k * ceil(k / s))``: the same map in plain torch."""
        return nn.AvgPool2d(self.kernel_size, self.stride, divisor_override=self.divisor).train(self.training)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, divisor={self.divisor}"


class L2NormPool2d(nn.Module):
    r"""The l2 norm of each window, :math:`\sqrt{\sum_{\text{window}} x^2}`; non-overlapping windows only.

    The gradient at a window that is exactly zero is taken as 0 (a valid subgradient of the norm), so training
    never produces NaN there; ``nn.LPPool2d``, which :meth:`export` returns, gives NaN gradients at such windows
    (its forward values match).

    Args:
        kernel_size: side :math:`k` of the square window.
        stride: step :math:`s \ge k` (default :math:`k`); ``s < k`` raises (the constant would be
            :math:`\lceil k/s \rceil`).

    Example:
        >>> L2NormPool2d(2)(torch.tensor([[[[3.0, 0.0], [0.0, 4.0]]]]))
        tensor([[[[5.]]]])
    """

    def __init__(self, kernel_size: int, stride: int | None = None) -> None:
        super().__init__()
        self.kernel_size, self.stride = _window(kernel_size, stride, "L2NormPool2d")
        if self.stride < self.kernel_size:
            k, s = self.kernel_size, self.stride
            raise ValueError(
                f"L2NormPool2d needs non-overlapping windows, stride >= kernel_size ({k}); got stride {s}, whose "
                f"overlapping windows make the map {-(-k // s)}-Lipschitz"
            )

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.kernel_size, "L2NormPool2d")
        squares = F.avg_pool2d(x * x, self.kernel_size, self.stride, divisor_override=1)
        # Note: sqrt has an infinite derivative at 0; route zero windows through a constant so their gradient is 0.
        positive = squares > 0
        safe = torch.where(positive, squares, torch.ones_like(squares))
        return torch.where(positive, safe.sqrt(), torch.zeros_like(squares))

    def lipschitz_bound(self) -> float:
        """``1 + LAYER_ROUNDING_SLACK`` (see Note [rounding slack] in ``stablenet.nn.base``)."""
        return 1.0 + LAYER_ROUNDING_SLACK

    def rounding_bound(self, input_shape: Sequence[int], dtype: torch.dtype) -> RoundingBound:
        r"""The squares and their sum (positive terms) are within :math:`\gamma_{k^2}` relatively, the root adds one
        rounding, so each output is within :math:`\gamma_{k^2+2}` of its value, and the outputs' l2 norm is at most
        :math:`\|z\|` (disjoint windows). Squares that underflow move a sum by at most :math:`k^2\eta_{\min}`,
        its root by at most :math:`k\sqrt{\eta_{\min}}`."""
        k = self.kernel_size
        outputs = _pooled_outputs(input_shape, k, self.stride)
        g = gamma(k * k + 2, dtype)
        absolute = 2.0 * k * math.sqrt(smallest_normal(dtype)) * math.sqrt(outputs)
        return RoundingBound(g, absolute, math.sqrt(overflow_limit(dtype) / (1.0 + g)))

    def export(self) -> nn.LPPool2d:
        """``nn.LPPool2d(2, k, s)``: the same outputs, but NaN gradients at all-zero windows (inference only)."""
        return nn.LPPool2d(2, self.kernel_size, self.stride).train(self.training)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"
