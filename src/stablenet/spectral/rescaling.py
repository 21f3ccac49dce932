r"""Gram matrices of dense and convolutional operators, and the absolute row sums that rescaling layers use.

AOL, SLL and spectral rescaling (SR) bound a positive semi-definite Gram matrix :math:`M` (:math:`WW^\top`
or :math:`W^\top W`) by a diagonal one through weighted row sums of :math:`|M|` (a Schur test):
:math:`M \preceq \operatorname{diag}(\sum_j |M_{ij}|\, q_j / q_i)` for any :math:`q > 0`.

For a convolution :math:`C` with kernel :math:`K`, :math:`CC^\top` on an unbounded input is the convolution
whose kernel is the cross-correlation of :math:`K` with itself (``conv2d(K, K, padding=k-1)``), with
:math:`2k-1` offsets per axis. With zero padding, :math:`CC^\top` is dominated in the PSD order by a principal
submatrix of that unbounded operator (the padding is a projection), and with circular padding its entries are
sums of the unbounded ones over wrapped offsets; in both cases the row sums of the unbounded kernel are valid,
for every input size. A stride only subsamples (1-Lipschitz), so the unstrided Gram is used. (Circular means the
circulant operator: torch's circular padding wider than :math:`(k-1)/2` per side repeats output rows and is not
covered.)

**AOL** (Prach & Lampert, ECCV 2022, arXiv 2208.03160). With :math:`M = W^\top W`,

.. math::
    d_j = \Big(\sum_i |W^\top W|_{ij}\Big)^{-1/2}, \qquad \|W \operatorname{diag}(d)\|_2 \le 1,

since :math:`\operatorname{diag}(d) M \operatorname{diag}(d) \preceq \operatorname{diag}(d)
\operatorname{diag}(\sum_j |M_{ij}|) \operatorname{diag}(d) = I`. For a convolution, :math:`M` is :math:`C^\top C`
and :math:`d` is one scale per input channel (:func:`aol_conv_rescaling`).

**Spectral rescaling (SR)** (Delattre, Barthélemy & Allauzen 2024, arXiv 2402.00240). With :math:`A = WW^\top`
and :math:`m = 2^{T-1}`,

.. math::
    t_i = \Big(\sum_j |(WW^\top)^{m}|_{ij}\Big)^{1/(2m)} = \Big(\sum_j |(WW^\top)^{2^{T-1}}|_{ij}\Big)^{2^{-T}},
    \qquad \|\operatorname{diag}(1/t)\, W\|_2 \le 1.

Proof: the Schur test gives :math:`A^m \preceq \operatorname{diag}(t)^{2m}`, and :math:`x \mapsto x^{1/m}` is
operator monotone (Löwner–Heinz), so :math:`A \preceq \operatorname{diag}(t)^2`. :math:`T = 1` is AOL applied to
the rows; as :math:`T \to \infty`, :math:`t_i \to \sigma_1` for every row not orthogonal to the top singular
subspace, i.e. spectral normalisation. For a convolution, :math:`A^m` is the convolution whose kernel
:math:`G_T` is the :math:`T`-th spatial Gram iterate (support :math:`2^T(k-1)+1`), and :math:`t` holds one
scale per output channel (:func:`sr_conv_rescaling`); the argument above holds on the unbounded input and
carries over to zero and circular padding and to strides as for the Gram kernel.

Numerics: the iterates are rescaled by their Frobenius norm before each squaring and the log of the scale is
carried (as in :func:`stablenet.spectral.dense.gram_iteration`), so nothing overflows. A row whose sum is zero
(or below the smallest normal float) gets :math:`t_i = 0` and its rescaled row is zero: dropping a row never
increases the norm, so this is sound, and no epsilon is ever added to a denominator. In float32 a row much
smaller than :math:`\sigma_1` can underflow this way for large :math:`T` (it is then zeroed, not amplified).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "aol_conv_rescaling",
    "aol_rescaling",
    "conv_gram_kernel",
    "conv_gram_power_rowsums",
    "dilate_kernel",
    "safe_reciprocal",
    "sll_rescaling",
    "sr_conv_rescaling",
    "sr_rescaling",
]


def dilate_kernel(kernel: Tensor, dilation: tuple[int, int]) -> Tensor:
    """The kernel with ``dilation - 1`` zeros between taps: an undilated kernel of the same operator."""
    dh, dw = dilation
    if (dh, dw) == (1, 1):
        return kernel
    co, ci, kh, kw = kernel.shape
    out = kernel.new_zeros(co, ci, (kh - 1) * dh + 1, (kw - 1) * dw + 1)
    out[:, :, ::dh, ::dw] = kernel
    return out


def conv_gram_kernel(kernel: Tensor, groups: int = 1, side: str = "output") -> Tensor:
    r"""Kernel of :math:`CC^\top` (``side="output"``) or :math:`C^\top C` (``side="input"``) on an unbounded input.

    Args:
        kernel: ``(c_out, c_in / groups, kh, kw)``, already dilated (:func:`dilate_kernel`).
        groups: the convolution's groups; the Gram operator is block-diagonal over them.
        side: ``"output"`` for :math:`CC^\top` (channels ``c_out``), ``"input"`` for :math:`C^\top C`.

    Returns:
        ``(groups, c, c, 2kh - 1, 2kw - 1)`` with ``c`` the per-group channel count of that side; entry
        ``[g, i, j, :, :]`` couples channel ``i`` to channel ``j`` of group ``g``. Differentiable.

    Example:
        >>> k = torch.randn(4, 3, 3, 3, dtype=torch.float64)
        >>> conv_gram_kernel(k).shape
        torch.Size([1, 4, 4, 5, 5])
    """
    if side not in ("output", "input"):
        raise ValueError(f"side must be one of output, input; got {side!r}")
    if kernel.dim() != 4:
        raise ValueError(f"kernel must have shape (c_out, c_in/groups, kh, kw); got {tuple(kernel.shape)}")
    co, ci, kh, kw = kernel.shape
    if groups < 1 or co % groups:
        raise ValueError(f"groups must be >= 1 and divide c_out={co}; got {groups}")
    k5 = kernel.reshape(groups, co // groups, ci, kh, kw)
    if side == "input":
        k5 = k5.transpose(1, 2)  # C^T C correlates the kernel's input-channel slices over output channels
    g, c, inner = k5.shape[:3]
    # G[g, i, j, s] = sum_{m, u} K[g, i, m, u + s] K[g, j, m, u] for the (2kh-1)(2kw-1) offsets s, as one batched
    # GEMM: the windows of row i at every offset (unfold of the zero-padded row) against the flattened rows j.
    # Note [gram as GEMM]: a cross-correlation conv2d computes the same, but constraint math runs in float64
    # (Note [constraint precision] in stablenet.nn.base), where GPUs run GEMMs on tensor cores and cuDNN has no
    # fast convolution; on this CPU the two are within 10% (benchmarks/zoo_micro.py).
    padded = F.pad(k5.reshape(g * c, inner, kh, kw), (kw - 1, kw - 1, kh - 1, kh - 1))
    if torch._C._are_functorch_transforms_active():  # F.unfold has a batching rule, unfold_backward none
        windows = F.unfold(padded, (kh, kw))
    else:  # a strided view copied once: F.unfold launches one im2col kernel per channel on a GPU
        windows = padded.unfold(2, kh, 1).unfold(3, kw, 1).permute(0, 1, 4, 5, 2, 3)
    windows = windows.reshape(g, c, inner * kh * kw, (2 * kh - 1) * (2 * kw - 1))
    rows = k5.reshape(g, c, inner * kh * kw)
    out = torch.einsum("gikl,gjk->gijl", windows, rows)
    return out.reshape(g, c, c, 2 * kh - 1, 2 * kw - 1)


def safe_reciprocal(x: Tensor) -> Tensor:
    """``1 / x`` where ``x > 0`` and ``0`` elsewhere, with finite gradients (no epsilon in the denominator)."""
    positive = x > 0
    return torch.where(positive, 1.0 / torch.where(positive, x, torch.ones_like(x)), torch.zeros_like(x))


def _safe_power(x: Tensor, exponent: float) -> Tensor:
    """``x ** exponent`` for normal positive ``x``, ``0`` elsewhere (zero and subnormal sums), finite gradients.

    Subnormal values carry few significant bits, so their root could underestimate a scale; zero is sound.
    """
    normal = x >= torch.finfo(x.dtype).tiny
    return torch.where(normal, torch.where(normal, x, torch.ones_like(x)).pow(exponent), torch.zeros_like(x))


def _peak(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Largest absolute entry over ``dims`` (kept), detached, ``1`` for all-zero tensors: an overflow-safe scale."""
    peak = t.detach().abs().amax(dim=dims, keepdim=True)
    return torch.where(peak > 0, peak, torch.ones_like(peak))


