"""Decode once, then cache as uint8 arrays.

Decoding a JPEG archive, a pickle or a gzip-compressed IDX file takes seconds; reading the same pixels back
from an uncompressed ``.npz`` takes milliseconds. :func:`load_or_decode` keeps one ``.npz`` per (data set,
split, source) under :func:`cache_dir`.

# Note [cache key]
The file name holds a short hash of each source path (resolved), its size and its modification time, so
a different or changed source gets a different entry and a stale entry is never read. For a directory
source the hash covers the directory and its immediate subdirectories, whose modification times change
when a file is added or removed (not when a file is rewritten in place). Entries are never deleted: remove
the cache directory to reclaim space.

# Note [corrupt cache]
A cache file that cannot be read, or holds arrays of the wrong type or shape, is treated as absent: it is
logged, decoded again from the source and rewritten. A cache directory that cannot be written to is
logged and otherwise ignored. Writes go through :func:`stablenet.atomic.atomic_write`, so a killed process
never leaves a torn entry.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from stablenet.atomic import atomic_write

__all__ = [
    "CACHE_ENV",
    "cache_dir",
    "cache_path",
    "load_cached",
    "load_or_decode",
    "save_cached",
    "source_key",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "STABLENET_CACHE"
"""Environment variable naming the cache directory (default ``~/.cache/stablenet/cache``)."""

# Bump when the decoded arrays would change for the same source (e.g. a different JPEG decoder setting).
_FORMAT_VERSION = "1"


def cache_dir() -> Path:
    """The cache directory: ``$STABLENET_CACHE`` if set and non-empty, else ``~/.cache/stablenet/cache``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stablenet" / "cache"


def _stat_parts(path: Path) -> list[str]:
    stat = path.stat()
    parts = [f"{path}|{stat.st_size}|{stat.st_mtime_ns}"]
    if path.is_dir():  # see Note [cache key]
        for sub in sorted(p for p in path.iterdir() if p.is_dir()):
            sub_stat = sub.stat()
            parts.append(f"{sub}|{sub_stat.st_mtime_ns}")
    return parts


def source_key(paths: Sequence[str | os.PathLike]) -> str:
    """A 12-hex-digit hash of the resolved paths, sizes and modification times (see Note [cache key])."""
    digest = hashlib.sha256(_FORMAT_VERSION.encode())
    for path in paths:
        for part in _stat_parts(Path(path).resolve()):
            digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()[:12]


def cache_path(name: str, split: str, key: str) -> Path:
    """The cache file of one data set, split and source: ``{cache_dir}/{name}-{split}-{key}.npz``."""
    return cache_dir() / f"{name}-{split}-{key}.npz"


def load_cached(
    path: str | os.PathLike, shape: tuple[int, int, int] | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Read a cache entry, or return ``None`` if it is absent or unusable (see Note [corrupt cache]).

    Args:
        path: The ``.npz`` file.
        shape: The expected ``(C, H, W)`` of each image, or ``None`` to accept any.

    Returns:
        ``(images, labels)`` (uint8 ``N×C×H×W``, int64 ``N``), or ``None``.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except Exception as exc:  # any failure to read means "not cached"; see Note [corrupt cache]
        logger.warning("ignoring unreadable cache file %s (%s: %s)", path, type(exc).__name__, exc)
        return None
    if (
        images.dtype != np.uint8
        or images.ndim != 4
        or (shape is not None and images.shape[1:] != tuple(shape))
        or labels.dtype != np.int64
        or labels.shape != (len(images),)
    ):
        logger.warning(
            "ignoring cache file %s: images %s %s, labels %s %s",
            path,
            images.dtype,
            images.shape,
            labels.dtype,
            labels.shape,
        )
        return None
    return images, labels


def save_cached(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> bool:
    """Write a cache entry atomically (uncompressed ``.npz``); return whether it was written.

    A failure to write (read-only or full disk) is logged, not raised: the cache only saves time.
    """
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    try:
        atomic_write(path, lambda f: np.savez(f, images=images, labels=labels))
    except OSError as exc:
        logger.warning("could not write cache file %s (%s: %s)", path, type(exc).__name__, exc)
        return False
    return True


def load_or_decode(
    name: str,
    split: str,
    sources: Sequence[str | os.PathLike],
    decode: Callable[[], tuple[np.ndarray, np.ndarray]],
    shape: tuple[int, int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return the cached arrays of ``sources`` or call ``decode()`` and cache its result.

    Args:
        name: Data set name (part of the file name).
        split: ``"train"`` or ``"test"`` (part of the file name).
        sources: The files or directories ``decode`` reads; they make the cache key (Note [cache key]).
        decode: Returns ``(images, labels)``, uint8 ``N×C×H×W`` and int64 ``N``.
        shape: The expected ``(C, H, W)``; a cache entry with another shape is decoded again.

    Returns:
        ``(images, labels)``.
    """
    path = cache_path(name, split, source_key(sources))
    cached = load_cached(path, shape)
    if cached is not None:
        logger.debug("%s/%s: loaded cache %s", name, split, path)
        return cached
    logger.info("%s/%s: decoding %s", name, split, ", ".join(map(str, sources)))
    images, labels = decode()
    if save_cached(path, images, labels):
        logger.info("%s/%s: cached %d images in %s", name, split, len(images), path)
    return images, labels
