r"""Weight-constrained layers: one constraint module, used both as a parametrization and inside ready layers.

A *constraint* is an ``nn.Module`` whose ``forward(weight)`` maps a free weight to a constrained one (a
normalisation, a rescaling, an orthogonalisation) whose operator has norm at most 1. It is used two ways:

* as a ``torch.nn.utils.parametrize`` parametrization on any ``nn.Linear`` / ``nn.Conv2d``
  (:func:`register_constraint`, wrapped by public functions such as ``lipschitz_spectral(module)``), and
* inside ready layers (``SpectralLinear``, ``AOLConv2d`` ...) that subclass :class:`ConstrainedLinear` or
  :class:`ConstrainedConv2d`: the free parameter stays ``weight`` and the constrained weight is computed in
  ``forward``, once per evaluation in eval mode (Note [eval cache] in ``stablenet.nn.base``).

The constraint math runs with autocast disabled, its scales and norm bounds in float64 (Note [constraint
precision] in ``stablenet.nn.base``), so bf16 training and TF32 keep the guarantee.

# Note [circular over-padding]
With circular padding wider than d(k-1)/2 per side, torch's output is longer than its input and repeats rows of
the circulant operator, so its norm can exceed the circulant's (by up to the square root of the repetition
count, which depends on the input size). The Gram-kernel bounds and rescalings bound the circulant only, so
:meth:`ConvGeometry.of` refuses such layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from stablenet.nn.base import LAYER_ROUNDING_SLACK, WeightCache, at_least_float32
from stablenet.spectral.rounding import (
    RoundingBound,
    abs_conv_norm_bound,
    affine_rounding,
    conv_output_size,
    linear_rounding,
)

__all__ = [
    "CONSTRAINED_WEIGHT_ROUNDINGS",
    "ConstrainedConv2d",
    "ConstrainedLinear",
    "Constraint",
    "ConvGeometry",
    "check_odd_kernel",
    "check_padding_mode",
    "constraints_of",
    "conv_rounding",
    "layer_geometry",
    "register_constraint",
    "remove_constraint",
]

PADDING_MODES = ("zeros", "circular")

#: Roundings between a constraint's ideal float64 weight and the one a forward multiplies by: the scale or
#: bound cast to the weight's dtype, the product or quotient, and a cast to a narrower input dtype (Note
#: [rounding model] in ``stablenet.spectral.rounding``); one to spare.
CONSTRAINED_WEIGHT_ROUNDINGS = 4


@dataclass(frozen=True)
class ConvGeometry:
    """What a conv constraint needs to know about its convolution (padding changes the operator norm).

    Attributes:
        padding_mode: ``"zeros"`` or ``"circular"``.
        padding: torch's numeric padding (an ``(ph, pw)`` tuple or ``"same"`` / ``"valid"``).
        stride, dilation: ``(sh, sw)``.
        groups: as in ``nn.Conv2d``.
        input_size: the spatial input size ``(h, w)`` when known (enables padding-aware, size-specific bounds).
    """

    padding_mode: str = "zeros"
    padding: tuple[int, int] | str = (0, 0)
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    input_size: tuple[int, int] | None = None

    @classmethod
    def of(cls, conv: nn.Conv2d, input_size: int | Sequence[int] | None = None) -> ConvGeometry:
        """The geometry of ``conv``; raises ``ValueError`` for paddings whose operator we cannot bound."""
        check_padding_mode(conv.padding_mode)
        if conv.padding_mode == "circular" and not isinstance(conv.padding, str):  # Note [circular over-padding]
            reach = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
            if any(2 * p > r for p, r in zip(conv.padding, reach, strict=True)):
                raise ValueError(
                    f"circular padding {tuple(conv.padding)} wraps more than the kernel reaches; it must be at most "
                    f"(dilation * (kernel_size - 1)) // 2 = {tuple(r // 2 for r in reach)} per side"
                )
        if input_size is not None:
            input_size = (int(input_size),) * 2 if isinstance(input_size, int) else tuple(int(s) for s in input_size)
            if len(input_size) != 2 or min(input_size) < 1:
                raise ValueError(f"input_size must be an int or (h, w) with positive entries; got {input_size}")
        return cls(
            conv.padding_mode,
            conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
            tuple(conv.stride),
            tuple(conv.dilation),
            conv.groups,
            input_size,
        )


def layer_geometry(module: nn.Module, caller: str) -> ConvGeometry | None:
    """``None`` for an ``nn.Linear``, the checked geometry of an ``nn.Conv2d``; raises for anything else.

    Raises:
        ValueError: for other module types, or paddings :meth:`ConvGeometry.of` refuses.
    """
    if isinstance(module, nn.Linear):
        return None
    if not isinstance(module, nn.Conv2d):
        raise ValueError(f"{caller} works on nn.Linear and nn.Conv2d modules; got {type(module).__name__}")
    return ConvGeometry.of(module)


def check_padding_mode(padding_mode: str) -> None:
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {', '.join(PADDING_MODES)}; got {padding_mode!r}")


def check_odd_kernel(kernel_size: int | Sequence[int], layer: str) -> tuple[int, int]:
    """``(kh, kw)``; raises for even sizes (a shape-preserving residual or centred layer needs odd kernels)."""
    size = (kernel_size,) * 2 if isinstance(kernel_size, int) else tuple(kernel_size)
    if len(size) != 2 or any(k < 1 or k % 2 == 0 for k in size):
        raise ValueError(f"{layer} needs odd kernel sizes (1, 3, 5, ...); got {kernel_size}")
    return size  # type: ignore[return-value]


class Constraint(nn.Module):
    """Base of constraint modules: subclasses implement :meth:`constrain`.

    ``forward`` runs :meth:`constrain` with autocast disabled on the weight upcast to at least float32, and
    returns the result in the weight's dtype (what a parametrization must do).
    """

    #: whether the map runs without host synchronisation, so CUDA graphs can record it (``stablenet.nn.cuda_graphs``)
    capturable: bool = False

    def constrain(self, weight: Tensor) -> Tensor:
        """Map a free weight (float32 or float64) to one whose operator has norm at most 1."""
        raise NotImplementedError

    def forward(self, weight: Tensor) -> Tensor:
        with torch.autocast(weight.device.type, enabled=False):
            return self.constrain(at_least_float32(weight)).to(weight.dtype)


def _constrained(module: nn.Module) -> Tensor:
    return module.constraint(at_least_float32(module.weight))


def _cache_params(module: nn.Module) -> list[Tensor]:
    constraint = module.constraint
    if not constraint._modules:  # the common case, without the generator machinery of parameters() (per call)
        return [module.weight, *(p for p in constraint._parameters.values() if p is not None)]
    return [module.weight, *constraint.parameters()]


class ConstrainedLinear(nn.Linear):
    """``nn.Linear`` whose weight is mapped by ``self.constraint`` (set by the subclass) before use.

    Subclasses build their constraint in ``__init__`` after calling this constructor. ``weight`` holds
    the free parameter; :meth:`constrained_weight` is what ``forward`` multiplies by.
    """

    constraint: Constraint

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

    def constrained_weight(self) -> Tensor:
        """The constrained weight, in at least float32, recomputed (with gradient) on every call."""
        return _constrained(self)

    def forward(self, x: Tensor) -> Tensor:
        w = self._cache.get(self, _cache_params(self), self.constrained_weight)
        return F.linear(x, w.to(x.dtype), self.bias)

    def lipschitz_bound(self) -> float:
        """``1 + LAYER_ROUNDING_SLACK`` (see Note [rounding slack] in ``stablenet.nn.base``)."""
        return 1.0 + LAYER_ROUNDING_SLACK

    def rounding_bound(self, input_shape: Sequence[int], dtype: torch.dtype) -> RoundingBound:
        """How far ``forward`` in ``dtype`` can be from the map with the ideal constrained weight
        (``stablenet.spectral.rounding``); ``input_shape`` excludes the batch dimension."""
        with torch.no_grad():
            w = self._cache.get(self, _cache_params(self), self.constrained_weight)
            return linear_rounding(w, self.bias, tuple(input_shape), dtype, CONSTRAINED_WEIGHT_ROUNDINGS)

    def export(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the constrained weight: the same outputs at no constraint cost."""
        with torch.no_grad():
            w = self.constrained_weight().to(self.weight.dtype)
            plain = nn.Linear(self.in_features, self.out_features, self.bias is not None, w.device, w.dtype)
            plain.weight.copy_(w)
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain.train(self.training)


class ConstrainedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose kernel is mapped by ``self.constraint`` (set by the subclass) before use.

    Only ``padding_mode`` ``"zeros"`` and ``"circular"`` are accepted (their operators are the ones the
    bounds cover); ``input_size`` lets size-specific constraints use the tighter padding-aware bound.
    """

    constraint: Constraint

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_padding_mode(padding_mode)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self._cache = WeightCache()

    def constrained_weight(self) -> Tensor:
        """The constrained kernel, in at least float32, recomputed (with gradient) on every call."""
        return _constrained(self)

    def forward(self, x: Tensor) -> Tensor:
        w = self._cache.get(self, _cache_params(self), self.constrained_weight)
        return self._conv_forward(x, w.to(x.dtype), self.bias)

    def lipschitz_bound(self) -> float:
        """``1 + LAYER_ROUNDING_SLACK`` (see Note [rounding slack] in ``stablenet.nn.base``)."""
        return 1.0 + LAYER_ROUNDING_SLACK

    def rounding_bound(self, input_shape: Sequence[int], dtype: torch.dtype) -> RoundingBound:
        """How far ``forward`` in ``dtype`` can be from the convolution with the ideal constrained kernel
        (``stablenet.spectral.rounding``); ``input_shape`` is ``(C, H, W)``."""
        with torch.no_grad():
            w = self._cache.get(self, _cache_params(self), self.constrained_weight)
            return conv_rounding(self, w, input_shape, dtype, CONSTRAINED_WEIGHT_ROUNDINGS)

    def export(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding the constrained kernel: the same outputs at no constraint cost."""
        with torch.no_grad():
            w = self.constrained_weight().to(self.weight.dtype)
            plain = nn.Conv2d(
                self.in_channels,
                self.out_channels,
                self.kernel_size,
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
                self.bias is not None,
                self.padding_mode,
                device=w.device,
                dtype=w.dtype,
            )
            plain.weight.copy_(w)
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain.train(self.training)


