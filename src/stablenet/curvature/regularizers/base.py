r"""The regulariser interface: :class:`Regularizer`, a user's callable as one, and the weighted sum of penalties.

.. math:: \mathcal L_{\text{train}} = \text{loss\_fn}(f(x), y) + \sum_r \lambda_r\, R_r(f, x, y)

A regulariser returns its *unweighted* value :math:`R_r`, a differentiable 0-dim tensor;
:func:`total_penalty` multiplies each by its ``weight`` :math:`\lambda_r` and sums (conventions in
:mod:`stablenet.curvature.regularizers`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from stablenet.curvature.regularizers.passes import _LossFn, _trainable_parameters, _zero

__all__ = ["FunctionRegularizer", "Regularizer", "penalty_terms", "total_penalty"]


def _check_weight(weight: object) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight must be a finite number >= 0; got {weight!r}")
    return float(weight)


def _check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value  # type: ignore[return-value]


def _options_of(factory: Callable[..., Any], skip: Iterable[str]) -> tuple[list[str], bool]:
    """Keyword options a factory accepts (minus ``skip``) and whether it takes ``**kwargs``."""
    sig = inspect.signature(factory)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [p.name for p in sig.parameters.values() if p.kind in kinds and p.name not in set(skip)]
    var_kw = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return names, var_kw


def _check_options(factory: Callable[..., Any], options: Mapping[str, Any], label: str, skip: Iterable[str]) -> None:
    accepted, var_kw = _options_of(factory, skip)
    unknown = sorted(set(options) - set(accepted))
    if unknown and not var_kw:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for regulariser {label!r}; "
            f"accepted: {', '.join(accepted) or 'none'}"
        )


class Regularizer:
    """A penalty with a ``weight``; calling it returns the unweighted, differentiable 0-dim value.

    Subclasses implement :meth:`penalty`; ``__call__`` first checks that the model has trainable parameters.
    ``options`` holds the constructor's options, so :meth:`config` round-trips through
    :func:`regularizers_from_config`.
    """

    name: ClassVar[str] = "regularizer"

    def __init__(self, weight: float, **options: Any) -> None:
        self.weight = _check_weight(weight)
        self.options = dict(options)

    def __call__(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Any,
        outputs: Tensor | None,
        loss_fn: _LossFn,
        features: Tensor | None = None,
    ) -> Tensor:
        _trainable_parameters(model)
        return self.penalty(model, inputs, targets, outputs, loss_fn, features)

    def penalty(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Any,
        outputs: Tensor | None,
        loss_fn: _LossFn,
        features: Tensor | None = None,
    ) -> Tensor:
        """The unweighted value (see the class docstring of each regulariser)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """``{"name": ..., "weight": ..., **options}``, the entry that :func:`regularizers_from_config` reads."""
        return {"name": self.name, "weight": self.weight, **self.options}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in {"weight": self.weight, **self.options}.items())
        return f"{type(self).__name__}({args})"


class FunctionRegularizer(Regularizer):
    """A user's callable ``fn(model, inputs, targets, outputs, loss_fn, features=None, **options) -> Tensor``.

    ``options`` are passed to ``fn`` as keyword arguments at every call.
    """

    _ARGS = ("model", "inputs", "targets", "outputs", "loss_fn", "features")

    def __init__(self, fn: Callable[..., Tensor], weight: float, **options: Any) -> None:
        if not callable(fn):
            raise ValueError(f"fn must be callable; got {type(fn).__name__}")
        label = getattr(fn, "__name__", type(fn).__name__)
        _check_options(fn, options, label, self._ARGS)
        try:
            inspect.signature(fn).bind(None, None, None, None, None, features=None, **options)
        except TypeError as error:
            raise ValueError(
                f"regulariser {label!r} must accept (model, inputs, targets, outputs, loss_fn, features=None); {error}"
            ) from None
        super().__init__(weight, **options)
        self.fn = fn
        self.name = label  # type: ignore[misc]

    def penalty(self, model, inputs, targets, outputs, loss_fn, features=None) -> Tensor:
        return self.fn(model, inputs, targets, outputs, loss_fn, features=features, **self.options)


def penalty_terms(
    regularizers: Iterable[Regularizer],
    model: nn.Module,
    inputs: Tensor,
    targets: Any,
    outputs: Tensor | None,
    loss_fn: _LossFn,
    features: Tensor | None = None,
) -> dict[str, Tensor]:
    """Each regulariser's *weighted* value ``weight * reg(...)``, keyed by name (``name#2``... for repeats).

    Regularisers with weight 0 are skipped (not computed). For logging; :func:`total_penalty` sums them.
    """
    terms: dict[str, Tensor] = {}
    for reg in regularizers:
        if reg.weight == 0:
            continue
        value = reg(model, inputs, targets, outputs, loss_fn, features)
        name = getattr(reg, "name", type(reg).__name__)
        if not isinstance(value, Tensor) or value.dim() != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"regulariser {name!r} must return a 0-dim tensor; got {shape}")
        key, count = name, 1
        while key in terms:
            count += 1
            key = f"{name}#{count}"
        terms[key] = reg.weight * value
    return terms


def total_penalty(
    regularizers: Iterable[Regularizer],
    model: nn.Module,
    inputs: Tensor,
    targets: Any,
    outputs: Tensor | None,
    loss_fn: _LossFn,
    features: Tensor | None = None,
) -> Tensor:
    r""":math:`\sum_r \lambda_r R_r`: the sum of ``reg.weight * reg(...)``, a 0-dim tensor on the inputs' device.

    Args:
        regularizers: from :func:`regularizers_from_config` or :func:`create_regularizer`.
        model: the model being trained (the bare module, not a DDP wrapper).
        inputs: the batch, ``(B, ...)``.
        targets: what ``loss_fn`` takes as its second argument.
        outputs: ``model(inputs)`` from the training forward (Note [reusing the training forward]), or None.
        loss_fn: ``loss_fn(outputs, targets)``, the batch-mean training loss.
        features: the last layer's input from the training forward, for ``activation_decay``.
    """
    terms = penalty_terms(regularizers, model, inputs, targets, outputs, loss_fn, features)
    zero = _zero(outputs if outputs is not None else inputs).to(inputs.device)
    return sum(terms.values(), zero)
