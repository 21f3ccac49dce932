r"""Residual layers :math:`h(x) = x + B\,\mathrm{ReLU}(W x + b)` with :math:`B = -W^\top S`, dense and conv.

SLL (``stablenet.nn.sll``) and CPL (``stablenet.nn.cpl``) layers share this form and differ only in the
scaling :math:`S` that makes them 1-Lipschitz (SLL: :math:`2\operatorname{diag}(t)`; CPL:
:math:`2/\hat\sigma^2`). The private bases here hold the rest: parameters and their initialisation, input
checks, the forward pass through ``back_weight()`` (which subclasses implement), the eval cache and the export
to a plain :class:`~stablenet.nn.skip.Residual`.

# Note [folded scaling]
The scaling is folded into the second factor: ``back_weight()`` returns :math:`-W^\top S` (dense), or the kernel
:math:`-S K` whose adjoint convolution is :math:`-C^\top S` (conv), so ``forward`` is two plain products or
convolutions. In eval mode the folded weight is computed once and reused (Note [eval cache] in
``stablenet.nn.base``), and ``export()`` copies it into a plain layer: inference costs what the plain block costs.

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
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablenet.nn.base import LAYER_ROUNDING_SLACK, WeightCache
from stablenet.nn.constrained import CONSTRAINED_WEIGHT_ROUNDINGS, check_odd_kernel, check_padding_mode
from stablenet.nn.skip import Residual
from stablenet.spectral.rounding import (
    RoundingBound,
    abs_conv_norm_bound,
    abs_matrix_norm_bound,
    affine_rounding,
    residual_rounding,
)

__all__: list[str] = []


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


class _ResidualLayer(nn.Module):
    r"""``x + second(ReLU(first(x)), back_weight())``; subclasses give the operator and :meth:`back_weight`.

    ``weight`` and ``bias`` parametrise the first factor; with ``_learned_q`` the scaling also learns
    ``q_log`` (SLL's positive weights :math:`q = \exp(\texttt{q\_log})`, one per inner row or channel).
    """

    _learned_q: ClassVar[bool] = False

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_parameters(
        self, shape: tuple[int, ...], bias: bool, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> None:
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(shape, **kw))
        self.bias = nn.Parameter(torch.empty(shape[0], **kw)) if bias else None
        if self._learned_q:
            self.q_log = nn.Parameter(torch.zeros(shape[0], **kw))
        self._cache = WeightCache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.weight)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.weight.shape[1:].numel())  # the fan-in, as nn.Linear / nn.Conv2d
            nn.init.uniform_(self.bias, -bound, bound)
        if self._learned_q:
            nn.init.zeros_(self.q_log)
        self._cache.clear()

    def back_weight(self) -> Tensor:
        """The second factor with the scaling folded in (Note [folded scaling])."""
        raise NotImplementedError

    def _back(self, input_shape: Sequence[int], update: bool) -> Tensor:
        """The second factor the forward uses on inputs of ``input_shape`` (cached in eval mode); ``update``: whether
        a training forward may move state (CPL's estimate, Note [training estimate])."""
        params = [self.weight, self.q_log] if self._learned_q else [self.weight]
        return self._cache.get(self, params, self.back_weight)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        back = self._back(x.shape, torch.is_grad_enabled())
        h = torch.relu(self._first(x))
        return x + self._second(h, back.to(h.dtype))

    def lipschitz_bound(self) -> float:
        """``1 + LAYER_ROUNDING_SLACK`` (see Note [rounding slack] in ``stablenet.nn.base``)."""
        return 1.0 + LAYER_ROUNDING_SLACK

    def rounding_bound(self, input_shape: Sequence[int], dtype: torch.dtype) -> RoundingBound:
        """How far ``forward`` in ``dtype`` can be from the layer with the ideal (float64-scaled) second factor
        (:func:`~stablenet.spectral.rounding.residual_rounding`); ``input_shape`` excludes the batch dimension."""
        with torch.no_grad():
            back = self._back((-1, *input_shape), update=False)
            weight = self.weight.detach()
            k = CONSTRAINED_WEIGHT_ROUNDINGS
            pixels, first_norm, back_norm, first_dot, back_dot = self._rounding_geometry(input_shape, weight, back)
            inner, channels = weight.shape[0] * pixels, weight.shape[1] * pixels
            bias = 0.0 if self.bias is None else float(self.bias.detach().double().norm()) * math.sqrt(pixels)
            first = affine_rounding(first_norm, bias, first_dot, inner, float(weight.abs().max()), dtype)
            second = affine_rounding(back_norm, 0.0, back_dot, channels, float(back.abs().max()), dtype, k)
            entries = math.sqrt(float(channels) * back_dot)
            return residual_rounding(first, first_norm, bias, second, back_norm, k, entries, channels, dtype)

    def _rounding_geometry(
        self, input_shape: Sequence[int], weight: Tensor, back: Tensor
    ) -> tuple[int, float, float, int, int]:
        """``(positions, |W| norm bound, |B| norm bound, first dot length, second dot length)``: positions is the
        number of rows (dense) or pixels (conv) each weight is applied at."""
        raise NotImplementedError

    def export(self) -> Residual:
        """Plain ``Residual(Sequential(first, ReLU(), second))`` holding ``back_weight()``: the same outputs."""
        with torch.no_grad():
            w = self.weight.detach()
            return self._plain(w, self.back_weight().to(w.dtype)).train(self.training)

    def _check_input(self, x: Tensor) -> None:
        """Raise a one-line ``ValueError`` for inputs the layer cannot take."""
        raise NotImplementedError

    def _first(self, x: Tensor) -> Tensor:
        """:math:`W x + b`."""
        raise NotImplementedError

    def _second(self, h: Tensor, back: Tensor) -> Tensor:
        """The second factor, given ``back = back_weight()``, applied to ``h``."""
        raise NotImplementedError

    def _plain(self, weight: Tensor, back: Tensor) -> Residual:
        """The plain-torch block with first weight ``weight`` (and ``self.bias``) and second factor ``back``."""
        raise NotImplementedError


class _ResidualLinear(_ResidualLayer):
    """Dense residual layer: ``weight`` is ``inner_features x features``, the second factor a matrix."""

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
        self.features, self.inner_features = features, inner
        self._init_parameters((inner, features), bias, device, dtype)

    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.features:
            raise ValueError(
                f"{type(self).__name__} expects inputs with last dimension {self.features}; got {tuple(x.shape)}"
            )

    def _first(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def _rounding_geometry(
        self, input_shape: Sequence[int], weight: Tensor, back: Tensor
    ) -> tuple[int, float, float, int, int]:
        rows = math.prod(input_shape[:-1])
        return rows, abs_matrix_norm_bound(weight), abs_matrix_norm_bound(back), self.features, self.inner_features

    def _second(self, h: Tensor, back: Tensor) -> Tensor:
        return F.linear(h, back)

    def _plain(self, weight: Tensor, back: Tensor) -> Residual:
        return _plain_residual(
            nn.Linear(self.features, self.inner_features, self.bias is not None, weight.device, weight.dtype),
            nn.Linear(self.inner_features, self.features, False, weight.device, weight.dtype),
            weight,
            self.bias,
            back,
        )

    def extra_repr(self) -> str:
        return f"features={self.features}, inner_features={self.inner_features}, bias={self.bias is not None}"


class _ResidualConv2d(_ResidualLayer):
    """Conv residual layer: ``weight`` is ``inner x channels x kh x kw``, stride 1, "same" padding ``k // 2``.

    ``back_weight()`` is a kernel shaped like ``weight``; the second factor is its exact adjoint convolution
    (Note [conv adjoint]).
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
        kh, kw = check_odd_kernel(kernel_size, type(self).__name__)
        check_padding_mode(padding_mode)
        self.channels, self.inner_channels = channels, inner
        self.kernel_size, self.padding, self.padding_mode = (kh, kw), (kh // 2, kw // 2), padding_mode
        self._init_parameters((inner, channels, kh, kw), bias, device, dtype)

    def _check_input(self, x: Tensor) -> None:
        """One-line ``ValueError`` for inputs a "same" residual conv cannot take."""
        layer, channels, padding = type(self).__name__, self.channels, self.padding
        if x.dim() not in (3, 4) or x.shape[-3] != channels:
            raise ValueError(
                f"{layer} expects inputs of shape (N, {channels}, H, W) or ({channels}, H, W); got {tuple(x.shape)}"
            )
        if self.padding_mode == "circular" and (x.shape[-2] < padding[0] or x.shape[-1] < padding[1]):
            raise ValueError(
                f"{layer} with circular padding {padding} needs H >= {padding[0]} and W >= {padding[1]} "
                f"(torch cannot wrap around more than once); got {tuple(x.shape)}"
            )

    def _first(self, x: Tensor) -> Tensor:
        return _conv_same(x, self.weight, self.bias, self.padding, self.padding_mode)

    def _rounding_geometry(
        self, input_shape: Sequence[int], weight: Tensor, back: Tensor
    ) -> tuple[int, float, float, int, int]:
        # stride 1, "same" padding: every map keeps the H x W pixels; the second is the adjoint of a conv with
        # kernel `back` (or a conv with its flipped transpose), whose |.| norm bound is the same.
        taps = math.prod(self.kernel_size)
        pixels = math.prod(input_shape[-2:])
        first_norm, back_norm = abs_conv_norm_bound(weight), abs_conv_norm_bound(back)
        return pixels, first_norm, back_norm, self.channels * taps, self.inner_channels * taps

    def _second(self, h: Tensor, back: Tensor) -> Tensor:
        return _conv_same_adjoint(h, back, self.padding, self.padding_mode)

    def _plain(self, weight: Tensor, back: Tensor) -> Residual:
        inner, channels, kh, kw = weight.shape
        kw_args = {
            "padding": self.padding,
            "padding_mode": self.padding_mode,
            "device": weight.device,
            "dtype": weight.dtype,
        }
        first = nn.Conv2d(channels, inner, (kh, kw), bias=self.bias is not None, **kw_args)
        second = nn.Conv2d(inner, channels, (kh, kw), bias=False, **kw_args)
        return _plain_residual(first, second, weight, self.bias, _adjoint_kernel(back))

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, inner_channels={self.inner_channels}, kernel_size={self.kernel_size}, "
            f"bias={self.bias is not None}, padding_mode={self.padding_mode!r}"
        )
