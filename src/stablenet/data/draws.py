r"""The random draws of a pass over a data set, and the crops and flips they drive, on whole batches.

A pass draws, from one generator and in this order (Note [loader randomness] in :mod:`stablenet.data.loader`):
the permutation (:func:`start_pass`), then for each batch its crop offsets ``randint(0, 2p + 1, (2, b))`` and
its flips ``rand(b) < 1/2`` (:func:`draw_augmentation`). A pass resumed at batch ``k`` draws the permutation
again, then sets the generator to its state after batch ``k - 1``.

Draws are made for the *global* batch and applied to any subset of it: a rank of a distributed run that holds
positions ``rank, rank + world_size, ...`` takes the same columns (:meth:`AugmentationDraws.select`), so every
image is augmented exactly as in a single-process pass (Note [per-rank shards] in
:mod:`stablenet.data.streaming`).

Crop: with padding :math:`p` and offsets :math:`(d_y, d_x) \in [0, 2p]^2`, output pixel :math:`(i, j)` is input
pixel :math:`(i + d_y - p,\ j + d_x - p)`, or zero outside the image, i.e. a shift by at most :math:`p` pixels
in each direction. Flip: :math:`x[..., j] \mapsto x[..., W - 1 - j]`.

Example:
    >>> import torch
    >>> x = torch.arange(1.0, 5.0).view(1, 1, 1, 4)
    >>> shift_crop(x, torch.tensor([[1], [2]]), 1)  # d_y = p: no vertical shift; d_x = p + 1: one pixel left
    tensor([[[[2., 3., 4., 0.]]]])
    >>> draws = draw_augmentation(8, crop_padding=2, flip=True, generator=torch.Generator().manual_seed(0))
    >>> apply_augmentation(torch.rand(8, 3, 5, 5), draws, 2).shape
    torch.Size([8, 3, 5, 5])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AugmentationDraws", "apply_augmentation", "draw_augmentation", "flip_where", "shift_crop", "start_pass"]


def start_pass(
    n: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None,
    num_batches: int,
    start: int = 0,
    generator_state: Tensor | None = None,
    per_batch_draws: bool = False,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The order of a pass over ``n`` items, with ``generator`` left where batch ``start`` draws.

    Args:
        n: The number of items.
        shuffle: Draw a permutation (else ``0, 1, ..., n - 1``).
        generator: The pass's generator, at its state for the start of the pass; ``None``: the default
            generator of ``device``.
        num_batches: The batches in the pass; ``0 <= start <= num_batches``.
        start: The first batch of the (resumed) pass.
        generator_state: The generator's state after batch ``start - 1``; needed to resume (``start > 0``) a
            pass with ``per_batch_draws``.
        per_batch_draws: Whether batches draw crops or flips.
        device: Where to draw without a generator (with one: on its device).

    Returns:
        int64 indices on the device they were drawn on.
    """
    if not 0 <= start <= num_batches:
        raise ValueError(f"start must be between 0 and {num_batches} batches; got {start}")
    restore = start > 0 and per_batch_draws
    if restore and (generator is None or generator_state is None):
        raise ValueError("resuming a pass with crops or flips needs a generator and its generator_state")
    where = generator.device if generator is not None else torch.device(device)
    order = torch.randperm(n, generator=generator, device=where) if shuffle else torch.arange(n, device=where)
    if restore:
        generator.set_state(generator_state)
    return order


@dataclass(frozen=True)
class AugmentationDraws:
    """The random numbers of one batch.

    Attributes:
        offsets: ``2×b`` int64 crop offsets ``(d_y, d_x)`` in ``[0, 2p]``, or ``None`` without crops.
        flips: ``b`` booleans, ``True`` where the image is flipped, or ``None`` without flips.
    """

    offsets: Tensor | None
    flips: Tensor | None

    def select(self, positions: slice) -> AugmentationDraws:
        """The draws of the images at ``positions`` of the batch (e.g. ``slice(rank, None, world_size)``)."""
        return AugmentationDraws(
            None if self.offsets is None else self.offsets[:, positions],
            None if self.flips is None else self.flips[positions],
        )


def draw_augmentation(
    batch: int,
    *,
    crop_padding: int,
    flip: bool,
    generator: torch.Generator | None,
    device: torch.device | str = "cpu",
) -> AugmentationDraws:
    """Draw the crops and flips of a batch of ``batch`` images, in :class:`DeviceLoader`'s order and calls.

    Args:
        batch: The number of images in the (global) batch.
        crop_padding: The crop's zero padding ``p``; no crop when 0.
        flip: Whether to draw flips.
        generator: The source of the draws; ``None`` uses the default generator of ``device``.
        device: Where to draw when ``generator`` is ``None`` (otherwise on the generator's device).
    """
    where = generator.device if generator is not None else torch.device(device)
    offsets = flips = None
    if crop_padding > 0:
        offsets = torch.randint(0, 2 * crop_padding + 1, (2, batch), generator=generator, device=where)
    if flip:
        flips = torch.rand(batch, generator=generator, device=where) < 0.5
    return AugmentationDraws(offsets, flips)


def shift_crop(x: Tensor, offsets: Tensor, padding: int) -> Tensor:
    """Crop ``H×W`` from ``x`` zero-padded by ``padding``, at offsets ``offsets[:, b]`` for image ``b``.

    Two gathers, rows then columns, so the cost is one pass over the padded batch whatever the offsets.
    """
    b, c, h, w = x.shape
    offsets = offsets.to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = (offsets[0, :, None] + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    x = padded.gather(2, rows.expand(b, c, h, w + 2 * padding))
    cols = (offsets[1, :, None] + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    return x.gather(3, cols.expand(b, c, h, w))


def flip_where(x: Tensor, mask: Tensor) -> Tensor:
    """Flip the images of ``x`` horizontally where ``mask`` is true."""
    return torch.where(mask.to(x.device)[:, None, None, None], x.flip(-1), x)


def apply_augmentation(x: Tensor, draws: AugmentationDraws, crop_padding: int) -> Tensor:
    """Crop, then flip, ``x`` (``b×C×H×W``) with the draws of its ``b`` images."""
    if draws.offsets is not None:
        x = shift_crop(x, draws.offsets, crop_padding)
    if draws.flips is not None:
        x = flip_where(x, draws.flips)
    return x
