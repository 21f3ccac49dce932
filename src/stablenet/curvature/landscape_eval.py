r"""The mean loss and accuracy of a model on a fixed data set, at its weights or at a point :math:`w + \sum_k c_k d_k`.

Shared by the landscape slices (:mod:`stablenet.curvature.landscape`) and ε-sharpness
(:mod:`stablenet.curvature.sharpness`).

# Note [landscape weights]
Evaluation writes :math:`w + \alpha d_1 + \beta d_2` into the parameters in place (under ``no_grad``) and
puts every module in eval mode (BatchNorm uses its running statistics, dropout is off). On exit, normal or
not, the parameters and buffers are copied back from clones taken on entry, so they are restored bit for bit,
and each module's ``training`` flag is restored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from stablenet.curvature.landscape_directions import Direction, _parameters

__all__ = ["loss_and_accuracy"]

Data = tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]]
LossFn = Callable[[Tensor, Tensor], Tensor]


def _model_device(model: nn.Module) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")


def _batches(data: Data, batch_size: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if len(x) != len(y):
            raise ValueError(f"inputs and targets must have the same length; got {len(x)} and {len(y)}")
        pairs = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    else:
        try:
            pairs = [(x, y) for x, y in data]
        except (TypeError, ValueError):
            raise ValueError("data must be an (inputs, targets) pair of tensors or an iterable of such pairs") from None
    pairs = [(x.to(device), y.to(device)) for x, y in pairs if len(x) > 0]
    if not pairs:
        raise ValueError("data must hold at least one example; got none")
    return pairs


def _evaluate(model: nn.Module, loss_fn: LossFn, batches: Sequence[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    # loss_fn returns the batch mean; weight each batch by its size so the result is the mean over examples.
    total = correct = 0.0
    count = 0
    classify = True
    with torch.no_grad():
        for x, y in batches:
            out = model(x)
            total += float(loss_fn(out, y)) * len(x)
            count += len(x)
            classify = classify and out.dim() == 2 and y.dim() == 1 and not y.is_floating_point()
            if classify:
                correct += float((out.argmax(dim=1) == y).sum())
    return total / count, (correct / count if classify else math.nan)


@contextmanager
def _scope(model: nn.Module) -> Iterator[tuple[list[nn.Parameter], list[Tensor]]]:
    """Eval mode and exact restoration of parameters, buffers and flags (see Note [landscape weights])."""
    params = _parameters(model)
    originals = [p.detach().clone() for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield params, originals
    finally:
        with torch.no_grad():
            for p, w in zip(params, originals, strict=True):
                p.copy_(w)
            for b, saved in buffers:
                b.copy_(saved)
        for m, training in flags:
            m.training = training


def _set_point(
    params: Sequence[Tensor], originals: Sequence[Tensor], directions: Sequence[Direction], coeffs: Sequence[float]
) -> None:
    with torch.no_grad():
        for i, (p, w) in enumerate(zip(params, originals, strict=True)):
            p.copy_(w)
            for d, c in zip(directions, coeffs, strict=True):
                if c != 0.0:  # skipping keeps the origin bit-identical to the weights
                    p.add_(d[i], alpha=c)


def loss_and_accuracy(model: nn.Module, loss_fn: LossFn, data: Data, *, batch_size: int = 256) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` (in eval mode) on ``data``, as used for every landscape point.

    Args:
        model: The network; its mode is restored afterwards.
        loss_fn: ``loss_fn(outputs, targets)`` returning the *batch mean* (``reduction="mean"``).
        data: An ``(inputs, targets)`` pair of tensors (split into batches of ``batch_size``) or an iterable
            of such pairs. Moved to the model's device.
        batch_size: Examples per forward pass.

    Returns:
        ``(loss, accuracy)``; accuracy is NaN unless outputs are ``N×C`` logits and targets integer labels.
    """
    batches = _batches(data, batch_size, _model_device(model))
    with _scope(model):
        return _evaluate(model, loss_fn, batches)
