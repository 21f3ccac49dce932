r"""Floating-point rounding of a layer's forward pass: proven bounds from the layer's weights and its input norm.

A layer :math:`g` whose forward runs in floating point computes some :math:`\tilde g`. A certificate needs, for
every input :math:`z` the computed network can feed it,

.. math:: \|\tilde g(z) - g(z)\|_2 \le \rho\,\|z\|_2 + \beta ,

with :math:`g` the exact map whose Lipschitz bound the layer reports. :class:`RoundingBound` holds
:math:`(\rho, \beta)` and a bound on the magnitude of every intermediate value (so that nothing overflows).
``stablenet.certify.rounding`` composes these per-layer bounds through a network; this module holds the
arithmetic they are built from.

# Note [rounding model]
Standard model of floating-point arithmetic (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed.,
ch. 2-3), with unit roundoff :math:`u` of the dtype the operation runs in (:func:`unit_roundoff`):
:math:`\mathrm{fl}(a \circ b) = (a \circ b)(1 + \delta) + \eta`, :math:`|\delta| \le u`, and an underflow term
:math:`|\eta| \le \eta_{\min}` (the smallest normal number, :func:`smallest_normal`: this also covers
flush-to-zero and denormals-are-zero modes). A product of :math:`k` such factors is :math:`1 + \theta_k` with
:math:`|\theta_k| \le \gamma_k = ku/(1 - ku)` (Higham, Lemma 3.1).

Hence a dot product :math:`\sum_{j=1}^n a_j z_j + b` evaluated **in any order, with or without fused
multiply-adds, with any blocking** (what BLAS, oneDNN and cuBLAS do) is within
:math:`\gamma_{n+1} (\sum_j |a_j z_j| + |b|)` of the exact value, plus underflow terms (Higham, §3.1: each term
meets at most one multiplication and ``n`` additions). Matrix products and direct or im2col convolutions are
dot products; in 16-bit dtypes, accumulating in float32 only makes the error smaller, so :math:`u` of the
storage dtype covers it. Not covered, and switched off where certificates compute
(:func:`stablenet.precision.sound_arithmetic`): TF32 and bf16 "fast math" (which round float32 *inputs* to fewer
bits) and cuDNN's Winograd and FFT convolution algorithms.

Weights computed in float64 by a constraint (a rescaling, a normalisation) and then rounded to the compute
dtype are :math:`A(1 + \theta_k)` for the *ideal* float64 weight :math:`A`, whose operator norm the constraint
proves; so ``weight_roundings = k`` extra factors per product cover them, and the exact map :math:`g` is the one
with the ideal weight.

Elementwise transcendental functions (``tanh``, ``exp``, ``erf``) have no proven error in torch; their rules
(``stablenet.certify.rounding``) *assume* the accuracy the math libraries document (SLEEF's ``u10`` routines on
CPUs, 1 ulp; CUDA's, at most 2 ulps) with a factor of 4 to spare. FFTs likewise rest on an assumed per-stage
accuracy (:func:`fft_relative_error`). Everything else here is proven.

The bounds themselves are evaluated in float64 and inflated by :data:`EVAL_SLACK`, far more than their own
rounding (a few dozen float64 operations on positive numbers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "EVAL_SLACK",
    "RoundingBound",
    "abs_conv_norm_bound",
    "abs_matrix_norm_bound",
    "affine_rounding",
    "conv_output_size",
    "fft_relative_error",
    "gamma",
    "linear_rounding",
    "max_input_norm",
    "overflow_limit",
    "pairwise_distance_upper_bounds",
    "residual_rounding",
    "smallest_normal",
    "unit_roundoff",
]

#: Relative inflation of every bound evaluated in float64 (their own rounding is below 1e-13 relatively).
EVAL_SLACK = 1e-9

_UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff :math:`u` (half the machine epsilon) of a floating dtype; raises for other dtypes."""
    if dtype not in _UNIT_ROUNDOFF:
        raise ValueError(f"dtype must be one of {', '.join(sorted(map(str, _UNIT_ROUNDOFF)))}; got {dtype}")
    return _UNIT_ROUNDOFF[dtype]


def smallest_normal(dtype: torch.dtype) -> float:
    """The smallest positive normal number of ``dtype``: the absolute error of an operation that underflows."""
    unit_roundoff(dtype)  # the same dtype check
    return float(torch.finfo(dtype).tiny)


def gamma(n: int | float, dtype: torch.dtype) -> float:
    r""":math:`\gamma_n = nu/(1 - nu)` for the dtype's unit roundoff, rounded up; ``inf`` when :math:`nu \ge 1`."""
    nu = float(n) * unit_roundoff(dtype)
    if nu >= 0.5:  # the bound is vacuous (or undefined) long before: no certificate rests on it
        return math.inf
    return nu / (1.0 - nu) * (1.0 + EVAL_SLACK)


