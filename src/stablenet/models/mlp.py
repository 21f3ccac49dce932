"""Fully connected 1-Lipschitz classifiers."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from stablenet.models.registry import register_model
from stablenet.nn import ChannelPad, InputNormalization, LinearNormalized, SLLLinear

__all__ = ["sll_mlp"]


@register_model("sll_mlp")
def sll_mlp(
    num_classes: int,
    in_channels: int,
    input_size: Sequence[int],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    width: int | None = None,
    depth: int = 4,
    inner_width: int | None = None,
) -> nn.Sequential:
    """Normalise, flatten, zero-pad to ``width``, ``depth`` dense SLL layers, LLN head.

    Args:
        width: feature width (default: the flattened input size, at least 128). Must be at least the input size,
            since the only 1-Lipschitz map to a narrower width that we allow here would lose information.
        depth: number of SLL layers.
        inner_width: rows of each SLL weight (default ``width``).
    """
    features = in_channels * math.prod(input_size)
    width = max(features, 128) if width is None else width
    if width < features:
        raise ValueError(f"width must be >= the flattened input size {features}; got {width}")
    if depth < 0:
        raise ValueError(f"depth must be >= 0; got {depth}")
    layers: list[nn.Module] = [
        InputNormalization(mean, std, input_size=input_size),
        nn.Flatten(),
        ChannelPad(features, width),
    ]
    layers += [SLLLinear(width, inner_width) for _ in range(depth)]
    layers.append(LinearNormalized(width, num_classes))
    return nn.Sequential(*layers)
