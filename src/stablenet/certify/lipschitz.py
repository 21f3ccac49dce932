r"""Lipschitz-margin certificates (Tsuzuku et al. 2018), batched and sound in floating point.

If the logits satisfy :math:`\|f(x) - f(x')\|_2 \le L \|x - x'\|_2`, the prediction
:math:`c = \arg\max_j f_j(x)` cannot change within

.. math:: R = \frac{f_c(x) - \max_{j \ne c} f_j(x)}{\sqrt{2}\, L}  \qquad \text{(generic form)}.

With a body :math:`\varphi` of Lipschitz constant :math:`L_\varphi` followed by a head with rows
:math:`w_j`, each margin :math:`f_c - f_j` is :math:`L_\varphi\|w_c - w_j\|`-Lipschitz, so

.. math:: R = \min_{j \ne c} \frac{f_c(x) - f_j(x)}{L_\varphi\, \|w_c - w_j\|}  \qquad \text{(LLN form)},

which is tighter when the rows are unit vectors (last-layer normalisation).

# Note [sound rounding]
Three roundings could make a certificate wrong, and each is paid for:
(1) the Lipschitz bound comes from ``stablenet.spectral`` with its documented slacks (an upper bound);
(2) the logits are computed in floating point: the computed network differs from the exact one by at
most ``forward_rounding_tolerance`` per logit at the certified point *and* at any perturbed point, so
each margin is reduced by twice the tolerance per logit pair (4 tolerances) before dividing;
(3) the radius is computed in float64 and moved one ulp towards zero.
The forward tolerance is calibrated by comparing float32 with float64 forwards (``tests/certify``); the
certifier's forward runs with TF32 off (:func:`stablenet.precision.ieee_float32`), as TF32 rounds far more.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from stablenet.certify.records import ABSTAIN
from stablenet.precision import ieee_float32

__all__ = [
    "FORWARD_ROUNDING_TOLERANCE",
    "LipschitzCertifier",
    "certify_lipschitz",
    "forward_rounding_tolerance",
    "generic_margin_radius",
    "lln_margin_radius",
    "split_lln_head",
]

#: Relative tolerance on computed logits per dtype (times ``1 + max |logit|``); see Note [sound rounding].
FORWARD_ROUNDING_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-11,
    torch.float32: 1e-4,
    torch.bfloat16: 5e-2,
    torch.float16: 1e-2,
}


def forward_rounding_tolerance(logits: Tensor) -> Tensor:
    """Per-example absolute tolerance on each computed logit (float64, shape ``(N,)``)."""
    if logits.dtype not in FORWARD_ROUNDING_TOLERANCE:
        raise ValueError(
            f"logits dtype must be one of {sorted(str(d) for d in FORWARD_ROUNDING_TOLERANCE)}; got {logits.dtype}"
        )
    scale = 1.0 + logits.detach().to(torch.float64).abs().amax(dim=1)
    return FORWARD_ROUNDING_TOLERANCE[logits.dtype] * scale


def _round_down(radius: Tensor) -> Tensor:
    down = torch.nextafter(radius, torch.zeros_like(radius))
    return torch.where(radius > 0, down, torch.zeros_like(radius))


def _predict(logits: Tensor) -> tuple[Tensor, Tensor]:
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, num_classes >= 2); got {tuple(logits.shape)}")
    finite = torch.isfinite(logits).all(dim=1)
    pred = logits.argmax(dim=1)
    return torch.where(finite, pred, torch.full_like(pred, ABSTAIN)), finite


def generic_margin_radius(logits: Tensor, lipschitz: float) -> tuple[Tensor, Tensor]:
    r"""Predictions and certified l2 radii :math:`(f_c - \max_{j\ne c} f_j)/(\sqrt2 L)`.

    Guarantee: if every logit vector of the model is ``lipschitz``-Lipschitz in l2, the computed
    prediction is constant on the open l2 ball of the returned radius around each input (up to the
    forward tolerance of Note [sound rounding]). Non-finite logits abstain (prediction ``ABSTAIN``, radius 0).

    Returns:
        ``(prediction, radius)``: int64 ``(N,)`` and float64 ``(N,)`` tensors on the logits' device.
    """
    if not (lipschitz > 0 and math.isfinite(lipschitz)):
        raise ValueError(f"lipschitz must be a finite number > 0; got {lipschitz}")
    pred, finite = _predict(logits)
    z = logits.detach().to(torch.float64)
    top2 = z.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1] - 4.0 * forward_rounding_tolerance(logits)
    radius = margin.clamp_min(0.0) / (math.sqrt(2.0) * lipschitz * (1.0 + 1e-15))
    radius = torch.where(finite, _round_down(radius), torch.zeros_like(radius))
    return pred, radius


def lln_margin_radius(logits: Tensor, distances: Tensor, body_lipschitz: float) -> tuple[Tensor, Tensor]:
    r"""Predictions and certified radii :math:`\min_{j\ne c}(f_c - f_j)/(L_\varphi \|w_c - w_j\|)`.

    Args:
        logits: ``(N, K)``.
        distances: ``(K, K)`` upper bounds on :math:`\|w_i - w_j\|` (e.g.
            ``LinearNormalized.pairwise_distance_bounds()``).
        body_lipschitz: upper bound on the Lipschitz constant of the body feeding the head.

    Guarantee: as :func:`generic_margin_radius`, for a model ``head(body(x))`` with these bounds.
    """
    if not (body_lipschitz > 0 and math.isfinite(body_lipschitz)):
        raise ValueError(f"body_lipschitz must be a finite number > 0; got {body_lipschitz}")
    k = logits.shape[1] if logits.dim() == 2 else -1
    if distances.shape != (k, k):
        raise ValueError(f"distances must have shape ({k}, {k}) to match the logits; got {tuple(distances.shape)}")
    pred, finite = _predict(logits)
    z = logits.detach().to(torch.float64)
    safe_pred = pred.clamp_min(0)
    margins = z.gather(1, safe_pred[:, None]) - z - 4.0 * forward_rounding_tolerance(logits)[:, None]
    dist = distances.to(device=z.device, dtype=torch.float64)[safe_pred] * body_lipschitz * (1.0 + 1e-15)
    ratio = margins.clamp_min(0.0) / dist.clamp_min(torch.finfo(torch.float64).tiny)
    ratio.scatter_(1, safe_pred[:, None], math.inf)
    radius = ratio.amin(dim=1)
    radius = torch.where(finite, _round_down(radius), torch.zeros_like(radius))
    return pred, radius


def split_lln_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(body, head)`` when ``model`` is an ``nn.Sequential`` ending in a ``LinearNormalized`` head."""
    from stablenet.nn.lln import LinearNormalized

    if isinstance(model, nn.Sequential) and len(model) > 1 and isinstance(model[-1], LinearNormalized):
        return model[:-1], model[-1]
    return None


