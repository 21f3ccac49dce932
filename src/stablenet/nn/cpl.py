r"""Convex Potential Layers (CPL): residual 1-Lipschitz layers (Meunier et al., ICML 2022, arXiv 2110.12690).

From "A Dynamical System Perspective for Lipschitz Neural Networks".

A residual layer, the explicit Euler step of the gradient flow of a convex potential,

.. math::
    h(x) = x - \frac{2}{\hat\sigma^2}\, W^\top \mathrm{ReLU}(W x + b), \qquad \hat\sigma \ge \|W\|_2 ,

is 1-Lipschitz for any :math:`W, b`: its Jacobian :math:`I - \frac{2}{\hat\sigma^2} W^\top D W`, with
:math:`D` diagonal in :math:`[0, 1]`, is symmetric with eigenvalues in
:math:`[1 - 2\|W\|^2/\hat\sigma^2, 1] \subset [-1, 1]`.

:math:`\hat\sigma` must be an **upper** bound of :math:`\|W\|`: a power-iteration estimate converges from
below and gives a step :math:`2/\hat\sigma^2 > 2/\sigma^2` that breaks the guarantee. We use the Gram
iteration (Delattre et al. 2023), differentiable, with a fixed number of steps (every iterate is an upper
bound, so stopping early is sound, and train and eval compute the same value):

* dense: :func:`~stablenet.spectral.dense.gram_iteration` on :math:`W`;
* convolution (:math:`W` the "same" convolution :math:`C`, zero or circular padding), by default the
  input-size-independent spatial Gram bound (:func:`~stablenet.spectral.conv.spatial_gram_bound`, valid for
  both paddings and every input size); with ``input_size`` the tighter padding-aware bound at that size: the
  circular Gram bound for circular padding, and for zero padding the circular bound of the embedding of
  :math:`C` into a circular convolution on :math:`n + k//2` pixels (``conv_spectral_norm(method="embed")``).
  With ``method="auto"`` that circular norm is verified by Cholesky factorisations on a CPU
  (:func:`~stablenet.spectral.conv.circular_norm_bound`, within 1e-4 of exact, and much faster there than the
  Gram iteration) and bounded by ``CPL_FFT_GRAM_ITERS`` Gram steps on other devices (no host synchronisation;
  batched Cholesky factorisations are slow on GPUs). The two bounds differ (the Gram one is looser), so weights
  moved between devices give slightly different steps, both 1-Lipschitz; ``method="gram"`` or ``"cholesky"``
  fixes the choice.

The bound is computed in float64 (Note [constraint precision] in ``stablenet.nn.base``) with autocast disabled
and cached in eval mode (Note [eval cache] in ``stablenet.nn.base``). In training mode the layers take the step
:math:`2/\tilde\sigma^2` of a persistent power-iteration estimate :math:`\tilde\sigma` of :math:`\|W\|` (of the
convolution at the input's size) instead, one power step per training forward (Note [training estimate] in
:mod:`stablenet.nn.power_estimate`; ``train_estimate=False`` keeps the bound). Such a step may exceed
:math:`2/\|W\|^2` slightly, so a training-mode layer's ``lipschitz_bound()`` is
:math:`\max(1, 2\hat\sigma^2/\tilde\sigma^2 - 1)` (the Jacobian's eigenvalues lie in
:math:`[1 - 2\|W\|^2/\tilde\sigma^2, 1]`); eval mode, ``back_weight()``, ``export()`` and certificates use
:math:`\hat\sigma`. A :class:`CPLConv2d` without ``input_size`` takes it from its first input, as torch's lazy
modules do (``input_size="any"``: the spatial bound, for every size). The residual machinery shared with SLL
(Note [folded scaling], Note [conv adjoint]) is in ``stablenet.nn.relu_residual``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from stablenet.nn.base import LAYER_ROUNDING_SLACK, at_least_float32
from stablenet.nn.power_estimate import PowerEstimate
from stablenet.nn.relu_residual import _conv_same, _ResidualConv2d, _ResidualLinear
from stablenet.nn.skip import Residual
from stablenet.spectral.conv import CIRCULAR_BOUND_METHODS, circular_gram_bound, circular_norm_bound, spatial_gram_bound
from stablenet.spectral.dense import gram_iteration

__all__ = ["CPL_DENSE_GRAM_ITERS", "CPL_FFT_GRAM_ITERS", "CPL_SPATIAL_GRAM_ITERS", "CPLConv2d", "CPLLinear"]

#: Gram-iteration steps of the dense bound (a Schatten-:math:`2^{T+1}` norm: within ``rank**(1/128)`` of
#: :math:`\sigma_1` for ``T = 6``).
CPL_DENSE_GRAM_ITERS = 6
#: Steps of the per-frequency Gram bound used with ``input_size`` off the CPU.
CPL_FFT_GRAM_ITERS = 6
#: Steps of the input-size-independent spatial Gram bound (its support grows as ``2**T (k - 1) + 1``).
CPL_SPATIAL_GRAM_ITERS = 4


def _step(sigma: Tensor) -> Tensor:
    r""":math:`2 / \hat\sigma^2`, and 0 for :math:`\hat\sigma = 0` (then :math:`W = 0` and the step is unused)."""
    positive = sigma > 0
    return torch.where(positive, 2.0 / torch.where(positive, sigma, torch.ones_like(sigma)).square(), 0.0)


def _train_bound(bound: Tensor, sigma: Tensor) -> float:
    r""":math:`\max(1, 2\hat\sigma^2/\tilde\sigma^2 - 1)(1 + \text{slack})`, rounded up: the Lipschitz bound of the
    layer with the step :math:`2/\tilde\sigma^2` (module docstring); ``inf`` for a zero estimate of a non-zero
    weight."""
    est, hat = float(sigma), float(bound)
    if not est > 0:
        return 1.0 + LAYER_ROUNDING_SLACK if hat == 0 else math.inf
    ratio = math.nextafter(math.nextafter(hat / est, math.inf) ** 2, math.inf)
    worst = max(1.0, math.nextafter(2.0 * ratio - 1.0, math.inf))
    return math.nextafter(worst * (1.0 + LAYER_ROUNDING_SLACK), math.inf)


class _Estimated:
    """The training estimate shared by the CPL layers (Note [training estimate])."""

    train_estimate: bool
    estimate: PowerEstimate

    def _sigma_estimate(self, input_shape: Sequence[int], update: bool) -> Tensor:
        raise NotImplementedError

    def _back(self, input_shape: Sequence[int], update: bool) -> Tensor:
        if not (self.training and self.train_estimate):
            return super()._back(input_shape, update)  # type: ignore[misc]
        sigma = self._sigma_estimate(input_shape, update)
        with torch.autocast(self.weight.device.type, enabled=False):
            return self._scaled_back(-_step(sigma))

    def _train_lipschitz(self, input_shape: Sequence[int]) -> float:
        with torch.no_grad():
            return _train_bound(self.norm_bound(), self._sigma_estimate(input_shape, update=False))


class CPLLinear(_Estimated, _ResidualLinear):
    r"""Dense CPL residual layer :math:`x - \frac{2}{\hat\sigma^2} W^\top \mathrm{ReLU}(Wx + b)`, 1-Lipschitz.

    Args:
        features: input and output size (the layer is residual).
        inner_features: rows of :math:`W` (default ``features``).
        bias: learn :math:`b`.

    Example:
        >>> layer = CPLLinear(8, 16).double()
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
        train_estimate: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(features, inner_features, bias, device=device, dtype=dtype)
        self.train_estimate = bool(train_estimate)
        self.estimate = PowerEstimate()

    def norm_bound(self) -> Tensor:
        r"""The upper bound :math:`\hat\sigma \ge \|W\|_2` (Gram iteration in float64, Note [constraint precision])."""
        with torch.autocast(self.weight.device.type, enabled=False):
            return gram_iteration(self.weight.to(torch.float64), CPL_DENSE_GRAM_ITERS)

    def _sigma_estimate(self, input_shape: Sequence[int], update: bool) -> Tensor:
        weight = at_least_float32(self.weight)
        with torch.autocast(weight.device.type, enabled=False):
            return self.estimate(lambda u, w: w @ u, weight, (weight.shape[1],), update)

    def _scaled_back(self, scale: Tensor) -> Tensor:
        return scale.to(at_least_float32(self.weight).dtype) * at_least_float32(self.weight).T

    def lipschitz_bound(self) -> float:
        """``1 + LAYER_ROUNDING_SLACK`` in eval mode; in training mode with the estimate, the bound of the module
        docstring."""
        if self.training and self.train_estimate:
            return self._train_lipschitz((-1, self.weight.shape[1]))
        return super().lipschitz_bound()

    def step(self) -> Tensor:
        r"""The step :math:`2 / \hat\sigma^2` (float64)."""
        return _step(self.norm_bound())

    def back_weight(self) -> Tensor:
        r"""The second factor :math:`-(2/\hat\sigma^2) W^\top` (Note [folded scaling])."""
        step = self.step()
        with torch.autocast(self.weight.device.type, enabled=False):
            return -step * at_least_float32(self.weight).T

    def export(self) -> Residual:
        r"""``Residual(Sequential(Linear(W, b), ReLU(), Linear(-(2/σ̂²) W^T)))``: plain torch, same outputs."""
        return super().export()


