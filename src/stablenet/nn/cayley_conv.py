r"""Orthogonal circular convolutions by the Cayley transform in the Fourier domain.

Trockman & Kolter, "Orthogonalizing Convolutional Layers with the Cayley Transform", ICLR 2021.

The free kernel :math:`K` (``d x d x k x k``, :math:`d = \max(c_\text{in}, c_\text{out})`, odd :math:`k`) defines
a circular, "same"-padded convolution :math:`C` on the :math:`n_1 \times n_2` input. The 2-D DFT
block-diagonalises it: :math:`\widehat{Cx}(\omega) = \hat C(\omega)\hat x(\omega)` with
:math:`\hat C(\omega) \in \mathbb{C}^{d \times d}`. Per frequency,

.. math::
    A(\omega) = \hat C(\omega) - \hat C(\omega)^H, \qquad Q(\omega) = (I - A(\omega))(I + A(\omega))^{-1},

the symbols of :math:`C - C^\top` (skew-symmetric) and of its Cayley transform, an orthogonal operator; the
layer applies the ``c_out x c_in`` block of :math:`Q(\omega)` (an isometry or co-isometry: all singular values
1). ``Q`` is computed by ``torch.linalg.solve(I + A, I - A)`` (the factors commute), followed by one Björck
step in complex128 that removes the rounding of the float32 work (Note [Björck polish] in
``stablenet.nn.orthogonal``).

# Note [real Cayley transform]
The layer works on the half spectrum of ``rfft2``. It is a real operator because :math:`\hat C` is the DFT of
a real kernel: :math:`\hat C(-\omega) = \overline{\hat C(\omega)}`, hence the same for :math:`A` and :math:`Q`
(every step is a polynomial or rational map in :math:`A, A^H` with real coefficients). At the self-conjugate
frequencies (0 and :math:`n/2` along each axis) :math:`\hat C` is real, so :math:`Q` is real orthogonal and
``irfft2`` discarding imaginary parts there loses nothing. The operator's singular values are 1 to rounding
(tested at 1e-10 in float64 on the explicit matrix).

The kernel enters through its DFT *at the input size*: a kernel larger than the input wraps around
(is folded), as a circular convolution of that size does. The input size is read at run time; the eval-mode
cache (Note [eval cache] in ``stablenet.nn.base``) keeps one entry per size.

Export: at a fixed size :math:`n_1 \times n_2` the layer is a plain circular convolution with a full-size
kernel, :math:`q = \mathrm{irfft2}(Q)` laid out for ``nn.Conv2d``'s cross-correlation with padding
:math:`\lfloor n/2 \rfloor` and kernel size :math:`2\lfloor n/2 \rfloor + 1` (for even :math:`n` the extra last
row / column is zero, so the padding stays symmetric).

Example:
    >>> layer = CayleyConv2d(3, 3, 3).double()
    >>> x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    >>> bool(torch.allclose((layer(x) - layer.bias[:, None, None]).norm(), x.norm()))
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablenet.nn.base import LAYER_ROUNDING_SLACK, WeightCache, at_least_float32
from stablenet.nn.constrained import check_odd_kernel
from stablenet.nn.orthogonal import polish
from stablenet.spectral.rounding import (
    RoundingBound,
    fft_relative_error,
    gamma,
    max_input_norm,
    smallest_normal,
    unit_roundoff,
)

__all__ = ["CayleyConv2d"]

#: Input sizes whose Fourier matrices the eval cache keeps at once.
_MAX_CACHED_SIZES = 8


def _fold(kernel: Tensor, size: tuple[int, int]) -> Tensor:
    r"""The ``(..., n1, n2)`` circular-convolution kernel :math:`q` of a centred cross-correlation kernel.

    ``nn.Conv2d`` with circular padding :math:`p = (k-1)/2` computes :math:`y_i = \sum_u K_u x_{i+u-p}
    = \sum_a q_a x_{i-a}` with :math:`q_a = \sum_{u \equiv p - a} K_u` (indices mod :math:`n`), so
    :math:`\hat C = \mathrm{DFT}(q)`.
    """
    for dim, n in ((-2, size[0]), (-1, size[1])):
        k = kernel.shape[dim]
        index = (k // 2 - torch.arange(k, device=kernel.device)) % n
        shape = list(kernel.shape)
        shape[dim] = n
        kernel = kernel.new_zeros(shape).index_add(dim % kernel.dim(), index, kernel)
    return kernel


def _unfold(q: Tensor, size: tuple[int, int]) -> Tensor:
    """The ``nn.Conv2d`` kernel (size ``2 * (n // 2) + 1`` per axis, padding ``n // 2``) of the circular conv ``q``."""
    for dim, n in ((-2, size[0]), (-1, size[1])):
        p = n // 2
        index = (p - torch.arange(2 * p + 1, device=q.device)) % n
        q = q.index_select(dim % q.dim(), index)
        if n % 2 == 0:  # the first and last taps read the same offset n/2: keep one
            q = q.narrow(dim % q.dim(), 0, 2 * p).contiguous()
            q = F.pad(q, (0, 1) if dim == -1 else (0, 0, 0, 1))
    return q


def _fourier_matrices(kernel: Tensor, size: tuple[int, int], c_out: int, c_in: int) -> Tensor:
    """The ``c_out x c_in`` blocks of the Cayley transforms per frequency (module docstring)."""
    symbol = torch.fft.rfft2(_fold(kernel, size)).permute(2, 3, 0, 1)  # (n1, n2', d, d)
    a = symbol - symbol.mH
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    q = torch.linalg.solve(eye + a, eye - a)[..., :c_out, :c_in]
    return polish(q)


class CayleyConv2d(nn.Module):
    r"""Orthogonal convolution with circular padding (stride 1), by the Cayley transform per frequency.

    All singular values of the operator are 1 (``c_in == c_out``: orthogonal; otherwise orthonormal columns
    or rows), so the layer is 1-Lipschitz and gradient-norm preserving. The output has the input's spatial
    size.

    Args:
        in_channels, out_channels: channels.
        kernel_size: odd size (int or pair) of the free kernel (the layer's effective kernel is full-size).
        bias: learn a bias.
        device, dtype: of the parameters.

    Example:
        >>> layer = CayleyConv2d(2, 4, 3).double()
        >>> y = layer(torch.randn(1, 2, 6, 6, dtype=torch.float64))
        >>> plain = layer.export()  # an nn.Conv2d with a 7x7 kernel and circular padding, for 6x6 inputs
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"channels must be positive; got in={in_channels}, out={out_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = check_odd_kernel(kernel_size, "CayleyConv2d")
        d = max(in_channels, out_channels)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(d, d, *self.kernel_size, **kw))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw)) if bias else None
        self._caches: dict[tuple[int, int], WeightCache] = {}
        self._last_size: tuple[int, int] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fan_in = self.weight.shape[1] * math.prod(self.kernel_size)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's default
        if self.bias is not None:
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def fourier_matrices(self, size: Sequence[int]) -> Tensor:
        """``Q(ω)`` for the half spectrum of a ``size`` input: ``(n1, n2 // 2 + 1, c_out, c_in)``, complex.

        Computed in at least float32 with autocast off, with gradient; uncached.
        """
        size = (int(size[0]), int(size[1]))
        with torch.autocast(self.weight.device.type, enabled=False):
            return _fourier_matrices(at_least_float32(self.weight), size, self.out_channels, self.in_channels)

    def _cached_fourier_matrices(self, size: tuple[int, int]) -> Tensor:
        cache = self._caches.get(size)
        if cache is None:
            if len(self._caches) >= _MAX_CACHED_SIZES:
                self._caches.clear()
            cache = self._caches[size] = WeightCache()
        return cache.get(self, [self.weight], lambda: self.fourier_matrices(size))  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (batch, {self.in_channels}, h, w); got shape {tuple(x.shape)}")
        size = (x.shape[-2], x.shape[-1])
        self._last_size = size
        q = self._cached_fourier_matrices(size)
        with torch.autocast(x.device.type, enabled=False):
            spectrum = torch.fft.rfft2(at_least_float32(x))  # (B, c_in, n1, n2')
            out = torch.einsum("hwoi,bihw->bohw", q.to(spectrum.dtype), spectrum)
            y = torch.fft.irfft2(out, s=size)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)[:, None, None]
        return y.to(x.dtype)

    def lipschitz_bound(self, input_shape: Sequence[int] | None = None) -> float:
        """``1 + LAYER_ROUNDING_SLACK`` (orthogonal up to rounding; Note [rounding slack] in ``nn.base``)."""
        return 1.0 + LAYER_ROUNDING_SLACK

    def rounding_bound(self, input_shape: Sequence[int], dtype: torch.dtype) -> RoundingBound:
        r"""How far ``forward`` in ``dtype`` can be from the exact map with the ideal (float64-polished) ``Q``.

        It rests on the *assumed* FFT accuracy :math:`\varepsilon` of
        :func:`~stablenet.spectral.rounding.fft_relative_error` (Note [rounding model] there), per axis. With
        :math:`N = n_1 n_2`: the forward transform is within :math:`\varepsilon\sqrt N\|x\|`; each frequency's
        product with the complex ``c_out x c_in`` block (rounded once from the ideal one) is a complex dot product
        of length :math:`c_\text{in}`, within :math:`\sqrt2\gamma_{2c_\text{in}+4}\|Q(\omega)\|_F\|\hat x(\omega)\|`,
        with :math:`\|Q(\omega)\|_F \le \sqrt{\min(c_\text{in}, c_\text{out})}`; the inverse half-spectrum
        transform has norm at most :math:`\sqrt{2/N}` and its own error :math:`\varepsilon`; the bias and the
        final cast to ``dtype`` round once each.
        """
        n1, n2 = (int(v) for v in input_shape[-2:])
        work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        eps = fft_relative_error(n1, work) + fft_relative_error(n2, work)
        eps = eps + eps * eps
        width = math.sqrt(min(self.in_channels, self.out_channels))
        product = math.sqrt(2.0) * gamma(2 * self.in_channels + 4, work) * width
        # spectrum error (eps), product error on the computed spectrum ((1 + eps) product), inverse transform
        inner = (eps + product * (1.0 + eps)) * math.sqrt(2.0) * (1.0 + eps) + eps * (1.0 + product)
        pixels = n1 * n2
        bias = 0.0 if self.bias is None else float(self.bias.detach().double().norm()) * math.sqrt(pixels)
        u = unit_roundoff(work) + unit_roundoff(dtype)
        relative = inner + u * (1.0 + inner)
        absolute = u * bias + smallest_normal(dtype) * math.sqrt(self.out_channels * pixels) * 4.0
        # every spectral value is at most ||x||_1 <= sqrt(c_in N) ||x||, times ||Q(w)||_F after the product
        limit = max_input_norm(math.sqrt(self.in_channels * pixels) * (1.0 + eps) * (1.0 + width), bias, work)
        return RoundingBound(relative * (1.0 + 1e-9), absolute * (1.0 + 1e-9), limit)

    def export(self, input_size: int | Sequence[int] | None = None) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` (full-size kernel, circular padding) equal to this layer on ``input_size`` inputs.

        Args:
            input_size: ``(h, w)`` or an int; default: the size of the last input seen by ``forward``.

        Raises:
            ValueError: when no size is given and ``forward`` has not run yet.
        """
        if input_size is None:
            if self._last_size is None:
                raise ValueError("export() needs input_size: the layer has not seen an input yet")
            input_size = self._last_size
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(int(s) for s in input_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"input_size must be an int or (h, w) with positive entries; got {input_size}")
        with torch.no_grad():
            # in float64: the full-size kernel sums many taps, so its own rounding should not add to the conv's
            q = _fourier_matrices(self.weight.double(), size, self.out_channels, self.in_channels)
            kernel = _unfold(torch.fft.irfft2(q.permute(2, 3, 0, 1), s=size), size).to(self.weight.dtype)
            plain = nn.Conv2d(
                self.in_channels,
                self.out_channels,
                tuple(kernel.shape[-2:]),
                padding=(size[0] // 2, size[1] // 2),
                bias=self.bias is not None,
                padding_mode="circular",
                device=kernel.device,
                dtype=kernel.dtype,
            )
            plain.weight.copy_(kernel)
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain.train(self.training)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, bias={bias}"
