r"""Directions in parameter space for loss-landscape slices, normalised to the weights' scale (Li et al., 2018).

A direction is a list with one tensor per parameter that requires grad, in ``model.parameters()`` order.
Filter normalisation rescales every output filter :math:`i` of parameter :math:`k` (row of a linear weight,
output channel of a convolution) to the norm of the same filter of the weights,

.. math:: d_{k,i} \leftarrow d_{k,i} \, \lVert w_{k,i} \rVert / \lVert d_{k,i} \rVert,

and sets every 1-D parameter (biases, BatchNorm weights and biases) to zero. This removes the scale invariance
of ReLU networks, so slices of different networks are comparable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["NORMALIZATIONS", "normalize_direction", "random_directions"]

NORMALIZATIONS = ("filter", "layer", "none")
"""Accepted values of ``normalize``: per output filter (Li et al.), per parameter tensor, or raw Gaussian."""

Direction = list[Tensor]


def _parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters that require grad; a landscape needs at least one")
    return params


def normalize_direction(direction: Sequence[Tensor], params: Sequence[Tensor], normalize: str = "filter") -> Direction:
    r"""Rescale a direction to the weights' scale, as in Li et al. (2018).

    * ``"filter"``: each output filter (index along dim 0) of a parameter with 2 or more dimensions gets the norm
      of the same filter of the weights, :math:`d_i \leftarrow d_i \lVert w_i \rVert / \lVert d_i \rVert`.
    * ``"layer"``: each such parameter tensor as a whole gets the norm of the weight tensor.
    * ``"none"``: unchanged (1-D parameters included).

    With ``"filter"`` and ``"layer"``, 1-D and scalar parameters (biases, BatchNorm) are set to zero.

    Args:
        direction: One tensor per parameter.
        params: The parameters, in the same order.
        normalize: One of :data:`NORMALIZATIONS`.

    Returns:
        New tensors on the parameters' devices and dtypes.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {', '.join(map(repr, NORMALIZATIONS))}; got {normalize!r}")
    if len(direction) != len(params):
        raise ValueError(f"direction must have one tensor per parameter ({len(params)}); got {len(direction)}")
    out = []
    for d, w in zip(direction, params, strict=True):
        if d.shape != w.shape:
            raise ValueError(f"direction tensor of shape {tuple(d.shape)} does not match parameter {tuple(w.shape)}")
        d = d.detach().to(device=w.device, dtype=w.dtype)
        w = w.detach()
        if normalize == "none":
            out.append(d.clone())
        elif w.dim() <= 1:
            out.append(torch.zeros_like(w))
        elif normalize == "filter":
            dims = tuple(range(1, w.dim()))
            norm = torch.linalg.vector_norm
            scale = norm(w, dim=dims, keepdim=True) / norm(d, dim=dims, keepdim=True).clamp_min(1e-30)
            out.append(d * scale)
        else:
            out.append(d * (w.norm() / d.norm().clamp_min(1e-30)))
    return out


def random_directions(
    model: nn.Module, num: int = 2, generator: torch.Generator | None = None, *, normalize: str = "filter"
) -> list[Direction]:
    """``num`` random Gaussian directions in parameter space, normalised by :func:`normalize_direction`.

    Each direction is a list with one tensor per parameter of ``model`` that requires grad (in
    ``model.parameters()`` order), on the parameter's device and dtype. The Gaussians are drawn on the
    generator's device (CPU by default), so a seed gives the same directions whatever the model's device.

    Args:
        model: The network.
        num: How many directions.
        generator: Source of randomness; ``None`` uses the global CPU generator.
        normalize: One of :data:`NORMALIZATIONS` (default ``"filter"``, Li et al. 2018).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> (d,) = random_directions(net, 1, torch.Generator().manual_seed(0))
        >>> torch.allclose(d[0].norm(dim=1), net[0].weight.norm(dim=1)), bool(d[1].abs().sum() == 0)
        (True, True)
    """
    if num < 1:
        raise ValueError(f"num must be >= 1; got {num}")
    params = _parameters(model)
    device = generator.device if generator is not None else torch.device("cpu")
    directions = []
    for _ in range(num):
        raw = [
            torch.randn(p.shape, generator=generator, device=device, dtype=p.dtype if p.is_floating_point() else None)
            for p in params
        ]
        directions.append(normalize_direction(raw, params, normalize))
    return directions
