"""Optimizers by name: the registry behind ``TrainConfig.optimizer`` (STYLE §5).

A *factory* builds an optimizer over parameters, ``factory(params, lr=..., weight_decay=..., [momentum=...])``:
an optimizer class such as ``torch.optim.SGD`` is one. :func:`register_optimizer` files it under a name (which a
config may then use), and :func:`create_optimizer` builds one by name, or from a factory passed directly, and
wraps it in sharpness-aware minimisation when ``sam_rho > 0``.

# Note [optimizer hyperparameters]
``lr`` and ``weight_decay`` go to every factory; ``momentum`` only to a factory that takes a ``momentum``
argument (``SGD``, ``RMSprop``; not ``Adam``, whose momentum is its ``betas``), so one config serves every
optimizer and a config's ``momentum`` is ignored by those that have none.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from stablenet.curvature.sam import SAM

__all__ = ["OptimizerFactory", "create_optimizer", "list_optimizers", "register_optimizer"]

OptimizerFactory = Callable[..., Optimizer]
"""``factory(params, *, lr, weight_decay, [momentum]) -> Optimizer`` (Note [optimizer hyperparameters])."""

_OPTIMIZERS: dict[str, OptimizerFactory] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}


def register_optimizer(
    name: str, factory: OptimizerFactory | None = None
) -> Callable[[OptimizerFactory], OptimizerFactory] | OptimizerFactory:
    """Register ``factory`` under ``name`` (also as a decorator); a config may then say ``optimizer: name``.

    A name is registered once; registering the same factory again is a no-op.

    Example:
        >>> _ = register_optimizer("rmsprop", torch.optim.RMSprop)
        >>> config = TrainConfig(optimizer="rmsprop", momentum=0.9)  # RMSprop takes the config's momentum
    """

    def wrap(factory: OptimizerFactory) -> OptimizerFactory:
        if not isinstance(name, str) or not name:
            raise ValueError(f"an optimizer name must be a non-empty string; got {name!r}")
        if not callable(factory):
            raise ValueError(f"optimizer factory for {name!r} must be callable; got {type(factory).__name__}")
        if name in _OPTIMIZERS and _OPTIMIZERS[name] is not factory:
            raise ValueError(f"optimizer name {name!r} is already registered")
        _OPTIMIZERS[name] = factory
        return factory

    return wrap if factory is None else wrap(factory)


def list_optimizers() -> tuple[str, ...]:
    """The registered names, sorted."""
    return tuple(sorted(_OPTIMIZERS))


def _factory(optimizer: str | OptimizerFactory) -> OptimizerFactory:
    if callable(optimizer):
        return optimizer
    if not isinstance(optimizer, str) or optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(list_optimizers())} or a callable; got {optimizer!r}")
    return _OPTIMIZERS[optimizer]


def _takes_momentum(factory: OptimizerFactory) -> bool:
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read: pass only what every optimizer takes
        return False
    return any(p.name == "momentum" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def create_optimizer(
    optimizer: str | OptimizerFactory,
    params: Iterable[Any],
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    sam_rho: float = 0.0,
    sam_adaptive: bool = False,
) -> Optimizer:
    """The optimizer ``optimizer`` (a name from :func:`list_optimizers` or a factory) over ``params``.

    Args:
        optimizer: a registered name or a factory (Note [optimizer hyperparameters]).
        params: tensors or param-group dicts, as for any ``torch.optim`` optimizer.
        lr, weight_decay: passed to every factory.
        momentum: passed to factories that take it.
        sam_rho: radius of sharpness-aware minimisation around the optimizer
            (:class:`~stablenet.curvature.sam.SAM`); 0 builds the optimizer itself.
        sam_adaptive: ASAM's elementwise normalisation (with ``sam_rho > 0``).

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> create_optimizer("sgd", model.parameters(), lr=0.1, momentum=0.9).defaults["momentum"]
        0.9
        >>> type(create_optimizer(torch.optim.Adagrad, model.parameters(), lr=0.1)).__name__  # a factory
        'Adagrad'
    """
    factory = _factory(optimizer)
    kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if _takes_momentum(factory):
        kwargs["momentum"] = momentum
    if sam_rho > 0:
        return SAM(params, factory, rho=sam_rho, adaptive=sam_adaptive, **kwargs)
    return factory(params, **kwargs)
