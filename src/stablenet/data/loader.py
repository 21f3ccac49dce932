r"""A batch iterator over a data set held whole on one device.

Small image data sets (MNIST, CIFAR) fit in accelerator memory many times over; keeping them there and
slicing batches with tensor indexing removes the worker processes, pinned-memory copies and per-image
Python calls of :class:`torch.utils.data.DataLoader`. Augmentation (random crop with zero padding,
horizontal flip) is done on the whole batch with tensor operations.

# Note [loader randomness]
Every random draw (the epoch's permutation, crop offsets, flip mask) comes from ``generator`` when one is
given, so two loaders with equally seeded generators yield identical batches. The draws happen on the
generator's device (a CPU generator is allowed with CUDA data) and are then moved to the data's device.
Without a generator, the default generator of the data's device is used. The permutation is drawn first, then
each batch's crops and flips in order, so :meth:`DeviceLoader.batches` can resume a pass in the middle from the
generator's state saved after the previous batch.

Example:
    >>> import torch
    >>> images, labels = torch.rand(10, 3, 8, 8), torch.arange(10)
    >>> loader = DeviceLoader(images, labels, 4, shuffle=True, generator=torch.Generator().manual_seed(0))
    >>> len(loader), [len(y) for _, y in loader]
    (3, [4, 4, 2])
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DeviceLoader"]


class DeviceLoader:
    """Iterate over ``(images, labels)`` in float32 batches, all kept on one device.

    Args:
        images: ``N×C×H×W``; uint8 (converted per batch to float32 ``/ 255``) or floating point in ``[0, 1]``.
        labels: ``N`` integer labels.
        batch_size: Images per batch, ``>= 1``.
        shuffle: Draw a new permutation each epoch.
        generator: Source of all random draws (see Note [loader randomness]).
        crop_padding: If positive, pad each image with this many zero pixels on every side and take a random
            ``H×W`` crop, i.e. shift it by up to ``crop_padding`` pixels in each direction.
        flip: Flip each image horizontally with probability 1/2.
        drop_last: Drop the last batch if it has fewer than ``batch_size`` images.
        device: Where to keep the data and yield batches; default: the device of ``images``.

    Attributes:
        images: The data on ``device``, in its original dtype.
        labels: int64 labels on ``device``.
        device: The device.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        crop_padding: int = 0,
        flip: bool = False,
        drop_last: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(images, Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a 4-D tensor N×C×H×W; got {shape}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise ValueError(f"images must be uint8 or floating point; got {images.dtype}")
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be a 1-D integer tensor; got {labels.dtype} {tuple(labels.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"images and labels must have the same length; got {len(images)} and {len(labels)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"crop_padding must be an integer >= 0; got {crop_padding!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
        self.device = torch.device(device) if device is not None else images.device
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.crop_padding = crop_padding
        self.flip = flip
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __repr__(self) -> str:
        return (
            f"DeviceLoader(n={len(self.images)}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"crop_padding={self.crop_padding}, flip={self.flip}, drop_last={self.drop_last}, "
            f"device={self.device})"
        )

    def _draw_device(self) -> torch.device:
        return self.generator.device if self.generator is not None else self.device

    def _order(self) -> Tensor:
        n = len(self.images)
        if not self.shuffle:
            return torch.arange(n, device=self.device)
        perm = torch.randperm(n, generator=self.generator, device=self._draw_device())
        return perm.to(self.device)

    def _crop(self, x: Tensor) -> Tensor:
        r"""Random ``H×W`` crop of the zero-padded batch, one offset per image, by gathering index grids.

        Output pixel ``(i, j)`` of image ``b`` is padded pixel ``(i + dy_b, j + dx_b)``, that is input
        pixel ``(i + dy_b - p, j + dx_b - p)`` or zero outside the image; ``dy_b, dx_b`` are uniform in
        ``[0, 2p]``.
        """
        p = self.crop_padding
        b, c, h, w = x.shape
        offsets = torch.randint(0, 2 * p + 1, (2, b), generator=self.generator, device=self._draw_device())
        dy, dx = offsets.to(x.device)
        padded = F.pad(x, (p, p, p, p))
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # B×1×H×1
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # B×1×1×W
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        channel = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[batch, channel, rows, cols]

    def _flip(self, x: Tensor) -> Tensor:
        mask = torch.rand(len(x), generator=self.generator, device=self._draw_device()) < 0.5
        return torch.where(mask.to(x.device)[:, None, None, None], x.flip(-1), x)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.batches()

    def batches(self, start: int = 0, generator_state: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches ``start, start + 1, ...`` of a pass, the same as a whole pass would yield them.

        Args:
            start: the first batch, ``0 <= start <= len(self)``.
            generator_state: ``generator.get_state()`` taken after batch ``start - 1`` was drawn; needed
                when ``start > 0`` and batches draw crops or flips. The permutation is drawn again from the
                generator as it is now, which must be its state at the start of the pass.
        """
        if not 0 <= start <= len(self):
            raise ValueError(f"start must be between 0 and {len(self)} batches; got {start}")
        per_batch_draws = self.crop_padding > 0 or self.flip
        if start > 0 and per_batch_draws and (self.generator is None or generator_state is None):
            raise ValueError("resuming a pass with crops or flips needs a generator and its generator_state")
        order = self._order()
        if start > 0 and per_batch_draws:
            self.generator.set_state(generator_state)
        for batch in range(start, len(self)):
            index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            x = self.images[index]
            x = x.to(torch.float32).div_(255) if x.dtype == torch.uint8 else x.to(torch.float32)
            if self.crop_padding > 0:
                x = self._crop(x)
            if self.flip:
                x = self._flip(x)
            yield x, self.labels[index]
