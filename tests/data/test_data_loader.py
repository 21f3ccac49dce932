"""DeviceLoader: batching, shuffling, augmentation and reproducibility."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stablenet.data import DeviceLoader

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def epoch(loader: DeviceLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def shift(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[..., i, j] = image[..., i + dy, j + dx]``, zero outside the image."""
    h, w = image.shape[-2:]
    out = torch.zeros_like(image)
    out[..., max(0, -dy) : min(h, h - dy), max(0, -dx) : min(w, w - dx)] = image[
        ..., max(0, dy) : min(h, h + dy), max(0, dx) : min(w, w + dx)
    ]
    return out


@pytest.mark.parametrize(("n", "batch_size", "drop_last", "sizes"), [(10, 4, False, [4, 4, 2]), (10, 4, True, [4, 4])])
def test_number_and_size_of_batches(n, batch_size, drop_last, sizes):
    loader = DeviceLoader(torch.rand(n, 1, 2, 2), torch.arange(n), batch_size, drop_last=drop_last)
    assert len(loader) == len(sizes)
    assert [len(y) for _, y in loader] == sizes
    assert [len(x) for x, _ in loader] == sizes


def test_without_shuffle_batches_are_in_order():
    images = torch.rand(7, 3, 4, 4)
    x, y = epoch(DeviceLoader(images, torch.arange(7), 3))
    assert torch.equal(x, images) and torch.equal(y, torch.arange(7))


@pytest.mark.parametrize("device", DEVICES)
def test_shuffle_sees_every_index_once_and_images_follow_labels(device):
    n = 103
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1) / n
    loader = DeviceLoader(images, torch.arange(n), 10, shuffle=True, generator=seeded(), device=device)
    x, y = epoch(loader)
    assert x.device.type == device and y.device.type == device and y.dtype == torch.int64
    assert sorted(y.tolist()) == list(range(n)) and y.tolist() != list(range(n))
    assert torch.equal((x.flatten() * n).round(), y.to(torch.float32))
    _, y2 = epoch(loader)
    assert y2.tolist() != y.tolist()  # a new permutation each epoch


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_batches(device):
    images, labels = torch.rand(50, 3, 8, 8), torch.arange(50)

    def run(seed):
        loader = DeviceLoader(
            images, labels, 16, shuffle=True, generator=seeded(seed), crop_padding=2, flip=True, device=device
        )
        return [epoch(loader) for _ in range(2)]

    first, again, other = run(1), run(1), run(2)
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(first[0][1], other[0][1])


@pytest.mark.parametrize("device", DEVICES)
def test_crop_is_a_zero_filled_shift_of_at_most_the_padding(device):
    p = 2
    image = torch.arange(1, 1 + 2 * 6 * 5, dtype=torch.float32).view(1, 2, 6, 5) / 100
    images = image.expand(300, -1, -1, -1).to(device)
    x, _ = epoch(DeviceLoader(images, torch.zeros(300, dtype=torch.long), 64, crop_padding=p, generator=seeded()))
    assert x.shape == images.shape and x.device == images.device
    x = x.cpu()
    seen = set()
    for out in x:
        matches = [
            (dy, dx) for dy in range(-p, p + 1) for dx in range(-p, p + 1) if torch.equal(out, shift(image[0], dy, dx))
        ]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) == (2 * p + 1) ** 2  # all 25 offsets occur among 300 draws


def test_crop_matches_pad_then_slice():
    images = torch.rand(8, 3, 5, 5)
    gen = seeded(3)
    x, _ = next(iter(DeviceLoader(images, torch.zeros(8, dtype=torch.long), 8, crop_padding=1, generator=gen)))
    offsets = torch.randint(0, 3, (2, 8), generator=seeded(3))  # the loader's draws, in its order
    padded = F.pad(images, (1, 1, 1, 1))
    for b in range(8):
        dy, dx = offsets[:, b].tolist()
        assert torch.equal(x[b], padded[b, :, dy : dy + 5, dx : dx + 5])


def test_flip_flips_about_half():
    image = torch.rand(1, 3, 4, 6)
    images = image.expand(200, -1, -1, -1)
    x, _ = epoch(DeviceLoader(images, torch.zeros(200, dtype=torch.long), 50, flip=True, generator=seeded()))
    flipped = torch.tensor([torch.equal(out, image[0].flip(-1)) for out in x])
    kept = torch.tensor([torch.equal(out, image[0]) for out in x])
    assert torch.all(flipped ^ kept)
    assert 70 < flipped.sum() < 130


