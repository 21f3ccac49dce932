r"""The AOL and SLL rescalings as single autograd nodes: the same values, far fewer operations per training step.

# Note [fused rescaling]
The reference rescalings (``aol_conv_rescaling``, ``sll_rescaling`` with ``conv_gram_kernel`` in
``stablenet.spectral.rescaling`` and ``stablenet.nn.sll``) are compositions of many small torch operations, each
recorded by autograd. Their arithmetic is tiny (a Gram kernel of a 3x3 kernel), so on a GPU a training step of a
64-channel layer spent more time dispatching and launching them than convolving (H200: AOL 2.3x a plain
convolution's step, ``benchmarks/README.md``). Here each rescaling is one ``torch.autograd.Function``
whose forward and hand-derived backward run a few dozen unrecorded operations, in float64 with autocast off
(Note [constraint precision] in ``stablenet.nn.base``). The references stay the specification: values and
gradients are tested equal in float64 (``tests/nn/test_fused_rescaling.py``).

The Gram kernel of a convolution is one GEMM of the kernel's zero-padded windows against its flattened rows
(Note [gram as GEMM] in ``stablenet.spectral.rescaling``): for a kernel slice per row channel :math:`K_i`,
:math:`M[i, s, j] = \langle \mathrm{window}_s(K_i), K_j \rangle` over the :math:`S = (2k_h-1)(2k_w-1)` offsets.
A dense matrix is the 1x1 case (:math:`S = 1`, :math:`M = WW^\top`).

# Note [symmetric Gram gradient]
:math:`M = \Phi(K, K)` is bilinear with :math:`\Phi(A, B)[i, s, j] = \Phi(B, A)[j, -s, i]`. So for a loss with
:math:`\partial L / \partial M = C`, :math:`dL = \langle C, \Phi(dK, K)\rangle + \langle C, \Phi(K, dK)\rangle
= \langle C + C', \Phi(K, dK)\rangle` with :math:`C'[i, s, j] = C[j, -s, i]`: the gradient is a single GEMM of
:math:`C + C'` against the windows, not two GEMMs and a fold. Offsets are stored in unfold order, where
:math:`-s` is the reversed index.

# Note [fused higher derivatives]
The hand-written backward passes are not themselves differentiable. When a gradient must be differentiated
again (``create_graph=True``: Hessian-vector products, gradient penalties) the backward instead differentiates
the reference composition, with a graph; under ``torch.func`` transforms (``jacrev``, ``vmap``, ``grad``) the
reference runs in the forward. Both give the same values, so second derivatives are exact, at the reference's
cost.

Scale: for float32 and narrower weights the float64 products cannot overflow or underflow (squares of float32
values stay within float64's normal range), so the kernel is used as it is; a float64 weight is divided by its
largest entry first and the scales are corrected by the homogeneity of the map (AOL: degree -1, SLL: -2).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from stablenet.nn.base import at_least_float32
from stablenet.spectral.rescaling import aol_conv_rescaling, conv_gram_kernel, dilate_kernel, sll_rescaling

__all__ = ["aol_scaled", "sll_back_weight"]


# ------------------------------------------------------------------------------------------ the Gram GEMM
def _windows(k5: Tensor) -> Tensor:
    """``(g, c, inner, kh, kw)`` -> ``(g, c * S, inner * kh * kw)``: the zero-padded windows at every offset."""
    g, c, inner, kh, kw = k5.shape
    if kh == kw == 1:
        return k5.reshape(g, c, inner)
    padded = F.pad(k5.reshape(g * c, inner, kh, kw), (kw - 1, kw - 1, kh - 1, kh - 1))
    # A strided view (g c, inner, S_h, S_w, kh, kw) copied once: F.unfold launches one im2col kernel per channel
    # on a GPU (128 launches, 0.57 ms for a 128-channel kernel on an H100).
    views = padded.unfold(2, kh, 1).unfold(3, kw, 1)
    return views.permute(0, 2, 3, 1, 4, 5).reshape(g, c * (2 * kh - 1) * (2 * kw - 1), inner * kh * kw)


def _gram(k5: Tensor, windows: Tensor) -> Tensor:
    """``M[g, i, s, j]``: the Gram kernel of ``k5`` (rows = dim 1) at the ``S`` offsets, in unfold order."""
    g, c = k5.shape[:2]
    return (windows @ k5.reshape(g, c, -1).mT).view(g, c, -1, c)


def _gram_backward(k5: Tensor, windows: Tensor, coeff: Tensor) -> Tensor:
    """The gradient of ``<coeff, M(k5)>`` with respect to ``k5`` (Note [symmetric Gram gradient])."""
    g, c = k5.shape[:2]
    sym = coeff + coeff.flip(2).permute(0, 3, 2, 1)
    return (sym.reshape(g, -1, c).mT @ windows).reshape(k5.shape)


def _prescale(w64: Tensor, source_dtype: torch.dtype) -> Tensor | None:
    """The scale the kernel is divided by before the Gram: ``None`` (none) unless the weight is float64."""
    if source_dtype != torch.float64:
        return None
    peak = w64.abs().amax()
    return torch.where(peak > 0, peak, torch.ones_like(peak))


# --------------------------------------------------------------------------------------------------- AOL
class _AOLScaled(torch.autograd.Function):
    """``weight * d`` with AOL's input-channel scales ``d`` (``stablenet.spectral.rescaling.aol_conv_rescaling``).

    The map is 0-homogeneous, so a prescaled float64 weight ``kn = weight / peak`` gives ``kn * d(kn)`` directly
    and the gradient with respect to ``weight`` is the one with respect to ``kn`` divided by ``peak``.
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor, groups: int, dilation: tuple[int, int]) -> Tensor:
        with torch.autocast(weight.device.type, enabled=False):
            co, ci_g = weight.shape[:2]
            w64 = weight.detach().to(torch.float64)
            peak = _prescale(w64, weight.dtype)
            kn = w64 if peak is None else w64 / peak
            kernel = dilate_kernel(kn, dilation)
            # C^T C correlates the kernel's input-channel slices over the output channels of their group.
            k5 = kernel.reshape(groups, co // groups, ci_g, *kernel.shape[-2:]).transpose(1, 2)
            windows = _windows(k5)
            m = _gram(k5, windows)
            rowsum = m.abs().sum(dim=(2, 3))  # (g, c_in / g)
            normal = rowsum >= torch.finfo(torch.float64).tiny
            d = torch.where(normal, rowsum.rsqrt(), 0.0)  # an empty channel gets 0
            scale = d[:, None, :].expand(groups, co // groups, ci_g).reshape(co, ci_g, 1, 1).to(weight.dtype)
            ctx.save_for_backward(weight, kn, k5, windows, m, -0.5 * d**3, peak, scale)  # d' = -d^3 / 2
            ctx.groups, ctx.dilation = groups, dilation
            return (weight if peak is None else kn) * scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        weight, kn, k5, windows, m, d_prime, peak, scale = ctx.saved_tensors
        groups, (dh, dw) = ctx.groups, ctx.dilation
        if torch.is_grad_enabled():  # a differentiable gradient (Note [fused higher derivatives])
            return *_reference_grad(_aol_reference, (weight,), grad, groups, (dh, dw)), None, None
        with torch.autocast(grad.device.type, enabled=False):
            co, ci_g = kn.shape[:2]
            grad_d = (grad.to(torch.float64) * kn).sum(dim=(2, 3)).reshape(groups, co // groups, ci_g).sum(dim=1)
            coeff = m.sign() * (d_prime * grad_d)[:, :, None, None]  # d = rowsum^(-1/2)
            grad_k5 = _gram_backward(k5, windows, coeff)
            grad_kernel = grad_k5.transpose(1, 2).reshape(co, ci_g, *k5.shape[-2:])[:, :, ::dh, ::dw]
            grad_kn = grad * scale + grad_kernel.to(grad.dtype)
            return grad_kn if peak is None else grad_kn / peak, None, None


def aol_scaled(weight: Tensor, groups: int = 1, dilation: tuple[int, int] = (1, 1)) -> Tensor:
    r"""The AOL-rescaled weight :math:`W \operatorname{diag}(d)`, one autograd node (Note [fused rescaling]).

    Equal to ``weight * aol_conv_rescaling(dilate_kernel(weight), groups)`` (dense: ``weight *
    aol_rescaling(weight)``) with the scales computed in float64 and applied in the weight's dtype.

    Args:
        weight: ``(out, in)`` or ``(c_out, c_in / groups, kh, kw)``, float32 or float64.
        groups: the convolution's groups (``1`` for a dense weight).
        dilation: the convolution's dilation.
    """
    kernel = weight[:, :, None, None] if weight.dim() == 2 else weight
    dilation = tuple(dilation)
    if torch._C._are_functorch_transforms_active():  # Note [fused higher derivatives]
        out = _aol_reference(kernel, groups, dilation)
    else:
        out = _AOLScaled.apply(kernel, groups, dilation)
    return out[:, :, 0, 0] if weight.dim() == 2 else out


# --------------------------------------------------------------------------------------------------- SLL
class _SLLBackWeight(torch.autograd.Function):
    r"""``-2 diag(t) K`` with SLL's scales :math:`t_i = q_i / \sum_j |G|_{ij} q_j` (``stablenet.nn.sll``).

    :math:`t` is -2-homogeneous in :math:`K`, so with a prescaled float64 weight ``kn = weight / peak`` the
    result is ``-2 t(kn) / peak * kn``, and the gradient with respect to ``weight`` is the one with respect to
    ``kn`` divided by ``peak``.
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor, q_log: Tensor) -> Tensor:
        with torch.autocast(weight.device.type, enabled=False):
            out_dtype = at_least_float32(weight).dtype
            w64 = weight.detach().to(torch.float64)
            peak = _prescale(w64, weight.dtype)
            kn = w64 if peak is None else w64 / peak
            k5 = kn[None]  # CC^T: the rows are the inner (output) channels
            windows = _windows(k5)
            m = _gram(k5, windows)
            gram_abs = m[0].abs().sum(dim=1)  # (inner, inner)
            q_log64 = q_log.detach().to(torch.float64)
            q = torch.exp(q_log64 - q_log64.max())  # t is invariant to the scale of q
            denom = gram_abs @ q
            positive = denom > 0
            t = torch.where(positive, q / denom, 0.0)  # an empty row gets 0 (sound)
            factor = -2.0 if peak is None else -2.0 / peak
            scale = (factor * t).to(out_dtype).view(-1, *[1] * (weight.dim() - 1))
            ctx.save_for_backward(weight, q_log, kn, k5, windows, m, gram_abs, q, denom, t, peak, scale)
            ctx.q_dtype, ctx.weight_dtype, ctx.factor = q_log.dtype, weight.dtype, factor
            return (weight.to(out_dtype) if peak is None else kn) * scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        weight, q_log, kn, k5, windows, m, gram_abs, q, denom, t, peak, scale = ctx.saved_tensors
        if torch.is_grad_enabled():  # a differentiable gradient (Note [fused higher derivatives])
            return _reference_grad(_sll_reference, (weight, q_log), grad)
        with torch.autocast(grad.device.type, enabled=False):
            # out = factor * t * kn; t_i = q_i / denom_i, denom = |G| q.
            grad_t = ctx.factor * (grad.to(torch.float64) * kn).flatten(1).sum(dim=1)
            positive = denom > 0
            grad_q = torch.where(positive, grad_t / torch.where(positive, denom, 1.0), 0.0)
            grad_denom = -grad_q * t
            grad_q = grad_q + gram_abs @ grad_denom  # |G| is symmetric
            coeff = m.sign() * grad_denom[None, :, None, None] * q[None, None, None, :]
            grad_kn = grad.to(scale.dtype) * scale + _gram_backward(k5, windows, coeff)[0].to(scale.dtype)
            grad_weight = grad_kn if peak is None else grad_kn / peak
            return grad_weight.to(ctx.weight_dtype), (q * grad_q).to(ctx.q_dtype)


def sll_back_weight(weight: Tensor, q_log: Tensor) -> Tensor:
    r"""SLL's folded second factor :math:`-2\operatorname{diag}(t) K`, one autograd node (Note [fused rescaling]).

    Equal to ``-2 * weight * sll_rescaling(|G|, q_log)`` broadcast over the inner (first) axis, with :math:`G`
    the Gram kernel of :math:`CC^\top` (conv, ``weight`` of shape ``(inner, c, kh, kw)``) or :math:`WW^\top`
    (dense, ``(inner, features)``); the scales are computed in float64 and the result is in at least float32.
    The dense second factor is the transpose of the result.
    """
    kernel = weight[:, :, None, None] if weight.dim() == 2 else weight
    if torch._C._are_functorch_transforms_active():  # Note [fused higher derivatives]
        out = _sll_reference(kernel, q_log)
    else:
        out = _SLLBackWeight.apply(kernel, q_log)
    return out[:, :, 0, 0] if weight.dim() == 2 else out


# ------------------------------------------------------------------------------------------ references
def _aol_reference(kernel: Tensor, groups: int, dilation: tuple[int, int]) -> Tensor:
    """``aol_scaled`` as a composition of differentiable torch operations (the specification)."""
    with torch.autocast(kernel.device.type, enabled=False):
        co, ci_g = kernel.shape[:2]
        d = aol_conv_rescaling(dilate_kernel(kernel.to(torch.float64), dilation), groups).to(kernel.dtype)
        return kernel * d.reshape(groups, 1, ci_g).expand(groups, co // groups, ci_g).reshape(co, ci_g, 1, 1)


def _sll_reference(kernel: Tensor, q_log: Tensor) -> Tensor:
    """``sll_back_weight`` as a composition of differentiable torch operations (the specification)."""
    with torch.autocast(kernel.device.type, enabled=False):
        gram = conv_gram_kernel(kernel.to(torch.float64))[0]
        t = sll_rescaling(gram.abs().sum(dim=(-2, -1)), q_log.to(torch.float64))
        out = at_least_float32(kernel)
        return -2.0 * out * t.to(out.dtype)[:, None, None, None]


def _reference_grad(reference, inputs: tuple[Tensor, ...], grad: Tensor, *args: object) -> tuple[Tensor, ...]:
    with torch.enable_grad():
        out = reference(*inputs, *args)
    return torch.autograd.grad(out, inputs, grad, create_graph=True)