def conv_rounding(
    conv: nn.Conv1d | nn.Conv2d, weight: Tensor, input_shape: Sequence[int], dtype: torch.dtype, weight_roundings: int
) -> RoundingBound:
    """:func:`~stablenet.spectral.rounding.affine_rounding` of ``conv``'s forward with kernel ``weight`` on one input
    of shape ``input_shape`` (channels first; zero or circular padding, which copies values exactly)."""
    nd = weight.dim() - 2
    out = conv_output_size(
        tuple(int(s) for s in input_shape[-nd:]),
        tuple(weight.shape[2:]),
        tuple(conv.stride),
        conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
        tuple(conv.dilation),
    )
    pixels = math.prod(out)
    bias = 0.0 if conv.bias is None else float(conv.bias.detach().double().norm()) * math.sqrt(pixels)
    return affine_rounding(
        abs_conv_norm_bound(weight, conv.groups),
        bias,
        math.prod(weight.shape[1:]),
        weight.shape[0] * pixels,
        float(weight.detach().abs().max()) if weight.numel() else 0.0,
        dtype,
        weight_roundings,
    )


def register_constraint(module: nn.Module, name: str, constraint: nn.Module) -> nn.Module:
    """Register ``constraint`` as a parametrization of ``module.<name>``; returns ``module``.

    Raises:
        ValueError: when ``module`` has no such parameter.
    """
    if not isinstance(getattr(module, name, None), Tensor):
        raise ValueError(f"{type(module).__name__} has no tensor named {name!r} to constrain")
    parametrize.register_parametrization(module, name, constraint)
    return module


def constraints_of(module: nn.Module, name: str, kind: type | tuple[type, ...]) -> list[nn.Module]:
    """The parametrizations of ``module.<name>`` that are instances of ``kind`` (empty when there is none)."""
    if not parametrize.is_parametrized(module, name):
        return []
    return [p for p in module.parametrizations[name] if isinstance(p, kind)]


def remove_constraint(
    module: nn.Module, name: str, kind: type | tuple[type, ...], description: str | None = None
) -> nn.Module:
    """Take the parametrization of type ``kind`` off ``module.<name>``, keeping the constrained value.

    Args:
        module, name: the parametrized tensor ``module.<name>``.
        kind: the constraint type, or a tuple of them.
        description: what the error calls the parametrization (default: the name of ``kind``).

    Raises:
        ValueError: when ``module.<name>`` has no parametrization of that type.
    """
    if not constraints_of(module, name, kind):
        what = description or kind.__name__
        raise ValueError(f"{type(module).__name__}.{name} has no {what} parametrization to remove")
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return module
