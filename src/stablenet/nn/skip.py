r"""Skip connections around any branch :math:`h`: :math:`x \mapsto x + h(x)`, whose Lipschitz constant is at most
:math:`1 + L(h)`, and the convex :math:`x \mapsto \alpha x + (1 - \alpha) h(x)`, at most
:math:`\alpha + (1 - \alpha) L(h)`.

The bound is not a method of the layer: ``stablenet.spectral.network`` bounds the branch :math:`h` like any
other network (with the recorded input shapes) through :meth:`Residual.residual_branch`, since
:math:`\|x + h(x) - y - h(y)\| \le \|x - y\| + \|h(x) - h(y)\| \le (1 + L(h))\|x - y\|`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from stablenet.nn.export import export_branch

__all__ = ["LipResidual", "Residual"]


class Residual(nn.Module):
    """``forward(x) = x + branch(x)``; the branch must keep the shape of its input.

    Args:
        branch: the module :math:`h`.

    Example:
        >>> from stablenet.spectral import lipschitz_upper_bound
        >>> block = Residual(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
        >>> lipschitz_upper_bound(block) >= 1.0
        True
    """

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        if not isinstance(branch, nn.Module):
            raise TypeError(f"branch must be an nn.Module; got {type(branch).__name__}")
        self.branch = branch

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch(x)
        # Broadcasting would repeat the branch's output and break the 1 + L(h) bound: insist on equal shapes.
        if out.shape != x.shape:
            raise ValueError(
                f"Residual needs a branch that keeps the input shape {tuple(x.shape)}; got {tuple(out.shape)}"
            )
        return x + out

    def residual_branch(self) -> nn.Module:
        """The branch :math:`h` (a network bounds ``self`` by ``1 + L(h)``)."""
        return self.branch


class LipResidual(nn.Module):
    r"""Convex residual connection :math:`x \mapsto \alpha x + (1 - \alpha) h(x)` with :math:`\alpha = \sigma(a)`.

    .. math:: \|\alpha (x - y) + (1 - \alpha)(h(x) - h(y))\| \le \big(\alpha + (1 - \alpha) L(h)\big) \|x - y\|,

    so the block is 1-Lipschitz whenever :math:`h` is, unlike :class:`Residual` (:math:`1 + L(h)`). The weight
    :math:`\alpha` is learned through its logit :math:`a`. As for :class:`Residual`, the bound is computed by
    ``stablenet.spectral.network``, which bounds the branch with its recorded input shapes through
    :meth:`residual_branch` and combines it with :meth:`residual_weights`.

    Args:
        branch: the module :math:`h`; it must keep the shape of its input.
        alpha_init: initial :math:`\alpha`, in :math:`(0, 1)`.

    Example:
        >>> from stablenet.spectral import lipschitz_upper_bound
        >>> block = LipResidual(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), alpha_init=0.25)
        >>> L = lipschitz_upper_bound(block)  # 0.25 + 0.75 * ||W||
    """

    def __init__(self, branch: nn.Module, alpha_init: float = 0.5) -> None:
        super().__init__()
        if not isinstance(branch, nn.Module):
            raise TypeError(f"branch must be an nn.Module; got {type(branch).__name__}")
        if not 0.0 < alpha_init < 1.0:
            raise ValueError(f"alpha_init must be in the open interval (0, 1); got {alpha_init}")
        self.branch = branch
        self.alpha_logit = nn.Parameter(torch.tensor(math.log(alpha_init) - math.log1p(-alpha_init)))

    def alpha(self) -> Tensor:
        r""":math:`\alpha = \sigma(a)`, a 0-dimensional tensor."""
        return torch.sigmoid(self.alpha_logit)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch(x)
        if out.shape != x.shape:
            raise ValueError(
                f"LipResidual needs a branch that keeps the input shape {tuple(x.shape)}; got {tuple(out.shape)}"
            )
        # out + alpha (x - out) = alpha x + (1 - alpha) out, without rounding 1 - alpha in the input's dtype.
        return out + self.alpha().to(x.dtype) * (x - out)

    def residual_branch(self) -> nn.Module:
        """The branch :math:`h`."""
        return self.branch

    def residual_weights(self) -> tuple[float, float]:
        r""":math:`(\alpha, 1 - \alpha)`: ``forward(x) = a x + b h(x)``, so a network bounds ``self`` by
        :math:`|a| + |b| L(h)`."""
        with torch.no_grad():
            a = float(self.alpha())
        return a, 1.0 - a

    def export(self) -> LipResidual:
        """The same block with the branch exported (:func:`export_branch`) and the same :math:`\\alpha`."""
        exported = LipResidual(export_branch(self.branch))
        exported.alpha_logit = nn.Parameter(self.alpha_logit.detach().clone(), self.alpha_logit.requires_grad)
        return exported.train(self.training)

    def extra_repr(self) -> str:
        return f"alpha={float(self.alpha().detach()):.4g}"
