r"""Lipschitz-margin certificates (Tsuzuku et al. 2018), batched and sound in floating point.

If the logits satisfy :math:`\|f(x) - f(x')\|_2 \le L \|x - x'\|_2`, the prediction
:math:`c = \arg\max_j f_j(x)` cannot change within

.. math:: R = \frac{f_c(x) - \max_{j \ne c} f_j(x)}{\sqrt{2}\, L}  \qquad \text{(generic form)}.

With a body :math:`\varphi` of Lipschitz constant :math:`L_\varphi` followed by a head with rows
:math:`w_j`, each margin :math:`f_c - f_j` is :math:`L_\varphi\|w_c - w_j\|`-Lipschitz, so

.. math:: R = \min_{j \ne c} \frac{f_c(x) - f_j(x)}{L_\varphi\, \|w_c - w_j\|}  \qquad \text{(LLN form)},

which is tighter when the rows are unit vectors (last-layer normalisation).

# Note [sound rounding]
Three roundings could make a certificate wrong, and each is paid for by a proof:
(1) the Lipschitz bound comes from ``stablenet.spectral`` with its documented slacks (an upper bound on the
exact network);
(2) the logits are computed in floating point, at :math:`x` and at every point :math:`x'` of the ball: the
computed margin can differ from the exact one by :math:`\alpha + \beta r` there (a bound derived from the
network's weights and its activations' norms at :math:`x`, over the whole ball: Note [rounding over the ball] in
``stablenet.certify.rounding``), so the radius is the largest :math:`r` with
:math:`\tilde m - 2\alpha - (D L + \beta) r > 0`, where :math:`\tilde m` is the computed margin at :math:`x`
and :math:`D L` the exact margin's Lipschitz constant;
(3) the radius is computed in float64 from these bounds, which carry an absolute slack of
:math:`2^{-50}(|f_c| + |f_j|)` for the margin's own rounding, then shrunk by :math:`2^{-40}` relatively and
moved one ulp towards zero.
The forward runs under :func:`stablenet.precision.sound_arithmetic` (no TF32, no reduced-precision fast math, no
cuDNN Winograd or FFT algorithms), as the rounding model assumes, and without autocast. The certificate covers
the model's forward computed that way; a deployment that runs it in TF32 or with other algorithms rounds
differently.

# Note [certified arithmetic]
A certificate is a statement about one function. Two are on offer, and both imply the statement for the exact
network (real arithmetic, with the ideal float64 constrained weights):

* ``"float64"`` (the default): the network evaluated in float64, i.e. ``model.double()`` (parameters and buffers
  converted exactly). Its rounding over the ball is about :math:`10^{-13}` of the activations, so radii are
  those of exact arithmetic to about 12 digits. ``verify`` attacks that network; to deploy exactly the
  certified classifier, evaluate in float64. A float32 evaluation of the same weights can differ from it where
  the float64 margin is below float32's rounding (about :math:`10^{-6}` in practice, but no proof of that is
  small).
* ``"native"``: the model's own forward in its own dtype (float32, bfloat16 ...). The bound on its rounding
  is proven for any summation order (Note [rounding model] in ``stablenet.spectral.rounding``), so it is
  pessimistic, :math:`n u` per dot product of length :math:`n` where a typical error is :math:`\sqrt n u`:
  on the demo's 4-layer SLL network (float32) it removes about 0.04 from every radius; in bfloat16 it
  certifies almost nothing. Use it when the deployed float32 model itself must be covered.

# Note [certified weights]
A certificate must describe the weights the forward actually uses. Constrained layers cache their weights in
eval mode and check the cache against the parameters' contents on every use (Note [eval cache] in
``stablenet.nn.base``), and :class:`LipschitzCertifier` snapshots every parameter and buffer when it computes
its bounds and refuses to certify after any of them changed, whatever path changed it (``.data`` writes
included).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from stablenet.abstain import ABSTAIN
from stablenet.certify.rounding import LogitErrorBound, RoundingWalk, _radius_below
from stablenet.precision import sound_arithmetic
from stablenet.spectral.network import lipschitz_bound_tree

__all__ = [
    "ARITHMETICS",
    "LipschitzCertifier",
    "LogitErrorBound",
    "certified_network",
    "certify_lipschitz",
    "generic_margin_radius",
    "lln_margin_radius",
    "split_lln_head",
]

#: Relative shrink of every radius (float64 evaluation of the bounds, a few dozen operations).
_RADIUS_SHRINK = 1.0 - 2.0**-40
#: Absolute slack on a margin, per unit of the two logits' magnitudes (their float64 difference rounds once).
_MARGIN_SLACK = 2.0**-50
_SQRT2_UP = math.nextafter(math.sqrt(2.0), math.inf)


def _round_down(radius: Tensor) -> Tensor:
    down = torch.nextafter(radius, torch.zeros_like(radius))
    return torch.where(radius > 0, down, torch.zeros_like(radius))


def _predict(logits: Tensor) -> tuple[Tensor, Tensor]:
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, num_classes >= 2); got {tuple(logits.shape)}")
    finite = torch.isfinite(logits).all(dim=1)
    pred = logits.argmax(dim=1)
    return torch.where(finite, pred, torch.full_like(pred, ABSTAIN)), finite


def _check_error(error: LogitErrorBound, logits: Tensor) -> None:
    if not isinstance(error, LogitErrorBound):
        raise TypeError(
            "error must be a LogitErrorBound (LipschitzCertifier computes it; LogitErrorBound.exact(n, k) for exactly "
            f"computed logits); got {type(error).__name__}"
        )
    n, k = logits.shape
    if error.body_offset.shape != (n,) or error.head_offset.shape != (n, k):
        raise ValueError(
            f"error must have body terms of shape ({n},) and head terms of shape ({n}, {k}) to match the logits; "
            f"got {tuple(error.body_offset.shape)} and {tuple(error.head_offset.shape)}"
        )


def _margin_radius(logits: Tensor, factors: Tensor, lipschitz: float, error: LogitErrorBound) -> tuple[Tensor, Tensor]:
    r"""Radii :math:`\min_j (\tilde m_{cj} - 2\alpha_{cj}) / (D_{cj} L + \beta_{cj})` (Note [sound rounding])."""
    _check_error(error, logits)
    pred, finite = _predict(logits)
    z = logits.detach().to(torch.float64)
    device = z.device
    c = pred.clamp_min(0)[:, None]
    d = factors.to(device=device, dtype=torch.float64)[c[:, 0]]
    zc = z.gather(1, c)
    margins = zc - z - _MARGIN_SLACK * (zc.abs() + z.abs())
    head0, head1 = error.head_offset.to(device), error.head_slope.to(device)
    alpha = d * error.body_offset.to(device)[:, None] + head0.gather(1, c) + head0
    beta = d * error.body_slope.to(device)[:, None] + head1.gather(1, c) + head1
    numerator = (margins - 2.0 * alpha).clamp_min(0.0)
    denominator = (d * lipschitz + beta).clamp_min(torch.finfo(torch.float64).tiny)
    ratio = torch.nan_to_num(numerator / denominator, nan=0.0)
    ratio.scatter_(1, c, math.inf)
    radius = torch.minimum(ratio.amin(dim=1), error.radius_limit.to(device)) * _RADIUS_SHRINK
    radius = torch.nan_to_num(radius, nan=0.0, posinf=0.0)
    radius = torch.where(finite, _round_down(radius), torch.zeros_like(radius))
    return pred, radius


def generic_margin_radius(logits: Tensor, lipschitz: float, error: LogitErrorBound) -> tuple[Tensor, Tensor]:
    r"""Predictions and certified l2 radii :math:`(\tilde m - 2\alpha)/(\sqrt2 L + \beta)`, :math:`\tilde m =
    \tilde f_c - \max_{j\ne c} \tilde f_j` in exact arithmetic, with rounding paid for (Note [sound rounding]).

    Guarantee: if every logit vector of the exact model is ``lipschitz``-Lipschitz in l2 and ``error`` bounds the
    computed logits' distance to the exact ones on the ball (body terms: the l2 norm of the logit error; head
    terms: 0), the computed prediction is constant on the open l2 ball of the returned radius around each
    input. Non-finite logits abstain (prediction ``ABSTAIN``, radius 0).

    Returns:
        ``(prediction, radius)``: int64 ``(N,)`` and float64 ``(N,)`` tensors on the logits' device.
    """
    if not (lipschitz > 0 and math.isfinite(lipschitz)):
        raise ValueError(f"lipschitz must be a finite number > 0; got {lipschitz}")
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, num_classes >= 2); got {tuple(logits.shape)}")
    k = logits.shape[1]
    factors = torch.full((k, k), _SQRT2_UP, dtype=torch.float64)
    return _margin_radius(logits, factors, lipschitz, error)


def lln_margin_radius(
    logits: Tensor, distances: Tensor, body_lipschitz: float, error: LogitErrorBound
) -> tuple[Tensor, Tensor]:
    r"""Predictions and certified radii :math:`\min_{j\ne c}(\tilde m_{cj} - 2\alpha_{cj})/(L_\varphi
    \|w_c - w_j\| + \beta_{cj})`, the LLN form (Note [sound rounding]).

    Args:
        logits: ``(N, K)``.
        distances: ``(K, K)`` upper bounds on :math:`\|w_i - w_j\|` (e.g.
            ``LinearNormalized.pairwise_distance_bounds()``).
        body_lipschitz: upper bound on the Lipschitz constant of the body feeding the head.
        error: bounds on the body's output error and on each logit's own rounding in the head, over the ball.

    Guarantee: as :func:`generic_margin_radius`, for a model ``head(body(x))`` with these bounds.
    """
    if not (body_lipschitz > 0 and math.isfinite(body_lipschitz)):
        raise ValueError(f"body_lipschitz must be a finite number > 0; got {body_lipschitz}")
    k = logits.shape[1] if logits.dim() == 2 else -1
    if distances.shape != (k, k):
        raise ValueError(f"distances must have shape ({k}, {k}) to match the logits; got {tuple(distances.shape)}")
    return _margin_radius(logits, distances, body_lipschitz, error)


def split_lln_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(body, head)`` when ``model`` is an ``nn.Sequential`` ending in a ``LinearNormalized`` head."""
    from stablenet.nn.lln import LinearNormalized

    if isinstance(model, nn.Sequential) and len(model) > 1 and isinstance(model[-1], LinearNormalized):
        return model[:-1], model[-1]
    return None


