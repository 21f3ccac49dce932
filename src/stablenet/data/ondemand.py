"""Data sets that decode an image only when it is asked for, for the streaming loader.

Each is a :class:`torch.utils.data.Dataset` whose item ``i`` is ``(image, label)``: ``image`` a ``C×H×W``
tensor (uint8, or floating point in ``[0, 1]``) and ``label`` an int. Items come in the order the in-memory
readers of :mod:`stablenet.data.sources` produce, so item ``i`` here is row ``i`` of what
:func:`~stablenet.data.load_dataset` returns for the same files.

* :class:`ImageFolderDataset`: a tree ``root/<class>/<file>``; listing it reads no image.
* :class:`ImageTarDataset`: a ``.tar`` (or ``.tar.gz``, ``.tar.bz2``, ``.tar.xz``) of such a tree, read member
  by member at stored offsets (see Note [compressed archives]).
* :class:`ArrayDataset`: arrays already in host memory (MNIST, CIFAR pickles, a user's data set).
* :func:`streaming_dataset`: a registered data set by name, found where :func:`load_dataset` finds it.

# Note [compressed archives]
A gzip stream cannot be read from the middle: item ``i`` of a ``.tar.gz`` would cost a decompression of
everything before it. The archive is therefore decompressed once, by a stream copy, into an uncompressed
``.tar`` in the cache directory (:func:`stablenet.data.cache.cache_dir`, written atomically and keyed like the
decoded cache, Note [cache key]); images are compressed already, so it is about the size of the archive. Each
process (each loader worker) opens its own handle on it, since handles inherited through ``fork`` share one
file position.
"""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import os
import shutil
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from stablenet.atomic import atomic_write
from stablenet.data import builtin
from stablenet.data.cache import CACHE_ENV, cache_dir, source_key
from stablenet.data.datasets import SPLITS, DatasetInfo, dataset_info, load_dataset
from stablenet.data.sources import _decode, _is_image, _stack, read_image_folder, read_image_tar

__all__ = ["ArrayDataset", "ImageFolderDataset", "ImageTarDataset", "streaming_dataset"]

logger = logging.getLogger(__name__)

# Compressed tar formats by magic number -> how to open them as a stream (see Note [compressed archives]).
_DECOMPRESSORS = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}


def _ordered(entries: Sequence[tuple[str, str]], classes: Sequence[str], where: str) -> tuple[list[int], Tensor]:
    """Order ``(class, file name)`` entries and label them exactly as the in-memory readers do.

    :func:`stablenet.data.sources._stack` is given each entry's position in place of its pixels, so the order,
    the labels and the errors (no images, unknown class folder) are the in-memory path's by construction.
    """
    positions, labels = _stack(((c, n, np.array(k)) for k, (c, n) in enumerate(entries)), classes, where)
    return positions.tolist(), torch.from_numpy(labels)


def _image_size(data: bytes, where: str) -> tuple[int, int]:
    from PIL import Image  # Pillow is only needed for image trees

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.height, img.width
    except OSError as exc:
        raise ValueError(f"cannot decode image {where}: {type(exc).__name__}: {exc}") from exc


