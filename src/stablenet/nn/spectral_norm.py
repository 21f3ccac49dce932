r"""Spectral normalisation by a guaranteed *upper* bound: :math:`W \mapsto W / \hat\sigma(W)`.

With :math:`\hat\sigma \ge \|W\|` the normalised operator has norm :math:`\|W\|/\hat\sigma \le 1`. We divide by
:math:`\hat\sigma` itself, the standard of Miyato et al. 2018 and of
``torch.nn.utils.parametrizations.spectral_norm``, not by :math:`\max(1, \hat\sigma)` (a projection some
Lipschitz libraries use): the layer's norm is then close to 1 whatever the scale of the free weight, so the
scale carries no gradient signal and cannot shrink the network's signal.

Unlike torch's ``spectral_norm``, :math:`\hat\sigma` is never a power-iteration estimate (that converges from
*below*, so :math:`W/\hat\sigma` may have norm above 1), and for convolutions it bounds the real operator, not
the reshaped kernel matrix (pytorch issue 99149):

* dense: the Gram iteration (Delattre et al., ICML 2023), differentiable;
* convolution with ``input_size`` and circular padding: the circular norm at that size (Sedghi et al. 2019
  block-diagonalisation), bounded by the Gram iteration or, on CPUs, verified by Cholesky factorisations
  (``method``, Note [circular bound method]);
* convolution with ``input_size`` and zero padding: the embedding bound (the zero-padded operator is a
  submatrix of a circular one on a slightly larger input), computed the same way; valid for every input size
  up to ``input_size``;
* convolution without ``input_size`` (or with one smaller than the dilated kernel, which then wraps around):
  the spatial Gram bound (Delattre et al. 2024), valid for every input size and both paddings, looser (7-11%
  for random 3x3 kernels with 4 iterations).

The ready layers :class:`SpectralLinear` and :class:`SpectralConv2d` *train* with a persistent power-iteration
estimate of the true operator's norm instead (one power step per training forward), and divide by the guaranteed
bound in eval mode, in ``constrained_weight()``, ``export()`` and the bounds certificates use (Note [training
estimate] in :mod:`stablenet.nn.power_estimate`; ``train_estimate=False`` keeps the bound in training too). A
:class:`SpectralConv2d` built without ``input_size`` takes it from its first forward, as torch's lazy modules do,
so the guaranteed bound is the tight size-specific one (``input_size="any"``: the spatial bound, for every size).
The parametrization :func:`lipschitz_spectral` always uses the guaranteed bound.

Strides keep the unstrided bound (subsampling is 1-Lipschitz), groups take the max over groups, dilations
dilate the kernel. A circular padding wider than ``(k - 1) / 2`` would repeat input rows in the output (a 1x1
identity kernel with circular padding 1 has norm 2); ``ConvGeometry.of`` rejects it.

# Note [bound precision]
:math:`\hat\sigma` is computed in float64, whatever the weight's dtype, and multiplied by
``1 + GRAM_ROUNDING_SLACK``; only the division runs in the weight's dtype. In float32 the bound can land below
the true norm: torch's CPU ``vector_norm`` accumulates float32 sums sequentially (relative error 2e-4 on a
2048 x 2048 rank-one matrix, which made :math:`W/\hat\sigma` exceed 1 by 5e-5 after the adaptive iteration
stopped at 2 steps), and TF32 matmuls on GPUs lose about 1e-3. In float64 both are far below the slack. The
cost is that of float64 matmuls on the Gram side (cheap on CPUs and data-centre GPUs).

# Note [circular bound method]
``method="auto"`` (the default) bounds a size-specific circular norm on a CPU by
:func:`~stablenet.spectral.cholesky_bound.cholesky_circular_bound` (within 1e-4 of exact, its rounding bounded),
whose gradient is that of the top frequency's norm, and elsewhere by the adaptive Gram iteration (within 1e-5;
batched Cholesky factorisations are slow on GPUs). On a CPU the training step of a 128-channel layer at 32x32 is then
several times faster (README, layers benchmark). Both are certified upper bounds, so the layer is 1-Lipschitz
either way, but they differ by up to about 1e-4 (relative): the same weights moved from a GPU to a CPU give
outputs that differ at that level. ``method="gram"`` (or an explicit ``n_iter``) computes the same value on every
device; ``"cholesky"`` forces the verified bound.

# Note [adaptive Gram iteration]
``n_iter=None`` iterates adaptively (at most ``GRAM_MAX_ITER`` steps, stopping at relative change
``GRAM_TOL``). The stopping test compares values computed from the weights alone, so the same weights give the
same number of steps, in training (with autograd) and in eval mode: eval outputs equal train outputs.

Example:
    >>> layer = SpectralLinear(20, 30).double()
    >>> bool(torch.linalg.matrix_norm(layer.constrained_weight(), 2) <= 1)
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablenet.nn.base import LAYER_ROUNDING_SLACK, at_least_float32
from stablenet.nn.constrained import (
    CONSTRAINED_WEIGHT_ROUNDINGS,
    ConstrainedConv2d,
    ConstrainedLinear,
    Constraint,
    ConvGeometry,
    constraints_of,
    conv_rounding,
    register_constraint,
    remove_constraint,
)
from stablenet.nn.power_estimate import PowerEstimate
from stablenet.spectral.conv import (
    CIRCULAR_BOUND_METHODS,
    GRAM_MAX_ITER,
    GRAM_TOL,
    _Conv,
    _embedding_size,
    circular_norm_bound,
)
from stablenet.spectral.conv import spatial_gram_bound as _spatial_gram_bound
from stablenet.spectral.dense import GRAM_ROUNDING_SLACK, gram_iteration
from stablenet.spectral.rounding import RoundingBound, linear_rounding

__all__ = [
    "SPATIAL_GRAM_ITERS",
    "ConvSpectralConstraint",
    "DenseSpectralConstraint",
    "SpectralConv2d",
    "SpectralLinear",
    "check_input_size",
    "conv_bound",
    "lipschitz_spectral",
    "remove_lipschitz_spectral",
]

#: Iterations of the size-independent spatial Gram bound when ``n_iter`` is not given (its kernel grows as
#: ``2**T (k - 1) + 1``; ``T = 4`` is within about 7-11% of the true norm for random 3x3 kernels).
SPATIAL_GRAM_ITERS = 4


def _check_n_iter(n_iter: int | None) -> int | None:
    if n_iter is not None and (not isinstance(n_iter, int) or n_iter < 1):
        raise ValueError(f"n_iter must be None (adaptive) or a positive int; got {n_iter!r}")
    return n_iter


def _safe_divide(weight: Tensor, sigma: Tensor) -> Tensor:
    """``weight / sigma``; a zero bound (zero weight) leaves the weight as it is (zero)."""
    sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    return weight / sigma.to(weight.dtype)


def _matvec(u: Tensor, weight: Tensor) -> Tensor:
    return weight @ u


def _train_bound(bound: Tensor, sigma: Tensor) -> float:
    r""":math:`(1 + \text{slack})\,\hat\sigma/\tilde\sigma`, rounded up; ``inf`` for a zero estimate of a non-zero
    weight (Note [training estimate])."""
    est = float(sigma)
    if not est > 0:
        return 1.0 + LAYER_ROUNDING_SLACK if float(bound) == 0 else math.inf
    ratio = math.nextafter(float(bound) / est, math.inf)
    return math.nextafter(max(ratio, 1.0) * (1.0 + LAYER_ROUNDING_SLACK), math.inf)


class DenseSpectralConstraint(Constraint):
    r"""Maps a matrix :math:`W` to :math:`W/\hat\sigma(W)`, :math:`\hat\sigma \ge \|W\|_2` by Gram iteration.

    Args:
        n_iter: Gram iterations; ``None`` iterates adaptively (Note [adaptive Gram iteration]).
    """

    def __init__(self, n_iter: int | None = None) -> None:
        super().__init__()
        self.n_iter = _check_n_iter(n_iter)

    @property
    def capturable(self) -> bool:  # type: ignore[override]
        """A fixed ``n_iter`` has no host synchronisation (Note [captured weight maps] in
        ``stablenet.nn.cuda_graphs``)."""
        return self.n_iter is not None

    def bound(self, weight: Tensor) -> Tensor:
        """The float64 upper bound :math:`\\hat\\sigma` (differentiable; Note [bound precision])."""
        if weight.dim() != 2:
            raise ValueError(f"a dense spectral constraint needs a 2-D weight; got shape {tuple(weight.shape)}")
        w64 = weight.to(torch.float64)
        if self.n_iter is None:
            sigma = gram_iteration(w64, GRAM_MAX_ITER, tol=GRAM_TOL)
        else:
            sigma = gram_iteration(w64, self.n_iter)
        return sigma * (1.0 + GRAM_ROUNDING_SLACK)

    def constrain(self, weight: Tensor) -> Tensor:
        return _safe_divide(weight, self.bound(weight))

    def extra_repr(self) -> str:
        return f"n_iter={self.n_iter}"


def _dilated_kernel_size(kernel: Tensor, dilation: tuple[int, int]) -> tuple[int, int]:
    kh, kw = kernel.shape[-2:]
    return dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1


def _capturing(t: Tensor) -> bool:
    """Whether ``t``'s device is recording a CUDA graph (Note [captured weight maps] in ``stablenet.nn.cuda_graphs``);
    the graph then skips the finiteness check, and NaN weights give NaN outputs as in a plain layer."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def conv_bound(kernel: Tensor, geometry: ConvGeometry, n_iter: int | None = None, method: str = "auto") -> Tensor:
    """A float64, differentiable upper bound on the norm of the convolution ``geometry`` with ``kernel``.

    See the module docstring for the choice of bound; ``n_iter=None`` is adaptive for the size-specific bounds
    and :data:`SPATIAL_GRAM_ITERS` for the spatial one. ``method`` chooses how a size-specific (circular) bound
    is computed (:func:`~stablenet.spectral.conv.circular_norm_bound`: ``"auto"``, ``"cholesky"`` or
    ``"gram"``); the spatial bound has one method.
    """
    if kernel.dim() != 4:
        raise ValueError(f"a conv spectral constraint needs a 4-D kernel; got shape {tuple(kernel.shape)}")
    k64 = kernel.to(torch.float64)
    k_dil = _dilated_kernel_size(kernel, geometry.dilation)
    size = geometry.input_size
    fits = size is not None and size[0] >= k_dil[0] and size[1] >= k_dil[1]
    # _Conv validates and groups / dilates the kernel; the spatial bound does not depend on its input size.
    conv = _Conv(
        k64,
        size if fits else k_dil,
        geometry.padding_mode,
        geometry.padding,
        geometry.stride,
        geometry.dilation,
        geometry.groups,
        check_finite=not _capturing(k64),  # a host read, which a CUDA graph capture refuses
    )
    if fits and geometry.padding_mode == "zeros":
        return circular_norm_bound(conv.grouped, _embedding_size(conv), n_iter, method=method)
    if fits:
        return circular_norm_bound(conv.grouped, conv.size, n_iter, method=method)
    # no size, or an input smaller than the kernel (which wraps around): the size-independent bound
    return _spatial_gram_bound(conv.grouped, n_iter or SPATIAL_GRAM_ITERS)


