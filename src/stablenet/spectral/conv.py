r"""Spectral norms of convolutions: exact values, guaranteed upper bounds and lower estimates.

The operator norm of a convolution depends on the padding and on the input size :math:`n`.

* **Circular padding** (Sedghi et al. 2019): the 2-D DFT block-diagonalises the operator, so
  :math:`\|C\| = \max_\omega \sigma_1(\hat K(\omega))` with :math:`\hat K` the DFT of the kernel zero-padded
  to :math:`n \times n`. ``method="exact"`` takes batched SVDs; ``method="gram"`` runs the Gram iteration
  batched over frequencies (an upper bound; Delattre et al. 2023).
* **Zero padding**, ``method="gram"``: the *spatial* Gram iteration (Delattre et al. 2024, arXiv 2402.00240).
  With :math:`G_1` the kernel of :math:`CC^\top` and :math:`G_t` that of :math:`(CC^\top)^{2^{t-1}}`,
  :math:`\|C\|^{2^T} \le \max_i \sum_{j,p,q} |G_T[i,j,p,q]|` (Schur test on a self-adjoint convolution).
  The bound holds for every :math:`n` and for both paddings. We compute the iterates in the Fourier domain
  at the size :math:`N_T = 2^T(k-1)+1` that holds :math:`G_T` without aliasing (Note [spatial Gram memory]).
* **Zero padding**, ``method="embed"``: the zero-padded operator on :math:`n` pixels is a submatrix of the
  circular one on :math:`N = n + \max(p, 2p-k+1)` pixels (:math:`p` the padding; the wrap-around then only
  reads padded zeros), so :math:`\|C_{\text{zeros},n}\| \le \|C_{\text{circ},N}\|`, bounded by the circular
  Gram iteration. Tight for large :math:`n`; depends on :math:`n`.
* ``method="exact"`` for zero padding or strides: the SVD of the explicit operator matrix (small inputs).
* ``method="power"``: power iteration on the conv / transposed-conv pair, a **lower estimate**.

Stride: subsampling is 1-Lipschitz, so unstrided bounds stay valid (possibly loose). Groups: the operator
is block-diagonal, so the norm is the **max** over groups. Dilation: the kernel is dilated explicitly.
Kernels of rank 3 are 1-D convolutions (treated as height-1 2-D ones).

# Note [spatial Gram memory]
The iterate :math:`G_T` is a ``c x c x N_T x N_T`` tensor, :math:`N_T` doubling with each iteration: with
512 channels and a 3x3 kernel, :math:`T=6` needs tens of GB. We hold only the half spectrum (``rfft2``),
square it in place, frequency chunk by chunk, and pick the largest :math:`T \le` ``n_iter`` whose spectrum
fits ``max_memory_bytes``. The final inverse FFT is done for a block of rows at a time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from stablenet.spectral.cholesky_bound import (
    _cholesky_bound,
    _collapsed_size,
    _half_frequencies,
    _Spectrum,
    cholesky_circular_bound,
)
from stablenet.spectral.dense import GRAM_ROUNDING_SLACK, gram_iteration, gram_iteration_amax, power_iteration
from stablenet.spectral.lockstep import LOCKSTEP_MEMORY_BYTES, _gram_max_many, gram_iteration_max_many
from stablenet.spectral.rescaling import conv_gram_power_rowsums

__all__ = [
    "CIRCULAR_BOUND_METHODS",
    "CONV_METHODS",
    "DEFAULT_MAX_MEMORY_BYTES",
    "circular_gram_bound",
    "circular_norm_bound",
    "conv_operator",
    "conv_operator_matrix",
    "conv_spectral_norm",
    "conv_spectral_norm_upper_bound",
    "conv_spectral_norm_upper_bounds",
    "spatial_gram_bound",
]

PADDINGS = ("circular", "zeros")
CONV_METHODS = {
    "circular": ("auto", "exact", "gram", "power"),
    "zeros": ("auto", "embed", "exact", "gram", "power"),
}
DEFAULT_MAX_MEMORY_BYTES = 1 << 30
_EXPLICIT_MAX_ENTRIES = 1 << 24


def _tuple(value: int | Sequence[int], nd: int, name: str, minimum: int = 1) -> tuple[int, ...]:
    out = (value,) * nd if isinstance(value, int) else tuple(value)
    if len(out) != nd or not all(isinstance(v, int) and v >= minimum for v in out):
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be a {kind} int or a tuple of {nd} {kind} ints; got {value!r}")
    return out


def _check_finite(kernels: Sequence[Tensor]) -> None:
    """``ValueError`` if any kernel holds NaN or Inf; one host synchronisation per device for all of them."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for kernel in kernels:
        by_device.setdefault(kernel.device, []).append(torch.isfinite(kernel).all())
    if not all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        raise ValueError("kernel contains NaN or Inf; a spectral norm needs finite weights")


