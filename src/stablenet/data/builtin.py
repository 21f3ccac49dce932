"""The built-in data sets and where their files are looked for.

``digits`` is scikit-learn's bundled copy (no files). For ``mnist``, ``fashion-mnist``, ``cifar10`` and
``cifar100`` the loader tries, in order:

1. the base directories, in order: the ``root`` argument, each directory in ``$STABLENET_DATA``
   (``os.pathsep``-separated), ``./data``, ``~/.cache/stablenet/data``; within each base, the standard
   layouts of the data set (listed in ``_LAYOUTS`` below) in order, lossless formats first;
2. a torchvision download to ``~/.cache/stablenet/data``, if torchvision is installed (the next call then
   finds the downloaded files under step 1).

The first source found is decoded once and cached as uint8 arrays (:mod:`stablenet.data.cache`). If none
is found, a one-line ``FileNotFoundError`` says where it looked and how to provide the files.

# Note [bare IDX directory]
MNIST and Fashion-MNIST use the same IDX file names, so a directory that holds them directly cannot tell
which data set it is. Such a directory is only used when it is the explicit ``root`` argument (the caller
named it for this data set); in the other base directories the files must be in a folder named after the
data set (``mnist/``, ``fashion-mnist/``) or in torchvision's layout (``MNIST/raw/``, ``FashionMNIST/raw/``).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stablenet.data.cache import load_or_decode
from stablenet.data.datasets import DatasetInfo, DatasetLoader, register_dataset
from stablenet.data.sources import read_cifar_batches, read_idx_pair, read_image_folder, read_image_tar

__all__ = ["DATA_ENV", "data_home", "search_dirs"]

logger = logging.getLogger(__name__)

DATA_ENV = "STABLENET_DATA"
"""Environment variable: ``os.pathsep``-separated directories to look for data files in."""

_DIGITS = tuple(str(i) for i in range(10))
_FASHION = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR100 = tuple(
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel "
    "can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
    "dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion "
    "lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
    "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
    "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table "
    "tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman "
    "worm".split()
)


def data_home() -> Path:
    """``~/.cache/stablenet/data``: the last directory searched and where torchvision downloads to."""
    return Path.home() / ".cache" / "stablenet" / "data"


def search_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """The base directories searched for data files, in order, without duplicates."""
    dirs = [Path(root).expanduser()] if root is not None else []
    dirs += [Path(d).expanduser() for d in os.environ.get(DATA_ENV, "").split(os.pathsep) if d]
    dirs += [Path("data").absolute(), data_home()]
    unique: list[Path] = []
    for d in dirs:
        if d.absolute() not in unique:
            unique.append(d.absolute())
    return unique


# --------------------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class _Source:
    paths: tuple[Path, ...]  # what the cache key is made of
    decode: Callable[[], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class _Layout:
    describe: Callable[[str], str]  # split -> e.g. "<base>/mnist/t10k-{images-idx3,labels-idx1}-ubyte[.gz]"
    find: Callable[[Path, str], _Source | None]  # (base, split) -> source, or None when absent
    root_only: bool = False  # see Note [bare IDX directory]


def _idx_layout(subdir: str) -> _Layout:
    def files(split: str) -> tuple[str, str]:
        prefix = "train" if split == "train" else "t10k"
        return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"

    def first(directory: Path, name: str) -> Path | None:
        return next((p for p in (directory / name, directory / f"{name}.gz") if p.is_file()), None)

    def find(base: Path, split: str) -> _Source | None:
        images, labels = (first(base / subdir, name) for name in files(split))
        if images is None or labels is None:
            return None
        return _Source((images, labels), functools.partial(read_idx_pair, images, labels))

    def describe(split: str) -> str:
        prefix = "train" if split == "train" else "t10k"
        where = f"<base>/{subdir}/" if subdir else "<root>/"
        return f"{where}{prefix}-{{images-idx3,labels-idx1}}-ubyte[.gz]"

    return _Layout(describe, find, root_only=not subdir)


def _cifar_pickle_layout(subdir: str, files: dict[str, Sequence[str]], label_key: bytes) -> _Layout:
    def find(base: Path, split: str) -> _Source | None:
        paths = tuple(base / subdir / f for f in files[split])
        if not all(p.is_file() for p in paths):
            return None
        return _Source(paths, functools.partial(read_cifar_batches, paths, label_key))

    def describe(split: str) -> str:
        names = files[split]
        shown = names[0] if len(names) == 1 else f"{{{names[0]}..{names[-1]}}}"
        return f"<base>/{subdir}/{shown}"

    return _Layout(describe, find)


def _image_tar_layout(subdir: str, classes: Sequence[str]) -> _Layout:
    def find(base: Path, split: str) -> _Source | None:
        path = base / subdir / f"{split}.tar.gz"
        return _Source((path,), functools.partial(read_image_tar, path, split, classes)) if path.is_file() else None

    return _Layout(lambda split: f"<base>/{subdir}/{split}.tar.gz", find)


def _image_folder_layout(subdir: str, classes: Sequence[str]) -> _Layout:
    def find(base: Path, split: str) -> _Source | None:
        path = base / subdir / split
        return _Source((path,), functools.partial(read_image_folder, path, classes)) if path.is_dir() else None

    return _Layout(lambda split: f"<base>/{subdir}/{split}/<class>/*.jpg", find)


def _cifar_layouts(
    name: str, pickle_dir: str, files: dict[str, Sequence[str]], label_key: bytes, classes: Sequence[str]
) -> tuple[_Layout, ...]:
    return (
        _cifar_pickle_layout(pickle_dir, files, label_key),
        _cifar_pickle_layout(name, files, label_key),
        _image_tar_layout(f"{name}-jpeg", classes),
        _image_folder_layout(f"{name}-jpeg", classes),
        _image_folder_layout(name, classes),
    )


_CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_CIFAR100_FILES = {"train": ("train",), "test": ("test",)}

_LAYOUTS: dict[str, tuple[_Layout, ...]] = {
    "mnist": (_idx_layout(""), _idx_layout("mnist"), _idx_layout("MNIST/raw")),
    "fashion-mnist": (_idx_layout(""), _idx_layout("fashion-mnist"), _idx_layout("FashionMNIST/raw")),
    "cifar10": _cifar_layouts("cifar10", "cifar-10-batches-py", _CIFAR10_FILES, b"labels", _CIFAR10),
    "cifar100": _cifar_layouts("cifar100", "cifar-100-python", _CIFAR100_FILES, b"fine_labels", _CIFAR100),
}

_TORCHVISION = {
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
}


# ---------------------------------------------------------------------------------------------- loaders


def _from_torchvision(name: str, split: str) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
    """Download with torchvision; return ``(arrays, "")`` or ``(None, why it failed)``."""
    try:
        from torchvision import datasets as tv_datasets
    except Exception as exc:  # not installed, or broken against this torch version
        return None, f"torchvision cannot be imported ({type(exc).__name__})"
    root = data_home()
    logger.info("%s/%s: not found locally; trying a torchvision download to %s", name, split, root)
    try:
        dataset = getattr(tv_datasets, _TORCHVISION[name])(root=str(root), train=split == "train", download=True)
        images, labels = np.asarray(dataset.data), np.asarray(dataset.targets, dtype=np.int64)
    except Exception as exc:  # offline, server down, bad checksum ...: report it and give up
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        logger.info("%s/%s: torchvision download failed: %s", name, split, reason)
        return None, f"torchvision download to {root} failed ({reason})"
    # MNIST-like data is N×H×W (a tensor), CIFAR data N×H×W×C (an array).
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    return (np.ascontiguousarray(images, dtype=np.uint8), labels), ""


def _not_found(name: str, split: str, root: Path | None, bases: Sequence[Path], why_not_torchvision: str) -> str:
    layouts = [lay.describe(split) for lay in _LAYOUTS[name] if root is not None or not lay.root_only]
    return (
        f"{name} {split!r} split not found: looked for {', '.join(layouts)} with <base> in "
        f"{', '.join(map(str, bases))}; {why_not_torchvision}. Pass root=<dir>, set {DATA_ENV}=<dir>"
        f"[{os.pathsep}<dir>...], or install torchvision and go online (it downloads to {data_home()})"
    )


def _files_loader(name: str, shape: tuple[int, int, int]) -> DatasetLoader:
    def load(split: str, root: Path | None) -> tuple[np.ndarray, np.ndarray]:
        bases = search_dirs(root)
        for i, base in enumerate(bases):
            for layout in _LAYOUTS[name]:
                if layout.root_only and (root is None or i != 0):
                    continue
                source = layout.find(base, split)
                if source is not None:
                    logger.debug("%s/%s: found %s", name, split, ", ".join(map(str, source.paths)))
                    return load_or_decode(name, split, source.paths, source.decode, shape)
        arrays, why_not = _from_torchvision(name, split)
        if arrays is None:
            raise FileNotFoundError(_not_found(name, split, root, bases, why_not))
        return arrays

    return load


def _load_digits(split: str, root: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8×8 digits (values 0..16), split 1437/360, stratified, with ``random_state=0``."""
    from sklearn.datasets import load_digits  # imported here: scikit-learn takes a while to import
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=360, random_state=0, stratify=digits.target
    )
    images, labels = (x_train, y_train) if split == "train" else (x_test, y_test)
    return (images[:, None] / 16).astype(np.float32), labels.astype(np.int64)


def _register_builtins() -> None:
    infos = [
        # digits mean/std: all pixels of the train split above (values / 16), population std, rounded.
        DatasetInfo("digits", 10, 1, (8, 8), (0.3054,), (0.3761,), _DIGITS),
        DatasetInfo("mnist", 10, 1, (28, 28), (0.1307,), (0.3081,), _DIGITS),
        DatasetInfo("fashion-mnist", 10, 1, (28, 28), (0.2860,), (0.3530,), _FASHION),
        DatasetInfo("cifar10", 10, 3, (32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), _CIFAR10),
        DatasetInfo("cifar100", 100, 3, (32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), _CIFAR100),
    ]
    for info in infos:
        shape = (info.in_channels, *info.input_size)
        loader = _load_digits if info.name == "digits" else _files_loader(info.name, shape)
        register_dataset(info, loader, overwrite=True)  # overwrite: importlib.reload must not fail


_register_builtins()
