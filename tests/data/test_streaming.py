"""StreamingLoader over data sets decoded on demand: the same batches as DeviceLoader, resume, shards, workers."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from stablenet.data import (
    ArrayDataset,
    DeviceLoader,
    ImageFolderDataset,
    ImageTarDataset,
    ShardedBatchSampler,
    StreamingLoader,
    builtin,
    decoded_bytes,
    load_dataset,
    loader_throughput,
    memory_budget,
    ondemand,
    streaming_dataset,
    use_streaming,
)
from stablenet.data.sources import read_image_folder

CLASSES = ("airplane", "automobile")  # the first two CIFAR-10 classes, so the tree is also a cifar10-jpeg tree
COUNTS = (17, 13)  # 30 images: batches of 8 leave a last batch of 6
N = sum(COUNTS)
AUG = {"crop_padding": 3, "flip": True}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/cifar10-jpeg/train/<class>/<file>.png``: 30 random 32×32 RGB PNGs, and the same as ``.tar.gz``."""
    root = tmp_path_factory.mktemp("tree")
    split = root / "cifar10-jpeg" / "train"
    rng = np.random.default_rng(0)
    from PIL import Image

    for cls, count in zip(CLASSES, COUNTS, strict=True):
        (split / cls).mkdir(parents=True)
        for k in rng.permutation(count):  # written out of order: the order must come from the names
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(split / cls / f"{k:03d}.png")
    archive_root = root / "archive" / "cifar10-jpeg"
    archive_root.mkdir(parents=True)
    with tarfile.open(archive_root / "train.tar.gz", "w:gz") as archive:
        archive.add(split, arcname="./train")
    return root