class _Conv:
    """A validated convolution: kernel as ``(groups, c_out/g, c_in/g, kh, kw)`` (dilated), sizes, paddings."""

    def __init__(
        self,
        kernel: Tensor,
        input_size: int | Sequence[int],
        padding: str,
        padding_size: int | Sequence[int] | str,
        stride: int | Sequence[int],
        dilation: int | Sequence[int],
        groups: int,
        check_finite: bool = True,
    ) -> None:
        if not isinstance(kernel, Tensor) or kernel.dim() not in (3, 4):
            shape = tuple(kernel.shape) if isinstance(kernel, Tensor) else type(kernel).__name__
            raise ValueError(
                f"kernel must have shape (c_out, c_in/groups, kh, kw) or (c_out, c_in/groups, k); got {shape}"
            )
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {', '.join(map(repr, PADDINGS))}; got {padding!r}")
        if check_finite:  # a host synchronisation: callers with many kernels check them all at once
            _check_finite([kernel])
        self.one_d = kernel.dim() == 3
        nd = 1 if self.one_d else 2
        if self.one_d:
            kernel = kernel.unsqueeze(-2)
        size = _tuple(input_size, nd, "input_size")
        stride_t = _tuple(stride, nd, "stride")
        dil = _tuple(dilation, nd, "dilation")
        if self.one_d:
            size, stride_t, dil = (1, *size), (1, *stride_t), (1, *dil)
        if not isinstance(groups, int) or groups < 1 or kernel.shape[0] % groups:
            raise ValueError(f"groups must be a positive int dividing c_out={kernel.shape[0]}; got {groups!r}")
        if any(d > 1 for d in dil):
            c_out, c_in, kh, kw = kernel.shape
            dilated = kernel.new_zeros(c_out, c_in, dil[0] * (kh - 1) + 1, dil[1] * (kw - 1) + 1)
            dilated[:, :, :: dil[0], :: dil[1]] = kernel
            kernel = dilated
        k = tuple(kernel.shape[-2:])
        if size[0] < k[0] or size[1] < k[1]:
            raise ValueError(
                f"input_size {tuple(size)} is smaller than the (dilated) kernel {k}; it must be at least that"
            )
        self.kernel = kernel
        self.groups, self.size, self.stride, self.k, self.padding = groups, size, stride_t, k, padding
        self.pads = self._pads(padding_size, nd)
        if padding == "circular" and any(b + a > kk - 1 for (b, a), kk in zip(self.pads, k, strict=True)):
            # Note [circular over-padding]: a wider wrap makes the output longer than the input and repeats rows
            # of the circular operator, so its norm can exceed the circular bound; we refuse instead of under-bound.
            raise ValueError(
                f"circular padding {self.pads} wraps more than the (dilated) kernel {k} reaches; the total padding "
                "per axis must be at most kernel - 1 (e.g. 'same')"
            )
        self.c_out, self.c_in = kernel.shape[0], kernel.shape[1] * groups

    def _pads(self, padding_size: int | Sequence[int] | str, nd: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(before, after) zero/circular padding per spatial dim, torch's conventions."""
        if self.padding == "circular" and padding_size == "same":
            padding_size = "same"
        if padding_size == "same":
            return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in self.k)  # type: ignore[return-value]
        if padding_size == "valid":
            return ((0, 0), (0, 0))
        if isinstance(padding_size, str):
            raise ValueError(f"padding_size must be 'same', 'valid', an int or a tuple of ints; got {padding_size!r}")
        p = _tuple(padding_size, nd, "padding_size", minimum=0)
        if self.one_d:
            p = (0, *p)
        return tuple((v, v) for v in p)  # type: ignore[return-value]

    @property
    def grouped(self) -> Tensor:
        g = self.groups
        return self.kernel.reshape(g, self.kernel.shape[0] // g, *self.kernel.shape[1:])

    def apply(self, x: Tensor) -> Tensor:
        """The operator itself on a batch ``(B, c_in, h, w)``."""
        (pt, pb), (pl, pr) = self.pads
        mode = "circular" if self.padding == "circular" else "constant"
        if any((pt, pb, pl, pr)):
            x = F.pad(x, (pl, pr, pt, pb), mode=mode)
        return F.conv2d(x, self.kernel.to(x.dtype), stride=self.stride, groups=self.groups)


def conv_operator(
    kernel: Tensor,
    input_size: int | Sequence[int],
    *,
    padding: str = "zeros",
    padding_size: int | Sequence[int] | str = "same",
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
):
    """``(matvec, rmatvec, input_shape)`` of the convolution, for ``power_iteration`` and explicit matrices."""
    conv = _Conv(kernel, input_size, padding, padding_size, stride, dilation, groups)
    shape = (conv.c_in, *conv.size)
    _, vjp = torch.func.vjp(lambda x: conv.apply(x[None])[0], kernel.new_zeros(shape))

    def matvec(x: Tensor) -> Tensor:
        return conv.apply(x[None])[0]

    def rmatvec(y: Tensor) -> Tensor:
        return vjp(y)[0]

    return matvec, rmatvec, shape


def conv_operator_matrix(kernel: Tensor, input_size: int | Sequence[int], **conv_args) -> Tensor:
    """The explicit matrix of the convolution (rows: flattened outputs), by applying it to the identity basis."""
    conv = _Conv(
        kernel,
        input_size,
        conv_args.get("padding", "zeros"),
        conv_args.get("padding_size", "same"),
        conv_args.get("stride", 1),
        conv_args.get("dilation", 1),
        conv_args.get("groups", 1),
    )
    d_in = conv.c_in * conv.size[0] * conv.size[1]
    out_numel = conv.apply(kernel.new_zeros(1, conv.c_in, *conv.size)).numel()
    if d_in * out_numel > _EXPLICIT_MAX_ENTRIES:
        raise ValueError(
            f"the explicit operator would have {out_numel}x{d_in} entries (limit {_EXPLICIT_MAX_ENTRIES}); "
            "use method='gram' or 'power' for this size"
        )
    eye = torch.eye(d_in, dtype=kernel.dtype, device=kernel.device).reshape(d_in, conv.c_in, *conv.size)
    return conv.apply(eye).reshape(d_in, -1).T


def _fold_kernel(kernel5: Tensor, size: tuple[int, int]) -> Tensor:
    r"""The kernel of the circular convolution on ``size`` pixels, folded modulo ``size`` where it is larger.

    On :math:`N < k` pixels the taps :math:`u` and :math:`u + N` act on the same pixel, so they add up; the DFT
    at size :math:`N` then sees every tap (``rfft2(s=size)`` alone would crop the kernel and under-estimate the
    norm). A no-op when the kernel fits.
    """
    for dim, n in ((-2, size[0]), (-1, size[1])):
        k = kernel5.shape[dim]
        if k > n:
            shape = list(kernel5.shape)
            shape[dim] = n
            index = torch.arange(k, device=kernel5.device) % n
            kernel5 = kernel5.new_zeros(shape).index_add(dim % kernel5.dim(), index, kernel5)
    return kernel5


def _half_spectrum(kernel5: Tensor, size: tuple[int, int]) -> Tensor:
    """``(g, H, W//2+1, c_out/g, c_in/g)`` DFT of the circular kernel on ``size`` pixels (folded, then zero-padded)."""
    spec = torch.fft.rfft2(_fold_kernel(kernel5, size), s=size)
    return spec.permute(0, 3, 4, 1, 2)


#: Adaptive Gram iteration for convolutions: at most this many steps, stopping at this relative tightness.
GRAM_MAX_ITER, GRAM_TOL = 14, 1e-5


def _circular_matrices(kernel5: Tensor, size: tuple[int, int]) -> Tensor:
    """The matrices whose largest norm is the circular norm: the half spectrum, or the channel matrix of a 1x1
    kernel (the same at every frequency)."""
    return kernel5[..., 0, 0] if kernel5.shape[-2:] == (1, 1) else _half_spectrum(kernel5, size)


# Note [lockstep from the Gram kernel]
# The lockstep bound (conv_spectral_norm_upper_bounds) starts from G(w) = K(w)^H K(w) itself, computed from the
# Gram kernel H_d = sum_{u-v=d} A_u^T A_v by one phase GEMM per group (stablenet.spectral.cholesky_bound._Spectrum,
# the Cholesky path's spectrum), written straight into the lockstep's buffer: no FFT, no spectrum K(w), no
# copy, and no first squaring of every frequency (one of the four or more full-batch steps of each of the
# ResNet-18 bound's convolutions). The kernel is first divided by a power of two near its largest entry, exactly
# except for entries that become subnormal (each moves by less than 2^-1074, far inside the 1e-9 rounding
# slack), so G neither overflows nor underflows; the scale multiplies the bound back. _Spectrum bounds
# ||G_computed(w) - G(w)||_2 <= err for every frequency (Note [verified rounding] in stablenet.spectral.cholesky_bound),
# so sigma_1(K(w))^2 <= ||G_computed(w)||_2 + err <= b^2 + err for the Gram iteration's upper bound b on the square
# root of ||G_computed(w)||_2: the result is scale * sqrt(b^2 + err), times 1 + GRAM_ROUNDING_SLACK for the
# iteration's own rounding, as before. Against the FFT start, the ResNet-18 bounds rose by 7e-13 to 6e-11
# (relative; benchmarks/README.md). The half spectrum is the deduplicated one of the Cholesky path
# (one frequency of each conjugate pair, one per axis where the kernel has one tap).


class _GramSource:
    r"""The Gram matrices :math:`G(\omega) = \hat K(\omega)^H \hat K(\omega)` of a circular convolution over its
    half spectrum, as a :class:`~stablenet.spectral.lockstep.MatrixSource` for the lockstep Gram iteration (Note
    [lockstep from the Gram kernel]).

    Read once; then ``scale`` (a power of two) and ``err`` (a bound on the rounding of every computed
    :math:`G(\omega)` of the scaled kernel) are set, as 0-dim device tensors, and the circular norm is at most
    ``scale * sqrt(b**2 + err)`` for an upper bound ``b`` on the square roots of the computed matrices' norms.
    """

    gram = True

    def __init__(self, kernel5: Tensor, size: tuple[int, int]) -> None:
        g, co, ci = kernel5.shape[:3]
        self.kernel5, self.size = kernel5, size
        self.count = g * len(_half_frequencies(_collapsed_size(kernel5, size), torch.device("cpu")))
        self.shape = (min(co, ci), min(co, ci))
        self.dtype = torch.complex128 if kernel5.dtype == torch.float64 else torch.complex64
        self.device = kernel5.device
        self.scale: Tensor | None = None
        self.err: Tensor | None = None

    def matrices(self, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        _, exponent = torch.frexp(self.kernel5.abs().amax())
        self.scale = torch.ldexp(torch.ones((), dtype=self.kernel5.dtype, device=self.device), exponent)
        spectrum = _Spectrum(self.kernel5 / self.scale, self.size)  # exact: a power of two, entries below 1
        self.err = spectrum.err.amax()
        return spectrum.gram_range(start, stop, out)


def circular_gram_bound(kernel5: Tensor, size: tuple[int, int], n_iter: int | None = None) -> Tensor:
    """Max over frequencies (and groups) of the Gram bound of :math:`\\hat K(\\omega)`; an upper bound.

    ``n_iter=None`` iterates adaptively, as :func:`~stablenet.spectral.dense.gram_iteration_max` (at most
    ``GRAM_MAX_ITER`` steps, dropping the frequencies that cannot hold the maximum, stopping once the bound is
    within ``GRAM_TOL`` of a lower estimate), from the Gram matrices of the Gram kernel (Note [lockstep from the
    Gram kernel]: no FFT and one squaring fewer); the value adds their rounding bound, and the gradient is that
    of the argmax frequency's Gram bound (Note [gradient of the maximum]). A fixed ``n_iter`` iterates the
    spectrum itself, on the device alone, so that a CUDA graph can capture it. A 1x1 kernel has the same matrix
    at every frequency, so it is bounded once.
    """
    if n_iter is not None:
        return gram_iteration_amax(_circular_matrices(kernel5, size), n_iter)
    source = _GramSource(kernel5.detach(), size)
    with torch.no_grad():
        (problem,) = _gram_max_many([source], GRAM_MAX_ITER, GRAM_TOL)
        scale, err = torch.stack([source.scale, source.err]).tolist()
    top = torch.tensor(math.sqrt(problem.top**2 + err) * scale, dtype=kernel5.dtype, device=kernel5.device)
    if not (torch.is_grad_enabled() and kernel5.requires_grad):
        return top
    single = gram_iteration(_frequency_matrix(kernel5, size, problem.argmax), problem.steps)
    return top + (single - single.detach())


#: Methods of :func:`circular_norm_bound`.
CIRCULAR_BOUND_METHODS = ("auto", "cholesky", "gram")


def circular_norm_bound(
    kernel5: Tensor, size: tuple[int, int], n_iter: int | None = None, *, method: str = "auto"
) -> Tensor:
    r"""A differentiable upper bound on the circular convolution's norm on ``size`` pixels, by the faster method.

    * ``"gram"``: :func:`circular_gram_bound` (``n_iter`` steps, or adaptive);
    * ``"cholesky"``: the value of :func:`~stablenet.spectral.cholesky_bound.cholesky_circular_bound` (within ``1e-4``
      of exact, its rounding bounded), with the gradient of :math:`\sigma_1(\hat K(\omega^*))` at the frequency
      :math:`\omega^*` that set its level (Note [gradient at the top frequency]);
    * ``"auto"``: ``"cholesky"`` for float64 kernels on a CPU with ``n_iter=None``: it made the CPU training
      step of a 128-channel spectral layer at 32x32 six times faster (``benchmarks/README.md``);
      ``"gram"`` otherwise (batched Cholesky factorisations are slow on GPUs, see
      :func:`conv_spectral_norm_upper_bound`). The two values differ by at most about ``1e-4`` (relative).

    Callers multiply by ``1 + GRAM_ROUNDING_SLACK`` as for :func:`circular_gram_bound`; the Cholesky value
    already covers its own rounding, so the factor only adds ``1e-9`` there.
    """
    if method not in CIRCULAR_BOUND_METHODS:
        raise ValueError(f"method must be one of {', '.join(CIRCULAR_BOUND_METHODS)}; got {method!r}")
    if method == "cholesky" and n_iter is not None:
        raise ValueError(f"n_iter applies to the Gram iteration only; got n_iter={n_iter} with method='cholesky'")
    if method == "auto":
        cpu_certified = kernel5.device.type == "cpu" and kernel5.dtype == torch.float64
        method = "cholesky" if cpu_certified and n_iter is None else "gram"
    if method == "gram":
        return circular_gram_bound(kernel5, size, n_iter)
    if kernel5.dtype != torch.float64:
        raise ValueError(f"method='cholesky' certifies float64 kernels; got {kernel5.dtype}")
    value, index = _cholesky_bound(kernel5.detach(), size)
    if not (torch.is_grad_enabled() and kernel5.requires_grad):
        return value
    # Note [gradient at the top frequency]
    # The norm is max_w sigma_1(K^(w)); away from ties its gradient is that of sigma_1 at the argmax frequency,
    # and the Cholesky bound (a verified level, not a function of the kernel) has none. So the value is the
    # bound's and the gradient that of sigma_1(K^(w*)) at the frequency whose Lanczos estimate set the level:
    # the argmax, or one within 2e-4 of it. K^(w*) is one DFT coefficient, built from the taps, so the backward
    # costs one c x c SVD (the Gram iteration's backward iterates its argmax matrix in the same way, Note
    # [gradient of the maximum] in stablenet.spectral.dense).
    top = torch.linalg.matrix_norm(_frequency_matrix(kernel5, size, index), 2)
    return value + (top - top.detach())


def _frequency_matrix(kernel5: Tensor, size: tuple[int, int], index: int) -> Tensor:
    """``(c_out/g, c_in/g)``: the kernel's DFT at matrix ``index`` of ``stablenet.spectral.cholesky_bound._Spectrum``
    (group-major over the half spectrum), differentiable; phases reduced modulo the size in integers."""
    kh, kw = kernel5.shape[-2:]
    size = _collapsed_size(kernel5, size)
    freqs = _half_frequencies(size, kernel5.device)
    group, frequency = divmod(index, len(freqs))
    factors = []
    for j, k, n in zip(freqs[frequency].tolist(), (kh, kw), size, strict=True):
        angle = (j * torch.arange(k, device=kernel5.device)).remainder(n).to(kernel5.dtype) * (-2 * math.pi / n)
        factors.append(torch.polar(torch.ones_like(angle), angle))
    return torch.einsum("oiab,a,b->oi", kernel5[group].to(factors[0].dtype), *factors)


def _circular_exact(kernel5: Tensor, size: tuple[int, int]) -> Tensor:
    r"""Exact circular norm: :math:`\max_\omega \sqrt{\lambda_{\max}(\hat K^H \hat K)}` on the smaller side.

    ``eigvalsh`` of the Hermitian Gram matrix is about 1.5x faster than ``svdvals`` on CPU; in float64 its
    relative error on :math:`\sigma_1` is of order ``c**2 * 2**-52`` (tested against ``svdvals`` to 1e-9).
    """
    if kernel5.shape[-2:] == (1, 1):  # a 1x1 convolution is its channel matrix at every frequency
        return torch.linalg.matrix_norm(kernel5[..., 0, 0], 2).amax()
    spec = _half_spectrum(kernel5, size)
    gram = spec.mH @ spec if spec.shape[-2] >= spec.shape[-1] else spec @ spec.mH
    return torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0).sqrt().amax()


def _spatial_iterations(kernel5: Tensor, n_iter: int, max_memory_bytes: int) -> int:
    c = min(kernel5.shape[1], kernel5.shape[2])
    kh, kw = kernel5.shape[-2:]
    item = 2 * kernel5.element_size()  # complex
    for t in range(n_iter, 0, -1):
        nh, nw = 2**t * (kh - 1) + 1, 2**t * (kw - 1) + 1
        if kernel5.shape[0] * nh * (nw // 2 + 1) * c * c * item <= max_memory_bytes:
            return t
    return 1


def spatial_gram_bound(kernel5: Tensor, n_iter: int, max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES) -> Tensor:
    r"""Input-size-independent upper bound on a convolution's norm (zero or circular padding, any ``n``).

    Args:
        kernel5: ``(groups, c_out/g, c_in/g, kh, kw)``.
        n_iter: the largest number of iterations to use; fewer are used when the spectrum would exceed
            ``max_memory_bytes`` (see Note [spatial Gram memory]).

    Returns:
        The bound (max over groups), differentiable in the kernel.
    """
    t_iter = _spatial_iterations(kernel5, n_iter, max_memory_bytes)
    # Work on the smaller Gram side: ||C|| = ||C^T||.
    side = "input" if kernel5.shape[2] < kernel5.shape[1] else "output"
    rowsums, log_scale = conv_gram_power_rowsums(kernel5, t_iter, side)
    exponent = 2.0**-t_iter
    return (rowsums.amax(dim=1).pow(exponent) * torch.exp(log_scale * exponent)).amax()


def _embedding_size(conv: _Conv) -> tuple[int, int]:
    """Smallest circular size containing the zero-padded operator as a submatrix (see module docstring)."""
    out = []
    for n, k, (before, after) in zip(conv.size, conv.k, conv.pads, strict=True):
        p = max(before, after)
        out.append(n + max(p, 2 * p - k + 1, 0))
    return tuple(out)  # type: ignore[return-value]


def conv_spectral_norm(
    kernel: Tensor,
    input_size: int | Sequence[int],
    padding: str = "circular",
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    method: str = "auto",
    n_iter: int | None = None,
    *,
    padding_size: int | Sequence[int] | str = "same",
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Operator norm of a 2-D (or 1-D) convolution, by the chosen method, in the kernel's dtype.

    Args:
        kernel: ``(c_out, c_in/groups, kh, kw)`` or ``(c_out, c_in/groups, k)``.
        input_size: spatial input size ``(h, w)``, ``(n,)`` or an int.
        padding: ``"circular"`` or ``"zeros"``.
        stride, dilation, groups: as in ``torch.nn.Conv2d``.
        method: ``"exact"``, ``"gram"`` (upper bound), ``"embed"`` (zeros only, upper bound), ``"power"``
            (lower estimate) or ``"auto"`` (the exact FFT for small circular problems, else an upper bound).
        n_iter: iterations (default: adaptive for circular Gram and embed, see :func:`circular_gram_bound`;
            4 for spatial Gram; 100 for power).
        padding_size: torch's numeric padding (``"same"``, ``"valid"``, an int or a tuple); only the
            explicit operator and the embedding size use it.
        max_memory_bytes: spectrum budget of the spatial Gram iteration.
        generator: for the power iteration's start.

    Returns:
        A 0-dim tensor; differentiable for ``"gram"`` and ``"embed"``.

    Example:
        >>> k = torch.randn(4, 3, 3, 3, dtype=torch.float64)
        >>> exact = conv_spectral_norm(k, 8, "zeros", method="exact")
        >>> bool(conv_spectral_norm(k, 8, "zeros", method="gram") >= exact)
        True
    """
    conv = _Conv(kernel, input_size, padding, padding_size, stride, dilation, groups)
    if method not in CONV_METHODS[padding]:
        raise ValueError(
            f"method for padding {padding!r} must be one of {', '.join(CONV_METHODS[padding])}; got {method!r}"
        )
    strided = any(s > 1 for s in conv.stride)
    if method == "auto":
        small = conv.size[0] * conv.size[1] * min(conv.c_in, conv.c_out) ** 2 <= 1 << 16
        method = (
            "exact"
            if (padding == "circular" and small and not strided)
            else ("gram" if padding == "circular" else "embed")
        )
    if method == "power":
        matvec, rmatvec, shape = conv_operator(
            kernel,
            input_size,
            padding=padding,
            padding_size=padding_size,
            stride=stride,
            dilation=dilation,
            groups=groups,
        )
        sigma, _, _ = power_iteration(
            (matvec, rmatvec),
            n_iter or 100,
            input_shape=shape,
            generator=generator,
            device=kernel.device,
            dtype=kernel.dtype,
        )
        return sigma
    if method == "exact":
        if padding == "circular" and not strided:
            return _circular_exact(conv.grouped, conv.size)
        matrix = conv_operator_matrix(
            kernel,
            input_size,
            padding=padding,
            padding_size=padding_size,
            stride=stride,
            dilation=dilation,
            groups=groups,
        )
        return torch.linalg.matrix_norm(matrix, 2)
    if n_iter is not None and n_iter < 1:
        raise ValueError(f"n_iter must be >= 1; got {n_iter}")
    if method == "gram" and padding == "circular":
        return circular_gram_bound(conv.grouped, conv.size, n_iter)
    if method == "embed":
        return circular_gram_bound(conv.grouped, _embedding_size(conv), n_iter)
    return spatial_gram_bound(conv.grouped, n_iter or 4, max_memory_bytes)


def conv_spectral_norm_upper_bound(
    kernel: Tensor,
    input_size: int | Sequence[int],
    *,
    padding: str = "zeros",
    padding_size: int | Sequence[int] | str = "same",
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    method: str = "auto",
    n_iter: int | None = None,
) -> float:
    """A certified upper bound on the operator norm, computed in float64 with its rounding accounted for.

    Methods:

    * ``"cholesky"``: the circular norm (at the input size, or at the embedding size for zero padding) within
      ``1e-4`` of exact, verified by one Cholesky factorisation per frequency
      (:func:`stablenet.spectral.cholesky_bound.cholesky_circular_bound`, rounding bounded explicitly);
    * ``"gram"``: the adaptive circular Gram iteration, or the spatial Gram bound for zero padding;
    * ``"embed"`` (zeros only): the circular Gram iteration at the embedding size;
    * ``"svd"``: the exact per-frequency eigenvalues of the circular operator (a float64 eigensolver is backward
      stable: its relative error, of order ``c * 2**-52``, is far below the slack);
    * ``"auto"``: for zero padding, the embedding (tighter and cheaper than the spatial Gram bound on every layer
      we benchmarked); its circular norm by ``"cholesky"`` on CPU (4.5x faster than ``"svd"`` on ResNet-18,
      ``benchmarks/resnet18_bound.py``) and by the adaptive Gram iteration on other devices (7x faster than
      ``"cholesky"`` on an H200, whose batched Cholesky factorisations are slow).

    The Gram and SVD values are multiplied by ``1 + GRAM_ROUNDING_SLACK``. Several convolutions are bounded
    faster together by :func:`conv_spectral_norm_upper_bounds`.
    """
    problem = {
        "kernel": kernel,
        "input_size": input_size,
        "padding": padding,
        "padding_size": padding_size,
        "stride": stride,
        "dilation": dilation,
        "groups": groups,
    }
    return conv_spectral_norm_upper_bounds([problem], method=method, n_iter=n_iter)[0]


def conv_spectral_norm_upper_bounds(
    problems: Sequence[Mapping[str, object]],
    *,
    method: str = "auto",
    n_iter: int | None = None,
    max_memory_bytes: int | None = LOCKSTEP_MEMORY_BYTES,
) -> list[float]:
    """:func:`conv_spectral_norm_upper_bound` of several convolutions, by one method.

    Each problem is a mapping of that function's arguments (``kernel`` and ``input_size``, and optionally
    ``padding``, ``padding_size``, ``stride``, ``dilation``, ``groups``). With the adaptive circular Gram
    iteration (``"gram"`` with circular padding, ``"embed"``, or ``"auto"`` off the CPU) all of them advance in
    lockstep (:func:`~stablenet.spectral.lockstep.gram_iteration_max_many`): on a GPU, one device-to-host copy per
    step for the whole network instead of one per convolution. Their iterates share ``max_memory_bytes`` (Note
    [lockstep memory] in ``stablenet.spectral.lockstep``; ``None``: all convolutions from the first step); their
    first Gram matrices come from the Gram kernel (Note [lockstep from the Gram kernel]).

    Example:
        >>> ks = [torch.randn(8, 4, 3, 3), torch.randn(8, 8, 1, 1)]
        >>> bounds = conv_spectral_norm_upper_bounds([{"kernel": k, "input_size": 6} for k in ks])
        >>> bounds == [conv_spectral_norm_upper_bound(k, 6) for k in ks]
        True
    """
    defaults = {"padding": "zeros", "padding_size": "same", "stride": 1, "dilation": 1, "groups": 1}
    results: list[float | None] = [None] * len(problems)
    lockstep: list[tuple[int, _GramSource]] = []
    parsed = []
    for problem in problems:
        unknown = set(problem) - {"kernel", "input_size", *defaults}
        if unknown or not {"kernel", "input_size"} <= set(problem):
            raise ValueError(
                f"a convolution problem needs 'kernel' and 'input_size' and accepts {', '.join(defaults)}; "
                f"got keys {sorted(problem)}"
            )
        args = {**defaults, **problem}
        allowed = ("auto", "cholesky", "gram", "svd") + (("embed",) if args["padding"] == "zeros" else ())
        if method not in allowed:
            raise ValueError(
                f"a certified bound for padding {args['padding']!r} needs method in {', '.join(allowed)}; "
                f"got {method!r}"
            )
        if not isinstance(args["kernel"], Tensor):
            raise ValueError(f"kernel must be a tensor; got {type(args['kernel']).__name__}")
        parsed.append(args)
    _check_finite([args["kernel"] for args in parsed])  # one host synchronisation, not one per kernel
    with torch.no_grad():
        for i, args in enumerate(parsed):
            padding = args["padding"]
            k64 = args["kernel"].detach().to(torch.float64)
            conv = _Conv(
                k64,
                args["input_size"],
                padding,
                args["padding_size"],
                args["stride"],
                args["dilation"],
                args["groups"],
                check_finite=False,
            )
            if method == "gram" and padding == "zeros":
                results[i] = float(spatial_gram_bound(conv.grouped, n_iter or 4)) * (1.0 + GRAM_ROUNDING_SLACK)
                continue
            size = _embedding_size(conv) if padding == "zeros" else conv.size
            chosen = ("cholesky" if k64.device.type == "cpu" else "gram") if method == "auto" else method
            if chosen == "cholesky":
                results[i] = float(cholesky_circular_bound(conv.grouped, size))
            elif chosen == "svd":
                results[i] = float(_circular_exact(conv.grouped, size)) * (1.0 + GRAM_ROUNDING_SLACK)
            elif n_iter is not None:
                value = circular_gram_bound(conv.grouped, size, n_iter)
                results[i] = float(value) * (1.0 + GRAM_ROUNDING_SLACK)
            else:
                lockstep.append((i, _GramSource(conv.grouped, size)))
        if lockstep:
            sources = [source for _, source in lockstep]
            values = gram_iteration_max_many(sources, GRAM_MAX_ITER, tol=GRAM_TOL, max_memory_bytes=max_memory_bytes)
            extras = torch.stack([torch.stack([s.scale, s.err]) for s in sources]).cpu().tolist()  # one copy
            for (i, _), value, (scale, err) in zip(lockstep, values, extras, strict=True):
                results[i] = math.sqrt(value * value + err) * scale * (1.0 + GRAM_ROUNDING_SLACK)
    return results  # type: ignore[return-value]
