r"""Monte-Carlo sampling of a base model under Gaussian noise, batched across images and noise draws.

``n`` noisy copies of each of ``N`` images are pushed through the model in batches of ``batch_size`` rows;
when ``n < batch_size`` a batch holds several images, so small models keep a GPU busy, and those images share
the batch's noise draws (Note [noise layout]). Reductions (class
counts, sums of a map and of its square) accumulate on the model's device; nothing goes back to the host
inside the loop, and no operation in it synchronises the device with the host (no tensor made from a Python
number, no ``bincount``), so a GPU runs ahead of the Python loop.

Two kinds of noise (Note [floating-point noise]): by default ``torch.randn`` in floating point, in at least
float32, which is the common practice and *not* sound against a base model that reads the low-order bits of
its input; or, with a :class:`~stablenet.smoothing.grid_noise.GridNoise`, Gaussian noise rounded to the grid of
the inputs and drawn exactly from random bits (Voráček & Hein, arXiv 2207.07209), which is sound for inputs on
that grid.

# Note [noise generator]
Noise comes from ``torch.randn(..., generator=g, device=model_device)`` (or ``torch.randint`` for
:class:`GridNoise`), so ``g`` must live on the model's device. :func:`make_generator` builds one from an int
seed. Certification uses one generator for the selection draws and continues with it for the estimation draws,
which are therefore fresh samples.

# Note [floating-point noise]
Cohen et al.'s theorem is about :math:`\mathbb P(f(x + \delta) = c)` for a *real* Gaussian :math:`\delta`. The
default sampling instead feeds the model :math:`\mathrm{fl}(x + \mathrm{fl}(\sigma n))`, :math:`n` from
``torch.randn``: a discrete distribution on floating-point numbers, whose support depends on :math:`x`, while
the set of all floats has Gaussian measure zero. A base model may do anything on that set: it can test a
property of the low-order bits of its input that the rounded noisy copies of :math:`x` have and those of a
nearby :math:`x'` lack (or that real Gaussian samples almost never have). The Monte-Carlo counts then estimate
a probability that has nothing to do with the Gaussian one, and the certificate can be false. Voráček & Hein
("Sound randomized smoothing in floating-point arithmetic", ICLR 2023, arXiv 2207.07209) build such models: a
one-dimensional example certified with radius 1.26 around a point with an adversarial example at distance
0.8, and false certificates for CIFAR-10 classifiers. A one-line model of the same kind: "class 1 iff the
input is a whole multiple of :math:`2^{-24}`" (probability 0 under a real Gaussian). In float32 every rounded
copy of :math:`1 + 0.25n` is such a multiple (if it falls below 0.5 the sum was exact), so with
:math:`\sigma = 0.25`, :math:`n = 10^5` the default certifies class 1 at :math:`x = 1` with radius 0.95, while at
:math:`x = 0.1`, at distance 0.9, only about 35% of the copies are multiples and ``predict`` answers 0 for every
seed. So with the default noise the certificates hold only under an assumption that sampling cannot check:
that the base model's decisions do not depend on how :math:`x + \delta` was rounded (plausible for ordinary
networks, false for adversarially built ones). What the default does guarantee about precision:

* the noise is drawn, and :math:`x + \sigma n` formed, in ``promote(x.dtype, float32)``, never in half
  precision (where ``randn`` itself would keep 8 or 11 significant bits and the sum would be rounded again);
  the noisy input is then cast to the dtype of the model's first floating-point parameter or buffer, and kept
  as it is for a model without one. Float32 and float64 inputs get exactly the noise they got before.

The sound alternative is :class:`~stablenet.smoothing.grid_noise.GridNoise` (``noise="grid"`` in the certifiers,
``--noise grid`` in ``stablenet certify``): the real Gaussian rounded to the grid :math:`\{k/L\}` of the inputs and
drawn exactly from random bits, which certifies the grid classifier :math:`f(\mathrm{round}(L\,\cdot)/L)` for any
base model, for inputs on the grid (Note [exact grid noise] in :mod:`stablenet.smoothing.grid_noise`).

Neither mode covers what happens outside the sampling: the certificate is about the smoothed classifier of the
model as it is computed, and the radius arithmetic is rounded down separately (Note [rounding down] in
:mod:`stablenet.smoothing.stats`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from itertools import chain

import torch
from torch import Tensor, nn

from stablenet.nn.base import checked_once
from stablenet.smoothing.grid_noise import GRID_BITS, GRID_MAX_STEPS, GridNoise

__all__ = [
    "COUNT_EVERY",
    "GPU_CHUNK_BYTES",
    "GRID_BITS",
    "GRID_MAX_STEPS",
    "NOISE_KINDS",
    "GridNoise",
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


#: The certifiers' ``noise`` options: ``torch.randn`` in floating point, or :class:`GridNoise` (Note
#: [floating-point noise]).
NOISE_KINDS = ("float", "grid")


def _input_dtype(model: object, dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``model``'s first floating-point parameter or buffer, else ``dtype`` (Note [floating-point
    noise])."""
    if isinstance(model, nn.Module):
        for t in chain(model.parameters(), model.buffers()):
            if t.is_floating_point():
                return t.dtype
    return dtype


