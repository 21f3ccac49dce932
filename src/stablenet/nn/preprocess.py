r"""Input normalisation and zero channel padding, with their Lipschitz constants.

Models take pixels in :math:`[0, 1]`; normalisation happens inside the model so certified radii are in
pixel space. :math:`x \mapsto (x - \mu)/s` has Lipschitz constant :math:`1/\min_c s_c`; Lipschitz models
default to :math:`s = 1` (centring only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablenet.spectral.rounding import RoundingBound, gamma, max_input_norm, smallest_normal

__all__ = ["ChannelPad", "InputNormalization"]


class InputNormalization(nn.Module):
    """Per-channel ``(x - mean) / std`` on ``(N, C, ...)`` inputs.

    Args:
        mean, std: one value per channel.
        input_size: when given, the spatial size every input must have (checked, with a clear error).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        input_size: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have one value per channel; got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be > 0; got {list(std)}")
        self.input_size = tuple(input_size) if input_size is not None else None
        self.register_buffer("mean", torch.tensor(list(mean), device=device, dtype=dtype))
        self.register_buffer("std", torch.tensor(list(std), device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        spatial = self.input_size
        if x.dim() < 2 or x.shape[1] != self.mean.numel() or (spatial is not None and tuple(x.shape[2:]) != spatial):
            expected = ", ".join(map(str, (self.mean.numel(), *(spatial or ("...",)))))
            raise ValueError(f"expected inputs of shape (N, {expected}) with pixels in [0, 1]; got {tuple(x.shape)}")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape).to(x.dtype)) / self.std.view(shape).to(x.dtype)

    def lipschitz_bound(self) -> float:
        # Division rounds; one part in 1e-12 covers it for any float64-representable std.
        return float(1.0 / self.std.double().min()) * (1.0 + 1e-12)

    def rounding_bound(self, input_shape: Sequence[int], dtype: torch.dtype) -> RoundingBound:
        r"""``(x - mean) / std`` in ``dtype``, with ``mean`` and ``std`` possibly rounded to it first: four
        roundings, so each output is within :math:`\gamma_4 (|x| + |\mu_c|)/s_c` of the exact value (Note
        [rounding model] in ``stablenet.spectral.rounding``)."""
        std = self.std.detach().double()
        pixels = math.prod(int(v) for v in input_shape[1:])
        offset = float((self.mean.detach().double() / std).norm()) * math.sqrt(pixels)
        g, inv = gamma(4, dtype), float(1.0 / std.min())
        numel = math.prod(int(v) for v in input_shape)
        absolute = g * offset + smallest_normal(dtype) * math.sqrt(numel)
        limit = max_input_norm(inv * (1.0 + g), offset * (1.0 + g), dtype)
        return RoundingBound(g * inv * (1.0 + 1e-12), absolute * (1.0 + 1e-12), limit)


class ChannelPad(nn.Module):
    """Append zero channels (dimension 1) up to ``out_channels``: an isometry, so 1-Lipschitz."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"out_channels must be >= in_channels ({in_channels}); got {out_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"ChannelPad expects {self.in_channels} channels; got shape {tuple(x.shape)}")
        pad = [0, 0] * (x.dim() - 2) + [0, self.out_channels - self.in_channels]
        return F.pad(x, pad)

    def lipschitz_bound(self) -> float:
        return 1.0

    def rounding_bound(self, input_shape: Sequence[int], dtype: torch.dtype) -> RoundingBound:
        """Exact: it copies values and appends zeros."""
        return RoundingBound.exact()

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}"
