r"""Almost-orthogonal layers (AOL): a column rescaling that makes any weight 1-Lipschitz.

Prach & Lampert, "Almost-Orthogonal Layers for Efficient General-Purpose Lipschitz Networks", ECCV 2022
(arXiv 2208.03160). A dense weight is used as

.. math::
    W \operatorname{diag}(d), \qquad d_j = \Big(\sum_i |W^\top W|_{ij}\Big)^{-1/2},

which has spectral norm at most 1 for every :math:`W` (Schur test:
:math:`W^\top W \preceq \operatorname{diag}(\sum_j |W^\top W|_{ij})`). For a convolution :math:`C`,
:math:`W^\top W` becomes :math:`C^\top C`, the convolution whose kernel is the self-correlation of the kernel
(:func:`stablenet.spectral.rescaling.conv_gram_kernel`), and :math:`d` holds one scale per input channel; the
bound holds for zero and circular padding, every input size, every stride, dilation and groups.

The rescaling is a parametrization (:func:`lipschitz_aol` on any ``nn.Linear`` / ``nn.Conv2d``) or built into
the ready layers :class:`AOLLinear` and :class:`AOLConv2d`; in both the constraint math runs in float32 or
higher with autocast disabled.

Example:
    >>> layer = AOLLinear(6, 4).double()
    >>> bool(torch.linalg.matrix_norm(layer.constrained_weight(), 2) <= 1 + 1e-12)
    True
    >>> from stablenet.spectral import conv_operator_matrix
    >>> conv = AOLConv2d(2, 3, 3, padding=1).double()
    >>> m = conv_operator_matrix(conv.constrained_weight().detach(), 6, padding="zeros", padding_size=1)
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
from stablenet.nn.fused_rescaling import aol_scaled

__all__ = ["AOLConstraint", "AOLConv2d", "AOLLinear", "lipschitz_aol", "remove_lipschitz_aol"]


class AOLConstraint(Constraint):
    r"""Maps a weight to :math:`W \operatorname{diag}(d)` (dense) or a kernel to its input-channel rescaling (conv).

    Args:
        geometry: the convolution's geometry (its ``groups`` and ``dilation`` enter the Gram kernel); ``None``
            for a dense weight, or a conv with ``groups=1`` and no dilation.
    """

    capturable = True  # no host synchronisation: Note [captured weight maps] in stablenet.nn.cuda_graphs

    def __init__(self, geometry: ConvGeometry | None = None) -> None:
        super().__init__()
        self.geometry = geometry

    def constrain(self, weight: Tensor) -> Tensor:
        # Note [fused rescaling] in stablenet.nn.fused_rescaling: equal to weight * aol_rescaling(weight) (dense) or to
        # the input-channel scales aol_conv_rescaling(dilate_kernel(weight), groups) (conv), computed in float64.
        if weight.dim() == 2:
            return aol_scaled(weight)
        if weight.dim() == 4:
            geometry = self.geometry or ConvGeometry()
            return aol_scaled(weight, geometry.groups, geometry.dilation)
        raise ValueError(f"AOL constrains (out, in) or (c_out, c_in/groups, kh, kw) weights; got {tuple(weight.shape)}")

    def extra_repr(self) -> str:
        if self.geometry is None:
            return ""
        return f"groups={self.geometry.groups}, dilation={self.geometry.dilation}"


class AOLLinear(ConstrainedLinear):
    r"""``nn.Linear`` with the AOL weight :math:`W \operatorname{diag}(d)`: 1-Lipschitz for any free weight.

    Same constructor as ``nn.Linear``. ``weight`` is the free parameter; :meth:`constrained_weight` is what the
    layer multiplies by (cached in eval mode) and :meth:`export` returns a plain ``nn.Linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.constraint = AOLConstraint()


class AOLConv2d(ConstrainedConv2d):
    r"""``nn.Conv2d`` with the AOL kernel (one scale per input channel): 1-Lipschitz for any free kernel.

    Same constructor as ``nn.Conv2d``; ``padding_mode`` must be ``"zeros"`` or ``"circular"`` (circular padding
    at most ``"same"``-wide, Note [circular over-padding] in ``stablenet.nn.constrained``). The bound holds for
    every input size, stride, dilation and groups.
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
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self.constraint = AOLConstraint(layer_geometry(self, "AOLConv2d"))


def lipschitz_aol(module: nn.Module, name: str = "weight") -> nn.Module:
    """Constrain ``module.<name>`` with AOL as a parametrization; returns ``module``.

    Works on any ``nn.Linear`` or ``nn.Conv2d`` (padding mode ``"zeros"`` or ``"circular"``, the latter at most
    ``"same"``-wide: Note [circular over-padding] in ``stablenet.nn.constrained``). The free weight is kept in
    ``module.parametrizations.<name>.original``.

    Raises:
        ValueError: for other module types, other padding modes or widths, or a missing tensor ``name``.
    """
    return register_constraint(module, name, AOLConstraint(layer_geometry(module, "lipschitz_aol")))


def remove_lipschitz_aol(module: nn.Module, name: str = "weight") -> nn.Module:
    """Take the AOL parametrization off ``module.<name>``, keeping the constrained value; returns ``module``.

    Raises:
        ValueError: when ``module.<name>`` has no AOL parametrization.
    """
    return remove_constraint(module, name, AOLConstraint)
