r"""Lipschitz upper bounds of whole networks by composing per-layer bounds.

.. math:: L(f_k \circ \dots \circ f_1) \le \prod_i L(f_i)

A module is bounded by, in order: its own ``lipschitz_bound()`` method (every stablenet layer has one),
a rule for a known torch module (``nn.Linear`` by a certified Gram bound, 1-Lipschitz activations and
reshapes), or recursion into ``nn.Sequential``. Any other module raises: a module is never skipped, since
a skipped module would make the bound, and every certificate built on it, wrong.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from stablenet.spectral.dense import spectral_norm_upper_bound

__all__ = ["layer_lipschitz_bounds", "lipschitz_upper_bound", "register_lipschitz_rule"]

# Modules that are 1-Lipschitz in l2 whatever their configuration.
_ONE_LIPSCHITZ: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.ReLU,
    nn.Tanh,
    nn.Sigmoid,  # 1/4-Lipschitz; 1 is a valid bound
    nn.Hardtanh,
)

_RULES: dict[type[nn.Module], Callable[[nn.Module], float]] = {}


def register_lipschitz_rule(module_type: type[nn.Module], rule: Callable[[nn.Module], float]) -> None:
    """Teach :func:`lipschitz_upper_bound` a module type: ``rule(module)`` must return a true upper bound."""
    _RULES[module_type] = rule


def _linear_bound(module: nn.Linear) -> float:
    return float(spectral_norm_upper_bound(module.weight))


def _leaky_relu_bound(module: nn.LeakyReLU) -> float:
    return max(1.0, abs(module.negative_slope))


register_lipschitz_rule(nn.Linear, _linear_bound)
register_lipschitz_rule(nn.LeakyReLU, _leaky_relu_bound)


def layer_lipschitz_bounds(model: nn.Module, prefix: str = "") -> list[tuple[str, float]]:
    """Per-layer upper bounds ``[(qualified name, bound), ...]`` whose product bounds ``model``."""
    bound_fn = getattr(model, "lipschitz_bound", None)
    if callable(bound_fn):
        return [(prefix or type(model).__name__, float(bound_fn()))]
    for module_type, rule in _RULES.items():
        if isinstance(model, module_type):
            return [(prefix or type(model).__name__, float(rule(model)))]
    if isinstance(model, nn.Sequential):
        out: list[tuple[str, float]] = []
        for name, child in model.named_children():
            out.extend(layer_lipschitz_bounds(child, f"{prefix}.{name}" if prefix else name))
        return out
    if isinstance(model, _ONE_LIPSCHITZ):
        return [(prefix or type(model).__name__, 1.0)]
    if isinstance(model, nn.Dropout) and not model.training:
        return [(prefix or type(model).__name__, 1.0)]
    raise TypeError(
        f"cannot bound the Lipschitz constant of module {prefix or '<root>'!r} of type "
        f"{type(model).__name__}; supported: nn.Sequential, nn.Linear, 1-Lipschitz activations, modules with a "
        "lipschitz_bound() method, and types added by register_lipschitz_rule()"
    )


def lipschitz_upper_bound(model: nn.Module) -> float:
    """A certified upper bound on the l2 Lipschitz constant of ``model`` (product of per-layer bounds)."""
    total = 1.0
    for _, bound in layer_lipschitz_bounds(model):
        total *= bound
    # Products of floats round; nudge up by one ulp per layer (the bounds themselves already carry slack).
    return float(torch.nextafter(torch.tensor(total, dtype=torch.float64), torch.tensor(float("inf"))))
