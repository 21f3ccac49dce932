r"""The losses' formulas: offset cross-entropy, multi-class hinge, Kantorovich–Rubinstein and hinge-KR.

Notation: logits :math:`z \in \mathbb{R}^{N \times K}`, labels :math:`y_i`, and per-pair margins
:math:`m_{y_i j} \ge 0` (zero at :math:`j = y_i`). A margin loss takes ``margin`` as a float :math:`u`
(:math:`m_{yj} = u` for every :math:`j \ne y`) or as an ``(N, K)`` tensor of :math:`m_{y_i j}` (what a target
radius gives with an LLN head: ``stablenet.train.losses.margins``). Every loss returns the batch mean, a 0-dim
tensor, and reads nothing back from the device.

# Note [KR under DDP]
The KR estimate is not a mean of per-example terms: its weights :math:`1/C_k` and :math:`1/(N - C_k)` depend on
the class counts :math:`C_k` of the whole batch. With ``distributed=True`` (and a process group) the counts and
the batch size are summed over the ranks (one ``all_reduce`` of :math:`K + 1` numbers per call) and each rank
returns its share scaled as a per-example mean would be: the average of the ranks' values weighted by their slice
sizes is then the loss of the global batch, which is what a data-parallel trainer's per-rank mean weighting
assumes (``stablenet.train.distributed``, Note [global batch]). Every rank must then call the loss the same
number of times.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from stablenet.nn.base import at_least_float32

__all__ = ["hkr_loss", "kr_loss", "multiclass_hinge", "offset_cross_entropy"]

# What each scalar option must be, by name (also checked by the registry when a loss is built).
_OPTION_RULES = {
    "offset": (lambda v: v >= 0, "a finite number >= 0"),
    "margin": (lambda v: v >= 0, "a finite number >= 0"),
    "temperature": (lambda v: v > 0, "a finite number > 0"),
    "alpha": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "target_radius": (lambda v: v > 0, "a finite number > 0"),
    "lipschitz": (lambda v: v > 0, "a finite number > 0"),
}


def _check_option(name: str, value: object) -> None:
    """Raise a one-line ``ValueError`` if ``value`` breaks the rule for option ``name`` (names without a rule pass)."""
    if name not in _OPTION_RULES:
        return
    ok, what = _OPTION_RULES[name]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and ok(value)):
        raise ValueError(f"{name} must be {what}; got {value!r}")


def _checked(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits, target)``: half-precision logits in float32 (class counts and margins need the digits), the
    target as int64, after checking the shapes (no values are read: that would synchronise the device)."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, num_classes >= 2); got {tuple(logits.shape)}")
    if target.shape != logits.shape[:1] or target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(
            f"target must hold integer class indices of shape ({logits.shape[0]},); "
            f"got {target.dtype} of shape {tuple(target.shape)}"
        )
    return at_least_float32(logits), target.long()


def _pair_margins(margin: float | Tensor, target: Tensor, logits: Tensor) -> Tensor:
    r"""The ``(N, K)`` margins :math:`m_{y_i j}` in the logits' dtype, zero at :math:`j = y_i`."""
    if isinstance(margin, Tensor):
        if margin.shape != logits.shape:
            raise ValueError(f"margin must be a float or of shape {tuple(logits.shape)}; got {tuple(margin.shape)}")
        m = margin.detach().to(device=logits.device, dtype=logits.dtype)
    else:
        _check_option("margin", margin)
        m = torch.full_like(logits, float(margin)).detach()
    return m.scatter(1, target[:, None], 0.0)


def offset_cross_entropy(
    logits: Tensor, target: Tensor, margin: float | Tensor = 0.0, temperature: float = 1.0
) -> Tensor:
    r"""Offset cross-entropy (SLL, Araujo et al. 2023, arXiv 2303.03169, after Prach & Lampert 2022):

    .. math:: \ell = \tau\, \mathrm{CE}\big((z + M_{y})/\tau,\; y\big), \qquad M_{yj} = m_{yj},\ M_{yy} = 0.

    With a constant margin :math:`u` this is :math:`\tau\,\mathrm{CE}((z - u\,e_y)/\tau)`, since cross-entropy is
    unchanged by adding :math:`u` to every logit. The loss is small only when :math:`z_y - z_j \gg m_{yj}`; the
    temperature :math:`\tau` sets how sharply (SLL: :math:`u = 1.5\sqrt2`, :math:`\tau = 0.25` on CIFAR-10).

    Example:
        >>> z, y = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
        >>> bool(offset_cross_entropy(z, y, margin=1.0) > F.cross_entropy(z, y))  # the margin costs
        True
    """
    logits, target = _checked(logits, target)
    _check_option("temperature", temperature)
    shifted = logits + _pair_margins(margin, target, logits)
    return temperature * F.cross_entropy(shifted / temperature, target)