def _safe_scale(c: Tensor) -> Tensor:
    return torch.where(c > 0, c, torch.ones_like(c))


def _check_n_iter(n_iter: int) -> None:
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be an int >= 1; got {n_iter!r}")


def _check_matrix(weight: Tensor) -> None:
    if not isinstance(weight, Tensor) or weight.dim() < 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must have shape (..., m, n); got {shape}")


def _check_kernel(kernel: Tensor, groups: int) -> None:
    if not isinstance(kernel, Tensor) or kernel.dim() != 4:
        shape = tuple(kernel.shape) if isinstance(kernel, Tensor) else type(kernel).__name__
        raise ValueError(f"kernel must have shape (c_out, c_in/groups, kh, kw); got {shape}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or kernel.shape[0] % groups:
        raise ValueError(f"groups must be a positive int dividing c_out={kernel.shape[0]}; got {groups!r}")


def aol_rescaling(weight: Tensor) -> Tensor:
    r"""AOL column scales :math:`d_j = (\sum_i |W^\top W|_{ij})^{-1/2}`: :math:`\|W \operatorname{diag}(d)\| \le 1`.

    Prach & Lampert, "Almost-Orthogonal Layers for Efficient General-Purpose Lipschitz Networks", ECCV 2022.
    A zero column gets :math:`d_j = 0`. Differentiable; computed on ``W / max|W|`` so the Gram matrix cannot
    overflow (:math:`d` is :math:`-1`-homogeneous in :math:`W`).

    Args:
        weight: ``(..., m, n)``.

    Returns:
        ``(..., n)`` non-negative scales, in the dtype of ``weight``.

    Example:
        >>> w = torch.randn(5, 3, dtype=torch.float64)
        >>> bool(torch.linalg.matrix_norm(w * aol_rescaling(w), 2) <= 1 + 1e-12)
        True
    """
    _check_matrix(weight)
    peak = _peak(weight, (-2, -1))
    w = weight / peak
    rowsum = (w.mT @ w).abs().sum(dim=-1)  # |W^T W| is symmetric: row sums = column sums
    return _safe_power(rowsum, -0.5) / peak[..., 0]


def sr_rescaling(weight: Tensor, n_iter: int = 3) -> Tensor:
    r"""Spectral-rescaling row scales :math:`t`, so that :math:`\|\operatorname{diag}(1/t)\, W\| \le 1`.

    Delattre, Barthélemy & Allauzen, "Spectral Norm of Convolutional Layers with Circular and Zero Paddings",
    2024 (arXiv 2402.00240). With :math:`G_1 = WW^\top` and :math:`G_{s+1} = G_s^2` (so
    :math:`G_T = (WW^\top)^{2^{T-1}}`),

    .. math:: t_i = \Big(\sum_j |G_T|_{ij}\Big)^{2^{-T}}.

    The iterates are divided by their Frobenius norm before each squaring and the log of the scale is carried,
    so nothing overflows; the normalisers are detached, which is exact because :math:`t` does not depend on
    them. ``n_iter=1`` equals AOL on the rows (``1 / aol_rescaling(W.T)``); large ``n_iter`` approaches
    :math:`\sigma_1(W)` on every row, i.e. spectral normalisation. A zero row gets :math:`t_i = 0` (use
    :func:`safe_reciprocal`: the rescaled row is then zero).

    Args:
        weight: ``(..., m, n)``.
        n_iter: number of Gram iterates :math:`T \ge 1`.

    Returns:
        ``(..., m)`` non-negative scales, in the dtype of ``weight``; differentiable.

    Example:
        >>> w = torch.randn(4, 6, dtype=torch.float64)
        >>> t = sr_rescaling(w, n_iter=3)
        >>> bool(torch.linalg.matrix_norm(w / t[:, None], 2) <= 1 + 1e-12)
        True
    """
    _check_matrix(weight)
    _check_n_iter(n_iter)
    peak = _peak(weight, (-2, -1))
    w = weight / peak
    c = _safe_scale(torch.linalg.matrix_norm(w.detach(), "fro"))
    w = w / c[..., None, None]
    log_scale = 2.0 * torch.log(c * peak[..., 0, 0])
    gram = w @ w.mT
    for _ in range(n_iter - 1):
        c = _safe_scale(torch.linalg.matrix_norm(gram.detach(), "fro"))
        gram = gram / c[..., None, None]
        gram = gram @ gram
        log_scale = 2.0 * (log_scale + torch.log(c))
    exponent = 2.0**-n_iter
    return _safe_power(gram.abs().sum(dim=-1), exponent) * torch.exp(log_scale * exponent)[..., None]


def _group_max_fro(m: Tensor) -> Tensor:
    """Per group (dim 0), the largest Frobenius norm over frequencies of ``(g, H, W', a, b)``; detached, safe."""
    return _safe_scale(torch.linalg.matrix_norm(m.detach(), "fro").reshape(m.shape[0], -1).amax(dim=1))


def _square_in_place(m: Tensor, chunk: int = 16) -> Tensor:
    if not m.is_contiguous():  # reshape would copy, and the squares would land in the copy
        return m @ m
    flat = m.view(-1, *m.shape[-2:])
    for start in range(0, flat.shape[0], chunk):
        part = flat[start : start + chunk]
        part.copy_(part @ part)
    return m


#: Matrices per chunk of the fused projection and product in the CPU backward of a Hermitian squaring.
_SQUARE_CHUNK = 8


# Note [Hermitian squaring]
# The symbols squared by conv_gram_power_rowsums are Hermitian at every frequency (the symbol of a self-adjoint
# operator; G[-s] = G[s]^T), and so is every perturbation the kernel can cause. For Y = M M, autograd's gradient
# G M^H + M^H G differs from S M + M S, with S = (G + G^H) / 2, by the anti-Hermitian A M + M A (A = G - S),
# which is orthogonal to every Hermitian perturbation E. And S M + M S = X + X^H with X = S M, whose inner
# product with a Hermitian E equals that of 2 X (<X^H, E> = Re tr(X E) = Re tr((X E)^H) = Re tr(E X^H) = <X, E>),
# so the backward returns 2 S M = (G + G^H) M: one product instead of two, and the kernel's gradient is
# unchanged because every consumer of that gradient only pairs it with Hermitian perturbations (an earlier
# squaring projects it again; the first symbol's backward, a product K K^H or the real Gram kernel's taps with
# G[-s] = G[s]^T, annihilates anti-Hermitian parts). Two of the six complex batched products of an SR training
# step (T = 3) are saved. On a CPU the projection is fused with the product in chunks that stay in cache (a
# transposed read of the whole batch is slow there). Without create_graph the backward writes into one
# buffer; with it, it is one differentiable expression, so gradients of gradients follow. Under torch.func
# transforms (which need their own autograd.Function protocol) the plain product runs.
class _HermitianSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, m: Tensor) -> Tensor:
        ctx.save_for_backward(m)
        return m @ m

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (m,) = ctx.saved_tensors
        if torch.is_grad_enabled() or grad.device.type != "cpu":
            return (grad + grad.mH) @ m  # 2 S M
        flat_grad, flat_m = grad.reshape(-1, *grad.shape[-2:]), m.reshape(-1, *m.shape[-2:])
        out = torch.empty(flat_m.shape, dtype=m.dtype, device=m.device)
        for start in range(0, len(out), _SQUARE_CHUNK):
            part = flat_grad[start : start + _SQUARE_CHUNK]
            torch.matmul(part + part.mH, flat_m[start : start + _SQUARE_CHUNK], out=out[start : start + _SQUARE_CHUNK])
        return out.view(m.shape)


