r"""Losses for Lipschitz training, by name (METHODS.md §6), with margins set from a target certified radius.

Registered names (:data:`LOSSES`; :func:`register_loss` adds more, and a function is accepted wherever a name
is), for logits :math:`z`, label :math:`y` and per-pair margins :math:`m_{yj}`:

* ``ce``: cross-entropy, ``torch.nn.functional.cross_entropy`` (its keyword arguments are options).
* ``offset_ce``: :math:`\tau\,\mathrm{CE}((z - u\,e_y)/\tau)`, pairwise :math:`\tau\,\mathrm{CE}((z + M_y)/\tau)`
  (:func:`offset_cross_entropy`).
* ``hinge``: :math:`\sum_{j\ne y}\max(0, m_{yj} - (z_y - z_j))` (:func:`multiclass_hinge`).
* ``kr``: minus the one-vs-rest Kantorovich–Rubinstein estimate, deel-lip's multi-class form (:func:`kr_loss`).
* ``hkr``: :math:`\alpha H + (1 - \alpha)\ell_{KR}` with deel-lip's one-vs-rest hinge :math:`H` (:func:`hkr_loss`).

Margins. ``offset: u`` is a raw margin; ``target_radius: ε`` asks for the margin the model's certificate needs
to certify :math:`\varepsilon` (:class:`TargetMargin`): :math:`\sqrt2 L\varepsilon` with :math:`L` the network's
bound, or :math:`L_\varphi\varepsilon\|w_y - w_j\|` per pair with an LLN head (its rows read at every step).

Gaussian-noise cross-entropy for randomized smoothing (Cohen et al. 2019) is ``ce`` on inputs
:math:`x + \delta`, :math:`\delta \sim \mathcal N(0, \sigma^2 I)`, and stays the trainer's input augmentation
(``noise_sigma``) rather than a loss entry: a loss sees logits, not inputs, so it would have to run the model
itself, while SAM's second pass, the regularisers (which take the inputs) and the accuracy must all see the same
noisy batch; the noise belongs to the trainer's generator, seeded by (seed, epoch), drawn for the global batch
before sharding and saved in checkpoints for exact resume; and as an augmentation it composes with every loss
(``hinge`` or ``offset_ce`` under noise), not with cross-entropy alone.

Layout: :mod:`~stablenet.train.losses.functions` (the formulas),
:mod:`~stablenet.train.losses.margins` (margins from a target radius),
:mod:`~stablenet.train.losses.registry` (names, :func:`build_loss`, :func:`create_loss`).

Example:
    >>> model = nn.Sequential(nn.Flatten(), SLLLinear(16), LinearNormalized(16, 10))
    >>> loss = build_loss("offset_ce", {"target_radius": 36 / 255, "temperature": 0.25}, model=model)
    >>> value = loss(model(torch.rand(8, 16)), torch.randint(0, 10, (8,)))  # margins from the head's rows
"""

from stablenet.train.losses.functions import hkr_loss, kr_loss, multiclass_hinge, offset_cross_entropy
from stablenet.train.losses.margins import MARGIN_FORMS, TargetMargin
from stablenet.train.losses.registry import (
    LOSSES,
    Loss,
    LossFunction,
    build_loss,
    create_loss,
    list_losses,
    loss_parameters,
    register_loss,
)

__all__ = [
    "LOSSES",
    "MARGIN_FORMS",
    "Loss",
    "LossFunction",
    "TargetMargin",
    "build_loss",
    "create_loss",
    "hkr_loss",
    "kr_loss",
    "list_losses",
    "loss_parameters",
    "multiclass_hinge",
    "offset_cross_entropy",
    "register_loss",
]
