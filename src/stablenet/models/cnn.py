"""Plain (unconstrained) classifiers: base models for randomized smoothing and baselines."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from stablenet.models.registry import register_model
from stablenet.nn import InputNormalization

__all__ = ["lenet", "mlp"]


@register_model("lenet")
def lenet(
    num_classes: int,
    in_channels: int,
    input_size: Sequence[int],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    width: int = 32,
    hidden: int = 256,
) -> nn.Sequential:
    """Two conv-ReLU-maxpool stages (``width``, ``2 * width`` channels) and two dense layers.

    Inputs must be at least 4x4 pixels (two 2x2 poolings). Its Lipschitz constant is not controlled, but every
    module has a bound in ``stablenet.spectral``, so ``stablenet lipschitz`` can report it.
    """
    h, w = input_size
    if h < 4 or w < 4:
        raise ValueError(f"lenet needs inputs of at least 4x4 pixels; got {h}x{w}")
    if width < 1 or hidden < 1:
        raise ValueError(f"width and hidden must be >= 1; got {width} and {hidden}")
    return nn.Sequential(
        InputNormalization(mean, std, input_size=input_size),
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * (h // 4) * (w // 4), hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


@register_model("mlp")
def mlp(
    num_classes: int,
    in_channels: int,
    input_size: Sequence[int],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    hidden: int = 256,
    depth: int = 2,
) -> nn.Sequential:
    """Normalise, flatten, ``depth`` dense ReLU layers of ``hidden`` units, a dense head.

    The cheapest base model for randomized smoothing on a CPU (Monte-Carlo certification runs it ``n`` times per
    image: on MNIST one forward pass costs about 0.27 M multiply-adds at the defaults, against 10 M for
    :func:`lenet` at width 32). Every module has a bound in ``stablenet.spectral``.
    """
    if hidden < 1 or depth < 0:
        raise ValueError(f"hidden must be >= 1 and depth >= 0; got {hidden} and {depth}")
    features = in_channels * math.prod(input_size)
    layers: list[nn.Module] = [InputNormalization(mean, std, input_size=input_size), nn.Flatten()]
    for i in range(depth):
        layers += [nn.Linear(features if i == 0 else hidden, hidden), nn.ReLU()]
    layers.append(nn.Linear(features if depth == 0 else hidden, num_classes))
    return nn.Sequential(*layers)
