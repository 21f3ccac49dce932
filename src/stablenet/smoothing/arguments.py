"""Argument checks, the eval-mode guard and the model's device, shared by the randomized certifiers.

# Note [eval mode]
The Monte-Carlo guarantees assume i.i.d. draws of one fixed function. BatchNorm in training mode couples the
noisy copies that share a batch, and dropout changes the function between them, so certifiers run the base
model in eval mode and then give every submodule back its own ``training`` flag.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "check_alpha",
    "check_count",
    "check_lipschitz",
    "check_positive",
    "check_values",
    "eval_mode",
    "model_device",
]


def check_count(name: str, value: object) -> int:
    """``value`` as an int >= 1, else a one-line ``ValueError`` naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    return int(value)


def check_alpha(alpha: object) -> float:
    """``alpha`` as a float in (0, 1), else a one-line ``ValueError``."""
    if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, numbers.Real) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be a number in the open interval (0, 1); got {alpha!r}")
    return float(alpha)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_positive(name: str, value: object) -> float:
    """``value`` as a finite float > 0, else a one-line ``ValueError`` naming ``name``."""
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return float(value)


def check_lipschitz(value: object) -> float:
    """``value`` as a float > 0 or ``inf`` (a Lipschitz constant), else a one-line ``ValueError``."""
    if not _is_real(value) or math.isnan(value) or value <= 0:
        raise ValueError(f"lipschitz must be a number > 0 (or inf); got {value!r}")
    return float(value)


@contextmanager
def eval_mode(model: object) -> Iterator[None]:
    """Run ``model`` in eval mode and restore every submodule's flag afterwards (Note [eval mode])."""
    if not isinstance(model, nn.Module):
        yield
        return
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def model_device(model: object, fallback: torch.device) -> torch.device:
    """The device of ``model``'s first parameter or buffer, else ``fallback``."""
    if isinstance(model, nn.Module):
        first = next(chain(model.parameters(), model.buffers()), None)
        if first is not None:
            return first.device
    return fallback


def check_values(x: Tensor, input_range: tuple[float, float] | None) -> None:
    """One-line ``ValueError`` if ``x`` holds NaN/Inf or values outside the inclusive ``input_range``."""
    if x.numel() == 0:
        return
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite; got NaN or Inf values")
    if input_range is not None:
        low, high = input_range
        lo, hi = float(x.min()), float(x.max())
        if lo < low or hi > high:
            raise ValueError(
                f"x must lie in input_range [{low}, {high}]; got values in [{lo}, {hi}] "
                "(pass input_range=None to skip this check)"
            )
