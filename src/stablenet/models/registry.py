"""Model registry: models are created by name, and a user's callable is accepted wherever a name is.

Every builder has the signature ``builder(num_classes, in_channels, input_size, *, mean, std, **options)``
and returns an ``nn.Module`` that takes images with pixels in [0, 1] (normalisation inside the model).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

__all__ = ["create_model", "list_models", "model_options", "register_model"]

ModelBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelBuilder] = {}
_FIXED_ARGS = ("num_classes", "in_channels", "input_size", "mean", "std")


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering ``builder`` under ``name`` (names are unique)."""

    def wrap(builder: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return wrap


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_REGISTRY)


def _resolve(model: str | ModelBuilder) -> ModelBuilder:
    if callable(model):
        return model
    if model not in _REGISTRY:
        raise ValueError(f"unknown model {model!r}; available: {', '.join(list_models())}")
    return _REGISTRY[model]


def model_options(model: str | ModelBuilder) -> dict[str, Any]:
    """The builder's own options (beyond the data-shape arguments) and their defaults."""
    sig = inspect.signature(_resolve(model))
    return {
        k: (None if p.default is inspect.Parameter.empty else p.default)
        for k, p in sig.parameters.items()
        if k not in _FIXED_ARGS and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def create_model(
    model: str | ModelBuilder,
    num_classes: int,
    in_channels: int = 1,
    input_size: Sequence[int] | int = (28, 28),
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **options: Any,
) -> nn.Module:
    """Build a model by registry name (or from a builder callable).

    Args:
        model: a name from :func:`list_models` or a callable with the builder signature.
        num_classes: number of output logits.
        in_channels: image channels.
        input_size: ``(H, W)`` or a single int for square images.
        mean, std: per-channel input normalisation applied inside the model (defaults: 0 and 1).
        **options: builder-specific options; unknown ones raise ``ValueError`` naming the accepted ones.

    Example:
        >>> net = create_model("sll_mlp", num_classes=10, in_channels=1, input_size=(8, 8))
        >>> net(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    builder = _resolve(model)
    accepted = model_options(builder)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        name = model if isinstance(model, str) else getattr(model, "__name__", "model")
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for model {name!r}; accepted: {', '.join(accepted) or 'none'}"
        )
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}")
    mean = tuple(mean) if mean is not None else (0.0,) * in_channels
    std = tuple(std) if std is not None else (1.0,) * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean and std need {in_channels} values (one per channel); got {len(mean)} and {len(std)}")
    return builder(num_classes, in_channels, tuple(input_size), mean=mean, std=std, **options)