def check_input_size(geometry: ConvGeometry, shape: Sequence[int]) -> None:
    """Raise ``ValueError`` when a size-specific bound does not cover inputs of spatial shape ``shape[-2:]``.

    A circular bound holds at its size only; a zero-padding (embedding) bound at every size up to its own
    (the operator on a smaller input is a submatrix).
    """
    if geometry.input_size is None:
        return
    got = tuple(int(s) for s in shape[-2:])
    want = geometry.input_size
    if geometry.padding_mode == "circular" and got != want:
        raise ValueError(f"this circular spectral bound holds for inputs of size {want} only; got {got}")
    if geometry.padding_mode == "zeros" and (got[0] > want[0] or got[1] > want[1]):
        raise ValueError(f"this zero-padding spectral bound holds for inputs up to size {want}; got {got}")


def _check_method(method: str, n_iter: int | None, geometry: ConvGeometry, lazy: bool = False) -> str:
    if method not in CIRCULAR_BOUND_METHODS:
        raise ValueError(f"method must be one of {', '.join(CIRCULAR_BOUND_METHODS)}; got {method!r}")
    if method == "cholesky" and (n_iter is not None or (geometry.input_size is None and not lazy)):
        raise ValueError(
            "method='cholesky' verifies a size-specific bound: it needs input_size and no n_iter; "
            f"got input_size={geometry.input_size}, n_iter={n_iter}"
        )
    return method