class LipschitzCertifier:
    """Certifies a model with a fixed set of bounds, computed once (see :func:`certify_lipschitz`).

    Args:
        model: the classifier (pixels in [0, 1] to logits).
        form: ``"lln"`` (needs an LLN head), ``"generic"``, or ``"auto"`` (LLN when available).
        input_shape: shape of one input (no batch dimension); needed by models with convolutions.
    """

    FORMS = ("auto", "generic", "lln")

    def __init__(self, model: nn.Module, form: str = "auto", input_shape: tuple[int, ...] | None = None) -> None:
        from stablenet.spectral.network import lipschitz_upper_bound

        if form not in self.FORMS:
            raise ValueError(f"form must be one of {', '.join(self.FORMS)}; got {form!r}")
        self.model = model
        split = split_lln_head(model)
        if form == "lln" and split is None:
            raise ValueError("form 'lln' needs an nn.Sequential model ending in a LinearNormalized head")
        self.form = "lln" if (form == "auto" and split is not None) else ("generic" if form == "auto" else form)
        if self.form == "lln":
            body, head = split
            self.lipschitz = lipschitz_upper_bound(body, input_shape)
            self.distances = head.pairwise_distance_bounds()
        else:
            self.lipschitz = lipschitz_upper_bound(model, input_shape)
            self.distances = None

    @torch.no_grad()
    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with ieee_float32():  # the float32 tolerance assumes IEEE float32, not TF32 (stablenet.precision)
            logits = self.model(x)
        if self.form == "lln":
            return lln_margin_radius(logits, self.distances, self.lipschitz)
        return generic_margin_radius(logits, self.lipschitz)


def certify_lipschitz(model: nn.Module, x: Tensor, form: str = "auto") -> tuple[Tensor, Tensor]:
    """Certified predictions and l2 radii for a batch ``x``, the model taken as it is (use eval mode).

    Guarantee: for each input, the model's prediction is the same at every point of the l2 ball of the
    returned radius (radius 0: nothing certified).
    """
    return LipschitzCertifier(model, form, tuple(x.shape[1:]))(x)