def _hermitian_square(m: Tensor) -> Tensor:
    """``m @ m`` for batches of Hermitian matrices whose perturbations are Hermitian (Note [Hermitian squaring])."""
    if torch._C._are_functorch_transforms_active():
        return m @ m
    return _HermitianSquare.apply(m)


# Note [unscaled spatial Gram]
# When no iterate can overflow, conv_gram_power_rowsums skips the per-step rescaling (a pass over the spectrum
# and a reduction per step, forward and backward) and computes G_1 in space with one real GEMM (conv_gram_kernel)
# instead of the complex product of the kernel's spectrum with itself, then takes its symbol at the size of G_T
# by one GEMM with the phases of its taps at offsets -(k-1) ... k-1 (_half_symbol).
# The bound: with the kernel divided by its largest entry, every entry of G_1 is at most a_1 = c_in k_h k_w
# (c_in the inner channel count), every entry of its symbol at most S a_1 (S = (2k_h-1)(2k_w-1) taps), a
# squaring of c x c symbols maps a bound a to c a^2, and a row sum of |G_T| adds c N_h N_w entries. The unscaled
# path runs only in float64, when this bound on the row sums stays below 2^500 (so the gradients, about
# 1 / row sum, stay far from float64's subnormal numbers; a 512-channel 3x3 kernel qualifies up to T = 5), and
# when the real GEMM's windows are no larger than the spectrum (or 1 MiB).
# Nothing underflows as a whole: G_1[0] (offset 0) is the average of the symbols over the frequencies and its
# largest diagonal entry is at least 1 (the row holding the peak), so some frequency's top eigenvalue is at
# least 1, and stays so under squaring. A row far below the peak can underflow to zero, as it does relative to
# the rescaled iterates; it then gets t = 0 (sound).
def _unscaled_is_safe(kernel5: Tensor, n_iter: int, side: str) -> bool:
    if kernel5.dtype != torch.float64:
        return False
    g, co, ci, kh, kw = kernel5.shape
    c, inner = (co, ci) if side == "output" else (ci, co)
    taps = (2 * kh - 1) * (2 * kw - 1)
    log_a = math.log(taps * inner * kh * kw)  # entries of G_1's symbol
    for _ in range(n_iter - 1):
        log_a = math.log(c) + 2.0 * log_a
    nh, nw = 2**n_iter * (kh - 1) + 1, 2**n_iter * (kw - 1) + 1
    log_rowsum = log_a + math.log(c * nh * nw)  # a row sum of |G_T| adds c N_h N_w entries
    windows_bytes = 8 * g * c * taps * inner * kh * kw
    spectrum_bytes = 16 * g * nh * (nw // 2 + 1) * c * c
    return log_rowsum < 500 * math.log(2) and windows_bytes <= max(spectrum_bytes, 2**20)


def _half_symbol(taps: Tensor, size: tuple[int, int]) -> Tensor:
    r"""``rfft2`` at ``size`` of a kernel given by its taps at offsets :math:`-(a-1)/2 \dots (a-1)/2` (axes -2, -1;
    odd lengths), laid out ``(g, H, W//2+1, c1, c2)``: one complex GEMM of the phases with the taps.

    The same as padding the taps to ``size``, rolling the centre tap to index 0 and calling ``rfft2``, without the
    ``size``-sized real intermediates and their passes forward and backward; phases reduced modulo the size in
    integers, so each is accurate to a few ulps.
    """
    g, c1, c2, a, b = taps.shape
    dtype = torch.complex128 if taps.dtype == torch.float64 else torch.complex64
    factors = []
    for n, k, count in ((size[0], a, size[0]), (size[1], b, size[1] // 2 + 1)):
        j = torch.arange(count, device=taps.device)
        offsets = torch.arange(k, device=taps.device) - (k - 1) // 2
        angle = (j[:, None] * offsets[None, :]).remainder(n).to(taps.dtype) * (-2 * math.pi / n)
        factors.append(torch.polar(torch.ones_like(angle), angle))
    phase = (factors[0][:, None, :, None] * factors[1][None, :, None, :]).reshape(-1, a * b)
    flat = taps.permute(0, 3, 4, 1, 2).reshape(g, a * b, c1 * c2).to(dtype)
    return (phase @ flat).view(g, size[0], size[1] // 2 + 1, c1, c2)


def conv_gram_power_rowsums(kernel5: Tensor, n_iter: int, side: str = "output") -> tuple[Tensor, Tensor]:
    r"""Absolute row sums of the spatial Gram iterate :math:`G_T`, the kernel of :math:`(CC^\top)^{2^{T-1}}`.

    :math:`G_T` has :math:`N_T = 2^T(k-1)+1` offsets per axis, so the iteration runs in the Fourier domain at
    that size without aliasing (Note [spatial Gram memory] in ``stablenet.spectral.conv``): the symbol of
    :math:`CC^\top` is :math:`\hat K \hat K^H` per frequency, squared :math:`T-1` times, then brought back to
    space. Each iterate is divided by its largest per-frequency Frobenius norm (one scalar per group, so the
    inverse DFT stays meaningful) and the log of the scale is carried. With no gradient needed, the squarings
    run in place.

    Args:
        kernel5: ``(groups, c_out/g, c_in/g, kh, kw)``, already dilated.
        n_iter: :math:`T \ge 1`.
        side: ``"output"`` for :math:`CC^\top` (rows are output channels), ``"input"`` for :math:`C^\top C`.

    Returns:
        ``(rowsums, log_scale)``: ``rowsums`` of shape ``(groups, c)`` and ``log_scale`` of shape ``(groups,)``,
        with :math:`\sum_{j,p,q} |G_T[i, j, p, q]| =` ``rowsums[g, i] * exp(log_scale[g])``. Differentiable.
    """
    if side not in ("output", "input"):
        raise ValueError(f"side must be one of output, input; got {side!r}")
    if not isinstance(kernel5, Tensor) or kernel5.dim() != 5:
        shape = tuple(kernel5.shape) if isinstance(kernel5, Tensor) else type(kernel5).__name__
        raise ValueError(f"kernel5 must have shape (groups, c_out/g, c_in/g, kh, kw); got {shape}")
    _check_n_iter(n_iter)
    groups = kernel5.shape[0]
    kh, kw = kernel5.shape[-2:]
    size = (2**n_iter * (kh - 1) + 1, 2**n_iter * (kw - 1) + 1)
    peak = _peak(kernel5, (1, 2, 3, 4))
    unscaled = _unscaled_is_safe(kernel5, n_iter, side)
    if unscaled:
        # Note [unscaled spatial Gram]: G_1 in space by one real GEMM, then to the Fourier domain.
        g, co, ci, _, _ = kernel5.shape
        g1 = conv_gram_kernel((kernel5 / peak).reshape(g * co, ci, kh, kw), groups, side)  # (g, c, c, 2kh-1, 2kw-1)
        m = _half_symbol(g1, size)  # (g, H, W', c, c): the symbol of G_1
        log_scale = 2.0 * torch.log(peak.reshape(groups))
    else:
        spec = torch.fft.rfft2(kernel5 / peak, s=size).permute(0, 3, 4, 1, 2)  # (g, H, W', c_out/g, c_in/g)
        if side == "input":
            spec = spec.mH
        c = _group_max_fro(spec)
        spec = spec / c.view(groups, 1, 1, 1, 1).to(spec.dtype)
        log_scale = 2.0 * torch.log(c * peak.reshape(groups))
        m = spec @ spec.mH  # symbol of C C^T: kernel G_1
    for _ in range(n_iter - 1):
        if not unscaled:
            c = _group_max_fro(m)
            m = m / c.view(groups, 1, 1, 1, 1).to(m.dtype)
            log_scale = log_scale + torch.log(c)
        log_scale = 2.0 * log_scale
        m = _hermitian_square(m) if torch.is_grad_enabled() and m.requires_grad else _square_in_place(m)
    # Back to space in blocks of rows: G_T is (g, c, c, N_T, N_T), large for many channels.
    rowsums = []
    for rows in torch.split(torch.arange(m.shape[-2], device=m.device), 64):
        block = m[..., rows, :].permute(0, 3, 4, 1, 2)
        rowsums.append(torch.fft.irfft2(block, s=size).abs().sum(dim=(2, 3, 4)))
    return torch.cat(rowsums, dim=1), log_scale


def aol_conv_rescaling(kernel: Tensor, groups: int = 1) -> Tensor:
    r"""AOL input-channel scales of a convolution: :math:`d_j = (\sum_{i,p,q} |G[j, i, p, q]|)^{-1/2}`.

    :math:`G` is the kernel of :math:`C^\top C` (:func:`conv_gram_kernel` with ``side="input"``); scaling input
    channel :math:`j` of the kernel by :math:`d_j` gives an operator of norm at most 1 for zero and circular
    padding, every input size and every stride (module docstring). Prach & Lampert 2022.

    Args:
        kernel: ``(c_out, c_in/groups, kh, kw)``, already dilated (:func:`dilate_kernel`).
        groups: the convolution's groups.

    Returns:
        ``(c_in,)`` scales in input-channel order (channel ``g * c_in/groups + j`` is slice ``j`` of group
        ``g``'s filters); zero for an all-zero channel. Differentiable.

    Example:
        >>> from stablenet.spectral import conv_operator_matrix
        >>> k = torch.randn(3, 2, 3, 3, dtype=torch.float64)
        >>> m = conv_operator_matrix(k * aol_conv_rescaling(k)[:, None, None], 6, padding="zeros")
        >>> bool(torch.linalg.matrix_norm(m, 2) <= 1 + 1e-12)
        True
    """
    _check_kernel(kernel, groups)
    peak = _peak(kernel, (0, 1, 2, 3))
    rowsum = conv_gram_kernel(kernel / peak, groups, side="input").abs().sum(dim=(2, 3, 4))  # (g, c_in/g)
    return _safe_power(rowsum.reshape(-1), -0.5) / peak.reshape(())


def sr_conv_rescaling(kernel: Tensor, n_iter: int = 3, groups: int = 1) -> Tensor:
    r"""Spectral-rescaling output-channel scales of a convolution: :math:`\|\operatorname{diag}(1/t)\,C\| \le 1`.

    .. math:: t_i = \Big(\sum_{j,p,q} |G_T[i, j, p, q]|\Big)^{2^{-T}},

    with :math:`G_T` the kernel of :math:`(CC^\top)^{2^{T-1}}` on an unbounded input
    (:func:`conv_gram_power_rowsums`). Valid for zero and circular padding, every input size and every stride
    (module docstring). Delattre et al. 2024. ``n_iter=1`` is AOL on the output side; the cost grows with
    :math:`(2^T k)^2 c^2`.

    Args:
        kernel: ``(c_out, c_in/groups, kh, kw)``, already dilated (:func:`dilate_kernel`).
        n_iter: :math:`T \ge 1`.
        groups: the convolution's groups.

    Returns:
        ``(c_out,)`` non-negative scales (zero for an all-zero filter); differentiable.

    Example:
        >>> from stablenet.spectral import conv_operator_matrix
        >>> k = torch.randn(3, 2, 3, 3, dtype=torch.float64)
        >>> t = sr_conv_rescaling(k, n_iter=3)
        >>> m = conv_operator_matrix(k / t[:, None, None, None], 6, padding="circular")
        >>> bool(torch.linalg.matrix_norm(m, 2) <= 1 + 1e-12)
        True
    """
    _check_kernel(kernel, groups)
    _check_n_iter(n_iter)
    co = kernel.shape[0]
    kernel5 = kernel.reshape(groups, co // groups, *kernel.shape[1:])
    rowsums, log_scale = conv_gram_power_rowsums(kernel5, n_iter, side="output")
    exponent = 2.0**-n_iter
    return (_safe_power(rowsums, exponent) * torch.exp(log_scale * exponent)[:, None]).reshape(co)


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