class ConvSpectralConstraint(Constraint):
    r"""Maps a kernel :math:`K` to :math:`K/\hat\sigma(K)`, :math:`\hat\sigma` bounding the real conv operator.

    Args:
        geometry: the convolution (padding mode, padding, stride, dilation, groups and optional input size).
        n_iter: Gram iterations; ``None``: adaptive (size-specific bounds) or :data:`SPATIAL_GRAM_ITERS`.
        method: how a size-specific bound is computed: ``"auto"``, ``"cholesky"`` or ``"gram"`` (Note [circular
            bound method]).
        lazy: the input size will be set later (a lazy :class:`SpectralConv2d`); until then the spatial bound.
    """

    def __init__(
        self, geometry: ConvGeometry, n_iter: int | None = None, method: str = "auto", lazy: bool = False
    ) -> None:
        super().__init__()
        self.geometry = geometry
        self.n_iter = _check_n_iter(n_iter)
        self.method = _check_method(method, n_iter, geometry, lazy)

    @property
    def capturable(self) -> bool:  # type: ignore[override]
        """No host synchronisation (Note [captured weight maps] in ``stablenet.nn.cuda_graphs``): the spatial bound, or
        a fixed ``n_iter`` of the Gram iteration (``"auto"`` uses it off the CPU, where graphs run)."""
        return self.method != "cholesky" and (self.n_iter is not None or self.geometry.input_size is None)

    def bound(self, kernel: Tensor) -> Tensor:
        """The float64 upper bound :math:`\\hat\\sigma` (differentiable; Note [bound precision])."""
        return conv_bound(kernel, self.geometry, self.n_iter, self.method) * (1.0 + GRAM_ROUNDING_SLACK)

    def constrain(self, weight: Tensor) -> Tensor:
        return _safe_divide(weight, self.bound(weight))

    def check_input(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook: the input must be covered by the bound (:func:`check_input_size`)."""
        if args and isinstance(args[0], Tensor):
            check_input_size(self.geometry, args[0].shape)

    def extra_repr(self) -> str:
        return f"n_iter={self.n_iter}, input_size={self.geometry.input_size}, method={self.method!r}"


class SpectralLinear(ConstrainedLinear):
    r"""``nn.Linear`` with weight :math:`W/\hat\sigma(W)`, :math:`\hat\sigma \ge \|W\|_2` (Gram iteration).

    Args:
        in_features, out_features, bias, device, dtype: as in ``nn.Linear``.
        n_iter: Gram iterations; ``None`` iterates adaptively (Note [adaptive Gram iteration]).
        train_estimate: in training mode, divide by a persistent power-iteration estimate of :math:`\|W\|_2`
            (Note [training estimate] in :mod:`stablenet.nn.power_estimate`); eval mode, ``constrained_weight()``,
            ``export()`` and certificates use the guaranteed bound either way. ``False``: the bound in training too.

    Example:
        >>> layer = SpectralLinear(5, 3).double()
        >>> bool(torch.linalg.matrix_norm(layer.constrained_weight(), 2) <= 1)
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        n_iter: int | None = None,
        train_estimate: bool = True,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.constraint = DenseSpectralConstraint(n_iter)
        self.train_estimate = bool(train_estimate)
        self.estimate = PowerEstimate()

    def _estimated(self, update: bool) -> tuple[Tensor, Tensor]:
        """``(W / sigma_est, sigma_est)``, the training-mode weight (Note [training estimate])."""
        weight = at_least_float32(self.weight)
        with torch.autocast(weight.device.type, enabled=False):
            sigma = self.estimate(_matvec, weight, (weight.shape[1],), update)
            return _safe_divide(weight, sigma), sigma

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.train_estimate:
            w, _ = self._estimated(update=torch.is_grad_enabled())
            return F.linear(x, w.to(x.dtype), self.bias)
        return super().forward(x)

    def lipschitz_bound(self) -> float:
        """``1 + LAYER_ROUNDING_SLACK`` in eval mode; in training mode with the estimate, the guaranteed bound over the
        estimate the forward divides by (Note [training estimate])."""
        if not (self.training and self.train_estimate):
            return super().lipschitz_bound()
        with torch.no_grad():
            _, sigma = self._estimated(update=False)
            return _train_bound(self.constraint.bound(self.weight.detach()), sigma)

    def rounding_bound(self, input_shape: Sequence[int], dtype: torch.dtype) -> RoundingBound:
        """As :class:`~stablenet.nn.constrained.ConstrainedLinear`'s, for the weight the forward uses in this mode."""
        if not (self.training and self.train_estimate):
            return super().rounding_bound(input_shape, dtype)
        with torch.no_grad():
            w, _ = self._estimated(update=False)
            return linear_rounding(w, self.bias, tuple(input_shape), dtype, CONSTRAINED_WEIGHT_ROUNDINGS)


class SpectralConv2d(ConstrainedConv2d):
    r"""``nn.Conv2d`` with kernel :math:`K/\hat\sigma(K)`, :math:`\hat\sigma` an upper bound of the operator norm.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device,
            dtype: as in ``nn.Conv2d`` (``padding_mode`` ``"zeros"`` or ``"circular"``).
        input_size: spatial input size ``(h, w)`` (or an int): enables the tighter size-specific bound, valid
            for that size (circular) or sizes up to it (zeros); other inputs raise ``ValueError``. ``None``: taken
            from the first forward (or the first ``lipschitz_bound(input_shape)``), as torch's lazy modules do;
            until then ``constrained_weight()`` uses the spatial bound. ``"any"``: the size-independent spatial
            Gram bound, for inputs of every size.
        n_iter: Gram iterations (see :class:`ConvSpectralConstraint`).
        method: ``"auto"``, ``"cholesky"`` or ``"gram"``: how the size-specific bound is computed (Note
            [circular bound method]).
        train_estimate: in training mode, divide by a persistent power-iteration estimate of the norm of the
            convolution at the input's size (Note [training estimate] in :mod:`stablenet.nn.power_estimate`);
            eval mode, ``constrained_weight()``, ``export()`` and certificates use the guaranteed bound either way.
            ``False``: the bound in training too.

    Example:
        >>> layer = SpectralConv2d(2, 3, 3, padding=1, input_size=6).double()
        >>> x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
        >>> y = layer(x)
    """

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
        *,
        input_size: int | Sequence[int] | str | None = None,
        n_iter: int | None = None,
        method: str = "auto",
        train_estimate: bool = True,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        if isinstance(input_size, str) and input_size != "any":
            raise ValueError(
                f"input_size must be an int, (h, w), None (from the first input) or 'any'; got {input_size!r}"
            )
        self.lazy_input_size = input_size is None
        size = None if isinstance(input_size, str) else input_size
        self.constraint = ConvSpectralConstraint(ConvGeometry.of(self, size), n_iter, method, self.lazy_input_size)
        self.train_estimate = bool(train_estimate)
        self.estimate = PowerEstimate()

    def _take_size(self, shape: Sequence[int]) -> None:
        """Record the spatial size of the first input of a lazy layer (its guaranteed bound becomes size-specific)."""
        if self.lazy_input_size and self.constraint.geometry.input_size is None:
            if len(shape) < 2:
                raise ValueError(f"expected an input of shape (..., h, w); got {tuple(shape)}")
            size = (int(shape[-2]), int(shape[-1]))
            self.constraint.geometry = dataclasses.replace(self.constraint.geometry, input_size=size)
            self._cache.clear()

    def _apply_conv(self, u: Tensor, weight: Tensor) -> Tensor:
        return self._conv_forward(u, weight, None)

    def _estimated(self, shape: Sequence[int], update: bool) -> tuple[Tensor, Tensor]:
        """``(K / sigma_est, sigma_est)`` at spatial size ``shape[-2:]``, the training-mode kernel."""
        weight = at_least_float32(self.weight)
        with torch.autocast(weight.device.type, enabled=False):
            one = (1, self.in_channels, int(shape[-2]), int(shape[-1]))
            sigma = self.estimate(self._apply_conv, weight, one, update)
            return _safe_divide(weight, sigma), sigma

    def forward(self, x: Tensor) -> Tensor:
        self._take_size(x.shape)
        check_input_size(self.constraint.geometry, x.shape)
        if self.training and self.train_estimate:
            w, _ = self._estimated(x.shape, update=torch.is_grad_enabled())
            return self._conv_forward(x, w.to(x.dtype), self.bias)
        return super().forward(x)

    def lipschitz_bound(self, input_shape: Sequence[int] | None = None) -> float:
        """``1 + LAYER_ROUNDING_SLACK`` in eval mode (raises ``ValueError`` if ``input_shape`` is not covered by the
        bound); in training mode with the estimate, the guaranteed bound over the estimate at ``input_shape``
        (required then), which the forward divides by (Note [training estimate])."""
        if input_shape is not None:
            self._take_size(input_shape)
            check_input_size(self.constraint.geometry, input_shape)
        if not (self.training and self.train_estimate):
            return super().lipschitz_bound()
        if input_shape is None:
            raise ValueError(
                "a training-mode SpectralConv2d needs input_shape for its bound (its estimate is per size)"
            )
        with torch.no_grad():
            _, sigma = self._estimated(input_shape, update=False)
            return _train_bound(self.constraint.bound(self.weight.detach()), sigma)

    def rounding_bound(self, input_shape: Sequence[int], dtype: torch.dtype) -> RoundingBound:
        """As :class:`~stablenet.nn.constrained.ConstrainedConv2d`'s, for the kernel the forward uses in this mode."""
        if not (self.training and self.train_estimate):
            return super().rounding_bound(input_shape, dtype)
        with torch.no_grad():
            w, _ = self._estimated(input_shape, update=False)
            return conv_rounding(self, w, input_shape, dtype, CONSTRAINED_WEIGHT_ROUNDINGS)


def lipschitz_spectral(
    module: nn.Module,
    name: str = "weight",
    n_iter: int | None = None,
    input_size: int | Sequence[int] | None = None,
    method: str = "auto",
) -> nn.Module:
    r"""Spectrally normalise ``module.<name>`` by an upper bound, as a parametrization; returns ``module``.

    For an ``nn.Linear`` the weight becomes :math:`W/\hat\sigma(W)` (Gram iteration); for an ``nn.Conv2d`` the
    kernel is divided by the padding-aware bound of its operator (see the module docstring), at ``input_size``
    when given (a forward pre-hook then rejects inputs the bound does not cover), computed by ``method``
    (Note [circular bound method]).

    Raises:
        ValueError: for other module types, ``input_size`` or a ``method`` other than ``"auto"`` on a linear
            layer, a padding mode other than
            ``"zeros"`` / ``"circular"``, or a tensor of the wrong rank.

    Example:
        >>> lin = lipschitz_spectral(nn.Linear(4, 6).double())
        >>> bool(torch.linalg.matrix_norm(lin.weight, 2) <= 1)
        True
    """
    if isinstance(module, nn.Conv2d):
        constraint = ConvSpectralConstraint(ConvGeometry.of(module, input_size), n_iter, method)
        rank = 4
    elif isinstance(module, nn.Linear):
        if input_size is not None:
            raise ValueError("input_size applies to nn.Conv2d only; a linear layer's norm does not depend on it")
        if method != "auto":
            raise ValueError(f"method applies to nn.Conv2d only (linear layers use the Gram iteration); got {method!r}")
        constraint, rank = DenseSpectralConstraint(n_iter), 2
    else:
        raise ValueError(f"lipschitz_spectral supports nn.Linear and nn.Conv2d; got {type(module).__name__}")
    tensor = getattr(module, name, None)
    if isinstance(tensor, Tensor) and tensor.dim() != rank:
        raise ValueError(f"{type(module).__name__}.{name} must have {rank} dimensions; got {tuple(tensor.shape)}")
    register_constraint(module, name, constraint)
    if isinstance(constraint, ConvSpectralConstraint) and constraint.geometry.input_size is not None:
        module.register_forward_pre_hook(constraint.check_input)
    return module


def remove_lipschitz_spectral(module: nn.Module, name: str = "weight") -> nn.Module:
    """Take off :func:`lipschitz_spectral`, keeping the normalised value as a plain parameter; returns ``module``.

    Raises:
        ValueError: when ``module.<name>`` has no spectral-normalisation parametrization.
    """
    kinds = (DenseSpectralConstraint, ConvSpectralConstraint)
    found = constraints_of(module, name, kinds)
    remove_constraint(module, name, kinds, "spectral-normalisation")
    for constraint in found:  # the input-size hook, matched by its owner (which survives deepcopy)
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(hook, "__self__", None) is constraint:
                del module._forward_pre_hooks[key]
    return module
