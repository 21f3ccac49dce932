"""Readers for the on-disk formats image data sets come in.

Every reader returns ``(images, labels)`` as numpy arrays: ``images`` uint8 of shape ``N×C×H×W`` and
``labels`` int64 of shape ``N``. Readers do no searching and no caching (see :mod:`stablenet.data.datasets`
and :mod:`stablenet.data.cache`); a file that is truncated or not in the expected format raises a one-line
``ValueError`` that names the file.

Formats:

* IDX (MNIST, Fashion-MNIST), plain or gzip-compressed: :func:`read_idx`, :func:`read_idx_pair`.
* CIFAR-10 / CIFAR-100 python-pickle batches: :func:`read_cifar_batches`.
* An ImageFolder tree ``split/<class>/<file>`` as a directory (:func:`read_image_folder`) or as a
  ``.tar.gz`` (:func:`read_image_tar`), decoded with Pillow.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
import warnings
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

__all__ = [
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "IMAGE_SUFFIXES",
    "read_cifar_batches",
    "read_idx",
    "read_idx_pair",
    "read_image_folder",
    "read_image_tar",
]

IDX_IMAGES_MAGIC = 2051
"""Magic number of an IDX file of unsigned bytes with 3 dimensions (``0x00000803``)."""
IDX_LABELS_MAGIC = 2049
"""Magic number of an IDX file of unsigned bytes with 1 dimension (``0x00000801``)."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
"""File name endings (case-insensitive) taken as images in an ImageFolder tree."""


# --------------------------------------------------------------------------------------------------- IDX


def _read_bytes(path: Path) -> bytes:
    """Read a file, decompressing it when its name ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (the MNIST format).

    The file holds a big-endian 32-bit magic number (``0x0000 08 D``: type ubyte, ``D`` dimensions), ``D``
    big-endian 32-bit sizes, then the bytes in C order.

    Args:
        path: The file, plain or gzip-compressed (name ending in ``.gz``).
        magic: The expected magic number: :data:`IDX_IMAGES_MAGIC` (2051) or :data:`IDX_LABELS_MAGIC` (2049).

    Returns:
        A uint8 array whose shape is the one in the header.

    Raises:
        ValueError: The magic number is not ``magic``, or the data is shorter or longer than the header says.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path} is not an IDX file: {len(raw)} bytes")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path} has IDX magic number {found}; expected {magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated: {len(raw)} bytes, shorter than its {header}-byte header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        raise ValueError(
            f"{path} is truncated or corrupt: header says shape {shape} ({expected} bytes), "
            f"file holds {len(raw) - header} bytes of data"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_pair(images_path: str | os.PathLike, labels_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read an IDX image file and its label file.

    Returns:
        ``(images, labels)``: uint8 ``N×1×H×W`` and int64 ``N``.

    Raises:
        ValueError: A file is malformed, or the two files hold different numbers of items.
    """
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    return images[:, None].copy(), labels.astype(np.int64)


