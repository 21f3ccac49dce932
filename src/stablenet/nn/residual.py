r"""Residual connections: :math:`x \mapsto x + h(x)`, whose Lipschitz constant is at most :math:`1 + L(h)`,
and the convex :math:`x \mapsto \alpha x + (1 - \alpha) h(x)`, at most :math:`\alpha + (1 - \alpha) L(h)`.

The bound is not a method of the layer: ``stablenet.spectral.network`` bounds the branch :math:`h` like any
other network (with the recorded input shapes) through :meth:`Residual.residual_branch`, since
:math:`\|x + h(x) - y - h(y)\| \le \|x - y\| + \|h(x) - h(y)\| \le (1 + L(h))\|x - y\|`.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

__all__ = ["LipResidual", "Residual", "export_branch", "export_model"]


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


def export_model(model: nn.Module, example_input: Tensor | None = None) -> nn.Module:
    """A deployable copy of ``model``: every constrained layer replaced by the plain torch layers of its ``export()``.

    In eval mode the copy computes the same outputs (to float rounding) without any constraint cost. Certify the
    original model: the copy's layers are plain, so only the generic (looser) network bound applies to it.

    Args:
        model: the network.
        example_input: a batch run through ``model`` (eval mode, no gradient) before exporting; needed by layers
            whose export depends on the input size (``CayleyConv2d``) when they have not seen an input yet.

    Example:
        >>> from stablenet.models import create_model
        >>> net = create_model("lipconvnet", num_classes=10, in_channels=1, input_size=(8, 8)).eval()
        >>> x = torch.rand(2, 1, 8, 8)
        >>> torch.allclose(export_model(net).eval()(x), net(x), atol=1e-5)
        True
    """
    if example_input is not None:
        training = model.training
        with torch.no_grad():
            model.eval()(example_input)
        model.train(training)
    return export_branch(model)


def export_branch(module: nn.Module) -> nn.Module:
    """A copy of ``module`` in which every submodule with an ``export()`` method is replaced by its export.

    A module that has ``export()`` itself is exported; any other module is deep-copied and its children are
    exported recursively (modules without ``export()``, e.g. activations, are kept as copies).
    """
    export = getattr(module, "export", None)
    if callable(export):
        return export()
    clone = copy.deepcopy(module)
    _export_children(clone)
    return clone


def _export_children(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        export = getattr(child, "export", None)
        if callable(export):
            setattr(module, name, export())
        else:
            _export_children(child)


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
