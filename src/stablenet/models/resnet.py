"""CIFAR-style ResNets (He et al. 2016, section 4.2): the base models of randomized smoothing.

Cohen et al. (2019) certify CIFAR-10 with ResNet-110: a 3×3 stem with 16 channels, three stages of
``(depth - 2) / 6`` basic blocks with 16, 32 and 64 channels (the first block of stages 2 and 3 halves the
resolution, its shortcut a strided 1×1 convolution with batch norm), global average pooling and a linear head;
1.7 M parameters at depth 110. Their Lipschitz constant is not controlled (``stablenet lipschitz`` still
bounds it, block by block); use them with noise augmentation and randomized smoothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from stablenet.models.registry import register_model
from stablenet.nn import InputNormalization
from stablenet.spectral.network import lipschitz_upper_bound

__all__ = ["BasicBlock", "cifar_resnet"]


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with a ReLU between, added to the (projected) input, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(out)) + self.shortcut(x)).relu()

    def lipschitz_bound(self, input_shape: Sequence[int] | None = None) -> float:
        """:math:`L(\text{main}) + L(\text{shortcut})` (the final ReLU is 1-Lipschitz); rounded up."""
        main = nn.Sequential(self.conv1, self.bn1, nn.ReLU(), self.conv2, self.bn2)
        total = lipschitz_upper_bound(main, input_shape) + lipschitz_upper_bound(self.shortcut, input_shape)
        return math.nextafter(total, math.inf)


@register_model("cifar_resnet")
def cifar_resnet(
    num_classes: int,
    in_channels: int,
    input_size: Sequence[int],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    depth: int = 110,
    width: int = 16,
) -> nn.Sequential:
    """A CIFAR ResNet of ``depth`` layers (``6n + 2``: 20, 32, 44, 56, 110, ...) with ``width`` stem channels."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...); got {depth}")
    if width < 1:
        raise ValueError(f"width must be >= 1; got {width}")
    h, w = input_size
    if h < 4 or w < 4:
        raise ValueError(f"cifar_resnet needs inputs of at least 4x4 pixels; got {h}x{w}")
    n = (depth - 2) // 6
    layers: list[nn.Module] = [
        InputNormalization(mean, std, input_size=input_size),
        nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    ]
    channels = width
    for stage in range(3):
        out = width * 2**stage
        for i in range(n):
            layers.append(BasicBlock(channels, out, stride=2 if (stage > 0 and i == 0) else 1))
            channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)
