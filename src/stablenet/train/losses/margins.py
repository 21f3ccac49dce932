r"""Margins from a target certified radius: what a margin loss must ask of the logits so that the model's
Lipschitz certificate (``stablenet.certify.lipschitz``, Tsuzuku et al. 2018) certifies radius :math:`\varepsilon`.

Generic form, :math:`L` an upper bound on the network's Lipschitz constant: the radius
:math:`(z_y - \max_{j\ne y} z_j)/(\sqrt2 L)` reaches :math:`\varepsilon` when every pair has

.. math:: z_y - z_j \ge m_{yj} = \sqrt2\, L\, \varepsilon.

LLN form, a body of bound :math:`L_\varphi` followed by a ``LinearNormalized`` head with rows :math:`w_j`: the
radius :math:`\min_{j\ne y}(z_y - z_j)/(L_\varphi\|w_y - w_j\|)` reaches :math:`\varepsilon` when

.. math:: z_y - z_j \ge m_{yj} = L_\varphi\, \varepsilon\, \|w_y - w_j\| \quad (\le 2 L_\varphi \varepsilon
          \text{ for unit rows}).

# Note [margin from the body's bound]
:math:`L` (or :math:`L_\varphi`) is computed once, when the margin is built, with
:func:`stablenet.spectral.lipschitz_upper_bound`. That is exact for the whole run when every layer is
constrained: a constrained layer's bound is a constant (``1 + LAYER_ROUNDING_SLACK``), whatever its weights.
An unconstrained layer (``nn.Linear``, ``nn.Conv2d``, BatchNorm's statistics), and an LLN head inside the
generic form, is bounded from its *current* weights, so the build-time :math:`L` goes stale as they train: the
margin stays the constant of the first weights while the certificate's :math:`L` moves. Such layers are listed
in :attr:`TargetMargin.weight_dependent` (and logged); :meth:`TargetMargin.refresh` recomputes :math:`L` (one
bound computation, e.g. once per epoch), and the value is part of :meth:`TargetMargin.state_dict` so that a
resumed run uses the same margin. The bound is taken in eval mode (the function a certificate describes:
BatchNorm with its running statistics), every module's mode restored afterwards. The LLN head's rows are
different: they are read at every call (below), so that part never goes stale.

# Note [reading the head each step]
With an LLN head the pairwise margins follow the rows the head uses (``head.used_weight()``, detached: the
margin is a target, not something to optimise), read at every call: an ``(N, K)`` distance computation on
:math:`N \times K \times d` numbers, without autograd, next to a forward pass that costs far more. The head is
held by reference, so build the margin from the bare model (not a DDP or ``torch.compile`` wrapper, whose
inner module is the same object).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from stablenet.certify.lipschitz import split_lln_head
from stablenet.nn.lln import LinearNormalized
from stablenet.spectral.network import lipschitz_upper_bound
from stablenet.train.losses.functions import _check_option

__all__ = ["MARGIN_FORMS", "TargetMargin"]

log = logging.getLogger(__name__)

#: How a target radius becomes margins: ``lln`` needs an LLN head; ``auto`` takes it when there is one.
MARGIN_FORMS = ("auto", "generic", "lln")


def _weight_dependent(module: nn.Module, name: str = "") -> list[str]:
    """Modules whose Lipschitz bound is computed from their current parameters or buffers (Note [margin from the
    body's bound]): an LLN head, and modules bounded by a rule for their type that hold tensors of their own. A
    module with its own ``lipschitz_bound`` (the constrained layers) counts as constant."""
    if isinstance(module, LinearNormalized):
        return [name or type(module).__name__]
    if callable(getattr(module, "lipschitz_bound", None)):
        return []
    own = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
    found = [name or type(module).__name__] if own else []
    for child_name, child in module.named_children():
        found += _weight_dependent(child, f"{name}.{child_name}" if name else child_name)
    return found


def _bound_in_eval_mode(model: nn.Module, input_shape: Sequence[int] | None) -> float:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return lipschitz_upper_bound(model, input_shape)
    finally:
        for module, training in modes:
            module.training = training


class TargetMargin:
    r"""The margins :math:`m_{yj}` that make a model's certificate reach radius :math:`\varepsilon` (module
    docstring), for a margin loss: ``margin(target)`` gives a float (generic form) or an ``(N, K)`` tensor of
    :math:`m_{y_i j}` (LLN form, Note [reading the head each step]).

    Args:
        target_radius: :math:`\varepsilon > 0`, in the model's input space (pixels in [0, 1]).
        model: the bare model (logits out); ``None`` with ``lipschitz`` given.
        form: ``"auto"`` (LLN when the model is an ``nn.Sequential`` ending in ``LinearNormalized``), ``"generic"``
            or ``"lln"``.
        input_shape: shape of one input without the batch dimension; needed when the model has convolutions.
        lipschitz: use this bound (of the whole model, or of the body in the LLN form) instead of computing it;
            then nothing is weight-dependent and :meth:`refresh` keeps it.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), LinearNormalized(4, 3))
        >>> margin = TargetMargin(0.5, net)  # LLN form: 1-Lipschitz body, unit rows
        >>> margin(torch.tensor([0])).shape, margin.form
        (torch.Size([1, 3]), 'lln')
    """

    def __init__(
        self,
        target_radius: float,
        model: nn.Module | None = None,
        *,
        form: str = "auto",
        input_shape: Sequence[int] | None = None,
        lipschitz: float | None = None,
    ) -> None:
        _check_option("target_radius", target_radius)
        if form not in MARGIN_FORMS:
            raise ValueError(f"margin_form must be one of {', '.join(MARGIN_FORMS)}; got {form!r}")
        if lipschitz is not None:
            _check_option("lipschitz", lipschitz)
        elif model is None:
            raise ValueError("target_radius needs the model (or its lipschitz bound) to turn the radius into a margin")
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module; got {type(model).__name__}")
        split = split_lln_head(model) if model is not None else None
        if form == "lln" and split is None:
            raise ValueError("margin_form 'lln' needs an nn.Sequential model ending in a LinearNormalized head")
        self.form = "lln" if split is not None and form != "generic" else "generic"
        self.target_radius = float(target_radius)
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.body, self.head = split if self.form == "lln" else (model, None)
        self._given = lipschitz
        self.weight_dependent: tuple[str, ...] = () if lipschitz is not None else tuple(_weight_dependent(self.body))
        if self.weight_dependent:
            log.warning(
                "the margin for target_radius %g uses the Lipschitz bound of the current weights of %s; call "
                "refresh() as they train (Note [margin from the body's bound])",
                self.target_radius,
                ", ".join(self.weight_dependent),
            )
        self.lipschitz = self.refresh()

    def refresh(self) -> float:
        """Recompute the bound :math:`L` (or :math:`L_\\varphi`) from the current weights and return it."""
        if self._given is not None:
            self.lipschitz = float(self._given)
        else:
            self.lipschitz = _bound_in_eval_mode(self.body, self.input_shape)
        return self.lipschitz

    def __call__(self, target: Tensor) -> float | Tensor:
        if self.head is None:
            return math.sqrt(2.0) * self.lipschitz * self.target_radius
        with torch.no_grad():
            rows = self.head.used_weight().detach()
            # Differences, not the Gram expansion, so that the distance of a row to itself is exactly 0.
            dist = torch.cdist(rows.index_select(0, target.long()), rows, compute_mode="donot_use_mm_for_euclid_dist")
            return dist * (self.lipschitz * self.target_radius)

    def state_dict(self) -> dict[str, float]:
        """The bound in use, for a checkpoint (Note [margin from the body's bound])."""
        return {"lipschitz": self.lipschitz}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        if set(state) != {"lipschitz"}:
            raise ValueError(f"a TargetMargin state has the key 'lipschitz'; got {sorted(state)}")
        _check_option("lipschitz", state["lipschitz"])
        self.lipschitz = float(state["lipschitz"])

    def __repr__(self) -> str:
        return f"TargetMargin(target_radius={self.target_radius}, form={self.form!r}, lipschitz={self.lipschitz:.6g})"