@pytest.mark.parametrize("device", DEVICES)
def test_uint8_input_gives_float_in_unit_interval(device):
    images = torch.randint(0, 256, (9, 3, 4, 4), dtype=torch.uint8, generator=seeded())
    images[0] = 255
    images[1] = 0
    loader = DeviceLoader(images, torch.arange(9), 4, crop_padding=1, flip=True, device=device)
    x, _ = epoch(loader)
    assert x.dtype == torch.float32 and x.device.type == device and x.min() == 0 and x.max() == 1
    plain, _ = epoch(DeviceLoader(images.to(device), torch.arange(9), 4))
    assert plain.device.type == device
    # CUDA may divide by multiplying with the reciprocal: equal up to one rounding
    assert torch.allclose(plain.cpu(), images.float() / 255, rtol=0, atol=1e-7)
    assert DeviceLoader(images, torch.arange(9), 4).images.dtype == torch.uint8  # stored compactly


def test_float64_input_gives_float32():
    x, _ = next(iter(DeviceLoader(torch.rand(3, 1, 2, 2, dtype=torch.float64), torch.arange(3), 3)))
    assert x.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1; got 0"),
        ({"batch_size": 2.0}, "batch_size must be an integer >= 1; got 2.0"),
        ({"crop_padding": -1}, "crop_padding must be an integer >= 0; got -1"),
        ({"images": torch.rand(4, 2, 2)}, r"images must be a 4-D tensor N×C×H×W; got \(4, 2, 2\)"),
        ({"images": torch.zeros(4, 1, 2, 2, dtype=torch.int32)}, "images must be uint8 or floating point"),
        ({"labels": torch.arange(3)}, "images and labels must have the same length; got 4 and 3"),
        ({"labels": torch.zeros(4)}, "labels must be a 1-D integer tensor; got torch.float32"),
        ({"generator": 0}, "generator must be a torch.Generator or None; got int"),
    ],
)
def test_arguments_are_validated(kwargs, message):
    args = {"images": torch.rand(4, 1, 2, 2), "labels": torch.arange(4), "batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        DeviceLoader(args.pop("images"), args.pop("labels"), args.pop("batch_size"), **args)


def test_device_defaults_to_the_images_device():
    loader = DeviceLoader(torch.rand(2, 1, 2, 2), [0, 1], 1)
    assert loader.device == torch.device("cpu") and loader.labels.dtype == torch.int64
    assert "batch_size=1" in repr(loader)


@pytest.mark.parametrize("crop_padding, flip", [(0, False), (2, False), (0, True), (2, True)])
@pytest.mark.parametrize("start", [1, 3, 4])
def test_batches_resume_a_pass_in_the_middle(crop_padding, flip, start):
    """Note [loader randomness]: batches(start, state after batch start - 1) continues the pass exactly."""
    images, labels = torch.rand(30, 2, 6, 6, generator=seeded(1)), torch.arange(30)

    def loader():
        return DeviceLoader(images, labels, 7, shuffle=True, generator=seeded(5), crop_padding=crop_padding, flip=flip)

    whole = loader()
    expected, state = [], None
    for b, batch in enumerate(whole):
        expected.append(batch)
        if b == start - 1:
            state = whole.generator.get_state()
    resumed = list(loader().batches(start, state))
    assert len(resumed) == len(expected) - start
    for (x, y), (x0, y0) in zip(resumed, expected[start:], strict=True):
        assert torch.equal(x, x0) and torch.equal(y, y0)


def test_batches_refuse_a_resume_they_cannot_reproduce():
    images, labels = torch.rand(10, 1, 4, 4), torch.arange(10)
    crop = DeviceLoader(images, labels, 4, shuffle=True, generator=seeded(0), crop_padding=1)
    with pytest.raises(ValueError, match="resuming a pass with crops or flips needs a generator and its generator_s"):
        next(crop.batches(1))
    with pytest.raises(ValueError, match="start must be between 0 and 3 batches; got 4"):
        next(crop.batches(4))
    plain = DeviceLoader(images, labels, 4, shuffle=True, generator=seeded(0))
    assert torch.equal(
        next(plain.batches(2))[1], list(DeviceLoader(images, labels, 4, shuffle=True, generator=seeded(0)))[2][1]
    )