class _EncodedImages(Dataset):
    """Items decoded from their file bytes; subclasses list ``self._where`` and implement ``_read``."""

    classes: tuple[str, ...]
    labels: Tensor
    size: tuple[int, int]
    _where: list[str]

    def _read(self, index: int) -> bytes:
        raise NotImplementedError

    def _finish(self, size: tuple[int, int] | None) -> None:
        if size is None:  # read one header: every image must have the first one's size
            size = _image_size(self._read(0), self._where[0]) if len(self) else (0, 0)
        self.size = (int(size[0]), int(size[1]))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        pixels = _decode(self._read(index), self._where[index], self.size)
        return torch.from_numpy(np.ascontiguousarray(pixels)), int(self.labels[index])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every item: images are decoded as RGB."""
        return (3, *self.size)


class ImageFolderDataset(_EncodedImages):
    """An ImageFolder tree ``root/<class>/<file>``, decoded (as RGB, with Pillow) one image at a time.

    Args:
        root: The split folder (e.g. ``.../tiny-imagenet/train``).
        classes: Class names in label order; default: the sorted names of the class folders.
        size: The ``(H, W)`` every image must have (checked on decoding); default: the first image's.

    Raises:
        ValueError: ``root`` is not a folder, holds no images, or has a class folder not in ``classes``.
    """

    def __init__(
        self, root: str | os.PathLike, classes: Sequence[str] | None = None, size: tuple[int, int] | None = None
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"root must be a folder holding <class>/<image> files; got {root}")
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.classes = tuple(classes) if classes is not None else tuple(p.name for p in class_dirs)
        found = [(d.name, f.name) for d in class_dirs for f in sorted(d.iterdir()) if f.is_file() and _is_image(f.name)]
        order, self.labels = _ordered(found, self.classes, str(root))
        self.root = root
        self._where = [str(root / found[k][0] / found[k][1]) for k in order]
        self._finish(size)

    def _read(self, index: int) -> bytes:
        return Path(self._where[index]).read_bytes()

    def __repr__(self) -> str:
        return f"ImageFolderDataset({str(self.root)!r}, n={len(self)}, classes={len(self.classes)}, size={self.size})"


def _uncompressed(path: Path) -> Path:
    """``path`` itself if it is a plain tar, else its decompressed copy in the cache (Note [compressed archives])."""
    with open(path, "rb") as f:
        head = f.read(6)
    opener = next((op for magic, op in _DECOMPRESSORS.items() if head.startswith(magic)), None)
    if opener is None:
        return path
    target = cache_dir() / f"stream-{path.parent.name}-{path.name.split('.')[0]}-{source_key([path])}.tar"
    if target.is_file():
        return target

    def copy(out: IO[bytes]) -> None:
        with opener(path, "rb") as stream:
            shutil.copyfileobj(stream, out, 1 << 20)

    logger.info("decompressing %s to %s for random access", path, target)
    try:
        atomic_write(target, copy)
    except (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as exc:
        raise ValueError(f"cannot read archive {path}: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise ValueError(
            f"cannot write the uncompressed copy of {path} to {target} ({exc}); "
            f"set {CACHE_ENV} to a writable folder with room for it"
        ) from exc
    return target


class ImageTarDataset(_EncodedImages):
    """A tar archive of an ImageFolder tree, members ``{split}/<class>/<file>`` read at their stored offsets.

    Members are selected as :func:`stablenet.data.sources.read_image_tar` selects them (an optional leading
    ``./``; other members ignored). A compressed archive is decompressed once into the cache (Note
    [compressed archives]); listing reads only the tar headers.

    Args:
        path: The archive.
        split: The top folder inside the archive (``"train"`` or ``"test"``).
        classes: Class names in label order; default: the sorted class folder names found.
        size: The ``(H, W)`` every image must have; default: the first image's.

    Raises:
        ValueError: The archive cannot be read or holds no images, or a class folder is not in ``classes``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str,
        classes: Sequence[str] | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        self.path, self.split = Path(path), split
        members: list[tuple[str, str, int, int]] = []  # class, file name, data offset, size
        try:
            self._file = _uncompressed(self.path)
            with tarfile.open(self._file, "r:") as archive:
                for member in archive:
                    parts = Path(member.name).parts
                    parts = parts[1:] if parts and parts[0] == "." else parts
                    if member.isfile() and len(parts) == 3 and parts[0] == split and _is_image(parts[2]):
                        members.append((parts[1], parts[2], member.offset_data, member.size))
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ValueError(f"cannot read archive {path}: {type(exc).__name__}: {exc}") from exc
        self.classes = tuple(classes) if classes is not None else tuple(sorted({m[0] for m in members}))
        order, self.labels = _ordered([m[:2] for m in members], self.classes, f"{path} (folder {split!r})")
        self._extent = [members[k][2:] for k in order]
        self._where = [f"{path}:{split}/{members[k][0]}/{members[k][1]}" for k in order]
        self._handle: tuple[int, IO[bytes]] | None = None
        self._finish(size)

    def _read(self, index: int) -> bytes:
        if self._handle is None or self._handle[0] != os.getpid():  # Note [compressed archives]: one per process
            self._handle = (os.getpid(), open(self._file, "rb"))  # kept open for the next items; see __del__
        offset, size = self._extent[index]
        handle = self._handle[1]
        handle.seek(offset)
        return handle.read(size)

    def __getstate__(self) -> dict:  # a spawned worker opens its own handle
        return {**self.__dict__, "_handle": None}

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None and handle[0] == os.getpid():
            handle[1].close()

    def __repr__(self) -> str:
        return f"ImageTarDataset({str(self.path)!r}, {self.split!r}, n={len(self)}, size={self.size})"


