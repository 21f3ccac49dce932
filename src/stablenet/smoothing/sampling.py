"""Monte-Carlo sampling of a base model under Gaussian noise, batched across images and noise draws.

``n`` noisy copies of each of ``N`` images are pushed through the model in batches of ``batch_size`` rows;
when ``n < batch_size`` a batch holds several images, so small models keep a GPU busy, and those images share
the batch's noise draws (Note [noise layout]). Reductions (class
counts, sums of a map and of its square) accumulate on the model's device; nothing goes back to the host
inside the loop, and no operation in it synchronises the device with the host (no tensor made from a Python
number, no ``bincount``), so a GPU runs ahead of the Python loop.

# Note [noise generator]
Noise comes from ``torch.randn(..., generator=g, device=model_device)``, so ``g`` must live on the model's
device. :func:`make_generator` builds one from an int seed. Certification uses one generator for the
selection draws and continues with it for the estimation draws, which are therefore fresh samples.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["batch_plan", "class_counts", "make_generator", "mean_and_variance", "noisy_outputs"]


def make_generator(seed: int | torch.Generator | None, device: torch.device) -> torch.Generator:
    """A generator on ``device`` (an int seeds it; an existing generator must be on that device)."""
    if seed is not None and not isinstance(seed, torch.Generator):
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"generator must be None, an int seed or a torch.Generator; got {seed!r}")
    if isinstance(seed, torch.Generator):
        if seed.device.type != device.type:
            raise ValueError(
                f"generator is on {seed.device} but the model is on {device}; make it on the model's device"
            )
        return seed
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def batch_plan(n_img: int, num: int, batch_size: int) -> list[tuple[int, int, int]]:
    """``(start, g, reps)`` per forward pass of :func:`noisy_outputs`: images ``start:start+g`` with ``reps`` noise
    draws each (Note [noise layout]); ``g * reps <= batch_size`` unless one image already needs more."""
    per_batch = max(1, min(n_img, batch_size // num)) if num < batch_size else 1
    plan = []
    for start in range(0, n_img, per_batch):
        g, remaining = min(per_batch, n_img - start), num
        while remaining > 0:
            reps = min(remaining, max(1, batch_size // g))
            plan.append((start, g, reps))
            remaining -= reps
    return plan


def noisy_outputs(
    model: nn.Module, x: Tensor, num: int, sigma: float, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(image_index, logits)`` chunks: logits of ``model(x[i] + sigma * noise)``, ``num`` per image.

    ``image_index`` is a ``(B,)`` long tensor on the model's device saying which image each row belongs to.
    """
    if num < 1 or batch_size < 1:
        raise ValueError(f"num and batch_size must be >= 1; got {num} and {batch_size}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    device = x.device
    index, index_key = None, None
    for start, g, reps in batch_plan(len(x), num, batch_size):
        group = x[start : start + g]
        # Note [noise layout]: the images of a batch share its reps noise draws. Each image still gets
        # i.i.d. N(0, sigma^2 I) samples, fresh for every call, which is all a per-image certificate
        # needs; drawing the noise once per batch instead of once per image divides the RNG cost by g.
        noise = torch.randn((1, reps, *group.shape[1:]), generator=generator, device=device, dtype=group.dtype)
        # A Python-scalar alpha: a tensor sigma would be a host-to-device copy, a sync, in every batch.
        batch = torch.add(group.unsqueeze(1), noise, alpha=sigma).view(g * reps, *group.shape[1:])
        logits = model(batch)
        if index_key != (start, g, reps):  # rebuilt only when the rows change (host-side check: no sync)
            index, index_key = torch.arange(start, start + g, device=device).repeat_interleave(reps), (start, g, reps)
        yield index, logits


@torch.no_grad()
def class_counts(
    model: nn.Module,
    x: Tensor,
    num: int,
    sigma: float,
    num_classes: int,
    batch_size: int,
    generator: torch.Generator,
) -> Tensor:
    """``(N, num_classes)`` counts of the base model's top class over ``num`` noisy copies of each image."""
    counts = torch.zeros(len(x), num_classes, dtype=torch.long, device=x.device)
    for index, logits in noisy_outputs(model, x, num, sigma, batch_size, generator):
        if logits.ndim != 2 or logits.shape[1] != num_classes:
            raise ValueError(
                f"the base model must return logits of shape (batch, num_classes) = ({len(index)}, {num_classes}); "
                f"got {tuple(logits.shape)}"
            )
        # One scatter-add over flattened (image, class) cells: a single atomic-add kernel on GPU, and unlike
        # torch.bincount (which reads the maximum back to size its output) no device-to-host sync.
        flat = index * num_classes + logits.argmax(dim=1)
        counts.view(-1).scatter_add_(0, flat, torch.ones_like(flat))
    return counts


@torch.no_grad()
def mean_and_variance(
    model: nn.Module,
    x: Tensor,
    num: int,
    sigma: float,
    batch_size: int,
    generator: torch.Generator,
    transform: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor]:
    """Per-image sample mean and unbiased variance of ``transform(logits)`` (shape ``(N, ..., K)``), in float64.

    ``transform`` maps ``(B, K)`` logits to ``(B, ..., K)`` values (e.g. softmax at several temperatures).
    """
    total = total_sq = None
    for index, logits in noisy_outputs(model, x, num, sigma, batch_size, generator):
        values = transform(logits).to(torch.float64)
        if total is None:
            total = torch.zeros(len(x), *values.shape[1:], dtype=torch.float64, device=x.device)
            total_sq = torch.zeros_like(total)
        total.index_add_(0, index, values)
        total_sq.index_add_(0, index, values * values)
    mean = total / num
    var = (total_sq - num * mean * mean) / max(num - 1, 1)
    return mean, var.clamp_min(0.0)