class CPLConv2d(_Estimated, _ResidualConv2d):
    r"""Convolutional CPL residual layer :math:`x - \frac{2}{\hat\sigma^2} C^\top \mathrm{ReLU}(Cx + b)`.

    :math:`C` is the stride-1 convolution with kernel :math:`K` (``inner x channels x kh x kw``) and "same"
    padding ``k // 2``; the adjoint is exact for both paddings (Note [conv adjoint] in
    ``stablenet.nn.relu_residual``).

    Args:
        channels: input and output channels (the layer is residual).
        inner_channels: output channels of :math:`K` (default ``channels``).
        kernel_size: odd int or ``(kh, kw)``.
        bias: learn :math:`b`.
        padding_mode: ``"zeros"`` or ``"circular"``.
        input_size: an int or ``(h, w)`` for the tight padding-aware bound at that size (other input sizes are
            refused); ``None`` (default): the size of the first input (or of the first ``lipschitz_bound``
            request with ``input_shape``), as torch's lazy modules do, the bound valid at every size until then;
            ``"any"``: the bound valid at every input size.
        method: how the size-specific bound is computed: ``"auto"`` (Cholesky on a CPU, Gram elsewhere),
            ``"cholesky"`` or ``"gram"`` (see the module docstring).
        train_estimate: train with the step of a power-iteration estimate (module docstring); ``False``: the bound.

    Example:
        >>> layer = CPLConv2d(2, 3, padding_mode="circular").double()
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
        input_size: int | Sequence[int] | str | None = None,
        *,
        method: str = "auto",
        train_estimate: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(channels, inner_channels, kernel_size, bias, padding_mode, device=device, dtype=dtype)
        if isinstance(input_size, str) and input_size != "any":
            raise ValueError(f"input_size must be None, 'any', a positive int or (h, w); got {input_size!r}")
        if method not in CIRCULAR_BOUND_METHODS or (method != "auto" and input_size == "any"):
            raise ValueError(
                f"method must be one of {', '.join(CIRCULAR_BOUND_METHODS)}, and only 'auto' with input_size 'any' "
                f"(it chooses how the size-specific bound is computed); got method={method!r}, input_size={input_size}"
            )
        self.method = method
        self.lazy_input_size = input_size is None
        self.train_estimate = bool(train_estimate)
        self.estimate = PowerEstimate()
        input_size = None if input_size == "any" else input_size
        if input_size is not None:
            size = (input_size,) * 2 if isinstance(input_size, int) else tuple(input_size)
            if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
                raise ValueError(
                    f"input_size must be None, a positive int or (h, w) of positive ints; got {input_size}"
                )
            input_size = size
        self.input_size: tuple[int, int] | None = input_size

    def norm_bound(self) -> Tensor:
        r"""The upper bound :math:`\hat\sigma \ge \|C\|_2` (see the module docstring), in float64."""
        with torch.autocast(self.weight.device.type, enabled=False):
            # (groups=1, inner, channels, kh, kw), in float64: Note [constraint precision]
            kernel5 = self.weight.to(torch.float64)[None]
            if self.input_size is None:
                return spatial_gram_bound(kernel5, CPL_SPATIAL_GRAM_ITERS)
            h, w = self.input_size
            if self.padding_mode == "zeros":
                # The zero-padded operator is a submatrix of the circular one on n + p pixels (embedding bound).
                h, w = h + self.padding[0], w + self.padding[1]
            if self.method == "cholesky" or (self.method == "auto" and kernel5.device.type == "cpu"):
                return circular_norm_bound(kernel5, (h, w), method="cholesky")
            return circular_gram_bound(kernel5, (h, w), CPL_FFT_GRAM_ITERS)  # folds a kernel larger than (h, w)

    def step(self) -> Tensor:
        r"""The step :math:`2 / \hat\sigma^2` (float64)."""
        return _step(self.norm_bound())

    def _take_size(self, shape: Sequence[int]) -> None:
        """Record the spatial size of the first input of a lazy layer (its bound becomes size-specific)."""
        if self.lazy_input_size and self.input_size is None and len(shape) >= 2:
            self.input_size = (int(shape[-2]), int(shape[-1]))
            self._cache.clear()

    def _sigma_estimate(self, input_shape: Sequence[int], update: bool) -> Tensor:
        weight = at_least_float32(self.weight)
        size = tuple(input_shape[-2:]) if len(input_shape) >= 3 and input_shape[-1] > 0 else self.input_size
        if size is None:
            raise ValueError("a training-mode CPLConv2d needs an input size for its estimate (it is per size)")

        def apply(u: Tensor, w: Tensor) -> Tensor:
            return _conv_same(u, w, None, self.padding, self.padding_mode)

        with torch.autocast(weight.device.type, enabled=False):
            return self.estimate(apply, weight, (1, weight.shape[1], int(size[0]), int(size[1])), update)

    def _scaled_back(self, scale: Tensor) -> Tensor:
        return scale.to(at_least_float32(self.weight).dtype) * at_least_float32(self.weight)

    def lipschitz_bound(self, input_shape: Sequence[int] | None = None) -> float:
        """``1 + LAYER_ROUNDING_SLACK`` in eval mode; in training mode with the estimate, the bound of the module
        docstring at ``input_shape`` (or the recorded input size)."""
        if input_shape is not None:
            self._take_size(input_shape)
            if self.input_size is not None and tuple(input_shape[-2:]) != self.input_size:
                raise ValueError(
                    f"CPLConv2d was built for input_size {self.input_size} (its bound holds at that size only); "
                    f"got spatial size {tuple(input_shape[-2:])}"
                )
        if self.training and self.train_estimate:
            return self._train_lipschitz(input_shape if input_shape is not None else ())
        return super().lipschitz_bound()

    def _check_input(self, x: Tensor) -> None:
        super()._check_input(x)
        self._take_size(x.shape)
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(
                f"CPLConv2d was built for input_size {self.input_size} (its bound holds at that size only); "
                f"got spatial size {tuple(x.shape[-2:])}"
            )

    def back_weight(self) -> Tensor:
        r"""The kernel :math:`-(2/\hat\sigma^2) K` whose adjoint is the second factor (Note [folded scaling])."""
        step = self.step()
        with torch.autocast(self.weight.device.type, enabled=False):
            return -step * at_least_float32(self.weight)

    def export(self) -> Residual:
        r"""Plain ``Residual(Sequential(Conv2d(K, b), ReLU(), Conv2d(-(2/σ̂²) K^T)))`` with the same outputs.

        With ``input_size`` set, the exported block no longer checks the input size: its guarantee still
        holds only at that size.
        """
        return super().export()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input_size={self.input_size}, method={self.method!r}"
