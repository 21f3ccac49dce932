"""Argument checks and the eval-mode guard shared by the randomized certifiers.

# Note [eval mode]
The Monte-Carlo guarantees assume i.i.d. draws of one fixed function. BatchNorm in training mode couples the
noisy copies that share a batch, and dropout changes the function between them, so certifiers run the base
model in eval mode and then give every submodule back its own ``training`` flag.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from torch import nn

__all__ = ["check_alpha", "check_count", "eval_mode"]


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
