"""Registry, digits, search order, errors and the real MNIST files."""

from __future__ import annotations

import dataclasses
import gzip
import inspect
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import stablenet.data as data
from stablenet.data import DatasetInfo, ImageData, dataset_info, list_datasets, load_dataset, register_dataset
from stablenet.data import datasets as datasets_module

BUILTIN = ["cifar10", "cifar100", "digits", "fashion-mnist", "mnist"]


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def write_mnist(directory: Path, split: str, labels: list[int], size: int = 28) -> np.ndarray:
    """Write a tiny IDX pair whose image ``i`` is filled with ``labels[i] * 10`` and return the images."""
    prefix = "train" if split == "train" else "t10k"
    images = np.repeat(np.array(labels, dtype=np.uint8) * 10, size * size).reshape(-1, size, size)
    write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images, 2051)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", np.array(labels, dtype=np.uint8), 2049)
    return images


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A private copy of the registry, so that registering in a test does not leak."""
    copy = dict(datasets_module._REGISTRY)
    monkeypatch.setattr(datasets_module, "_REGISTRY", copy)
    return copy


# ------------------------------------------------------------------------------------------- API, info


def test_all_lists_exactly_the_public_names():
    public = {n for n, v in vars(data).items() if not n.startswith("_") and not inspect.ismodule(v)}
    assert sorted(data.__all__) == sorted(public)
    assert set(data.__all__) == {
        "load_dataset",
        "dataset_info",
        "list_datasets",
        "register_dataset",
        "ImageData",
        "DatasetInfo",
        "DeviceLoader",
        "STANDARD_RADII",
        "HEADLINE_RADIUS",
        "ArrayDataset",
        "ImageFolderDataset",
        "ImageTarDataset",
        "ShardedBatchSampler",
        "StreamingLoader",
        "STREAMING_MODES",
        "decoded_bytes",
        "loader_throughput",
        "memory_budget",
        "streaming_dataset",
        "use_streaming",
    }


def test_list_datasets_holds_the_builtins_sorted():
    assert list_datasets() == BUILTIN


@pytest.mark.parametrize(
    ("name", "num_classes", "channels", "size"),
    [
        ("digits", 10, 1, (8, 8)),
        ("mnist", 10, 1, (28, 28)),
        ("fashion-mnist", 10, 1, (28, 28)),
        ("cifar10", 10, 3, (32, 32)),
        ("cifar100", 100, 3, (32, 32)),
    ],
)
def test_dataset_info_without_loading(name, num_classes, channels, size):
    info = dataset_info(name)
    assert (info.name, info.num_classes, info.in_channels, info.input_size) == (name, num_classes, channels, size)
    assert len(info.mean) == len(info.std) == channels
    assert all(0 < m < 1 for m in info.mean) and all(0 < s < 1 for s in info.std)
    assert len(info.classes) == num_classes == len(set(info.classes))
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.num_classes = 3


def test_cifar_class_order_is_alphabetical():
    assert dataset_info("cifar10").classes == (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    )
    classes = dataset_info("cifar100").classes
    assert list(classes) == sorted(classes) and classes[0] == "apple" and classes[-1] == "worm"


def test_dataset_info_validates():
    with pytest.raises(ValueError, match="mean and std must have in_channels=3 entries; got 1 and 3"):
        DatasetInfo("x", 2, 3, (4, 4), (0.5,), (0.2, 0.2, 0.2))
    with pytest.raises(ValueError, match="classes must have num_classes=2 names; got 3"):
        DatasetInfo("x", 2, 1, (4, 4), (0.5,), (0.2,), ("a", "b", "c"))


def test_unknown_name_lists_accepted_names():
    msg = "dataset must be one of 'cifar10', 'cifar100', 'digits', 'fashion-mnist', 'mnist'; got 'svhn'"
    with pytest.raises(ValueError, match=msg):
        load_dataset("svhn", "train")
    with pytest.raises(ValueError, match=msg):
        dataset_info("svhn")


@pytest.mark.parametrize("split", ["val", "Train", "", None])
def test_bad_split_lists_accepted_splits(split):
    with pytest.raises(ValueError, match=f"split must be one of 'train', 'test'; got {split!r}"):
        load_dataset("digits", split)


# --------------------------------------------------------------------------------------------- digits


def test_digits_shapes_range_and_attributes():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    assert train.labels.shape == (1437,) and test.labels.shape == (360,)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    for split in (train, test):
        assert split.images.min() == 0 and split.images.max() == 1
        # values are k/16: the original 0..16 grey levels
        assert torch.equal(split.images * 16, (split.images * 16).round())
    assert train.num_classes == 10 and train.name == "digits" and train.classes == tuple("0123456789")
    images, labels = test
    assert images is test.images and labels is test.labels and len(test) == 2


def test_digits_split_is_fixed_stratified_and_a_partition():
    from sklearn.datasets import load_digits

    first, again = load_dataset("digits", "test"), load_dataset("digits", "test")
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    train = load_dataset("digits", "train")
    full = load_digits()
    # stratified: each class's test share is 360/1797 of its count, up to rounding
    expected = np.bincount(full.target) * 360 / 1797
    assert np.all(np.abs(np.bincount(first.labels.numpy()) - expected) < 1)
    # a partition of the 1797 images: together the two splits are the whole set, as a multiset of rows
    rows = torch.cat([train.images, first.images]).reshape(1797, 64).numpy() * 16
    labels = torch.cat([train.labels, first.labels]).numpy()
    combined = np.column_stack([rows, labels])
    original = np.column_stack([full.data, full.target])
    assert np.array_equal(
        combined[np.lexsort(combined.T[::-1])], original[np.lexsort(original.T[::-1])].astype(combined.dtype)
    )


def test_digits_split_is_sklearns_with_random_state_0():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    full = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        full.images, full.target, test_size=360, random_state=0, stratify=full.target
    )
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.labels.tolist() == y_train.tolist() and test.labels.tolist() == y_test.tolist()
    assert torch.equal(train.images[:, 0] * 16, torch.from_numpy(x_train).float())
    assert torch.equal(test.images[:, 0] * 16, torch.from_numpy(x_test).float())
    # pinned, so that a change of the split (or of scikit-learn's shuffling) shows up here
    assert test.labels[:12].tolist() == [7, 6, 3, 7, 7, 3, 2, 8, 9, 3, 2, 6]
    assert train.labels[:12].tolist() == [3, 9, 1, 3, 1, 9, 4, 4, 2, 8, 3, 5]


def test_digits_mean_std_come_from_the_train_split():
    images = load_dataset("digits", "train").images.double()
    info = dataset_info("digits")
    assert images.mean().item() == pytest.approx(info.mean[0], abs=1e-4)
    assert images.std(unbiased=False).item() == pytest.approx(info.std[0], abs=1e-4)


# --------------------------------------------------------------------------------- register, ImageData


def test_register_dataset_loads_and_converts(registry):
    info = DatasetInfo("tiny", 3, 2, (2, 3), (0.5, 0.5), (0.3, 0.3), ("a", "b", "c"))
    calls = []

    def loader(split, root):
        calls.append((split, root))
        return np.full((4, 2, 2, 3), 51, dtype=np.uint8), [0, 1, 2, 1]

    assert register_dataset(info, loader) is info
    assert "tiny" in list_datasets() and dataset_info("tiny") is info
    out = load_dataset("tiny", "test", root="~/somewhere")
    assert calls == [("test", Path("~/somewhere").expanduser())]
    assert out.images.dtype == torch.float32 and torch.allclose(out.images, torch.full((4, 2, 2, 3), 0.2))
    assert out.labels.tolist() == [0, 1, 2, 1] and out.labels.dtype == torch.int64
    assert (out.name, out.num_classes, out.classes) == ("tiny", 3, ("a", "b", "c"))
    with pytest.raises(ValueError, match="dataset 'tiny' is already registered; pass overwrite=True"):
        register_dataset(info, loader)
    register_dataset(
        info, lambda split, root: (torch.zeros(1, 2, 2, 3), torch.zeros(1, dtype=torch.long)), overwrite=True
    )
    assert len(load_dataset("tiny", "train").images) == 1


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (np.zeros((2, 1, 4, 4), np.uint8), [0, 1], r"images must have shape N×2×2×3; got \(2, 1, 4, 4\)"),
        (np.zeros((2, 2, 2, 3), np.uint8), [0, 3], r"labels must lie in \[0, 3\); got \[0, 3\]"),
        (np.zeros((2, 2, 2, 3), np.uint8), [0], r"labels must have shape \(2,\); got \(1,\)"),
        (np.full((2, 2, 2, 3), 1.5), [0, 1], r"float images must lie in \[0, 1\]; got \[1.5, 1.5\]"),
        (np.zeros((2, 2, 2, 3), np.int32), [0, 1], "images must be uint8 or floating point; got torch.int32"),
        (np.zeros((2, 2, 2, 3), np.uint8), [0.0, 1.0], "labels must be integers; got torch.float64"),
    ],
)
def test_loader_output_is_checked_against_info(registry, images, labels, message):
    info = DatasetInfo("tiny", 3, 2, (2, 3), (0.5, 0.5), (0.3, 0.3))
    register_dataset(info, lambda split, root: (images, labels))
    with pytest.raises(ValueError, match=message):
        load_dataset("tiny", "train")


def test_image_data_pickles_with_its_attributes():
    original = ImageData(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), 2, "toy", ("a", "b"))
    copy = pickle.loads(pickle.dumps(original))
    assert isinstance(copy, ImageData) and len(copy) == 2
    assert (copy.name, copy.num_classes, copy.classes) == ("toy", 2, ("a", "b"))
    assert torch.equal(copy.images, original.images) and torch.equal(copy.labels, original.labels)
    assert repr(original) == "ImageData(name='toy', images=float32[2, 1, 2, 2], labels=int64[2], num_classes=2)"


# ------------------------------------------------------------------------------ search order, errors


def test_missing_data_raises_one_line_file_not_found(tmp_path, data_env, monkeypatch):
    env_dirs = [tmp_path / "env1", tmp_path / "env2"]
    monkeypatch.setenv("STABLENET_DATA", os.pathsep.join(map(str, env_dirs)))
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", "test", root=root)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("mnist 'test' split not found")
    for path in [root, *env_dirs, data_env.cwd / "data", data_env.home / ".cache" / "stablenet" / "data"]:
        assert str(path) in message
    assert "t10k-{images-idx3,labels-idx1}-ubyte[.gz]" in message and "MNIST/raw" in message
    assert "root=" in message and "STABLENET_DATA" in message and "torchvision" in message


def test_search_order_root_env_cwd_home(tmp_path, data_env, monkeypatch):
    home_dir = data_env.home / ".cache" / "stablenet" / "data" / "mnist"
    write_mnist(home_dir, "test", [9])
    assert load_dataset("mnist", "test").labels.tolist() == [9]
    write_mnist(data_env.cwd / "data" / "MNIST" / "raw", "test", [8])
    assert load_dataset("mnist", "test").labels.tolist() == [8]
    write_mnist(tmp_path / "env2" / "mnist", "test", [7])
    write_mnist(tmp_path / "env1" / "mnist", "test", [6])
    monkeypatch.setenv("STABLENET_DATA", f"{tmp_path / 'env1'}{os.pathsep}{tmp_path / 'env2'}")
    assert load_dataset("mnist", "test").labels.tolist() == [6]
    write_mnist(tmp_path / "root", "test", [5])  # files directly in root
    assert load_dataset("mnist", "test", root=tmp_path / "root").labels.tolist() == [5]
    assert load_dataset("mnist", "test", root=str(tmp_path / "nonexistent")).labels.tolist() == [6]


def test_bare_idx_directory_is_only_used_as_root(tmp_path, monkeypatch):
    # MNIST and Fashion-MNIST share file names, so a bare directory only counts when named as root
    write_mnist(tmp_path / "bare", "test", [3])
    monkeypatch.setenv("STABLENET_DATA", str(tmp_path / "bare"))
    with pytest.raises(FileNotFoundError):
        load_dataset("fashion-mnist", "test")
    with pytest.raises(FileNotFoundError):
        load_dataset("mnist", "test")
    assert load_dataset("fashion-mnist", "test", root=tmp_path / "bare").labels.tolist() == [3]


def fake_torchvision(monkeypatch: pytest.MonkeyPatch, dataset_class: type) -> None:
    package = types.ModuleType("torchvision")
    package.datasets = types.ModuleType("torchvision.datasets")
    package.datasets.MNIST = package.datasets.CIFAR10 = dataset_class
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", package.datasets)


def test_torchvision_download_is_the_last_resort(data_env, monkeypatch):
    calls = []

    class FakeDataset:
        def __init__(self, root, train, download):
            calls.append((type(self).__name__, root, train, download))
            if self.is_mnist:  # MNIST: a uint8 tensor N×H×W; CIFAR: an array N×H×W×C and a list
                self.data, self.targets = torch.full((3, 28, 28), 255, dtype=torch.uint8), torch.tensor([1, 2, 3])
            else:
                self.data, self.targets = np.zeros((2, 32, 32, 3), np.uint8), [4, 5]
                self.data[:, :, :, 1] = 255

    FakeDataset.is_mnist = True
    fake_torchvision(monkeypatch, FakeDataset)
    mnist = load_dataset("mnist", "train")
    home = str(data_env.home / ".cache" / "stablenet" / "data")
    assert calls == [("FakeDataset", home, True, True)]
    assert mnist.images.shape == (3, 1, 28, 28) and mnist.images.min() == 1 and mnist.labels.tolist() == [1, 2, 3]
    FakeDataset.is_mnist = False
    cifar = load_dataset("cifar10", "test")
    assert calls[-1] == ("FakeDataset", home, False, True)
    assert cifar.images.shape == (2, 3, 32, 32) and cifar.labels.tolist() == [4, 5]
    assert cifar.images[:, 1].min() == 1 and cifar.images[:, [0, 2]].max() == 0  # channels moved to dim 1


def test_failed_torchvision_download_is_reported(monkeypatch):
    class Offline:
        def __init__(self, root, train, download):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nno network")

    fake_torchvision(monkeypatch, Offline)
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", "test")
    message = str(info.value)
    assert "\n" not in message
    assert "failed (RuntimeError: Error downloading train-images-idx3-ubyte.gz: no network)" in message


# ----------------------------------------------------------------------------------------- real MNIST


def test_real_mnist_test_split(shared_data):
    test = load_dataset("mnist", "test", root=shared_data)
    assert test.images.shape == (10000, 1, 28, 28) and test.images.dtype == torch.float32
    assert test.images.min() == 0 and test.images.max() == 1
    counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert torch.bincount(test.labels).tolist() == counts
    mean = test.images.mean().item()
    assert abs(mean - dataset_info("mnist").mean[0]) < 0.01  # the test split's mean is close to the train's


def test_real_mnist_train_split_and_cache(shared_data, data_env, monkeypatch):
    monkeypatch.setenv("STABLENET_DATA", str(shared_data))
    first = load_dataset("mnist", "train")
    assert first.images.shape == (60000, 1, 28, 28)
    assert first.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    cached = list(data_env.cache.glob("mnist-train-*.npz"))
    assert len(cached) == 1
    with np.load(cached[0], allow_pickle=False) as npz:
        assert npz["images"].dtype == np.uint8 and npz["images"].shape == (60000, 1, 28, 28)

    def no_decoding(*args):
        raise AssertionError("the second load must come from the cache")

    monkeypatch.setattr("stablenet.data.builtin.read_idx_pair", no_decoding)
    second = load_dataset("mnist", "train")
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert abs(second.images.mean().item() - dataset_info("mnist").mean[0]) < 1e-4
    assert abs(second.images.std().item() - dataset_info("mnist").std[0]) < 1e-4
