"""On-disk formats (IDX, CIFAR pickles, ImageFolder trees and archives) and the uint8 cache."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stablenet.data import dataset_info, load_dataset
from stablenet.data.cache import load_cached, source_key
from stablenet.data.sources import read_cifar_batches, read_idx, read_idx_pair

CIFAR10 = dataset_info("cifar10").classes


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write(path: Path, raw: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def random_idx(n: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_plain_and_gzipped(tmp_path, suffix):
    images, labels = random_idx()
    directory = tmp_path / "data" / "mnist"
    write(directory / f"train-images-idx3-ubyte{suffix}", idx_bytes(images, 2051))
    write(directory / f"train-labels-idx1-ubyte{suffix}", idx_bytes(labels, 2049))
    out = load_dataset("mnist", "train", root=tmp_path / "data")
    assert out.images.shape == (5, 1, 28, 28)
    assert torch.equal((out.images * 255).round().to(torch.uint8), torch.from_numpy(images[:, None]))
    assert out.labels.tolist() == labels.tolist()


def test_torchvision_raw_layout_for_both_mnists(tmp_path):
    images, labels = random_idx(3, seed=1)
    for folder in ["MNIST", "FashionMNIST"]:
        raw = tmp_path / folder / "raw"
        write(raw / "t10k-images-idx3-ubyte", idx_bytes(images, 2051))
        write(raw / "t10k-labels-idx1-ubyte", idx_bytes(labels, 2049))
    for name in ["mnist", "fashion-mnist"]:
        out = load_dataset(name, "test", root=tmp_path)
        assert out.name == name and out.labels.tolist() == labels.tolist()
    assert load_dataset("fashion-mnist", "test", root=tmp_path).classes[0] == "T-shirt/top"


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda raw: raw[:-5], r"is truncated or corrupt: header says shape \(5, 28, 28\) \(3920 bytes\), "),
        (lambda raw: raw + b"\0", "file holds 3921 bytes of data"),
        (lambda raw: raw[:10], r"is truncated: 10 bytes, shorter than its 16-byte header"),
        (lambda raw: (2049).to_bytes(4, "big") + raw[4:], "has IDX magic number 2049; expected 2051"),
    ],
)
def test_malformed_idx_is_a_one_line_error_naming_the_file(tmp_path, mangle, message):
    images, labels = random_idx()
    path = write(tmp_path / "mnist" / "train-images-idx3-ubyte", mangle(idx_bytes(images, 2051)))
    write(tmp_path / "mnist" / "train-labels-idx1-ubyte", idx_bytes(labels, 2049))
    with pytest.raises(ValueError, match=message) as info:
        load_dataset("mnist", "train", root=tmp_path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_gzip_is_a_one_line_error(tmp_path):
    images, _ = random_idx()
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(idx_bytes(images, 2051))[:-100])
    with pytest.raises(ValueError, match=r"cannot read .*images.gz: EOFError") as info:
        read_idx(path, 2051)
    assert "\n" not in str(info.value)


def test_idx_count_mismatch(tmp_path):
    images, labels = random_idx()
    a = write(tmp_path / "a", idx_bytes(images, 2051))
    b = write(tmp_path / "b", idx_bytes(labels[:4], 2049))
    with pytest.raises(ValueError, match=r"holds 5 images but .* holds 4 labels"):
        read_idx_pair(a, b)


# ---------------------------------------------------------------------------------------------- CIFAR


def write_batch(path: Path, images: np.ndarray, labels: list[int], label_key: bytes) -> None:
    # as in the original files: bytes keys, N×3072 rows, labels as a list, pickle protocol 2
    batch = {b"batch_label": b"x", b"data": images.reshape(len(images), -1), label_key: labels}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(batch, protocol=2))


def fake_cifar10(directory: Path, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, list[int]]]:
    batches = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        images = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, 2).tolist()
        write_batch(directory / name, images, labels, b"labels")
        batches[name] = (images, labels)
    return batches


@pytest.mark.parametrize("folder", ["cifar-10-batches-py", "cifar10"])
def test_cifar10_pickle_batches(tmp_path, folder):
    batches = fake_cifar10(tmp_path / folder, np.random.default_rng(0))
    train = load_dataset("cifar10", "train", root=tmp_path)
    expected = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert train.images.shape == (10, 3, 32, 32)
    assert np.array_equal((train.images.numpy() * 255).round().astype(np.uint8), expected)
    assert train.labels.tolist() == [y for i in range(1, 6) for y in batches[f"data_batch_{i}"][1]]
    test = load_dataset("cifar10", "test", root=tmp_path)
    assert test.labels.tolist() == batches["test_batch"][1] and test.classes[0] == "airplane"


def test_cifar100_pickle_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in [("train", 4), ("test", 3)]:
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        batch = {b"data": images.reshape(n, -1), b"fine_labels": [99, 0, 57, 3][:n], b"coarse_labels": [1] * n}
        write(tmp_path / "cifar-100-python" / split, pickle.dumps(batch, protocol=2))
    test = load_dataset("cifar100", "test", root=tmp_path)
    assert test.images.shape == (3, 3, 32, 32) and test.labels.tolist() == [99, 0, 57]
    assert test.num_classes == 100 and test.classes[99] == "worm"
    assert len(load_dataset("cifar100", "train", root=tmp_path).images) == 4


def test_cifar_pickle_cannot_run_code(tmp_path):
    target = tmp_path / "created-by-pickle"

    class Exploit:
        def __reduce__(self):
            return (os.mkdir, (str(target),))

    path = write(tmp_path / "batch", pickle.dumps({b"data": Exploit(), b"labels": []}))
    with pytest.raises(ValueError, match=r"global 'posix.mkdir' is not allowed|global 'os.mkdir' is not"):
        read_cifar_batches([path])
    assert not target.exists()


def test_cifar_batch_with_wrong_shape(tmp_path):
    path = tmp_path / "b"
    write_batch(path, np.zeros((2, 100), np.uint8), [0, 1], b"labels")
    with pytest.raises(ValueError, match=r"b'data' must be uint8 of shape N×3072; got uint8 \(2, 100\)"):
        read_cifar_batches([path])


# ---------------------------------------------------------------------------------------- ImageFolder

# (class, file, colour): flat colours survive JPEG almost exactly
IMAGES = [
    ("truck", "b.jpg", (250, 10, 10)),
    ("airplane", "z.jpg", (10, 250, 10)),
    ("truck", "a.jpg", (10, 10, 250)),
    ("bird", "m.jpg", (128, 128, 128)),
    ("airplane", "c.jpg", (250, 250, 250)),
]
# sorted by (class, file): airplane/c, airplane/z, bird/m, truck/a, truck/b
EXPECTED_LABELS = [0, 0, 2, 9, 9]
EXPECTED_COLOURS = [(250, 250, 250), (10, 250, 10), (128, 128, 128), (10, 10, 250), (250, 10, 10)]


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (32, 32), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, colour).convert(mode)
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_tar(path: Path, split: str, items=IMAGES, prefix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        for member in [f"{prefix}{split}", *(f"{prefix}{split}/{c}" for c, _, _ in items)]:
            info = tarfile.TarInfo(member)
            info.type = tarfile.DIRTYPE
            archive.addfile(info)
        for cls, name, colour in items:
            data = colour if isinstance(colour, bytes) else jpeg(colour)
            info = tarfile.TarInfo(f"{prefix}{split}/{cls}/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def write_tree(directory: Path, items=IMAGES) -> None:
    for cls, name, colour in items:
        (directory / cls).mkdir(parents=True, exist_ok=True)
        (directory / cls / name).write_bytes(jpeg(colour))


def check_images(out) -> None:
    assert out.images.shape == (5, 3, 32, 32)
    assert out.labels.tolist() == EXPECTED_LABELS
    colours = torch.tensor(EXPECTED_COLOURS, dtype=torch.float32)[:, :, None, None] / 255
    assert (out.images - colours).abs().max() < 4 / 255


@pytest.mark.parametrize("prefix", ["", "./"])
def test_jpeg_tar(tmp_path, prefix):
    write_tar(tmp_path / "cifar10-jpeg" / "test.tar.gz", "test", prefix=prefix)
    check_images(load_dataset("cifar10", "test", root=tmp_path))
    with pytest.raises(FileNotFoundError, match=r"<base>/cifar10-jpeg/train.tar.gz"):
        load_dataset("cifar10", "train", root=tmp_path)


@pytest.mark.parametrize("folder", ["cifar10-jpeg", "cifar10"])
def test_jpeg_folder_tree(tmp_path, folder):
    write_tree(tmp_path / folder / "train")
    (tmp_path / folder / "train" / "notes.txt").write_text("ignored")
    check_images(load_dataset("cifar10", "train", root=tmp_path))


def test_grey_jpeg_is_converted_to_rgb(tmp_path):
    write_tar(tmp_path / "cifar10-jpeg" / "test.tar.gz", "test", [("cat", "g.jpg", jpeg((90, 90, 90), mode="L"))])
    out = load_dataset("cifar10", "test", root=tmp_path)
    assert out.images.shape == (1, 3, 32, 32) and (out.images - 90 / 255).abs().max() < 3 / 255
    assert out.labels.tolist() == [3]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([("cat", "big.jpg", jpeg((1, 2, 3), (32, 33)))], r"image .*cat/big.jpg is 33×32; expected 32×32"),
        ([("kitten", "k.jpg", jpeg((1, 2, 3)))], "class folder must be one of 'airplane', .*; got 'kitten'"),
        ([("cat", "bad.jpg", b"not a jpeg")], r"cannot decode image .*cat/bad.jpg"),
    ],
)
def test_bad_image_folder_contents(tmp_path, items, message):
    write_tar(tmp_path / "cifar10-jpeg" / "test.tar.gz", "test", items)
    with pytest.raises(ValueError, match=message) as info:
        load_dataset("cifar10", "test", root=tmp_path)
    assert "\n" not in str(info.value)


def test_corrupt_archive(tmp_path):
    path = write_tar(tmp_path / "cifar10-jpeg" / "test.tar.gz", "test")
    full = path.read_bytes()
    for cut in [200, 400, len(full) // 2]:  # 200 ends on a member boundary of the uncompressed stream
        path.write_bytes(full[:cut])
        with pytest.raises(ValueError, match=r"cannot read archive .*test.tar.gz: (EOFError|ReadError)"):
            load_dataset("cifar10", "test", root=tmp_path)


@pytest.mark.slow
def test_real_cifar10_train_split(shared_data):
    train = load_dataset("cifar10", "train", root=shared_data)
    assert train.images.shape == (50000, 3, 32, 32)
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    info = dataset_info("cifar10")
    # a JPEG copy: the statistics are close to, not equal to, the original's
    assert torch.allclose(train.images.mean(dim=(0, 2, 3)), torch.tensor(info.mean), atol=0.01)
    assert torch.allclose(train.images.std(dim=(0, 2, 3)), torch.tensor(info.std), atol=0.01)


def test_real_cifar10_test_split(shared_data, data_env):
    test = load_dataset("cifar10", "test", root=shared_data)
    assert test.images.shape == (10000, 3, 32, 32) and test.images.dtype == torch.float32
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert torch.all(test.labels[:-1] <= test.labels[1:])  # sorted by class, then file name
    mean = test.images.mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(dataset_info("cifar10").mean), atol=0.02)
    assert len(list(data_env.cache.glob("cifar10-test-*.npz"))) == 1


# ---------------------------------------------------------------------------------------------- cache


def test_cache_is_used_then_ignored_when_corrupt(tmp_path, data_env, monkeypatch):
    write_tar(tmp_path / "cifar10-jpeg" / "test.tar.gz", "test")
    first = load_dataset("cifar10", "test", root=tmp_path)
    (entry,) = data_env.cache.glob("cifar10-test-*.npz")
    cached = load_cached(entry, (3, 32, 32))
    assert cached is not None and cached[0].dtype == np.uint8 and cached[1].tolist() == EXPECTED_LABELS

    def no_decoding(*args):
        raise AssertionError("decoded although the cache is valid")

    with monkeypatch.context() as patch:
        patch.setattr("stablenet.data.builtin.read_image_tar", no_decoding)
        second = load_dataset("cifar10", "test", root=tmp_path)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)

    entry.write_bytes(b"garbage")
    third = load_dataset("cifar10", "test", root=tmp_path)
    assert torch.equal(first.images, third.images)
    assert load_cached(entry) is not None  # rewritten

    np.savez(entry, images=np.zeros((5, 1, 8, 8), np.uint8), labels=np.zeros(5, np.int64))  # wrong shape
    assert load_cached(entry, (3, 32, 32)) is None
    assert torch.equal(load_dataset("cifar10", "test", root=tmp_path).images, first.images)


def test_changed_source_gets_a_new_cache_entry(tmp_path, data_env):
    path = write_tar(tmp_path / "cifar10-jpeg" / "test.tar.gz", "test")
    key = source_key([path])
    assert load_dataset("cifar10", "test", root=tmp_path).labels.tolist() == EXPECTED_LABELS
    write_tar(path, "test", IMAGES[:2])
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse-grained file systems
    assert source_key([path]) != key
    assert load_dataset("cifar10", "test", root=tmp_path).labels.tolist() == [0, 9]
    assert len(list(data_env.cache.glob("cifar10-test-*.npz"))) == 2


def test_unwritable_cache_does_not_fail_the_load(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("STABLENET_CACHE", str(blocker / "cache"))
    write_tar(tmp_path / "cifar10-jpeg" / "test.tar.gz", "test")
    assert load_dataset("cifar10", "test", root=tmp_path).labels.tolist() == EXPECTED_LABELS


def test_digits_is_not_cached(data_env):
    load_dataset("digits", "train")
    assert not data_env.cache.exists() or not any(data_env.cache.iterdir())
