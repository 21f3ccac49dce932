"""Regularisers by name: :data:`REGULARIZERS`, :func:`register_regularizer`, :func:`create_regularizer` and
:func:`regularizers_from_config` (a list of ``{name: ..., weight: ..., **options}`` entries, as in a training
config). The built-in penalties register themselves when :mod:`stablenet.curvature.regularizers` is imported,
which importing this module does first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from stablenet.curvature.regularizers.base import FunctionRegularizer, Regularizer, _check_options

__all__ = ["REGULARIZERS", "create_regularizer", "register_regularizer", "regularizers_from_config"]

#: Registered regulariser factories by name: ``factory(weight=..., **options) -> Regularizer``.
REGULARIZERS: dict[str, Callable[..., Regularizer]] = {}


def register_regularizer(name: str) -> Callable[[Callable[..., Regularizer]], Callable[..., Regularizer]]:
    """Decorator registering a regulariser class (or factory ``f(weight=..., **options)``) under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a regulariser name must be a non-empty string; got {name!r}")

    def wrap(factory: Callable[..., Regularizer]) -> Callable[..., Regularizer]:
        if name in REGULARIZERS and REGULARIZERS[name] is not factory:
            raise ValueError(f"regulariser name {name!r} is already registered")
        REGULARIZERS[name] = factory
        return factory

    return wrap


def create_regularizer(regularizer: str | Callable[..., Any], weight: float, **options: Any) -> Regularizer:
    """A regulariser by registered name, by :class:`Regularizer` subclass, or from a user's callable.

    Args:
        regularizer: a name from :data:`REGULARIZERS`, a :class:`Regularizer` subclass, or a callable
            ``fn(model, inputs, targets, outputs, loss_fn, features=None, **options) -> Tensor`` (wrapped in
            :class:`FunctionRegularizer`).
        weight: the multiplier :math:`\\lambda \\ge 0` applied by :func:`total_penalty`.
        **options: the regulariser's options; unknown ones raise ``ValueError`` naming the accepted ones.

    Example:
        >>> create_regularizer("hessian_trace", 0.1, num_samples=2)
        HessianTrace(weight=0.1, num_samples=2, wrt='params')
    """
    if isinstance(regularizer, str):
        if regularizer not in REGULARIZERS:
            raise ValueError(
                f"unknown regulariser {regularizer!r}; accepted: {', '.join(sorted(REGULARIZERS))}, or a callable"
            )
        factory, label = REGULARIZERS[regularizer], regularizer
    elif isinstance(regularizer, type) and issubclass(regularizer, Regularizer):
        factory, label = regularizer, regularizer.name
    elif callable(regularizer):
        return FunctionRegularizer(regularizer, weight, **options)
    else:
        raise ValueError(
            f"regularizer must be a name ({', '.join(sorted(REGULARIZERS))}) or a callable; "
            f"got {type(regularizer).__name__}"
        )
    _check_options(factory, options, label, ("weight",))
    reg = factory(weight=weight, **options)
    if not isinstance(reg, Regularizer):
        raise TypeError(f"the factory registered as {label!r} must return a Regularizer; got {type(reg).__name__}")
    return reg


def regularizers_from_config(config: Iterable[Mapping[str, Any] | Regularizer] | None) -> list[Regularizer]:
    """Regularisers from a list of ``{name: ..., weight: ..., **options}`` entries (``None``: none).

    Entries that already are :class:`Regularizer` objects are kept as they are.

    Example:
        >>> regularizers_from_config([{"name": "gradient_norm", "weight": 0.5, "wrt": "params"}])
        [GradientNorm(weight=0.5, wrt='params')]
    """
    if config is None:
        return []
    if isinstance(config, (str, Mapping)) or not isinstance(config, Iterable):
        raise ValueError(
            f"regularizers must be a list of {{name: ..., weight: ..., **options}} entries; got {type(config).__name__}"
        )
    out = []
    for index, entry in enumerate(config):
        if isinstance(entry, Regularizer):
            out.append(entry)
            continue
        if not isinstance(entry, Mapping):
            raise ValueError(
                f"regularizer entry {index} must be a mapping with keys 'name', 'weight' and options; "
                f"got {type(entry).__name__}"
            )
        missing = [key for key in ("name", "weight") if key not in entry]
        if missing:
            raise ValueError(f"regularizer entry {index} needs keys 'name' and 'weight'; missing {', '.join(missing)}")
        options = {k: v for k, v in entry.items() if k not in ("name", "weight")}
        out.append(create_regularizer(entry["name"], entry["weight"], **options))
    return out