class _Snapshot:
    """Copies of a model's parameters and buffers, to detect any later change (Note [certified weights])."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.values = {name: t.detach().clone() for name, t in self._tensors()}

    def _tensors(self) -> list[tuple[str, Tensor]]:
        params = [(f"parameter {n}", p) for n, p in self.model.named_parameters(remove_duplicate=False)]
        return params + [(f"buffer {n}", b) for n, b in self.model.named_buffers(remove_duplicate=False)]

    def check(self) -> None:
        current = dict(self._tensors())
        for name, saved in self.values.items():
            now = current.pop(name, None)
            if now is None or now.shape != saved.shape or now.dtype != saved.dtype or not torch.equal(now, saved):
                raise RuntimeError(
                    f"the model's {name} changed after the certifier computed its bounds; build a new "
                    "LipschitzCertifier for the new weights"
                )
        if current:
            raise RuntimeError(
                f"the model gained {next(iter(current))} after the certifier computed its bounds; build a new "
                "LipschitzCertifier"
            )


#: What a Lipschitz certificate describes (Note [certified arithmetic]).
ARITHMETICS = ("float64", "native")


def certified_network(model: nn.Module, arithmetic: str) -> nn.Module:
    """The network whose forward a certificate in ``arithmetic`` describes (Note [certified arithmetic]): a float64
    copy of ``model`` (parameters and buffers converted exactly) or ``model`` itself."""
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic must be one of {', '.join(ARITHMETICS)}; got {arithmetic!r}")
    if arithmetic == "native":
        return model
    return copy.deepcopy(model).to(torch.float64)


class LipschitzCertifier:
    """Certifies a model with bounds computed once from its current weights (see :func:`certify_lipschitz`).

    Args:
        model: the classifier (pixels in [0, 1] to logits), in eval mode.
        form: ``"lln"`` (needs an LLN head), ``"generic"``, or ``"auto"`` (LLN when available).
        input_shape: shape of one input (no batch dimension); needed by models with convolutions.
        arithmetic: ``"float64"`` (default) certifies the network evaluated in float64, ``"native"`` its forward
            in its own dtype (Note [certified arithmetic]).

    Calling it after any parameter or buffer of ``model`` changed raises ``RuntimeError`` (Note [certified
    weights]).
    """

    FORMS = ("auto", "generic", "lln")

    def __init__(
        self,
        model: nn.Module,
        form: str = "auto",
        input_shape: tuple[int, ...] | None = None,
        arithmetic: str = "float64",
    ) -> None:
        if form not in self.FORMS:
            raise ValueError(f"form must be one of {', '.join(self.FORMS)}; got {form!r}")
        self.model = model
        self.arithmetic = arithmetic
        self.network = certified_network(model, arithmetic)
        split = split_lln_head(self.network)
        if form == "lln" and split is None:
            raise ValueError("form 'lln' needs an nn.Sequential model ending in a LinearNormalized head")
        self.form = "lln" if (form == "auto" and split is not None) else ("generic" if form == "auto" else form)
        self._snapshot = _Snapshot(model)
        if self.form == "lln":
            self.body, self.head = split
            tree = lipschitz_bound_tree(self.body, input_shape)
            self.distances = self.head.pairwise_distance_bounds()
        else:
            self.body, self.head = self.network, None
            tree = lipschitz_bound_tree(self.network, input_shape)
            self.distances = None
        self.lipschitz = tree.bound
        self._walk = RoundingWalk(tree)

    @torch.no_grad()
    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._snapshot.check()
        if self.arithmetic == "float64":
            x = x.to(torch.float64)
        extra = [] if self.head is None else [self.head]
        with sound_arithmetic(), torch.autocast(x.device.type, enabled=False), self._walk.record(extra):
            features = self.body(x)
            logits = features if self.head is None else self.head(features)
        if logits.dim() != 2 or logits.shape[1] < 2:
            raise ValueError(f"the model must return logits of shape (N, num_classes >= 2); got {tuple(logits.shape)}")
        n, k = logits.shape
        state, _ = self._walk.body_error(n, logits.device)
        if self.head is None:
            zeros = torch.zeros(n, k, dtype=torch.float64, device=logits.device)
            error = LogitErrorBound(state.e0, state.e1, zeros, zeros, state.limit)
            return generic_margin_radius(logits, self.lipschitz, error)
        call = self._walk.call_of(self.head)
        relative, absolute, max_norm = self.head.logit_rounding(call.dtype)
        relative, absolute = relative.to(logits.device), absolute.to(logits.device)
        m0, m1 = call.in_norm + 2.0 * state.e0, state.e1 + state.prefix
        head0 = torch.nan_to_num(relative[None] * m0[:, None] + absolute[None], nan=math.inf)
        head1 = torch.nan_to_num(relative[None] * m1[:, None], nan=math.inf)
        limit = torch.minimum(state.limit, _radius_below(max_norm, m0, m1))
        error = LogitErrorBound(state.e0, state.e1, head0, head1, limit)
        return lln_margin_radius(logits, self.distances, self.lipschitz, error)


def certify_lipschitz(
    model: nn.Module, x: Tensor, form: str = "auto", arithmetic: str = "float64"
) -> tuple[Tensor, Tensor]:
    """Certified predictions and l2 radii for a batch ``x``, the model taken as it is (use eval mode).

    Guarantee: for each input, the prediction of the exact network and of its forward in ``arithmetic`` (under
    :func:`stablenet.precision.sound_arithmetic`; Note [certified arithmetic]) is the same at every point of the
    open l2 ball of the returned radius (radius 0: nothing certified). Floating-point rounding is accounted for
    (Note [sound rounding]).
    """
    return LipschitzCertifier(model, form, tuple(x.shape[1:]), arithmetic)(x)
