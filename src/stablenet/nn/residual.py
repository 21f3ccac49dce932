r"""Residual connection :math:`x \mapsto x + h(x)`, whose Lipschitz constant is at most :math:`1 + L(h)`.

The bound is not a method of the layer: ``stablenet.spectral.network`` bounds the branch :math:`h` like any
other network (with the recorded input shapes) through :meth:`Residual.residual_branch`, since
:math:`\|x + h(x) - y - h(y)\| \le \|x - y\| + \|h(x) - h(y)\| \le (1 + L(h))\|x - y\|`.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["Residual"]


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