@pytest.fixture
def reference(tree: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-memory reader's arrays of the tree (uint8 and int64 tensors)."""
    images, labels = read_image_folder(tree / "cifar10-jpeg" / "train", CLASSES)
    return torch.from_numpy(images), torch.from_numpy(labels)


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Disable the in-memory path (a whole-split decode fails the test) and record every on-demand decode."""
    seen: list[str] = []
    decode = ondemand._decode

    def counting(data, where, size):
        seen.append(where)
        return decode(data, where, size)

    def in_memory(*args, **kwargs):
        raise AssertionError("the in-memory path was used")

    monkeypatch.setattr(ondemand, "_decode", counting)
    monkeypatch.setattr(ondemand, "load_dataset", in_memory)
    monkeypatch.setattr(builtin, "load_or_decode", in_memory)
    return seen


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def stream(dataset, seed: int = 0, batch_size: int = 8, **kwargs) -> StreamingLoader:
    return StreamingLoader(dataset, batch_size, shuffle=True, generator=seeded(seed), **kwargs)


def memory(images, labels, seed: int = 0, batch_size: int = 8, **kwargs) -> DeviceLoader:
    return DeviceLoader(images, labels, batch_size, shuffle=True, generator=seeded(seed), **kwargs)


def assert_same_batches(first, second) -> None:
    first, second = list(first), list(second)
    assert len(first) == len(second) > 0
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert x1.dtype == x2.dtype == torch.float32 and y1.dtype == y2.dtype == torch.int64
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


# ------------------------------------------------------------------------------------------ data sets


def test_listing_decodes_nothing_and_items_are_the_in_memory_rows(tree, reference, decodes):
    dataset = ImageFolderDataset(tree / "cifar10-jpeg" / "train", CLASSES, size=(32, 32))
    assert decodes == [] and len(dataset) == N and dataset.classes == CLASSES
    images, labels = zip(*(dataset[i] for i in range(N)), strict=True)
    assert torch.equal(torch.stack(images), reference[0]) and list(labels) == reference[1].tolist()
    assert len(decodes) == N


def test_tar_items_equal_folder_items(tree, reference, decodes, data_env):
    dataset = ImageTarDataset(tree / "archive" / "cifar10-jpeg" / "train.tar.gz", "train")
    assert dataset.classes == CLASSES and dataset.size == (32, 32)  # inferred from the folders and one header
    assert decodes == [] and len(list(data_env.cache.glob("stream-*.tar"))) == 1  # the uncompressed copy
    assert torch.equal(torch.stack([dataset[i][0] for i in range(N)]), reference[0])
    assert [dataset[i][1] for i in range(N)] == reference[1].tolist()


@pytest.mark.parametrize("root", ["", "archive"])
def test_streaming_dataset_finds_what_load_dataset_finds(tree, root):
    expected = load_dataset("cifar10", "train", tree / root)
    dataset = streaming_dataset("cifar10", "train", tree / root)
    assert isinstance(dataset, ImageTarDataset if root else ImageFolderDataset)
    assert_same_batches(stream(dataset, **AUG), memory(*expected, **AUG))


def test_streaming_dataset_wraps_other_sources_and_passes_a_dataset_through(monkeypatch):
    from stablenet.data import DatasetInfo, datasets

    images = torch.randint(0, 256, (12, 1, 5, 5), dtype=torch.uint8)
    info = DatasetInfo("bytes", 3, 1, (5, 5), (0.5,), (0.3,))
    monkeypatch.setitem(
        datasets._REGISTRY, "bytes", datasets._Entry(info, lambda split, root: (images, torch.arange(12) % 3))
    )
    dataset = streaming_dataset("bytes", "test")
    assert isinstance(dataset, ArrayDataset) and torch.equal(dataset.images, images)
    assert streaming_dataset(dataset, "train") is dataset
    with pytest.raises(ValueError, match="split must be one of 'train', 'test'; got 'val'"):
        streaming_dataset("bytes", "val")


def test_array_dataset_keeps_exact_values():
    as_bytes = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8)
    stored = ArrayDataset(as_bytes.to(torch.float32).div(255), torch.arange(6))
    assert stored.images.dtype == torch.uint8 and torch.equal(stored.images, as_bytes)  # a quarter of the memory
    sixteenths = torch.randint(0, 17, (6, 1, 4, 4)).to(torch.float32) / 16  # like digits: not bytes / 255
    assert ArrayDataset(sixteenths, torch.arange(6)).images.dtype == torch.float32
    assert_same_batches(
        stream(ArrayDataset(sixteenths, torch.arange(6)), batch_size=4),
        memory(sixteenths, torch.arange(6), batch_size=4),
    )


def test_decoded_bytes_is_the_float32_size(tree):
    dataset = ImageFolderDataset(tree / "cifar10-jpeg" / "train")
    assert decoded_bytes(dataset) == N * 3 * 32 * 32 * 4
    assert decoded_bytes(ArrayDataset(torch.zeros(5, 1, 8, 8), torch.arange(5)), bytes_per_value=1) == 5 * 64


# ------------------------------------------------------------------------------- the same batches


@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_equal_device_loader_without_augmentation(tree, reference, decodes, drop_last):
    dataset = ImageFolderDataset(tree / "cifar10-jpeg" / "train", CLASSES)
    loader = stream(dataset, drop_last=drop_last)
    assert len(loader) == (3 if drop_last else 4)
    assert_same_batches(loader, memory(*reference, drop_last=drop_last))


def test_augmented_passes_repeat_and_equal_device_loader(tree, reference):
    dataset = ImageFolderDataset(tree / "cifar10-jpeg" / "train", CLASSES)
    first = list(stream(dataset, seed=1, **AUG))
    assert_same_batches(first, stream(dataset, seed=1, **AUG))
    assert_same_batches(first, memory(*reference, seed=1, **AUG))
    other = list(stream(dataset, seed=2, **AUG))
    assert not torch.equal(torch.cat([x for x, _ in first]), torch.cat([x for x, _ in other]))


@pytest.mark.parametrize("k", [1, 3])
def test_resumed_pass_equals_uninterrupted_one_and_skips_reading(tree, decodes, k):
    dataset = ImageFolderDataset(tree / "cifar10-jpeg" / "train", CLASSES)
    whole = stream(dataset, **AUG)
    generator = whole.generator
    uninterrupted, states = [], []
    for batch in whole:
        uninterrupted.append(batch)
        states.append(generator.get_state())
    decodes.clear()
    resumed = stream(dataset, **AUG).batches(k, states[k - 1])
    assert_same_batches(resumed, uninterrupted[k:])
    assert len(decodes) == sum(len(y) for _, y in uninterrupted[k:])  # batches before k were not read


def test_resume_with_augmentation_needs_the_generator_state(tree):
    loader = stream(ImageFolderDataset(tree / "cifar10-jpeg" / "train"), **AUG)
    with pytest.raises(ValueError, match="generator_state"):
        next(loader.batches(2))
    with pytest.raises(ValueError, match="start must be between 0 and 4"):
        next(loader.batches(5))


# ------------------------------------------------------------------------------------ ranks, workers


def test_rank_shards_are_disjoint_cover_the_epoch_and_interleave_to_the_global_batch(tree):
    dataset = ImageFolderDataset(tree / "cifar10-jpeg" / "train", CLASSES)
    single = list(stream(dataset, **AUG))
    ranks = [list(stream(dataset, rank=r, world_size=2, **AUG)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    order = torch.randperm(N, generator=seeded())
    shards = [list(ShardedBatchSampler(order, 8, rank=r, world_size=2)) for r in range(2)]
    seen = [sorted(i for batch in shard for i in batch) for shard in shards]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(N))
    for (x, y), (x0, y0), (x1, y1) in zip(single, *ranks, strict=True):
        assert len(y0) == len(y1) == len(y) // 2
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)  # crops and flips included
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)


@pytest.mark.parametrize(
    ("n", "kwargs", "message"),
    [
        (30, {"batch_size": 7, "world_size": 2}, "divisible by world_size=2"),
        (26, {"batch_size": 8, "world_size": 4}, "fewer than world_size=4"),
        (30, {"batch_size": 8, "world_size": 2, "rank": 2}, "rank must be in"),
    ],
)
def test_bad_sharding_is_a_one_line_error(n, kwargs, message):
    with pytest.raises(ValueError, match=message):
        StreamingLoader(
            ArrayDataset(torch.zeros(n, 1, 2, 2), torch.zeros(n, dtype=torch.int64)), generator=seeded(), **kwargs
        )


def test_several_ranks_need_a_generator():
    with pytest.raises(ValueError, match="need a generator"):
        StreamingLoader(
            ArrayDataset(torch.zeros(8, 1, 2, 2), torch.zeros(8, dtype=torch.int64)), 4, shuffle=True, world_size=2
        )


def test_workers_give_the_same_batches_and_leave_the_global_generator_alone(tree):
    folder = ImageFolderDataset(tree / "cifar10-jpeg" / "train", CLASSES)
    archive = ImageTarDataset(tree / "archive" / "cifar10-jpeg" / "train.tar.gz", "train", CLASSES)
    expected = list(stream(folder, **AUG))
    before = torch.get_rng_state()
    assert_same_batches(stream(folder, num_workers=2, **AUG), expected)
    assert_same_batches(stream(archive, num_workers=2, prefetch_factor=1, **AUG), expected)  # a file handle each
    assert torch.equal(torch.get_rng_state(), before)


def test_each_process_reads_the_archive_through_its_own_handle(tree, monkeypatch):
    # Handles inherited through fork share one file position, so concurrent workers would read each other's
    # members; a race is too rare to catch by running workers, hence this direct check.
    archive = ImageTarDataset(tree / "archive" / "cifar10-jpeg" / "train.tar.gz", "train", CLASSES)
    first = archive[0][0]
    inherited = archive._handle[1]
    monkeypatch.setattr(ondemand.os, "getpid", lambda: -1)  # what a forked worker sees
    assert torch.equal(archive[0][0], first) and archive._handle[1] is not inherited and not inherited.closed
    assert torch.equal(pickle.loads(pickle.dumps(archive))[0][0], first)  # how a spawned worker gets it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_pinned_batches_on_cuda_equal_device_loader(tree, reference):
    dataset = ImageFolderDataset(tree / "cifar10-jpeg" / "train", CLASSES)
    loader = stream(dataset, device="cuda", num_workers=2, **AUG)
    assert loader.pin_memory
    assert_same_batches(loader, memory(*reference, device="cuda", **AUG))


# ---------------------------------------------------------------------------- choice and throughput


def test_use_streaming_rule():
    assert use_streaming(True, 0) and not use_streaming(False, 10**15)
    assert use_streaming("auto", 101, budget_bytes=100) and not use_streaming("auto", 100, budget_bytes=100)
    assert 0 < memory_budget("cpu", fraction=0.25) < memory_budget("cpu", fraction=0.5)
    with pytest.raises(ValueError, match="data_streaming must be one of true, false, 'auto'; got 'yes'"):
        use_streaming("yes", 0)


def test_throughput_counts_every_image(tree):
    loader = stream(ImageFolderDataset(tree / "cifar10-jpeg" / "train"), **AUG)
    result = loader_throughput(loader)
    assert result["images"] == N and result["batches"] == len(loader) and result["images_per_s"] > 0
    assert loader_throughput(loader, max_batches=2)["images"] == 16


# ------------------------------------------------------------------------------------------ bad input


def test_bad_files_are_one_line_errors(tree, tmp_path):
    with pytest.raises(ValueError, match="root must be a folder"):
        ImageFolderDataset(tmp_path / "absent")
    with pytest.raises(ValueError, match="class folder must be one of 'cat'"):
        ImageFolderDataset(tree / "cifar10-jpeg" / "train", ("cat",))
    wrong_size = ImageFolderDataset(tree / "cifar10-jpeg" / "train", size=(28, 28))
    with pytest.raises(ValueError, match=r"airplane/000\.png is 32×32; expected 28×28"):
        wrong_size[0]
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes((tree / "archive" / "cifar10-jpeg" / "train.tar.gz").read_bytes()[:3000])
    with pytest.raises(ValueError, match="cannot read archive"):
        ImageTarDataset(cut, "train")