class ArrayDataset(Dataset):
    """``(images, labels)`` already in host memory, as a data set of ``(image, label)`` items.

    float32 images that are exactly ``u / 255`` for uint8 ``u`` (a uint8 data set loaded by :func:`load_dataset`)
    are stored back as ``u``: the loader's ``float32(u) / 255`` gives back the same values bit for bit, with a
    quarter of the memory and of the host-to-device copies.

    Args:
        images: ``N×C×H×W``, uint8 or floating point in ``[0, 1]`` (numpy array or tensor).
        labels: ``N`` integer labels.
    """

    def __init__(self, images: np.ndarray | Tensor, labels: np.ndarray | Tensor) -> None:
        images, labels = torch.as_tensor(images), torch.as_tensor(labels)
        if images.ndim != 4 or (images.dtype != torch.uint8 and not images.is_floating_point()):
            raise ValueError(f"images must be a uint8 or float N×C×H×W array; got {images.dtype} {tuple(images.shape)}")
        if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool or len(labels) != len(images):
            raise ValueError(f"labels must be {len(images)} integers; got {labels.dtype} {tuple(labels.shape)}")
        if images.dtype == torch.float32:
            as_bytes = (images * 255).round().clamp(0, 255).to(torch.uint8)
            if torch.equal(as_bytes.to(torch.float32).div(255), images):
                images = as_bytes
        self.images, self.labels = images, labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __repr__(self) -> str:
        return f"ArrayDataset(n={len(self)}, image_shape={self.image_shape}, dtype={self.images.dtype})"


# The on-demand twin of each in-memory reader a built-in layout may find, built from the reader's arguments
# (``functools.partial`` of :mod:`stablenet.data.builtin`) and the data set's info.
_ON_DEMAND = {
    read_image_folder: lambda args, info: ImageFolderDataset(args[0], args[1], info.input_size),
    read_image_tar: lambda args, info: ImageTarDataset(args[0], args[1], args[2], info.input_size),
}


def _find_source(name: str, split: str, root: str | os.PathLike | None) -> builtin._Source | None:
    """The first source :func:`load_dataset` would read, by the search order of :mod:`stablenet.data.builtin`."""
    layouts = builtin._LAYOUTS.get(name, ())
    bases = builtin.search_dirs(root)
    searched = (
        (base, layout)
        for i, base in enumerate(bases)
        for layout in layouts
        if not layout.root_only or (root is not None and i == 0)  # Note [bare IDX directory]
    )
    return next((found for base, layout in searched if (found := layout.find(base, split)) is not None), None)


def streaming_dataset(name: str | Dataset, split: str, root: str | os.PathLike | None = None) -> Dataset:
    """One split of a registered data set, decoded on demand where its files allow it.

    An ImageFolder tree or tar archive (found where :func:`load_dataset` looks, in the same order) gives an
    :class:`ImageFolderDataset` or :class:`ImageTarDataset`, which reads no image until asked; any other source
    (IDX, CIFAR pickles, a user's registered loader, the torchvision download) is loaded as
    :func:`load_dataset` loads it and wrapped in an :class:`ArrayDataset`. Item ``i`` equals row ``i`` of
    :func:`load_dataset`'s output, as uint8 (or float) before the division by 255.

    Args:
        name: A name from :func:`list_datasets`, or a ready :class:`torch.utils.data.Dataset` (returned as is).
        split: ``"train"`` or ``"test"``.
        root: A directory to search first.

    Raises:
        ValueError: Unknown ``name`` or ``split``, or malformed files.
        FileNotFoundError: No files found (as :func:`load_dataset`).
    """
    if isinstance(name, Dataset):
        return name
    info: DatasetInfo = dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(repr(s) for s in SPLITS)}; got {split!r}")
    source = _find_source(name, split, root)
    build = _ON_DEMAND.get(getattr(source.decode, "func", None)) if source is not None else None
    if build is not None:
        logger.debug("%s/%s: streaming from %s", name, split, ", ".join(map(str, source.paths)))
        return build(source.decode.args, info)
    return ArrayDataset(*load_dataset(name, split, root))