def multiclass_hinge(logits: Tensor, target: Tensor, margin: float | Tensor = 0.0) -> Tensor:
    r"""Multi-class hinge (Weston & Watkins 1999), the sum over the wrong classes:

    .. math:: \ell = \frac1N \sum_i \sum_{j \ne y_i} \max\big(0,\; m_{y_i j} - (z_{i y_i} - z_{ij})\big).

    It is zero exactly when every margin :math:`z_y - z_j` reaches :math:`m_{yj}`, i.e. when the Lipschitz
    certificate whose margins these are certifies the target radius (``stablenet.train.losses.margins``).

    Example:
        >>> multiclass_hinge(torch.tensor([[2.0, 0.0, 1.5]]), torch.tensor([0]), margin=1.0)  # 0 + 0.5
        tensor(0.5000)
    """
    logits, target = _checked(logits, target)
    true = logits.gather(1, target[:, None])
    violations = (_pair_margins(margin, target, logits) - (true - logits)).clamp_min(0.0)
    return violations.scatter(1, target[:, None], 0.0).sum(dim=1).mean()


def _kr_estimate(logits: Tensor, target: Tensor, distributed: bool) -> Tensor:
    r"""This rank's share of :math:`\widehat{W} = \frac1K\sum_k (\bar z_k^{+} - \bar z_k^{-})`, scaled as a mean
    over its slice (Note [KR under DDP]); an empty group's mean counts as 0."""
    n, k = logits.shape
    onehot = torch.zeros_like(logits).scatter(1, target[:, None], 1.0)
    counts = torch.cat([onehot.sum(dim=0), logits.new_full((1,), n)]).detach()
    if distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    pos, total = counts[:k], counts[k]
    neg = total - pos
    weights = onehot / pos.clamp_min(1.0) - (1.0 - onehot) / neg.clamp_min(1.0)  # (N, K), labels only
    return (weights * logits).sum() * (total / (k * n))


def kr_loss(logits: Tensor, target: Tensor, distributed: bool = False) -> Tensor:
    r"""Kantorovich–Rubinstein loss, multi-class one-vs-rest as in deel-lip (Serrurier et al., CVPR 2021,
    arXiv 2006.06520): minus the batch estimate of the mean over classes of the Wasserstein-1 dual between the
    class and the rest,

    .. math:: \ell_{KR} = -\frac1K \sum_k \Big(\frac1{C_k}\sum_{i: y_i = k} z_{ik}
              - \frac1{N - C_k}\sum_{i: y_i \ne k} z_{ik}\Big),

    :math:`C_k` the count of class :math:`k` in the batch (a term with an empty group counts as 0). For a
    1-Lipschitz model each term is at most the Wasserstein-1 distance between the class and the rest. It is
    unbounded below on its own: use it with a Lipschitz-constrained model, or inside :func:`hkr_loss`.
    ``distributed``: Note [KR under DDP].

    Example:
        >>> kr_loss(torch.tensor([[1.0, -1.0], [0.0, 2.0]]), torch.tensor([0, 1]))  # -((1-0) + (2+1))/2
        tensor(-2.)
    """
    logits, target = _checked(logits, target)
    return -_kr_estimate(logits, target, distributed)


def _one_vs_rest_hinge(logits: Tensor, target: Tensor, margin: float | Tensor) -> Tensor:
    r""":math:`H = \frac1N\sum_i \frac1K \sum_{j\ne y_i} [\max(0, m_{y_i j}/2 - z_{iy_i})
    + \max(0, m_{y_i j}/2 + z_{ij})]` (see :func:`hkr_loss`)."""
    half = _pair_margins(margin, target, logits) / 2
    true = logits.gather(1, target[:, None])
    terms = (half - true).clamp_min(0.0) + (half + logits).clamp_min(0.0)
    return terms.scatter(1, target[:, None], 0.0).sum(dim=1).mean() / logits.shape[1]


def hkr_loss(
    logits: Tensor, target: Tensor, margin: float | Tensor = 0.0, alpha: float = 0.9, distributed: bool = False
) -> Tensor:
    r"""Hinge-KR loss, multi-class as in deel-lip (Serrurier et al., CVPR 2021, arXiv 2006.06520):

    .. math:: \ell = \alpha\, H + (1 - \alpha)\, \ell_{KR}, \qquad
              H = \frac1N \sum_i \frac1K \sum_{j \ne y_i}
              \Big[\max\big(0, \tfrac{m_{y_i j}}2 - z_{iy_i}\big) + \max\big(0, \tfrac{m_{y_i j}}2 + z_{ij}\big)\Big],

    :math:`\ell_{KR}` as in :func:`kr_loss` and :math:`\alpha \in [0, 1]` (1: hinge only, 0: KR only; 0.9 is
    deel-torchlip's default for its soft variant). With a constant margin :math:`m`, :math:`H` is deel-lip's
    one-vs-rest hinge, :math:`\frac1K[(K-1)\max(0, m/2 - z_y) + \sum_{j\ne y}\max(0, m/2 + z_j)]`; the pairwise
    form spreads the true class's term over the pairs so that :math:`H = 0` gives
    :math:`z_y - z_j \ge m_{yj}` for every pair. ``distributed``: Note [KR under DDP].
    """
    logits, target = _checked(logits, target)
    _check_option("alpha", alpha)
    hinge = _one_vs_rest_hinge(logits, target, margin)
    if alpha == 1.0:  # skip the KR term (and its all_reduce) when it has no weight
        return hinge
    return alpha * hinge - (1.0 - alpha) * _kr_estimate(logits, target, distributed)
