r"""Spectral rescaling (SR): a row rescaling from Gram iterates, between AOL and spectral normalisation.

Delattre, Barthélemy & Allauzen, "Spectral Norm of Convolutional Layers with Circular and Zero Paddings", 2024
(arXiv 2402.00240). A dense weight is used as

.. math::
    \operatorname{diag}(1/t)\, W, \qquad
    t_i = \Big(\sum_j \big|(W W^\top)^{2^{T-1}}\big|_{ij}\Big)^{2^{-T}},

which has spectral norm at most 1 for every :math:`W` and every :math:`T \ge 1`: the Schur test gives
:math:`(WW^\top)^{2^{T-1}} \preceq \operatorname{diag}(t)^{2^T}`, and :math:`x \mapsto x^{2^{1-T}}` is operator
monotone. :math:`T = 1` is AOL applied to the rows; larger :math:`T` is tighter (every :math:`t_i` tends to
:math:`\sigma_1(W)`, spectral normalisation) at the cost of :math:`T - 1` matrix squarings. For a convolution,
:math:`(CC^\top)^{2^{T-1}}` is a convolution whose kernel is the :math:`T`-th spatial Gram iterate (computed in the
Fourier domain without aliasing), :math:`t` holds one scale per output channel, and the bound holds for zero and
circular padding, every input size, stride, dilation and groups. A zero row gets :math:`t_i = 0` and stays zero.

Use it as a parametrization (:func:`lipschitz_sr` on any ``nn.Linear`` / ``nn.Conv2d``) or through the ready
layers :class:`SRLinear` and :class:`SRConv2d`; the constraint math runs in float32 or higher with autocast off.

Example:
    >>> layer = SRLinear(6, 4, n_iter=4).double()
    >>> bool(torch.linalg.matrix_norm(layer.constrained_weight(), 2) <= 1 + 1e-12)
    True
    >>> from stablenet.spectral import conv_operator_matrix
    >>> conv = SRConv2d(2, 3, 3, padding=1, padding_mode="circular").double()
    >>> m = conv_operator_matrix(conv.constrained_weight().detach(), 6, padding="circular", padding_size=1)
    >>> bool(torch.linalg.matrix_norm(m, 2) <= 1 + 1e-12)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stablenet.nn.constrained import (
    ConstrainedConv2d,
    ConstrainedLinear,
    Constraint,
    ConvGeometry,
    layer_geometry,
    register_constraint,
    remove_constraint,
)
from stablenet.spectral.rescaling import dilate_kernel, safe_reciprocal, sr_conv_rescaling, sr_rescaling

__all__ = ["SRConstraint", "SRConv2d", "SRLinear", "lipschitz_sr", "remove_lipschitz_sr"]


def _check_n_iter(n_iter: int) -> int:
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be an int >= 1; got {n_iter!r}")
    return n_iter


class SRConstraint(Constraint):
    r"""Maps a weight to :math:`\operatorname{diag}(1/t)\, W` (rows, or output channels of a kernel).

    Args:
        n_iter: number of Gram iterates :math:`T \ge 1` (1 is AOL on the rows).
        geometry: the convolution's geometry (its ``groups`` and ``dilation`` enter the Gram kernel); ``None``
            for a dense weight, or a conv with ``groups=1`` and no dilation.
    """

    capturable = True  # no host synchronisation: Note [captured weight maps] in stablenet.nn.cuda_graphs

    def __init__(self, n_iter: int = 3, geometry: ConvGeometry | None = None) -> None:
        super().__init__()
        self.n_iter = _check_n_iter(n_iter)
        self.geometry = geometry

    def constrain(self, weight: Tensor) -> Tensor:
        if weight.dim() == 2:
            t = sr_rescaling(weight.to(torch.float64), self.n_iter)  # Note [constraint precision]
            return weight * safe_reciprocal(t).to(weight.dtype)[:, None]
        if weight.dim() == 4:
            geometry = self.geometry or ConvGeometry()
            kernel64 = dilate_kernel(weight.to(torch.float64), geometry.dilation)  # Note [constraint precision]
            t = sr_conv_rescaling(kernel64, self.n_iter, geometry.groups)
            return weight * safe_reciprocal(t).to(weight.dtype)[:, None, None, None]
        raise ValueError(f"SR constrains (out, in) or (c_out, c_in/groups, kh, kw) weights; got {tuple(weight.shape)}")

    def extra_repr(self) -> str:
        if self.geometry is None:
            return f"n_iter={self.n_iter}"
        return f"n_iter={self.n_iter}, groups={self.geometry.groups}, dilation={self.geometry.dilation}"


class SRLinear(ConstrainedLinear):
    r"""``nn.Linear`` with the SR weight :math:`\operatorname{diag}(1/t)\, W`: 1-Lipschitz for any free weight.

    Same constructor as ``nn.Linear`` plus ``n_iter`` (:math:`T \ge 1`, keyword only). ``weight`` is the free
    parameter; :meth:`constrained_weight` is what the layer multiplies by (cached in eval mode) and
    :meth:`export` returns a plain ``nn.Linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        n_iter: int = 3,
    ) -> None:
        _check_n_iter(n_iter)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.constraint = SRConstraint(n_iter)


class SRConv2d(ConstrainedConv2d):
    r"""``nn.Conv2d`` with the SR kernel (one scale per output channel): 1-Lipschitz for any free kernel.

    Same constructor as ``nn.Conv2d`` plus ``n_iter`` (:math:`T \ge 1`, keyword only); ``padding_mode`` must
    be ``"zeros"`` or ``"circular"`` (circular at most ``"same"``-wide, Note [circular over-padding] in
    ``stablenet.nn.constrained``). The Gram iterate has :math:`2^T(k-1)+1` offsets per axis, so the cost
    grows quickly with ``n_iter``.
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
        n_iter: int = 3,
    ) -> None:
        _check_n_iter(n_iter)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self.constraint = SRConstraint(n_iter, layer_geometry(self, "SRConv2d"))


def lipschitz_sr(module: nn.Module, name: str = "weight", n_iter: int = 3) -> nn.Module:
    """Constrain ``module.<name>`` with spectral rescaling as a parametrization; returns ``module``.

    Works on any ``nn.Linear`` or ``nn.Conv2d`` (padding mode ``"zeros"`` or ``"circular"``, the latter at most
    ``"same"``-wide: Note [circular over-padding] in ``stablenet.nn.constrained``). The free weight is kept in
    ``module.parametrizations.<name>.original``.

    Raises:
        ValueError: for other module types, other padding modes or widths, ``n_iter < 1`` or a missing tensor
            ``name``.
    """
    _check_n_iter(n_iter)
    return register_constraint(module, name, SRConstraint(n_iter, layer_geometry(module, "lipschitz_sr")))


def remove_lipschitz_sr(module: nn.Module, name: str = "weight") -> nn.Module:
    """Take the SR parametrization off ``module.<name>``, keeping the constrained value; returns ``module``.

    Raises:
        ValueError: when ``module.<name>`` has no SR parametrization.
    """
    return remove_constraint(module, name, SRConstraint)
