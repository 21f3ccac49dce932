"""Losses by name: the registry behind a training config's ``loss`` (STYLE §5), and the builder the trainer calls.

A *loss function* is ``fn(logits, target, **options) -> Tensor`` (the batch mean). :func:`register_loss` files
one under a name; :func:`build_loss` builds a ready :class:`Loss` from a name or a function, its options, and (for
a margin from a target radius) the model.

# Note [loss options]
A loss's options are its keyword parameters after ``(logits, target)``; an unknown option raises, naming the
accepted ones. Two parameters are set by the builder, never by options:

* ``margin``: a loss with this parameter is a *margin loss*. The options ``offset`` (a raw margin :math:`u`,
  passed as a float) or ``target_radius`` (:math:`\\varepsilon`, turned into the margins the certificate needs
  by :class:`~stablenet.train.losses.margins.TargetMargin`, with ``margin_form`` and ``lipschitz``) set it; the
  loss receives a float or an ``(N, K)`` tensor of per-pair margins, and must accept both.
* ``distributed``: passed as ``build_loss(..., distributed=True)`` to losses that have it (Note [KR under DDP]
  in ``stablenet.train.losses.functions``), so one trainer call serves every loss.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from stablenet.nn.base import at_least_float32
from stablenet.train.losses.functions import _check_option, hkr_loss, kr_loss, multiclass_hinge, offset_cross_entropy
from stablenet.train.losses.margins import TargetMargin

__all__ = [
    "LOSSES",
    "Loss",
    "LossFunction",
    "build_loss",
    "create_loss",
    "list_losses",
    "loss_parameters",
    "register_loss",
]

LossFunction = Callable[..., Tensor]
"""``fn(logits, target, [margin=...], [distributed=...], **options) -> Tensor`` (Note [loss options])."""

_LOSSES: dict[str, LossFunction] = {
    "ce": F.cross_entropy,
    "hinge": multiclass_hinge,
    "hkr": hkr_loss,
    "kr": kr_loss,
    "offset_ce": offset_cross_entropy,
}

#: The built-in names (:func:`list_losses` also lists registered ones).
LOSSES: tuple[str, ...] = tuple(sorted(_LOSSES))

_MARGIN_OPTIONS = ("offset", "target_radius", "margin_form", "lipschitz")
_SET_BY_BUILDER = {
    "margin": "it is set from the options offset or target_radius",
    "distributed": "it is set by build_loss(..., distributed=True)",
}


def register_loss(name: str, fn: LossFunction | None = None) -> Callable[[LossFunction], LossFunction] | LossFunction:
    """Register ``fn`` under ``name`` (also as a decorator); a config may then say ``loss: name``.

    A name is registered once; registering the same function again is a no-op.

    Example:
        >>> @register_loss("squared_hinge")
        ... def squared_hinge(logits, target, margin=0.0):
        ...     return multiclass_hinge(logits, target, margin) ** 2
        >>> build_loss("squared_hinge", {"offset": 1.0})(torch.zeros(2, 3), torch.tensor([0, 1]))
        tensor(4.)
    """

    def wrap(fn: LossFunction) -> LossFunction:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a loss name must be a non-empty string; got {name!r}")
        _parameters(fn, name)
        if name in _LOSSES and _LOSSES[name] is not fn:
            raise ValueError(f"loss name {name!r} is already registered")
        _LOSSES[name] = fn
        return fn

    return wrap if fn is None else wrap(fn)


def list_losses() -> tuple[str, ...]:
    """The registered names, sorted."""
    return tuple(sorted(_LOSSES))


def _resolve(loss: str | LossFunction) -> tuple[LossFunction, str]:
    if isinstance(loss, str) and loss in _LOSSES:
        return _LOSSES[loss], loss
    if callable(loss) and not isinstance(loss, str):
        return loss, getattr(loss, "__name__", type(loss).__name__)
    raise ValueError(f"loss must be one of {', '.join(list_losses())} or a callable; got {loss!r}")


def _parameters(fn: LossFunction, label: str) -> tuple[tuple[str, ...], bool]:
    """``(keyword parameters after (logits, target), accepts **kwargs)``; raises if ``fn`` cannot take two."""
    if not callable(fn):
        raise ValueError(f"loss {label!r} must be callable; got {type(fn).__name__}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to read (some builtins): call it with (logits, target) only
        return (), False
    try:
        signature.bind(None, None)
    except TypeError:
        raise ValueError(f"loss {label!r} must accept (logits, target); its signature is {signature}") from None
    params = list(signature.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:2]
    names = tuple(p.name for p in params if p not in positional and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def loss_parameters(loss: str | LossFunction) -> frozenset[str]:
    """The keyword parameters of a loss (a name or a function): ``margin`` marks a margin loss (Note [loss options])."""
    fn, label = _resolve(loss)
    return frozenset(_parameters(fn, label)[0])


def _margin_losses() -> str:
    return ", ".join(name for name in list_losses() if "margin" in _parameters(_LOSSES[name], name)[0])


class Loss:
    """A loss ready for the training loop: ``loss(logits, target)`` returns the batch mean.

    Built by :func:`build_loss`. Half-precision logits are taken in float32 (the margins and the
    log-sum-exp would lose digits in bfloat16). With a :class:`TargetMargin`, :meth:`refresh` recomputes its
    Lipschitz bound and :meth:`state_dict` carries it into a checkpoint (Note [margin from the body's bound]).

    Attributes:
        name: the registered name, or the function's name.
        fn: the loss function.
        options: the keyword options passed at every call (``distributed`` included when set).
        margin: ``None`` (the function's default), a float (from ``offset``) or a :class:`TargetMargin`.
    """

    def __init__(
        self, name: str, fn: LossFunction, options: Mapping[str, Any], margin: float | TargetMargin | None
    ) -> None:
        self.name, self.fn, self.options, self.margin = name, fn, dict(options), margin

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        if isinstance(logits, Tensor):
            logits = at_least_float32(logits)
        if self.margin is None:
            return self.fn(logits, target, **self.options)
        margin = self.margin(target) if isinstance(self.margin, TargetMargin) else self.margin
        return self.fn(logits, target, margin=margin, **self.options)

    def refresh(self) -> None:
        """Recompute the target margin's Lipschitz bound from the current weights (no-op without one)."""
        if isinstance(self.margin, TargetMargin):
            self.margin.refresh()

    def state_dict(self) -> dict[str, float]:
        """What a checkpoint must keep for an exact resume: the target margin's bound (empty without one)."""
        return self.margin.state_dict() if isinstance(self.margin, TargetMargin) else {}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        if isinstance(self.margin, TargetMargin):
            self.margin.load_state_dict(state)
        elif state:
            raise ValueError(
                f"loss {self.name!r} has no target margin, so its state must be empty; got {sorted(state)}"
            )

    def __repr__(self) -> str:
        parts = [repr(self.name)] + ([f"margin={self.margin!r}"] if self.margin is not None else [])
        return f"Loss({', '.join(parts + [f'{k}={v!r}' for k, v in self.options.items()])})"


def build_loss(
    loss: str | LossFunction,
    options: Mapping[str, Any] | None = None,
    *,
    model: nn.Module | None = None,
    input_shape: Sequence[int] | None = None,
    distributed: bool = False,
) -> Loss:
    r"""The loss ``loss`` (a name from :func:`list_losses` or a function) with its options, ready to call.

    Args:
        loss: a registered name or a function ``fn(logits, target, **options)`` (Note [loss options]).
        options: the loss's keyword options, plus for a margin loss either ``offset`` (a raw margin :math:`u`)
            or ``target_radius`` (:math:`\varepsilon`, with ``margin_form``: ``auto``/``generic``/``lln`` and
            ``lipschitz``: a bound to use instead of computing one).
        model: the bare model, needed by ``target_radius`` (its Lipschitz bound, its LLN head).
        input_shape: shape of one input without the batch dimension (models with convolutions).
        distributed: passed to losses that take it (Note [KR under DDP]).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), LinearNormalized(4, 3))
        >>> loss = build_loss("hinge", {"target_radius": 0.5}, model=net)
        >>> loss(net(torch.randn(8, 4)), torch.randint(0, 3, (8,))).dim()
        0
    """
    fn, label = _resolve(loss)
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"options must be a mapping of option names to values; got {type(options).__name__}")
    options = dict(options or {})
    accepted, any_keyword = _parameters(fn, label)
    takes_margin = "margin" in accepted
    for key, value in options.items():
        if key in _SET_BY_BUILDER:
            raise ValueError(f"option {key!r} cannot be given: {_SET_BY_BUILDER[key]}")
        if key in _MARGIN_OPTIONS and not takes_margin:
            raise ValueError(
                f"loss {label!r} takes no margin, so {key!r} does not apply; margin losses: {_margin_losses()}"
            )
        if key not in _MARGIN_OPTIONS and key not in accepted and not any_keyword:
            choices = [k for k in accepted if k not in _SET_BY_BUILDER] + (
                list(_MARGIN_OPTIONS) if takes_margin else []
            )
            raise ValueError(f"loss {label!r} has no option {key!r}; its options are {', '.join(choices) or 'none'}")
        _check_option(key, value)
    if "offset" in options and "target_radius" in options:
        raise ValueError("give offset (a raw margin) or target_radius (a certified radius), not both")
    for key in ("margin_form", "lipschitz"):
        if key in options and "target_radius" not in options:
            raise ValueError(f"{key} applies only with target_radius")

    margin: float | TargetMargin | None = None
    if "target_radius" in options:
        margin = TargetMargin(
            options.pop("target_radius"),
            model,
            form=options.pop("margin_form", "auto"),
            input_shape=input_shape,
            lipschitz=options.pop("lipschitz", None),
        )
    elif "offset" in options:
        margin = float(options.pop("offset"))
    if distributed and "distributed" in accepted:
        options["distributed"] = True
    return Loss(label, fn, options, margin)


def create_loss(name: str | LossFunction, offset: float = 0.0, temperature: float = 1.0) -> Loss:
    """The loss ``name`` with a raw margin ``offset`` (margin losses) and ``temperature`` (losses that take one):
    the call of today's trainer. :func:`build_loss` is the full interface (target radius, any option)."""
    fn, label = _resolve(name)
    accepted, _ = _parameters(fn, label)
    options: dict[str, float] = {}
    if "margin" in accepted:
        options["offset"] = offset
    if "temperature" in accepted:
        options["temperature"] = temperature
    return build_loss(name, options)
