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

import math
import numbers
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "COUNT_EVERY",
    "GPU_CHUNK_BYTES",
    "batch_plan",
    "chunk_plan",
    "class_counts",
    "make_generator",
    "mean_and_variance",
    "noisy_outputs",
]


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


#: Noisy inputs prepared ahead of the forward passes on a GPU, in bytes (Note [noise chunks]); none on a CPU.
GPU_CHUNK_BYTES = 1 << 26
#: Forward passes whose top classes are counted together (one scatter-add) in :func:`class_counts`.
COUNT_EVERY = 32


def _chunks(plan: list[tuple[int, int, int]], most: int) -> Iterator[tuple[int, int, int, int, bool]]:
    """``(start, g, reps, k, same)``: runs of at most ``most`` consecutive plan entries with one ``(g, reps)``,
    either all on the same ``g`` images (``same``) or on consecutive groups of ``g`` images."""
    i = 0
    while i < len(plan):
        start, g, reps = plan[i]
        j, same = i + 1, True
        while j < len(plan) and j - i < most and plan[j][1:] == (g, reps):
            if same and plan[j][0] == start:
                j += 1
            elif plan[j][0] == start + (j - i) * g and (j - i == 1 or not same):
                same = False
                j += 1
            else:
                break
        yield start, g, reps, j - i, same
        i = j


def chunk_plan(
    n_img: int, num: int, batch_size: int, image_bytes: int, device: torch.device, chunk_bytes: int | None = None
) -> list[tuple[int, int, int, int, bool]]:
    """``(start, g, reps, k, same)`` per noise draw of :func:`noisy_outputs`: ``k`` forward passes of ``g`` images
    times ``reps`` draws, on the same images (``same``) or on consecutive groups (Note [noise chunks])."""
    if chunk_bytes is None:
        chunk_bytes = GPU_CHUNK_BYTES if device.type == "cuda" else 0
    plan = batch_plan(n_img, num, batch_size)
    batch_bytes = max((g * reps for _, g, reps in plan), default=1) * image_bytes
    return list(_chunks(plan, max(1, chunk_bytes // max(1, batch_bytes))))


def noisy_outputs(
    model: nn.Module,
    x: Tensor,
    num: int,
    sigma: float,
    batch_size: int,
    generator: torch.Generator,
    chunk_bytes: int | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(image_index, logits)`` chunks: logits of ``model(x[i] + sigma * noise)``, ``num`` per image.

    ``image_index`` is a ``(B,)`` long tensor on the model's device saying which image each row belongs to.
    ``chunk_bytes`` bounds the noisy inputs prepared ahead of the forward passes (Note [noise chunks]); the
    default is ``GPU_CHUNK_BYTES`` on a GPU and none (one forward pass at a time) on a CPU.
    """
    if num < 1 or batch_size < 1:
        raise ValueError(f"num and batch_size must be >= 1; got {num} and {batch_size}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    device, shape = x.device, x.shape[1:]
    index_key, index = None, None
    image_bytes = math.prod(shape) * x.element_size()
    for start, g, reps, k, same in chunk_plan(len(x), num, batch_size, image_bytes, device, chunk_bytes):
        # Note [noise chunks]
        # On a GPU a small model's forward pass is a handful of kernel launches, and every extra operation per
        # pass (drawing noise, adding it, counting) costs a launch of about the same duration. So the noisy
        # inputs of k passes are drawn and added by one operation each (at most chunk_bytes of them), and each
        # pass reads its slice. Every pass still gets its own fresh draws.
        if same:
            groups = x[start : start + g].unsqueeze(0).expand(k, g, *shape)
        else:
            groups = x[start : start + k * g].reshape(k, g, *shape)
        # Note [noise layout]: the images of a pass share its reps noise draws. Each image still gets
        # i.i.d. N(0, sigma^2 I) samples, fresh for every call, which is all a per-image certificate
        # needs; drawing the noise once per pass instead of once per image divides the RNG cost by g.
        noise = torch.randn((k, 1, reps, *shape), generator=generator, device=device, dtype=x.dtype)
        # A Python-scalar alpha: a tensor sigma would be a host-to-device copy, a sync, in every pass.
        batches = torch.add(groups.unsqueeze(2), noise, alpha=sigma)
        key = (start, g, reps, k, same)
        if index_key != key:  # rebuilt only when the rows change (host-side check: no sync)
            images = torch.arange(start, start + (g if same else k * g), device=device)
            index, index_key = images.repeat_interleave(reps).view(1 if same else k, g * reps), key
        for b in range(k):
            yield index[0 if same else b], model(batches[b].view(g * reps, *shape))


@torch.no_grad()
def class_counts(
    model: nn.Module,
    x: Tensor,
    num: int,
    sigma: float,
    num_classes: int,
    batch_size: int,
    generator: torch.Generator,
    chunk_bytes: int | None = None,
) -> Tensor:
    """``(N, num_classes)`` counts of the base model's top class over ``num`` noisy copies of each image.

    ``chunk_bytes``: see :func:`noisy_outputs`.
    """
    counts = torch.zeros(len(x) * num_classes, dtype=torch.long, device=x.device)
    pending: list[tuple[Tensor, Tensor]] = []

    def count() -> None:
        # One scatter-add over flattened (image, class) cells for up to COUNT_EVERY passes: a single atomic-add
        # kernel on GPU, and unlike torch.bincount (which reads the maximum back to size its output) no
        # device-to-host sync.
        index = torch.cat([i for i, _ in pending]) if len(pending) > 1 else pending[0][0]
        top = torch.cat([t for _, t in pending]) if len(pending) > 1 else pending[0][1]
        flat = index * num_classes + top
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        pending.clear()

    for index, logits in noisy_outputs(model, x, num, sigma, batch_size, generator, chunk_bytes):
        if logits.ndim != 2 or logits.shape[1] != num_classes:
            raise ValueError(
                f"the base model must return logits of shape (batch, num_classes) = ({len(index)}, {num_classes}); "
                f"got {tuple(logits.shape)}"
            )
        pending.append((index, logits.argmax(dim=1)))
        if len(pending) == COUNT_EVERY:
            count()
    if pending:
        count()
    return counts.view(len(x), num_classes)


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
