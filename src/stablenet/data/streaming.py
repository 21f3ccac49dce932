r"""Batches decoded on demand by worker processes, for data sets that do not fit in memory.

:class:`StreamingLoader` has the interface of :class:`~stablenet.data.loader.DeviceLoader` (``len``,
iteration, ``batches(start, generator_state)``) and yields the same batches: torch's
:class:`~torch.utils.data.DataLoader` reads and decodes the images of each batch in worker processes (an
:mod:`stablenet.data.ondemand` data set), stacks them as uint8 in pinned memory, and the batch is copied to the
device, divided by 255 and augmented there. :func:`stablenet.data.sizing.use_streaming` decides between the
two loaders.

# Note [streaming randomness]
All random numbers are drawn in the main process from ``generator``, with the calls and in the order of
Note [loader randomness] (:mod:`stablenet.data.loader`): the epoch's permutation first, then each batch's crop
offsets and flips as the batch is yielded. Workers draw nothing, so neither their number nor their scheduling
changes a batch, and a pass resumed at batch ``k`` from the generator's state after batch ``k - 1`` equals the
uninterrupted pass from ``k`` on, exactly as with :class:`DeviceLoader`; the ``k`` batches already done are
not read at all. The DataLoader gets a generator of its own, so creating it leaves torch's global generator
(dropout, the trainer's saved global state) untouched.

# Note [per-rank shards]
With ``world_size`` ranks, ``batch_size`` is the global batch and every rank runs the same generator. Global
batch ``i`` is ``order[i·B : (i+1)·B]``, as in a single process, and rank ``r`` takes its positions
``r, r + world_size, ...`` (what :class:`~torch.utils.data.DistributedSampler` gives without padding). Each
rank draws the augmentation of the whole global batch and applies its own columns
(:meth:`~stablenet.data.draws.AugmentationDraws.select`), so the ranks' batches, interleaved, are the
single-process batch image for image, crops and flips included. Every rank yields ``len(loader)`` batches. Of a
last global batch of ``m < B`` images rank ``r`` gets ``⌈(m − r)/world_size⌉``, so local sizes may differ by
one: a loss averaged over ranks equals the single-process mean only if each rank's sum is divided by ``m``
(or ``drop_last`` is set). ``m < world_size`` would leave a rank empty and is an error unless ``drop_last``.

Example:
    >>> import torch
    >>> from stablenet.data import ArrayDataset, DeviceLoader
    >>> images, labels = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8), torch.arange(10)
    >>> kw = dict(shuffle=True, crop_padding=2, flip=True)
    >>> stream = StreamingLoader(ArrayDataset(images, labels), 4, generator=torch.Generator().manual_seed(0), **kw)
    >>> memory = DeviceLoader(images, labels, 4, generator=torch.Generator().manual_seed(0), **kw)
    >>> all(torch.equal(a, b) and torch.equal(u, v) for (a, u), (b, v) in zip(stream, memory))
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from stablenet.data.draws import apply_augmentation, draw_augmentation, start_pass

__all__ = ["ShardedBatchSampler", "StreamingLoader"]


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


class ShardedBatchSampler(Sampler[list[int]]):
    """One rank's share of each batch of a pass over ``order`` (Note [per-rank shards]).

    A batch sampler: ``DataLoader(dataset, batch_sampler=ShardedBatchSampler(...))`` reads exactly these items.

    Args:
        order: The pass's data set indices, e.g. the epoch's permutation (the same on every rank).
        batch_size: The global batch ``B``, divisible by ``world_size``.
        rank: This rank, ``0 <= rank < world_size``.
        world_size: The number of ranks.
        drop_last: Drop a last global batch smaller than ``B``.
        start: The first global batch to yield (the earlier ones are skipped without being read).
    """

    def __init__(
        self,
        order: Tensor | Iterable[int],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        start: int = 0,
    ) -> None:
        self.order = torch.as_tensor(order if isinstance(order, Tensor) else list(order), dtype=torch.int64).cpu()
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}); got {rank}")
        if batch_size % world_size:
            raise ValueError(
                f"batch_size (the global batch) must be divisible by world_size={world_size}; got {batch_size}"
            )
        n, self.drop_last = len(self.order), drop_last
        self.num_batches = n // batch_size if drop_last else -(-n // batch_size)
        if not drop_last and 0 < n % batch_size < world_size:
            raise ValueError(
                f"the last batch has {n % batch_size} images, fewer than world_size={world_size}, so a rank would "
                "get none; set drop_last=True or choose another batch_size"
            )
        self.start = _check_int("start", start, 0)
        if start > self.num_batches:
            raise ValueError(f"start must be between 0 and {self.num_batches} batches; got {start}")

    def __len__(self) -> int:
        return self.num_batches - self.start

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(self.start, self.num_batches):
            yield self.order[i * self.batch_size : (i + 1) * self.batch_size][self.rank :: self.world_size].tolist()


class StreamingLoader:
    """Iterate over ``(images, labels)`` float32 batches of a data set read and decoded on demand.

    Arguments shared with :class:`~stablenet.data.loader.DeviceLoader` mean the same; batches equal its batches
    for an equally seeded ``generator`` (Note [streaming randomness]).

    Args:
        dataset: Items ``(image, label)``, ``image`` a ``C×H×W`` uint8 or ``[0, 1]`` float tensor (see
            :mod:`stablenet.data.ondemand`).
        batch_size: Images per global batch, ``>= 1``; each rank yields its share (Note [per-rank shards]).
        shuffle: Draw a new permutation each pass.
        generator: Source of all random draws; required with several ranks when anything is drawn.
        crop_padding: Random ``H×W`` crop of the image zero-padded by this many pixels.
        flip: Flip each image horizontally with probability 1/2.
        drop_last: Drop the last global batch if it has fewer than ``batch_size`` images.
        device: Where batches are yielded (default: CPU).
        num_workers: Worker processes reading and decoding (0: in the main process).
        pin_memory: Stack batches in page-locked memory for asynchronous copies (default: when ``device`` is
            CUDA).
        prefetch_factor: Batches each worker reads ahead (default: torch's, 2); only with workers.
        rank: This process's rank, ``0 <= rank < world_size``.
        world_size: The number of ranks.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        crop_padding: int = 0,
        flip: bool = False,
        drop_last: bool = False,
        device: torch.device | str | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        prefetch_factor: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ValueError(
                f"dataset must be a map-style data set (__getitem__ and __len__); got {type(dataset).__name__}"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
        self.dataset = dataset
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.crop_padding = _check_int("crop_padding", crop_padding, 0)
        self.num_workers = _check_int("num_workers", num_workers, 0)
        self.world_size = _check_int("world_size", world_size, 1)
        if world_size > 1 and generator is None and (shuffle or crop_padding > 0 or flip):
            raise ValueError("several ranks with shuffle, crops or flips need a generator seeded alike on every rank")
        if prefetch_factor is not None and _check_int("prefetch_factor", prefetch_factor, 1) and num_workers == 0:
            raise ValueError("prefetch_factor needs num_workers >= 1; got num_workers=0")
        self.prefetch_factor = prefetch_factor
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)
        self.shuffle, self.generator, self.flip, self.drop_last = shuffle, generator, flip, drop_last
        self.rank = rank
        self._sampler(torch.arange(len(dataset)), 0)  # checks rank, world_size and the last batch now

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __repr__(self) -> str:
        return (
            f"StreamingLoader(n={len(self.dataset)}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"crop_padding={self.crop_padding}, flip={self.flip}, drop_last={self.drop_last}, "
            f"device={self.device}, num_workers={self.num_workers}, rank={self.rank}/{self.world_size})"
        )

    def _sampler(self, order: Tensor, start: int) -> ShardedBatchSampler:
        return ShardedBatchSampler(
            order, self.batch_size, rank=self.rank, world_size=self.world_size, drop_last=self.drop_last, start=start
        )

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.batches()

    def batches(self, start: int = 0, generator_state: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches ``start, start + 1, ...`` of a pass, the same as a whole pass would yield them.

        Args:
            start: The first global batch, ``0 <= start <= len(self)``; earlier ones are not read.
            generator_state: ``generator.get_state()`` taken after batch ``start - 1`` was yielded; needed
                when ``start > 0`` and batches draw crops or flips. The permutation is drawn again from the
                generator as it is now, which must be its state at the start of the pass.
        """
        draws = self.crop_padding > 0 or self.flip
        order = start_pass(
            len(self.dataset),
            shuffle=self.shuffle,
            generator=self.generator,
            num_batches=len(self),
            start=start,
            generator_state=generator_state,
            per_batch_draws=draws,
            device=self.device,
        )
        loader = DataLoader(
            self.dataset,
            batch_sampler=self._sampler(order, start),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            generator=torch.Generator(),  # Note [streaming randomness]: not torch's global generator
        )
        n, shard = len(order), slice(self.rank, None, self.world_size)
        for i, (x, y) in enumerate(loader, start):
            x = x.to(self.device, non_blocking=self.pin_memory)
            y = y.to(self.device, torch.int64, non_blocking=self.pin_memory)
            x = x.to(torch.float32).div_(255) if x.dtype == torch.uint8 else x.to(torch.float32)
            if draws:
                batch = min(self.batch_size, n - i * self.batch_size)  # the global batch's size
                drawn = draw_augmentation(
                    batch, crop_padding=self.crop_padding, flip=self.flip, generator=self.generator, device=self.device
                )
                x = apply_augmentation(x, drawn.select(shard), self.crop_padding)
            yield x, y