def fft_relative_error(size: int, dtype: torch.dtype) -> float:
    r"""Assumed bound on :math:`\|\tilde F x - F x\|_2 / \|F x\|_2` for a length-``size`` FFT (Note [rounding model]).

    For radix-2 Cooley-Tukey, Higham (Thm. 24.2) proves :math:`\log_2 n \cdot \eta / (1 - \log_2 n \cdot \eta)`
    with :math:`\eta = \mu + \gamma_4(\sqrt2 + \mu)`, :math:`\mu` the twiddle factors' error. pocketFFT and cuFFT
    use mixed radices; we assume each radix-:math:`p` stage is within :math:`\gamma_{4p}` (a direct length-p DFT
    with accurate twiddles is within about :math:`\gamma_{p+2}`), so the bound is the sum over the prime factors.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1; got {size}")
    factors, m, p = [], size, 2
    while p * p <= m:
        while m % p == 0:
            factors.append(p)
            m //= p
        p += 1
    if m > 1:
        factors.append(m)
    return sum(gamma(4 * f, dtype) for f in factors) * 2.0


@dataclass(frozen=True)
class RoundingBound:
    r"""A layer's forward-rounding bound: for every input :math:`z` with :math:`\|z\|_2 \le`
    ``max_input_norm``,

    .. math:: \|\tilde g(z) - g(z)\|_2 \le \texttt{relative}\,\|z\|_2 + \texttt{absolute},

    where :math:`\tilde g` is the layer's floating-point forward and :math:`g` the exact map its Lipschitz bound
    is for. ``max_input_norm`` keeps every value the forward computes at most a quarter of the dtype's largest
    number, so nothing overflows.
    """

    relative: float
    absolute: float
    max_input_norm: float = math.inf

    def __post_init__(self) -> None:
        for name in ("relative", "absolute", "max_input_norm"):
            value = getattr(self, name)
            if not (value >= 0.0):  # also NaN
                raise ValueError(f"RoundingBound.{name} must be a number >= 0 (inf allowed); got {value}")

    @classmethod
    def exact(cls) -> RoundingBound:
        """An exact map that computes nothing larger than its input (ReLU, max pooling, a reshape)."""
        return cls(0.0, 0.0)


def overflow_limit(dtype: torch.dtype) -> float:
    """A quarter of the largest finite number of ``dtype``: what :attr:`RoundingBound.max_input_norm` keeps below."""
    unit_roundoff(dtype)
    return float(torch.finfo(dtype).max) / 4.0


def max_input_norm(slope: float, offset: float, dtype: torch.dtype) -> float:
    r"""The largest :math:`\|z\|` with ``slope * ||z|| + offset <= overflow_limit(dtype)`` (0 if none, inf if any)."""
    room = overflow_limit(dtype) - offset
    if not room > 0:
        return 0.0
    return room / slope if slope > 0 else math.inf


def abs_matrix_norm_bound(weight: Tensor) -> float:
    r"""An upper bound on :math:`\|\,|W|\,\|_2` (entrywise absolute value): the Schur test
    :math:`\sqrt{\|W\|_1 \|W\|_\infty}` or the Frobenius norm, whichever is smaller. Float64 math, slack added."""
    w = weight.detach().to(torch.float64).abs().reshape(weight.shape[0], -1)
    if w.numel() == 0:
        return 0.0
    schur = math.sqrt(float(w.sum(1).max()) * float(w.sum(0).max()))
    frobenius = float(torch.linalg.vector_norm(w))
    return min(schur, frobenius) * (1.0 + EVAL_SLACK + w.numel() * 2.0**-52)


def abs_conv_norm_bound(kernel: Tensor, groups: int = 1) -> float:
    r"""An upper bound on :math:`\|\,|C|\,\|_2` for the convolution :math:`C` with ``kernel``
    (``c_out x c_in/groups x k...``) on any input size, zero or circular padding, any stride and dilation, and
    for its transpose.

    Schur test: each output sums :math:`\le R = \max_o \sum_{i,p}|K_{o,i,p}|` in absolute value, and each input
    element is used by each (output channel, tap) pair at most once, so a column sums to
    :math:`\le C = \max_i \sum_{o,p} |K_{o,i,p}|`; with circular wrap-around, entries that land on the same
    position add, which only lowers the absolute sums. Hence :math:`\|\,|C|\,\| \le \sqrt{RC}`.
    """
    k = kernel.detach().to(torch.float64).abs()
    c_out = k.shape[0]
    if k.numel() == 0:
        return 0.0
    rows = k.reshape(c_out, -1).sum(1).max()
    per_group = k.reshape(groups, c_out // groups, k.shape[1], -1)
    cols = per_group.sum(dim=(1, 3)).max()
    return math.sqrt(float(rows) * float(cols)) * (1.0 + EVAL_SLACK + k.numel() * 2.0**-52)


def affine_rounding(
    abs_norm: float,
    bias_norm: float,
    dot_length: int,
    outputs: int,
    max_abs_weight: float,
    dtype: torch.dtype,
    weight_roundings: int = 0,
) -> RoundingBound:
    r"""Rounding of :math:`y = Az + b` computed as dot products of length ``dot_length`` (plus the bias).

    .. math::
        \|\tilde y - (Az + b)\|_2 \le \frac{\gamma_{n+1+k}}{1 - \gamma_k}\big(\|\,|\tilde A|\,\|\,\|z\| + \|b\|\big)
        + (k + 1)\,\eta_{\min}\sqrt{mn}\,\|z\| + \sqrt m\,\eta_{\min}\big(n \max|\tilde A| + 4(n + 1)\big)

    (Note [rounding model]): the first term is the dot products' rounding with the :math:`k` roundings of a
    computed weight :math:`\tilde A = A(1 + \theta_k)`; the others are underflow (of the weight, of the
    products and sums, and inputs or weights flushed to zero).

    Args:
        abs_norm: upper bound on :math:`\|\,|\tilde A|\,\|_2` for the weight the forward uses
            (:func:`abs_matrix_norm_bound`, :func:`abs_conv_norm_bound`).
        bias_norm: :math:`\|b\|_2` of the bias *as added to the output* (a conv bias counts once per pixel).
        dot_length: :math:`n`, the number of products per output (``in_features``, ``c_in/groups * kh * kw``).
        outputs: :math:`m`, the number of outputs per example.
        max_abs_weight: :math:`\max |\tilde A|`.
        dtype: the dtype the forward runs in.
        weight_roundings: :math:`k`, roundings between the ideal weight and the one used (0 when the exact map
            is defined with the float weight itself).
    """
    n, m, k = int(dot_length), int(outputs), int(weight_roundings)
    eta = smallest_normal(dtype)
    g = gamma(n + 1 + k, dtype)
    shrink = 1.0 - gamma(k, dtype) if k else 1.0
    if not (g < math.inf and shrink > 0):
        return RoundingBound(math.inf, math.inf, math.inf, math.inf)
    mn = math.sqrt(float(m) * float(n))
    relative = g / shrink * (abs_norm + k * eta * mn) + (k + 1) * eta * mn
    absolute = g / shrink * bias_norm + math.sqrt(m) * eta * (n * max_abs_weight + 4.0 * (n + 1))
    slack = 1.0 + EVAL_SLACK
    # Every partial sum is at most sum_j |A_ij z_j| + |b_i| <= || |A| |z| + |b| ||_2, up to (1 + gamma).
    limit = max_input_norm(abs_norm * (1.0 + g) * slack, bias_norm * (1.0 + g) * slack, dtype)
    return RoundingBound(relative * slack, absolute * slack, limit)


def _affine_input(slope: float, offset: float, limit: float) -> float:
    """The largest ``||z||`` with ``slope * ||z|| + offset <= limit`` (0 if none, inf if any)."""
    if not limit - offset > 0:
        return 0.0
    return (limit - offset) / slope if slope > 0 else math.inf


def residual_rounding(
    first: RoundingBound,
    first_abs_norm: float,
    first_bias_norm: float,
    back: RoundingBound,
    back_abs_norm: float,
    back_roundings: int,
    back_entries: float,
    outputs: int,
    dtype: torch.dtype,
) -> RoundingBound:
    r"""Rounding of the residual layer :math:`y = z + B\,\mathrm{ReLU}(Wz + b)` (SLL, CPL) computed as
    ``z + back(relu(first(z)))``.

    With :math:`u = Wz + b` computed within :math:`e_1(z)` (``first``), :math:`\|\mathrm{ReLU}(\tilde u)\| \le
    H(z) = \|W\|\,\|z\| + \|b\| + e_1(z)`; the second product, with the computed weight :math:`\tilde B` of the
    ideal :math:`B`, is within :math:`e_2(H)` of :math:`B\,\mathrm{ReLU}(\tilde u)` (``back``); ReLU is
    1-Lipschitz, so the first error reaches the output through :math:`\|B\|`; and the sum rounds once:

    .. math::
        \|\tilde y - y\| \le \|B\|\,e_1(z) + e_2(H(z)) + u\,(\|z\| + \|\tilde v\|) + \eta_{\min}\sqrt m,
        \qquad \|\tilde v\| \le \|B\|\,H(z) + e_2(H(z)).

    Args:
        first: :func:`affine_rounding` of :math:`Wz + b` (no weight roundings: :math:`W` is the parameter).
        first_abs_norm: the bound on :math:`\|\,|W|\,\|` it was built with (it also bounds :math:`\|W\|`).
        first_bias_norm: :math:`\|b\|` as added to the inner output.
        back: :func:`affine_rounding` of :math:`\tilde B h` (with ``back_roundings`` weight roundings).
        back_abs_norm: the bound on :math:`\|\,|\tilde B|\,\|` it was built with.
        back_roundings: roundings between the ideal :math:`B` and :math:`\tilde B`.
        back_entries: :math:`\sqrt{mn}` of the second product (the underflow allowance of its weight).
        outputs: :math:`m`, the layer's outputs per example.
        dtype: the dtype the forward runs in.
    """
    u, eta = unit_roundoff(dtype), smallest_normal(dtype)
    shrink = 1.0 - gamma(back_roundings, dtype)
    if not shrink > 0:
        return RoundingBound(math.inf, math.inf, 0.0)
    b_norm = (back_abs_norm + back_roundings * eta * back_entries) / shrink  # >= ||B|| for the ideal B
    h_slope, h_offset = first_abs_norm + first.relative, first_bias_norm + first.absolute
    v_slope = (b_norm + back.relative) * h_slope
    v_offset = (b_norm + back.relative) * h_offset + back.absolute
    relative = b_norm * first.relative + back.relative * h_slope + u * (1.0 + v_slope)
    absolute = b_norm * first.absolute + back.relative * h_offset + back.absolute + u * v_offset
    absolute += eta * math.sqrt(outputs)
    limit = min(
        first.max_input_norm,
        _affine_input(h_slope, h_offset, back.max_input_norm),
        max_input_norm(1.0 + v_slope, v_offset, dtype),
    )
    slack = 1.0 + EVAL_SLACK
    return RoundingBound(relative * slack, absolute * slack, limit)


def conv_output_size(
    size: tuple[int, ...],
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
) -> tuple[int, ...]:
    """Spatial output size of a convolution (torch's formula; ``padding`` as ``nn.Conv2d`` takes it)."""
    if padding == "same":
        return tuple(size)
    pads = (0,) * len(size) if padding == "valid" else tuple(padding)
    return tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(size, kernel_size, stride, pads, dilation, strict=True)
    )