# ------------------------------------------------------------------------------------------------ CIFAR


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays and plain containers.

    CIFAR batches are pickles; loading a pickle runs whatever callables it names, so a file in a data
    directory could otherwise execute code. The batches only need numpy's array reconstruction.
    """

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),  # how pickle protocol 2 stores bytes written by Python 3
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a data batch")
        with warnings.catch_warnings():
            # numpy 2 warns when a pickle from numpy 1 names numpy.core; the object is the same.
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def _load_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"cannot read CIFAR batch {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR batch: it holds a {type(batch).__name__}, not a dict")
    return batch


def read_cifar_batches(
    paths: Sequence[str | os.PathLike], label_key: bytes = b"labels"
) -> tuple[np.ndarray, np.ndarray]:
    """Read and concatenate CIFAR python-pickle batches.

    Each batch is a dict with ``b"data"`` (``N×3072`` uint8, each row a 3×32×32 image in C order) and a label
    list under ``label_key``.

    Args:
        paths: The batch files, read in this order.
        label_key: ``b"labels"`` for CIFAR-10, ``b"fine_labels"`` for CIFAR-100.

    Returns:
        ``(images, labels)``: uint8 ``N×3×32×32`` and int64 ``N``.

    Raises:
        ValueError: A batch cannot be read, lacks a key, or has the wrong shape.
    """
    images, labels = [], []
    for path in map(Path, paths):
        batch = _load_batch(path)
        if b"data" not in batch or label_key not in batch:
            keys = ", ".join(repr(k) for k in batch)
            raise ValueError(f"{path} must hold keys b'data' and {label_key!r}; it holds {keys}")
        data = np.asarray(batch[b"data"])
        target = np.asarray(batch[label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{path}: b'data' must be uint8 of shape N×3072; got {data.dtype} {data.shape}")
        if target.shape != (len(data),):
            raise ValueError(f"{path}: {len(data)} images but labels of shape {target.shape}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(target)
    if not images:
        raise ValueError("read_cifar_batches needs at least one batch file; got none")
    return np.concatenate(images), np.concatenate(labels)


# ------------------------------------------------------------------------------------------ ImageFolder


def _decode(data: bytes, where: str, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # Pillow is only needed for this format

    try:
        with Image.open(io.BytesIO(data)) as img:
            array = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot decode image {where}: {type(exc).__name__}: {exc}") from exc
    if array.shape[:2] != size:
        raise ValueError(f"image {where} is {array.shape[0]}×{array.shape[1]}; expected {size[0]}×{size[1]}")
    return array.transpose(2, 0, 1)


def _class_index(cls: str, classes: Sequence[str], where: str) -> int:
    try:
        return classes.index(cls)
    except ValueError:
        raise ValueError(
            f"{where}: class folder must be one of {', '.join(repr(c) for c in classes)}; got {cls!r}"
        ) from None


def _stack(
    items: Iterable[tuple[str, str, np.ndarray]], classes: Sequence[str], where: str
) -> tuple[np.ndarray, np.ndarray]:
    # Sort by (class, file name) so the order does not depend on the tar order or on os.listdir.
    ordered = sorted(items, key=lambda item: (item[0], item[1]))
    if not ordered:
        raise ValueError(f"{where} holds no images (<class>/<file> with ending {', '.join(IMAGE_SUFFIXES)})")
    images = np.stack([item[2] for item in ordered])
    labels = np.array([_class_index(item[0], classes, where) for item in ordered], dtype=np.int64)
    return images, labels


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not Path(name).name.startswith(".")


def read_image_tar(
    path: str | os.PathLike, split: str, classes: Sequence[str], size: tuple[int, int] = (32, 32)
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a ``.tar.gz`` of an ImageFolder tree, member by member, without extracting it to disk.

    Members ``{split}/<class>/<file>`` (optionally under a leading ``./``) are decoded with Pillow and
    converted to RGB; other members are ignored. Images are ordered by (class, file name).

    Args:
        path: The archive.
        split: The top folder inside the archive (``"train"`` or ``"test"``).
        classes: The class names in label order; a class folder not in it is an error, a missing one is not.
        size: The ``(H, W)`` every image must have.

    Returns:
        ``(images, labels)``: uint8 ``N×3×H×W`` and int64 ``N``.

    Raises:
        ValueError: The archive is corrupt, an image cannot be decoded or has another size, or a class
            folder is unknown.
    """
    path = Path(path)
    items = []
    try:
        # "r:*" rather than the stream mode "r|*": a gzip stream cut at a member boundary then raises
        # EOFError instead of silently ending the archive early. Members are still read in order.
        with tarfile.open(path, "r:*") as archive:
            # Decoding runs once per source (the result is cached); tqdm hides itself when not on a terminal.
            for member in tqdm(archive, desc=f"decode {path.name}", unit=" files", disable=None, leave=False):
                parts = Path(member.name).parts
                parts = parts[1:] if parts and parts[0] == "." else parts
                if not member.isfile() or len(parts) != 3 or parts[0] != split or not _is_image(parts[2]):
                    continue
                where = f"{path}:{member.name}"
                data = archive.extractfile(member).read()
                items.append((parts[1], parts[2], _decode(data, where, size)))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"cannot read archive {path}: {type(exc).__name__}: {exc}") from exc
    return _stack(items, classes, f"{path} (folder {split!r})")


def read_image_folder(
    path: str | os.PathLike, classes: Sequence[str], size: tuple[int, int] = (32, 32)
) -> tuple[np.ndarray, np.ndarray]:
    """Decode an ImageFolder tree ``path/<class>/<file>``.

    Args:
        path: The split folder (e.g. ``.../cifar10/test``).
        classes: The class names in label order; a class folder not in it is an error, a missing one is not.
        size: The ``(H, W)`` every image must have.

    Returns:
        ``(images, labels)``: uint8 ``N×3×H×W`` and int64 ``N``, ordered by (class, file name).

    Raises:
        ValueError: An image cannot be decoded or has another size, or a class folder is unknown.
    """
    path = Path(path)
    items = []
    class_dirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    for class_dir in tqdm(class_dirs, desc=f"decode {path.name}", unit=" classes", disable=None, leave=False):
        for file in sorted(class_dir.iterdir()):
            if file.is_file() and _is_image(file.name):
                items.append((class_dir.name, file.name, _decode(file.read_bytes(), str(file), size)))
    return _stack(items, classes, str(path))
