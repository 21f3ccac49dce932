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

The shared residual machinery (the exact conv adjoint, Note [conv adjoint], and the folded scaling, Note
[folded scaling]) is in ``stablenet.nn.relu_residual``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stablenet.nn.base import at_least_float32
from stablenet.nn.fused_rescaling import sll_back_weight
from stablenet.nn.relu_residual import _ResidualConv2d, _ResidualLinear
from stablenet.nn.skip import Residual
from stablenet.spectral.rescaling import conv_gram_kernel, sll_rescaling

__all__ = ["SLLConv2d", "SLLLinear", "sll_rescaling"]


class SLLLinear(_ResidualLinear):
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

    _learned_q = True

    def rescaling(self) -> Tensor:
        """The vector :math:`t`, computed in float64 and returned in at least float32 (Note [constraint precision])."""
        with torch.autocast(self.weight.device.type, enabled=False):
            w = self.weight.to(torch.float64)
            t = sll_rescaling((w @ w.T).abs(), self.q_log.to(torch.float64))
            return t.to(at_least_float32(self.weight).dtype)

    def back_weight(self) -> Tensor:
        r"""The second factor :math:`-2 W^\top \operatorname{diag}(t)`, cached in eval (see Note [folded scaling])."""
        return sll_back_weight(self.weight, self.q_log).T  # Note [fused rescaling]: = -2 W^T diag(rescaling())

    def export(self) -> Residual:
        r"""``Residual(Sequential(Linear(W, b), ReLU(), Linear(-2 W^T diag(t))))``: plain torch, same outputs."""
        return super().export()


class SLLConv2d(_ResidualConv2d):
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

    _learned_q = True

    def rescaling(self) -> Tensor:
        """The vector :math:`t` of length ``inner_channels``, computed in float64 (Note [constraint precision])."""
        with torch.autocast(self.weight.device.type, enabled=False):
            gram = conv_gram_kernel(self.weight.to(torch.float64))[0]  # (inner, inner, 2kh-1, 2kw-1)
            t = sll_rescaling(gram.abs().sum(dim=(-2, -1)), self.q_log.to(torch.float64))
            return t.to(at_least_float32(self.weight).dtype)

    def back_weight(self) -> Tensor:
        r"""The kernel :math:`-2\operatorname{diag}(t) K` whose adjoint is the second factor (Note [folded scaling])."""
        return sll_back_weight(self.weight, self.q_log)  # Note [fused rescaling]: = -2 diag(rescaling()) K

    def export(self) -> Residual:
        """Plain ``Residual(Sequential(Conv2d(K, b), ReLU(), Conv2d(-2 K^T diag(t))))`` with the same outputs."""
        return super().export()
