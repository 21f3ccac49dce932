"""Data sets by name: a registry of :class:`DatasetInfo` and loader functions.

:func:`load_dataset` looks a name up, calls its loader and returns an :class:`ImageData`: float32 images in
``[0, 1]`` of shape ``N×C×H×W`` and int64 labels, checked against the registered :class:`DatasetInfo`.
The built-in data sets (``digits``, ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``) are registered
by :mod:`stablenet.data.builtin`; :func:`register_dataset` adds a user's own.

Example:
    >>> from stablenet.data import dataset_info, load_dataset
    >>> dataset_info("mnist").input_size
    (28, 28)
    >>> images, labels = load_dataset("digits", "test")
    >>> images.shape, labels.shape
    (torch.Size([360, 1, 8, 8]), torch.Size([360]))
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SPLITS",
    "DatasetInfo",
    "DatasetLoader",
    "ImageData",
    "dataset_info",
    "list_datasets",
    "load_dataset",
    "register_dataset",
]

SPLITS = ("train", "test")
"""The accepted values of ``split``."""

DatasetLoader = Callable[[str, Path | None], tuple[np.ndarray | Tensor, np.ndarray | Tensor]]
"""``loader(split, root) -> (images, labels)``.

``split`` is ``"train"`` or ``"test"``; ``root`` is the caller's ``root`` argument as a :class:`~pathlib.Path`
(or ``None``). ``images`` is ``N×C×H×W``, either uint8 (divided by 255) or floating point in ``[0, 1]``;
``labels`` holds integers in ``[0, num_classes)``. Numpy arrays and tensors are both accepted.
"""


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a data set without loading it.

    Attributes:
        name: The registry name.
        num_classes: Number of classes; labels lie in ``[0, num_classes)``.
        in_channels: Channels ``C`` of each image.
        input_size: ``(H, W)`` of each image.
        mean: Per-channel mean of the training images in ``[0, 1]`` units (for normalisation layers).
        std: Per-channel standard deviation of the training images.
        classes: Class names in label order, or ``None``.
    """

    name: str
    num_classes: int
    in_channels: int
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # Normalise sequences to tuples so that infos compare, hash and print the same way.
        object.__setattr__(self, "input_size", tuple(int(s) for s in self.input_size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if not self.name:
            raise ValueError("name must be a non-empty string; got ''")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {self.num_classes}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1; got {self.in_channels}")
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise ValueError(f"input_size must be (H, W) with H, W >= 1; got {self.input_size}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(
                f"mean and std must have in_channels={self.in_channels} entries; "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive; got {self.std}")
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise ValueError(f"classes must have num_classes={self.num_classes} names; got {len(self.classes)}")


class ImageData(tuple):
    """``(images, labels)`` of one split, with the data set's name and classes attached.

    A tuple of length 2, so ``images, labels = load_dataset(...)`` works.

    Attributes:
        images: float32 tensor in ``[0, 1]``, shape ``N×C×H×W``.
        labels: int64 tensor, shape ``N``.
        num_classes: Number of classes.
        name: The data set's registry name.
        classes: Class names in label order, or ``None``.
    """

    num_classes: int
    name: str
    classes: tuple[str, ...] | None

    def __new__(
        cls,
        images: Tensor,
        labels: Tensor,
        num_classes: int,
        name: str,
        classes: Sequence[str] | None = None,
    ) -> ImageData:
        self = super().__new__(cls, (images, labels))
        self.num_classes = int(num_classes)
        self.name = name
        self.classes = tuple(classes) if classes is not None else None
        return self

    @property
    def images(self) -> Tensor:
        return self[0]

    @property
    def labels(self) -> Tensor:
        return self[1]

    def __getnewargs__(self) -> tuple[Any, ...]:  # so that pickle and copy rebuild all attributes
        return (self[0], self[1], self.num_classes, self.name, self.classes)

    def __repr__(self) -> str:
        return (
            f"ImageData(name={self.name!r}, images={str(self.images.dtype).removeprefix('torch.')}"
            f"{list(self.images.shape)}, labels={str(self.labels.dtype).removeprefix('torch.')}"
            f"{list(self.labels.shape)}, num_classes={self.num_classes})"
        )


@dataclass(frozen=True)
class _Entry:
    info: DatasetInfo
    loader: DatasetLoader


_REGISTRY: dict[str, _Entry] = {}


def register_dataset(info: DatasetInfo, loader: DatasetLoader, *, overwrite: bool = False) -> DatasetInfo:
    """Add a data set to the registry so that :func:`load_dataset` and :func:`dataset_info` know it.

    Args:
        info: Its description; ``info.name`` is the registry name.
        loader: ``loader(split, root) -> (images, labels)``, see :data:`DatasetLoader`. Its output is checked
            against ``info`` (channels, size, label range) on every load.
        overwrite: Replace an existing entry of the same name instead of raising.

    Returns:
        ``info``.

    Raises:
        ValueError: The name is taken and ``overwrite`` is false.

    Example:
        >>> import torch
        >>> info = DatasetInfo(
        ...     "noise", num_classes=2, in_channels=1, input_size=(4, 4), mean=(0.5,), std=(0.29,)
        ... )
        >>> _ = register_dataset(info, lambda split, root: (torch.rand(6, 1, 4, 4), torch.arange(6) % 2))
        >>> load_dataset("noise", "train").images.shape
        torch.Size([6, 1, 4, 4])
    """
    if not isinstance(info, DatasetInfo):
        raise TypeError(f"info must be a DatasetInfo; got {type(info).__name__}")
    if not callable(loader):
        raise TypeError(f"loader must be callable as loader(split, root); got {type(loader).__name__}")
    if info.name in _REGISTRY and not overwrite:
        raise ValueError(f"dataset {info.name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[info.name] = _Entry(info, loader)
    return info


def list_datasets() -> list[str]:
    """The registered data set names, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        accepted = ", ".join(repr(n) for n in list_datasets())
        raise ValueError(f"dataset must be one of {accepted}; got {name!r}") from None


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of a registered data set, without loading any data.

    Raises:
        ValueError: ``name`` is not registered (the message lists the registered names).
    """
    return _entry(name).info


def _as_tensor(array: np.ndarray | Tensor) -> Tensor:
    if isinstance(array, Tensor):
        return array.detach().cpu()
    array = np.asarray(array)
    if not array.flags.writeable:  # torch.from_numpy warns on read-only memory
        array = array.copy()
    return torch.from_numpy(np.ascontiguousarray(array))


def _to_image_data(images: Any, labels: Any, info: DatasetInfo) -> ImageData:
    """Convert a loader's output to float32/int64 tensors and check it against ``info``."""
    images, labels = _as_tensor(images), _as_tensor(labels)
    expected = (info.in_channels, *info.input_size)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"{info.name}: images must have shape N×{'×'.join(map(str, expected))}; got {tuple(images.shape)}"
        )
    if images.dtype == torch.uint8:
        images = images.to(torch.float32).div_(255)
    elif images.is_floating_point():
        images = images.to(torch.float32)
        if images.numel() and (images.min() < 0 or images.max() > 1):
            raise ValueError(
                f"{info.name}: float images must lie in [0, 1]; "
                f"got [{images.min().item():.4g}, {images.max().item():.4g}]"
            )
    else:
        raise ValueError(f"{info.name}: images must be uint8 or floating point; got {images.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{info.name}: labels must be integers; got {labels.dtype}")
    labels = labels.to(torch.int64)
    if labels.shape != (len(images),):
        raise ValueError(f"{info.name}: labels must have shape ({len(images)},); got {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise ValueError(
            f"{info.name}: labels must lie in [0, {info.num_classes}); "
            f"got [{labels.min().item()}, {labels.max().item()}]"
        )
    return ImageData(images, labels, info.num_classes, info.name, info.classes)


def load_dataset(name: str, split: str, root: str | os.PathLike | None = None) -> ImageData:
    """Load one split of a registered data set.

    For the built-in data sets, files are looked for under ``root``, the directories in ``$STABLENET_DATA``,
    ``./data`` and ``~/.cache/stablenet/data``, then downloaded with torchvision if it is installed (see
    :mod:`stablenet.data.builtin`); decoded files are cached as uint8 arrays (:mod:`stablenet.data.cache`).

    Args:
        name: A name from :func:`list_datasets`.
        split: ``"train"`` or ``"test"``.
        root: A directory to search first.

    Returns:
        ``ImageData`` (unpacks as ``images, labels``): float32 images in ``[0, 1]``, ``N×C×H×W``; int64
        labels.

    Raises:
        ValueError: Unknown ``name`` or ``split``, or malformed data.
        FileNotFoundError: The files were not found (the message lists where it looked and what to do).
    """
    entry = _entry(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(repr(s) for s in SPLITS)}; got {split!r}")
    root_path = Path(root).expanduser() if root is not None else None
    images, labels = entry.loader(split, root_path)
    return _to_image_data(images, labels, entry.info)
