"""Evaluation during training: clean accuracy and Lipschitz-certified accuracy, split over the ranks.

The certificate is the one ``stablenet certify`` makes (:class:`~stablenet.certify.lipschitz.LipschitzCertifier`,
float64 arithmetic by default), computed on exactly the weights being evaluated: the certifier snapshots them and
the layers' weight caches are checked against them (Note [certified weights] in ``stablenet.certify.lipschitz``),
so an EMA swapped in place is certified as it is evaluated.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stablenet.certify.lipschitz import LipschitzCertifier
from stablenet.train.distributed import DistributedContext

__all__ = ["evaluate", "evaluate_batches"]


def _certifier(model: nn.Module, input_shape: tuple[int, ...]) -> LipschitzCertifier | None:
    try:
        return LipschitzCertifier(model, input_shape=input_shape)
    except TypeError:  # a model the walk cannot bound: accuracy only
        return None


def _count(model: nn.Module, certifier, x: Tensor, y: Tensor, radius: float) -> Tensor:
    """``(correct, certified, seen)`` of one batch, on the device."""
    if certifier is None:
        pred, rad = model(x).argmax(1), torch.zeros(len(x), dtype=torch.float64, device=x.device)
    else:
        pred, rad = certifier(x)
    ok = pred == y
    return torch.stack([ok.sum(), (ok & (rad >= radius)).sum(), torch.tensor(len(y), device=ok.device)]).double()


def _rates(counts: Tensor, certifier, context: DistributedContext) -> tuple[float, float]:
    correct, certified, seen = (float(v) for v in context.sum(counts).cpu())
    seen = max(seen, 1.0)
    return correct / seen, (certified / seen if certifier is not None else float("nan"))


@torch.no_grad()
def evaluate_batches(
    model: nn.Module, batches, radius: float, context: DistributedContext | None = None
) -> tuple[float, float]:
    """As :func:`evaluate`, over ``(images, labels)`` batches (this rank's share of a streamed test set)."""
    training = model.training
    model.eval()
    certifier, counts = None, None
    for x, y in batches:
        if counts is None:
            certifier = _certifier(model, tuple(x.shape[1:]))
            counts = torch.zeros(3, dtype=torch.float64, device=x.device)
        counts += _count(model, certifier, x, y, radius)
    model.train(training)
    if counts is None:  # this rank had no test images; it still joins the sum
        device = (context or DistributedContext()).device
        counts = torch.zeros(3, dtype=torch.float64, device=device)
    return _rates(counts, certifier, context or DistributedContext(device=counts.device))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    radius: float,
    batch_size: int = 1024,
    context: DistributedContext | None = None,
) -> tuple[float, float]:
    """Clean accuracy and certified accuracy at ``radius`` (NaN when the model cannot be bounded).

    Under data parallelism each rank evaluates every ``world``-th example and the counts are summed over the
    ranks, so every rank returns the same two numbers.
    """
    context = context or DistributedContext(device=images.device)
    training = model.training
    model.eval()
    certifier = _certifier(model, tuple(images.shape[1:]))
    mine = slice(context.rank, None, context.world)
    x_all, y_all = images[mine], labels[mine]
    counts = torch.zeros(3, dtype=torch.float64, device=images.device)  # correct, certified, seen
    for start in range(0, len(x_all), batch_size):
        counts += _count(model, certifier, x_all[start : start + batch_size], y_all[start : start + batch_size], radius)
    model.train(training)
    return _rates(counts, certifier, context)