def noisy_outputs(
    model: nn.Module,
    x: Tensor,
    num: int,
    sigma: float,
    batch_size: int,
    generator: torch.Generator,
    chunk_bytes: int | None = None,
    *,
    grid: GridNoise | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(image_index, logits)`` chunks: logits of ``model(x[i] + sigma * noise)``, ``num`` per image.

    ``image_index`` is a ``(B,)`` long tensor on the model's device saying which image each row belongs to.
    ``chunk_bytes`` bounds the noisy inputs prepared ahead of the forward passes (Note [noise chunks]); the
    default is ``GPU_CHUNK_BYTES`` on a GPU and none (one forward pass at a time) on a CPU.

    The noise is ``torch.randn`` in ``promote(x.dtype, float32)`` by default, or ``grid``'s exact grid noise
    (``grid.sigma`` must equal ``sigma``; ``x`` must lie on its grid); either way the noisy input is cast to
    the dtype of the model's first floating-point parameter or buffer, if it has one (Note [floating-point
    noise]).
    """
    if num < 1 or batch_size < 1:
        raise ValueError(f"num and batch_size must be >= 1; got {num} and {batch_size}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    if grid is not None and grid.sigma != sigma:
        raise ValueError(f"grid noise was built for sigma = {grid.sigma}; got sigma = {sigma}")
    device, shape = x.device, x.shape[1:]
    # Note [floating-point noise]: never draw or add the noise in half precision.
    noise_dtype = torch.promote_types(x.dtype, torch.float32)
    input_dtype = _input_dtype(model, noise_dtype)
    if grid is None:
        source, element_bytes = x, noise_dtype.itemsize
    else:
        table = grid._table(device)
        # cells are steps + support; 8 bytes: chunks are sized by the int64 draws
        source, element_bytes = grid.to_grid(x) - grid.support, 8
    index_key, index = None, None
    checked: set[int] = set()  # Note [eval cache] in stablenet.nn.base: each weight cache compares once
    image_bytes = math.prod(shape) * element_bytes
    for start, g, reps, k, same in chunk_plan(len(x), num, batch_size, image_bytes, device, chunk_bytes):
        # Note [noise chunks]
        # On a GPU a small model's forward pass is a handful of kernel launches, and every extra operation per
        # pass (drawing noise, adding it, counting) costs a launch of about the same duration. So the noisy
        # inputs of k passes are drawn and added by one operation each (at most chunk_bytes of them), and each
        # pass reads its slice. Every pass still gets its own fresh draws.
        if same:
            groups = source[start : start + g].unsqueeze(0).expand(k, g, *shape)
        else:
            groups = source[start : start + k * g].reshape(k, g, *shape)
        # Note [noise layout]: the images of a pass share its reps noise draws. Each image still gets
        # i.i.d. N(0, sigma^2 I) samples, fresh for every call, which is all a per-image certificate
        # needs; drawing the noise once per pass instead of once per image divides the RNG cost by g.
        if grid is None:
            noise = torch.randn((k, 1, reps, *shape), generator=generator, device=device, dtype=noise_dtype)
            # A Python-scalar alpha: a tensor sigma would be a host-to-device copy, a sync, in every pass.
            batches = torch.add(groups.unsqueeze(2), noise, alpha=sigma)
        else:
            # The model sees phi(m) = m / levels of the integer grid point m alone (Note [exact grid noise]).
            cells = grid._cells((k, 1, reps, *shape), generator, table)
            cells = cells.add_(groups.unsqueeze(2)) if g == 1 else cells + groups.unsqueeze(2)
            batches = cells.to(noise_dtype).div_(grid.levels)
        if batches.dtype != input_dtype:
            batches = batches.to(input_dtype)
        key = (start, g, reps, k, same)
        if index_key != key:  # rebuilt only when the rows change (host-side check: no sync)
            images = torch.arange(start, start + (g if same else k * g), device=device)
            index, index_key = images.repeat_interleave(reps).view(1 if same else k, g * reps), key
        for b in range(k):
            with checked_once(checked):
                logits = model(batches[b].view(g * reps, *shape))
            yield index[0 if same else b], logits


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
    *,
    grid: GridNoise | None = None,
) -> Tensor:
    """``(N, num_classes)`` counts of the base model's top class over ``num`` noisy copies of each image.

    ``chunk_bytes`` and ``grid``: see :func:`noisy_outputs`.
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

    for index, logits in noisy_outputs(model, x, num, sigma, batch_size, generator, chunk_bytes, grid=grid):
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
    *,
    grid: GridNoise | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-image sample mean and unbiased variance of ``transform(logits)`` (shape ``(N, ..., K)``), in float64.

    ``transform`` maps ``(B, K)`` logits to ``(B, ..., K)`` values (e.g. softmax at several temperatures);
    ``grid``: see :func:`noisy_outputs`.
    """
    total = total_sq = None
    for index, logits in noisy_outputs(model, x, num, sigma, batch_size, generator, grid=grid):
        values = transform(logits).to(torch.float64)
        if total is None:
            total = torch.zeros(len(x), *values.shape[1:], dtype=torch.float64, device=x.device)
            total_sq = torch.zeros_like(total)
        total.index_add_(0, index, values)
        total_sq.index_add_(0, index, values * values)
    mean = total / num
    var = (total_sq - num * mean * mean) / max(num - 1, 1)
    return mean, var.clamp_min(0.0)
