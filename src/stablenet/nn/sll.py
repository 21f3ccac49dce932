r"""SDP-based Lipschitz Layers (SLL), the corrected formulation (Araujo et al., ICLR 2023, arXiv 2303.03169 v2).

A residual layer

.. math::
    h(x) = x - 2\, W^\top \operatorname{diag}(t)\, \mathrm{ReLU}(W x + b), \qquad
    t_i = \Big(\sum_j |W W^\top|_{ij}\, q_j / q_i\Big)^{-1},\quad q = \exp(\texttt{q\_log}) > 0,

is 1-Lipschitz for any :math:`W, b, q`: :math:`\operatorname{diag}(1/t) \succeq W W^\top` (a weighted
Gershgorin bound), and the activation has slopes in :math:`[0, 1]`.

For the convolutional layer :class:`SLLConv2d`, :math:`W` is the convolution :math:`C` with kernel
:math:`K` (``inner x channels x k x k``, "same" padding, zero or circular) and :math:`t` is shared by the
pixels of an inner channel. :math:`CC^\top` is then bounded through the kernel :math:`G` of
:math:`CC^\top` on an unbounded input (``conv_gram_kernel``), summed in absolute value over offsets:

.. math::
    t_i = q_i \Big/ \sum_j \Big(\sum_{u,v} |G_{ij}[u, v]|\Big) q_j ,

a weighted Schur bound valid for both paddings and every input size (``stablenet.spectral.rescaling``).

Pitfalls of published code that this file avoids: ``q`` is broadcast over the inner (output) dimension so
it does not cancel; no epsilon is added to the denominator (that breaks the bound); the reciprocal is safe
(a zero row of ``W`` gets ``t = 0``, and a smaller ``t`` only strengthens the bound); the padding is
``k // 2`` for every odd kernel size, not hard-coded for 3x3 kernels.

# Note [conv adjoint]
The transposed operator must be the exact adjoint of the forward convolution, else the Jacobian is not
symmetric and the bound does not apply. With stride 1, an odd kernel and padding :math:`p = k // 2`, the
adjoint of the cross-correlation with :math:`K` is the cross-correlation, with the same padding, with the
kernel flipped in space and with its channel axes swapped (:math:`K'_{c,o,u} = K_{o,c,k-1-u}`, and
:math:`k - 1 = 2p`). For zero padding that is ``conv_transpose2d(padding=p)``; for circular padding a
circular conv with the flipped kernel (tested as :math:`\langle Cx, y\rangle = \langle x, C^\top y\rangle`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablenet.nn.base import LAYER_ROUNDING_SLACK, WeightCache, at_least_float32
from stablenet.nn.constrained import check_odd_kernel, check_padding_mode
from stablenet.nn.residual import Residual
from stablenet.spectral.rescaling import conv_gram_kernel

__all__ = ["SLLConv2d", "SLLLinear", "sll_rescaling"]


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
        """The vector :math:`t`, computed in float64 and returned in at least float32 (Note [constraint precision])."""
        with torch.autocast(self.weight.device.type, enabled=False):
            w = self.weight.to(torch.float64)
            t = sll_rescaling((w @ w.T).abs(), self.q_log.to(torch.float64))
            return t.to(at_least_float32(self.weight).dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.features:
            raise ValueError(f"SLLLinear expects inputs with last dimension {self.features}; got {tuple(x.shape)}")
        back = self._cache.get(self, [self.weight, self.q_log], self.back_weight)
        h = torch.relu(F.linear(x, self.weight, self.bias))
        return x + F.linear(h, back.to(h.dtype))

    def back_weight(self) -> Tensor:
        r"""The second factor :math:`-2 W^\top \operatorname{diag}(t)`, cached in eval (see Note [folded scaling])."""
        t = self.rescaling()
        with torch.autocast(self.weight.device.type, enabled=False):
            return -2.0 * at_least_float32(self.weight).T * t

    def lipschitz_bound(self) -> float:
        """``1 + LAYER_ROUNDING_SLACK`` (see Note [rounding slack] in ``stablenet.nn.base``)."""
        return 1.0 + LAYER_ROUNDING_SLACK

    def export(self) -> Residual:
        r"""``Residual(Sequential(Linear(W, b), ReLU(), Linear(-2 W^T diag(t))))``: plain torch, same outputs."""
        with torch.no_grad():
            w = self.weight.detach()
            back = self.back_weight().to(w.dtype)
            return _plain_residual(
                nn.Linear(self.features, self.inner_features, self.bias is not None, w.device, w.dtype),
                nn.Linear(self.inner_features, self.features, False, w.device, w.dtype),
                w,
                self.bias,
                back,
            ).train(self.training)

    def extra_repr(self) -> str:
        return f"features={self.features}, inner_features={self.inner_features}, bias={self.bias is not None}"


def _plain_residual(first: nn.Module, second: nn.Module, weight: Tensor, bias: Tensor | None, back: Tensor) -> Residual:
    """``Residual(Sequential(first, ReLU(), second))`` with the given weights copied in (used by ``export``)."""
    with torch.no_grad():
        first.weight.copy_(weight)
        if bias is not None:
            first.bias.copy_(bias)
        second.weight.copy_(back)
    return Residual(nn.Sequential(first, nn.ReLU(), second))


def _conv_same(x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int], padding_mode: str) -> Tensor:
    """Stride-1 cross-correlation with "same" padding ``padding``, zero or circular (as ``nn.Conv2d``)."""
    if padding_mode == "circular":
        ph, pw = padding
        return F.conv2d(F.pad(x, (pw, pw, ph, ph), mode="circular"), weight, bias)
    return F.conv2d(x, weight, bias, padding=padding)


def _adjoint_kernel(weight: Tensor) -> Tensor:
    """Kernel of the adjoint of a "same" odd-kernel convolution: channels swapped, flipped in space."""
    return weight.transpose(0, 1).flip(-2, -1)


def _conv_same_adjoint(y: Tensor, weight: Tensor, padding: tuple[int, int], padding_mode: str) -> Tensor:
    """The exact adjoint of :func:`_conv_same` without bias (see Note [conv adjoint])."""
    if padding_mode == "circular":
        return _conv_same(y, _adjoint_kernel(weight), None, padding, padding_mode)
    return F.conv_transpose2d(y, weight, padding=padding)


def _check_conv_input(layer: str, x: Tensor, channels: int, padding: tuple[int, int], padding_mode: str) -> None:
    """One-line ``ValueError`` for inputs a "same" residual conv cannot take."""
    if x.dim() not in (3, 4) or x.shape[-3] != channels:
        raise ValueError(
            f"{layer} expects inputs of shape (N, {channels}, H, W) or ({channels}, H, W); got {tuple(x.shape)}"
        )
    if padding_mode == "circular" and (x.shape[-2] < padding[0] or x.shape[-1] < padding[1]):
        raise ValueError(
            f"{layer} with circular padding {padding} needs H >= {padding[0]} and W >= {padding[1]} "
            f"(torch cannot wrap around more than once); got {tuple(x.shape)}"
        )


def _plain_residual_conv(
    weight: Tensor, bias: Tensor | None, back: Tensor, padding: tuple[int, int], padding_mode: str
) -> Residual:
    """Plain ``Residual(Sequential(Conv2d(K, b), ReLU(), Conv2d(back)))``; ``back`` is the adjoint-side kernel."""
    inner, channels, kh, kw = weight.shape
    kw_args = {"padding": padding, "padding_mode": padding_mode, "device": weight.device, "dtype": weight.dtype}
    first = nn.Conv2d(channels, inner, (kh, kw), bias=bias is not None, **kw_args)
    second = nn.Conv2d(inner, channels, (kh, kw), bias=False, **kw_args)
    return _plain_residual(first, second, weight, bias, back)


class SLLConv2d(nn.Module):
    r"""Convolutional SLL residual layer, 1-Lipschitz by construction for both paddings and every input size.

    .. math::
        h(x) = x - 2\, C^\top \operatorname{diag}(t \otimes 1)\, \mathrm{ReLU}(C x + b),

    with :math:`C` the "same" convolution with kernel :math:`K` and :math:`t` from the module docstring.

    Args:
        channels: input and output channels (the layer is residual).
        inner_channels: output channels of :math:`K` (default ``channels``).
        kernel_size: odd int or ``(kh, kw)``; the padding is ``k // 2``.
        bias: learn :math:`b`.
        padding_mode: ``"zeros"`` or ``"circular"``.

    Example:
        >>> layer = SLLConv2d(2, 3).double()
        >>> x = torch.randn(2, 4, 4, dtype=torch.float64)
        >>> J = torch.autograd.functional.jacobian(layer, x).reshape(32, 32)
        >>> bool(torch.linalg.matrix_norm(J, 2) <= 1 + 1e-12)
        True
    """

    def __init__(
        self,
        channels: int,
        inner_channels: int | None = None,
        kernel_size: int | tuple[int, int] = 3,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1; got {channels}")
        inner = channels if inner_channels is None else inner_channels
        if inner < 1:
            raise ValueError(f"inner_channels must be >= 1; got {inner}")
        kh, kw = check_odd_kernel(kernel_size, "SLLConv2d")
        check_padding_mode(padding_mode)
        kw_args = {"device": device, "dtype": dtype}
        self.channels, self.inner_channels = channels, inner
        self.kernel_size, self.padding, self.padding_mode = (kh, kw), (kh // 2, kw // 2), padding_mode
        self.weight = nn.Parameter(torch.empty(inner, channels, kh, kw, **kw_args))
        self.bias = nn.Parameter(torch.empty(inner, **kw_args)) if bias else None
        self.q_log = nn.Parameter(torch.zeros(inner, **kw_args))
        self._cache = WeightCache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.weight)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.channels * self.kernel_size[0] * self.kernel_size[1])
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.q_log)
        self._cache.clear()

    def rescaling(self) -> Tensor:
        """The vector :math:`t` of length ``inner_channels``, computed in float64 (Note [constraint precision])."""
        with torch.autocast(self.weight.device.type, enabled=False):
            gram = conv_gram_kernel(self.weight.to(torch.float64))[0]  # (inner, inner, 2kh-1, 2kw-1)
            t = sll_rescaling(gram.abs().sum(dim=(-2, -1)), self.q_log.to(torch.float64))
            return t.to(at_least_float32(self.weight).dtype)

    def forward(self, x: Tensor) -> Tensor:
        _check_conv_input("SLLConv2d", x, self.channels, self.padding, self.padding_mode)
        back = self._cache.get(self, [self.weight, self.q_log], self.back_weight)
        h = torch.relu(_conv_same(x, self.weight, self.bias, self.padding, self.padding_mode))
        return x + _conv_same_adjoint(h, back.to(h.dtype), self.padding, self.padding_mode)

    def back_weight(self) -> Tensor:
        r"""The kernel :math:`-2\operatorname{diag}(t) K` whose adjoint is the second factor (Note [folded scaling])."""
        t = self.rescaling()
        with torch.autocast(self.weight.device.type, enabled=False):
            return -2.0 * at_least_float32(self.weight) * t[:, None, None, None]

    def lipschitz_bound(self) -> float:
        """``1 + LAYER_ROUNDING_SLACK`` (see Note [rounding slack] in ``stablenet.nn.base``)."""
        return 1.0 + LAYER_ROUNDING_SLACK

    def export(self) -> Residual:
        """Plain ``Residual(Sequential(Conv2d(K, b), ReLU(), Conv2d(-2 K^T diag(t))))`` with the same outputs."""
        with torch.no_grad():
            w = self.weight.detach()
            back = _adjoint_kernel(self.back_weight().to(w.dtype))
            return _plain_residual_conv(w, self.bias, back, self.padding, self.padding_mode).train(self.training)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, inner_channels={self.inner_channels}, kernel_size={self.kernel_size}, "
            f"bias={self.bias is not None}, padding_mode={self.padding_mode!r}"
        )
