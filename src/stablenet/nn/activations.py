r"""Gradient-norm-preserving activations: GroupSort and MaxMin (Anil et al. 2019).

Sorting within groups is a permutation that depends on the input piecewise, so the map is 1-Lipschitz
in l2 and its Jacobian is orthogonal almost everywhere (gradient norm preserving).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from stablenet.spectral.rounding import RoundingBound

__all__ = ["GroupSort", "MaxMin"]


class GroupSort(nn.Module):
    """Sort features in consecutive groups of ``group_size`` along ``dim``, in descending order.

    Example:
        >>> GroupSort(2)(torch.tensor([[1.0, 3.0, -2.0, -5.0]]))
        tensor([[ 3.,  1., -2., -5.]])
    """

    def __init__(self, group_size: int = 2, dim: int = 1) -> None:
        super().__init__()
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1; got {group_size}")
        self.group_size, self.dim = group_size, dim

    def forward(self, x: Tensor) -> Tensor:
        dim = self.dim % x.dim()
        size = x.shape[dim]
        if size % self.group_size:
            raise ValueError(
                f"GroupSort(group_size={self.group_size}) needs dimension {self.dim} divisible by "
                f"{self.group_size}; got size {size}"
            )
        grouped = x.unflatten(dim, (size // self.group_size, self.group_size))
        if self.group_size == 2:
            # Pairs need no sort: max and min are elementwise (a sort of pairs was 70% of a MaxMin CNN's forward).
            a, b = grouped.unbind(dim + 1)
            return torch.stack((torch.maximum(a, b), torch.minimum(a, b)), dim=dim + 1).flatten(dim, dim + 1)
        return grouped.sort(dim=dim + 1, descending=True).values.flatten(dim, dim + 1)

    def lipschitz_bound(self) -> float:
        return 1.0

    def rounding_bound(self, input_shape: Sequence[int], dtype: torch.dtype) -> RoundingBound:
        """Exact: a permutation of its input within each group."""
        return RoundingBound.exact()

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, dim={self.dim}"


class MaxMin(GroupSort):
    """GroupSort with groups of two: each pair ``(a, b)`` becomes ``(max(a, b), min(a, b))``."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__(group_size=2, dim=dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
