r"""Certifiers by name: the registry behind the ``method`` of a certification run (STYLE §5).

A *certifier* maps a batch of inputs ``x`` of shape ``(B, ...)`` to ``(prediction, radius)``, two tensors of shape
``(B,)``: for each input, either ``ABSTAIN`` with radius 0, or a class that the certified classifier keeps on the
open :math:`\ell_2` ball of that radius around the input. A *factory* builds one from the model and the settings of
the run, ``factory(model, settings) -> certifier``; :func:`register_certifier` files it under a name and
:func:`certifier` builds one by name. Wherever a name is accepted, a ready certifier callable is accepted too.

Built in: ``"lipschitz"`` (:class:`~stablenet.certify.lipschitz.LipschitzCertifier`, deterministic) and the
randomized ``"smoothing"`` (Cohen et al., :class:`~stablenet.smoothing.cohen.Smooth`), ``"lvm-rs"``
(:class:`~stablenet.smoothing.lvm.LVMSmooth`) and ``"cpm"`` (:class:`~stablenet.smoothing.cpm.CPMSmooth`).

# Note [certifier protocol]
A run calls :attr:`Certifier.certify` as ``certify(x, first_index) -> (prediction, radius, choices)`` on chunks of
:attr:`Certifier.chunk` examples, ``first_index`` being the index of the chunk's first example (the randomized
certifiers seed their noise with it, Note [smoothing seeds] in :mod:`stablenet.workflows.certification`), and
``choices`` the ``(simplex_map, inverse_temperature)`` of each record (Note [certified classifier] there). The
run's sidecar gets :attr:`Certifier.metadata`. A factory may return a :class:`Certifier`, or a plain certifier
callable ``x -> (prediction, radius)``, which is run on ``batch_size`` examples at a time with no metadata and
no choices. A factory registered with ``randomized=True`` takes Monte-Carlo settings: it is only built with
``settings.smoothing`` and ``settings.num_classes`` set, and its runs check and record the noise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stablenet.certify.lipschitz import LipschitzCertifier
from stablenet.certify.records import read_metadata
from stablenet.smoothing.sampling import NOISE_KINDS

__all__ = [
    "Certifier",
    "CertifierFactory",
    "CertifierFn",
    "CertifierSettings",
    "SmoothingParams",
    "certifier",
    "certifier_name",
    "is_randomized",
    "list_certifiers",
    "register_certifier",
]

logger = logging.getLogger(__name__)

_Choice = tuple[str | None, float | None]
"""``(simplex_map, inverse_temperature)`` of one record (Note [certified classifier] in the certification module)."""
CertifierFn = Callable[[Tensor], tuple[Tensor, Tensor]]
"""A ready certifier: a batch ``x`` to ``(prediction, radius)``."""


@dataclass(frozen=True)
class SmoothingParams:
    """Monte-Carlo settings of the randomized certifiers (Cohen et al. defaults: n0=100, n=100000, alpha=0.001).

    ``noise`` is ``"float"`` or ``"grid"`` (Note [grid runs] in :mod:`stablenet.workflows.certification`);
    ``levels``, the grid steps per input unit, only goes with ``"grid"`` (``None``:
    :func:`~stablenet.workflows.certification.certify_run` takes the data set's ``GRID_LEVELS``).
    """

    sigma: float
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    seed: int = 0
    noise: str = "float"
    levels: int | None = None

    def __post_init__(self) -> None:
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0; got {self.sigma}")
        if self.n0 < 1 or self.n < 1:
            raise ValueError(f"n0 and n must be >= 1; got {self.n0} and {self.n}")
        if not (0.0 < self.alpha < 1.0):
            raise ValueError(f"alpha must be in (0, 1); got {self.alpha}")
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {', '.join(NOISE_KINDS)}; got {self.noise!r}")
        if self.levels is not None:
            if self.noise != "grid":
                raise ValueError(f"levels goes with noise 'grid' only; got levels {self.levels} with float noise")
            if isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 1:
                raise ValueError(f"levels must be an int >= 1; got {self.levels!r}")


@dataclass(frozen=True)
class CertifierSettings:
    """What a factory is given besides the model: the run's settings."""

    input_shape: tuple[int, ...]
    """Shape of one input, without the batch dimension."""
    batch_size: int = 256
    """Rows per forward pass (images for ``lipschitz``, noisy samples for the randomized certifiers)."""
    form: str = "auto"
    """Lipschitz certificate form (``auto``, ``generic``, ``lln``)."""
    arithmetic: str = "float64"
    """What a Lipschitz certificate describes, ``"float64"`` or ``"native"``."""
    smoothing: SmoothingParams | None = None
    """Monte-Carlo settings; set for the randomized certifiers."""
    num_classes: int | None = None
    """Number of logits of the model; set for the randomized certifiers."""
    out: Path | None = None
    """The record file the run appends to, if any (a factory may refuse to add to it)."""


@dataclass(frozen=True)
class Certifier:
    """A certifier as a run calls it (Note [certifier protocol])."""

    certify: Callable[[Tensor, int], tuple[Tensor, Tensor, list[_Choice]]]
    """``(x, first_index) -> (prediction, radius, choices)``."""
    chunk: int
    """Examples per call."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Written beside the records (after ``method``)."""


CertifierFactory = Callable[[nn.Module, CertifierSettings], Certifier | CertifierFn]
"""``factory(model, settings)`` -> a :class:`Certifier` or a ready certifier callable."""


@dataclass(frozen=True)
class _Entry:
    factory: CertifierFactory
    randomized: bool


_CERTIFIERS: dict[str, _Entry] = {}


def register_certifier(
    name: str, factory: CertifierFactory | None = None, *, randomized: bool = False
) -> Callable[[CertifierFactory], CertifierFactory] | CertifierFactory:
    """Register ``factory`` under ``name`` (also as a decorator: ``@register_certifier("mine")``).

    ``randomized=True`` marks a factory that takes Monte-Carlo settings (Note [certifier protocol]). A name is
    registered once; registering the same factory again is a no-op.

    Example:
        >>> @register_certifier("zero-radius")
        ... def zero_radius(model, settings):  # a ready certifier: x -> (prediction, radius)
        ...     return lambda x: (model(x).argmax(1), torch.zeros(len(x), dtype=torch.float64))
        >>> certify_dataset(model, images, labels, "zero.jsonl", method="zero-radius")  # records say "zero-radius"
    """

    def wrap(factory: CertifierFactory) -> CertifierFactory:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a certifier name must be a non-empty string; got {name!r}")
        if not callable(factory):
            raise ValueError(f"certifier factory for {name!r} must be callable; got {type(factory).__name__}")
        entry = _Entry(factory, bool(randomized))
        if name in _CERTIFIERS and _CERTIFIERS[name] != entry:
            raise ValueError(f"certifier name {name!r} is already registered")
        _CERTIFIERS[name] = entry
        return factory

    return wrap if factory is None else wrap(factory)


def list_certifiers(*, randomized: bool | None = None) -> tuple[str, ...]:
    """The registered names, in registration order (only the randomized or deterministic ones if asked)."""
    return tuple(k for k, e in _CERTIFIERS.items() if randomized is None or e.randomized == randomized)


def _entry(method: str) -> _Entry:
    if not isinstance(method, str) or method not in _CERTIFIERS:
        raise ValueError(
            f"method must be one of {', '.join(_CERTIFIERS)} or a callable x -> (prediction, radius); got {method!r}"
        )
    return _CERTIFIERS[method]


def certifier_name(method: str | CertifierFn, name: str | None = None) -> str:
    """The ``method`` records carry: ``name`` if given, else the registered name, else the callable's name.

    Raises:
        ValueError: ``method`` is neither a registered name nor a callable (the message lists the names).
    """
    if not callable(method):
        _entry(method)
    if name is not None:
        return name
    return method if isinstance(method, str) else getattr(method, "__name__", None) or type(method).__name__


def is_randomized(method: str | CertifierFn) -> bool:
    """Whether ``method`` names a certifier registered with ``randomized=True`` (a callable never is)."""
    return not callable(method) and _entry(method).randomized


def certifier(method: str | CertifierFn, model: nn.Module, **settings: Any) -> Certifier:
    """The certifier ``method`` for ``model``, built by its registered factory (or ``method`` itself, if callable).

    Args:
        method: a name from :func:`list_certifiers`, or a ready certifier ``x -> (prediction, radius)``.
        model: the classifier, used as it is.
        **settings: the fields of :class:`CertifierSettings` (``input_shape`` is required).

    Raises:
        ValueError: an unknown name or setting, or a randomized certifier without ``smoothing`` and
            ``num_classes``.
    """
    known = [f.name for f in fields(CertifierSettings)]
    unknown = sorted(set(settings) - set(known))
    if unknown or "input_shape" not in settings:
        raise ValueError(
            f"certifier settings must be among {', '.join(known)} (input_shape required); got {', '.join(settings)}"
        )
    config = CertifierSettings(**settings)
    if callable(method):
        return _wrap(method, certifier_name(method), config.batch_size)
    entry = _entry(method)
    if entry.randomized and config.smoothing is None:
        raise ValueError(f"method {method!r} needs smoothing parameters (sigma, n0, n, alpha)")
    if entry.randomized and config.num_classes is None:
        raise ValueError(f"method {method!r} needs num_classes (the number of logits of the model)")
    built = entry.factory(model, config)
    return built if isinstance(built, Certifier) else _wrap(built, method, config.batch_size)


def _wrap(fn: CertifierFn, name: str, batch_size: int) -> Certifier:
    """A plain ``x -> (prediction, radius)`` as a :class:`Certifier` (Note [certifier protocol])."""

    def certify(x: Tensor, first_index: int) -> tuple[Tensor, Tensor, list[_Choice]]:
        prediction, radius = (torch.as_tensor(t) for t in fn(x))
        if prediction.shape != (len(x),) or radius.shape != (len(x),):
            raise ValueError(
                f"certifier {name!r} must return (prediction, radius) of shape ({len(x)},) each; "
                f"got {tuple(prediction.shape)} and {tuple(radius.shape)}"
            )
        return prediction, radius, [(None, None)] * len(x)

    return Certifier(certify, chunk=batch_size)


# ----------------------------------------------------------------------------------------- built-ins
@register_certifier("lipschitz")
def _lipschitz(model: nn.Module, settings: CertifierSettings) -> Certifier:
    """Margin over Lipschitz constant (:class:`~stablenet.certify.lipschitz.LipschitzCertifier`)."""
    out = settings.out
    earlier = read_metadata(out) if out is not None and Path(out).exists() else {}
    if earlier.get("method") == "lipschitz" and "arithmetic" not in earlier:
        raise ValueError(
            f"{out} holds Lipschitz records made before certificates named their arithmetic (they describe the "
            "model's own float32 forward, with an unproven rounding tolerance); certify into a new file"
        )
    lipschitz = LipschitzCertifier(model, settings.form, settings.input_shape, settings.arithmetic)

    def certify(x: Tensor, first_index: int) -> tuple[Tensor, Tensor, list[_Choice]]:
        return (*lipschitz(x), [(None, None)] * len(x))

    metadata = {"form": lipschitz.form, "lipschitz": lipschitz.lipschitz, "arithmetic": settings.arithmetic}
    return Certifier(certify, chunk=settings.batch_size, metadata=metadata)


def _seed(params: SmoothingParams, first_index: int) -> int:
    return params.seed * 1_000_003 + first_index  # Note [smoothing seeds]


def _grid(params: SmoothingParams) -> dict[str, Any]:
    return {"noise": params.noise, "levels": params.levels} if params.noise == "grid" else {}


def _randomized(
    params: SmoothingParams, batch_size: int, certify: Callable[[Tensor, int], tuple[Tensor, Tensor, list[_Choice]]]
) -> Certifier:
    """``certify`` with the Monte-Carlo settings as metadata, on chunks that fill about one batch of noisy copies."""
    metadata = {"sigma": params.sigma, "n0": params.n0, "n": params.n, "alpha": params.alpha, "seed": params.seed}
    metadata.update(noise=params.noise, **({"levels": params.levels} if params.noise == "grid" else {}))
    return Certifier(certify, chunk=max(1, min(64, batch_size // max(params.n0, 1))), metadata=metadata)


@register_certifier("smoothing", randomized=True)
def _cohen(model: nn.Module, settings: CertifierSettings) -> Certifier:
    """Cohen et al.'s hard-vote smoothing (:class:`~stablenet.smoothing.cohen.Smooth`)."""
    from stablenet.smoothing.cohen import Smooth

    params, batch_size = settings.smoothing, settings.batch_size
    cohen = Smooth(model, settings.num_classes, params.sigma, **_grid(params))

    def certify(x: Tensor, first_index: int) -> tuple[Tensor, Tensor, list[_Choice]]:
        pred, radius = cohen.certify(x, params.n0, params.n, params.alpha, batch_size, _seed(params, first_index))
        return pred, radius, [(None, None)] * len(x)

    return _randomized(params, batch_size, certify)


@register_certifier("lvm-rs", randomized=True)
def _lvm(model: nn.Module, settings: CertifierSettings) -> Certifier:
    """LVM-RS (:class:`~stablenet.smoothing.lvm.LVMSmooth`), recording the map and temperature of each example."""
    from stablenet.smoothing.lvm import LVMSmooth

    params, batch_size = settings.smoothing, settings.batch_size
    lvm = LVMSmooth(model, settings.num_classes, params.sigma, **_grid(params))
    names = [m if isinstance(m, str) else getattr(m, "__name__", repr(m)) for m in lvm.maps]

    def certify(x: Tensor, first_index: int) -> tuple[Tensor, Tensor, list[_Choice]]:
        result = lvm.certify_detailed(x, params.n0, params.n, params.alpha, batch_size, _seed(params, first_index))
        choices = zip(result.map_index.tolist(), result.temperature.tolist(), strict=True)
        return result.prediction, result.radius, [(names[m], t) for m, t in choices]

    return _randomized(params, batch_size, certify)


@register_certifier("cpm", randomized=True)
def _cpm(model: nn.Module, settings: CertifierSettings) -> Certifier:
    """CPM (:class:`~stablenet.smoothing.cpm.CPMSmooth`): with a finite Lipschitz bound, soft votes at the inverse
    temperature chosen per example among :data:`~stablenet.smoothing.cpm.CPM_TEMPERATURES` or hard votes (its
    Note [temperature selection]), recorded per record; hard votes otherwise."""
    from stablenet.smoothing.cpm import CPM_TEMPERATURES, CPMSmooth
    from stablenet.smoothing.soft import HARD_VOTES

    params, batch_size = settings.smoothing, settings.batch_size
    grid = _grid(params)
    # With grid noise CPMSmooth takes L = inf (hard votes) and bounds nothing (Note [grid runs]).
    cpm = CPMSmooth(
        model,
        settings.num_classes,
        params.sigma,
        input_shape=settings.input_shape,
        temperatures=CPM_TEMPERATURES,
        **grid,
    )
    if grid:
        logger.info("cpm with grid noise: hard votes (soft votes are not sound for the grid classifier)")

    def certify(x: Tensor, first_index: int) -> tuple[Tensor, Tensor, list[_Choice]]:
        result = cpm.certify_detailed(x, params.n0, params.n, params.alpha, batch_size, _seed(params, first_index))
        choices = [
            ("softmax", s) if math.isfinite(s) else (HARD_VOTES, None) for s in result.inverse_temperature.tolist()
        ]
        return result.prediction, result.radius, choices

    return _randomized(params, batch_size, certify)