def pairwise_distance_upper_bounds(rows: Tensor, chunk_elements: int = 1 << 24) -> Tensor:
    r"""Float64 upper bounds on :math:`\|r_i - r_j\|_2` for the rows of ``rows`` (``(K, m)``), proven.

    Computed from the differences themselves, never as :math:`\|a\|^2 + \|b\|^2 - 2a^\top b` (which cancels for
    close rows: ``torch.cdist``'s default above 25 rows). In float64, each difference and square rounds once,
    a sum of :math:`m` non-negative terms in any order is within :math:`\gamma_{m-1}`, and the square root rounds
    once, so the exact distance is at most the computed one divided by :math:`1 - \gamma_{m+3}`; squares below
    float64's smallest normal add at most :math:`m\,\eta_{\min}` under the root.

    Args:
        rows: ``(K, m)`` real tensor (any float dtype; converted to float64 exactly).
        chunk_elements: largest intermediate, in elements (memory stays bounded for many classes).
    """
    if rows.dim() != 2:
        raise ValueError(f"rows must be a (K, m) matrix; got shape {tuple(rows.shape)}")
    w = rows.detach().to(torch.float64)
    k, m = w.shape
    out = torch.empty(k, k, dtype=torch.float64, device=w.device)
    step = max(1, chunk_elements // max(1, k * m))
    for start in range(0, k, step):
        diff = w[start : start + step, None, :] - w[None, :, :]
        out[start : start + step] = (diff * diff).sum(dim=-1).sqrt()
    eps64 = 2.0**-53
    factor = (1.0 + EVAL_SLACK) / (1.0 - (m + 3) * eps64 / (1.0 - (m + 3) * eps64))
    return out * factor + math.sqrt(m * float(torch.finfo(torch.float64).tiny))


def linear_rounding(
    weight: Tensor, bias: Tensor | None, input_shape: tuple[int, ...], dtype: torch.dtype, weight_roundings: int = 0
) -> RoundingBound:
    """:func:`affine_rounding` of ``F.linear(z, weight, bias)`` on one input of shape ``input_shape`` (features
    last; leading dimensions are rows the same map is applied to)."""
    rows = math.prod(int(s) for s in input_shape[:-1])
    bias_norm = 0.0 if bias is None else float(bias.detach().double().norm()) * math.sqrt(rows)
    peak = float(weight.detach().abs().max()) if weight.numel() else 0.0
    out_features, in_features = weight.shape
    return affine_rounding(
        abs_matrix_norm_bound(weight), bias_norm, in_features, rows * out_features, peak, dtype, weight_roundings
    )
