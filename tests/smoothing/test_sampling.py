"""Tests for stablenet.smoothing.sampling: batching across images and draws, seeding, and moments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stablenet.smoothing import sampling
from stablenet.smoothing.grid_noise import GridNoise


class RowCounter(nn.Module):
    """A random linear classifier on flattened inputs that records the size of every batch it sees."""

    def __init__(self, in_features: int, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(in_features, num_classes)
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(len(x))
        return self.linear(x.flatten(1))


class Constant(nn.Module):
    def __init__(self, num_classes: int, label: int) -> None:
        super().__init__()
        self.num_classes, self.label = num_classes, label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), self.num_classes, device=x.device)
        logits[:, self.label] = 1.0
        return logits


@pytest.mark.parametrize(
    ("n_img", "num", "batch_size"),
    [(5, 3, 16), (5, 10, 4), (3, 7, 7), (4, 16, 5), (1, 1, 1), (6, 5, 11), (7, 2, 3), (2, 100, 1000)],
)
@pytest.mark.parametrize("chunk_bytes", [0, 1 << 20])
def test_counts_sum_to_num_for_every_image(n_img, num, batch_size, chunk_bytes):
    model = RowCounter(2 * 3 * 3, 4)
    x = torch.rand(n_img, 2, 3, 3)
    gen = sampling.make_generator(0, torch.device("cpu"))
    counts = sampling.class_counts(model, x, num, 0.5, 4, batch_size, gen, chunk_bytes)
    assert counts.shape == (n_img, 4) and counts.dtype == torch.long
    assert torch.equal(counts.sum(dim=1), torch.full((n_img,), num))
    assert sum(model.batch_sizes) == n_img * num
    assert max(model.batch_sizes) <= max(batch_size, 1)
    if 2 * num <= batch_size and n_img > 1:
        assert len(model.batch_sizes) < n_img  # several images share a forward pass


@pytest.mark.parametrize(("num", "batch_size"), [(6, 5), (2, 4), (5, 10), (7, 3)])
@pytest.mark.parametrize("chunk_bytes", [0, 1 << 20])
def test_noisy_outputs_index_each_row_by_its_image(num, batch_size, chunk_bytes):
    x = torch.arange(5.0).view(5, 1, 1, 1) * 100.0  # images far apart, so rows reveal their image
    seen = torch.zeros(5, dtype=torch.long)
    gen = sampling.make_generator(1, torch.device("cpu"))
    noise = []
    for index, out in sampling.noisy_outputs(nn.Flatten(), x, num, 0.1, batch_size, gen, chunk_bytes):
        assert torch.equal((out[:, 0] / 100.0).round().long(), index)
        seen += torch.bincount(index, minlength=5)
        noise.append(out[:, 0] - 100.0 * index)
    assert torch.equal(seen, torch.full((5,), num))
    # Fresh draws in every pass, chunked or not: no two passes share their noise.
    first = torch.stack([n[0] for n in noise])
    assert len(torch.unique(first)) == len(noise)


def test_chunks_group_runs_of_equal_passes():
    plan = sampling.batch_plan(7, 3, 6)  # (start, g=2, reps=3) for 3 groups, then (6, 1, 3)
    assert plan == [(0, 2, 3), (2, 2, 3), (4, 2, 3), (6, 1, 3)]
    assert list(sampling._chunks(plan, 8)) == [(0, 2, 3, 3, False), (6, 1, 3, 1, True)]
    assert list(sampling._chunks(plan, 2)) == [(0, 2, 3, 2, False), (4, 2, 3, 1, True), (6, 1, 3, 1, True)]
    plan = sampling.batch_plan(2, 10, 4)  # one image at a time: (0, 1, 4), (0, 1, 4), (0, 1, 2), (1, 1, 4) ...
    assert list(sampling._chunks(plan, 8)) == [
        (0, 1, 4, 2, True),
        (0, 1, 2, 1, True),
        (1, 1, 4, 2, True),
        (1, 1, 2, 1, True),
    ]


def test_same_seed_same_counts_and_other_seed_other_counts():
    model = RowCounter(12, 3, seed=3)
    x = torch.rand(4, 3, 2, 2)

    def counts(seed):
        return sampling.class_counts(model, x, 200, 1.0, 3, 64, sampling.make_generator(seed, torch.device("cpu")))

    first = counts(7)
    assert torch.equal(first, counts(7))
    assert (first > 0).sum() > 4  # the votes are split, so a different noise stream must show
    assert not torch.equal(first, counts(8))


def test_a_generator_object_continues_its_stream():
    model = RowCounter(12, 3, seed=3)
    x = torch.rand(2, 3, 2, 2)
    gen = sampling.make_generator(5, torch.device("cpu"))
    assert sampling.make_generator(gen, torch.device("cpu")) is gen
    a = sampling.class_counts(model, x, 300, 1.0, 3, 64, gen)
    b = sampling.class_counts(model, x, 300, 1.0, 3, 64, gen)
    assert not torch.equal(a, b)


def test_constant_classifier_puts_every_count_in_its_class():
    x = torch.rand(3, 1, 4, 4)
    gen = sampling.make_generator(0, torch.device("cpu"))
    counts = sampling.class_counts(Constant(5, 3), x, 37, 2.0, 5, 10, gen)
    expected = torch.zeros(3, 5, dtype=torch.long)
    expected[:, 3] = 37
    assert torch.equal(counts, expected)


def test_mean_and_variance_of_a_linear_model_match_the_closed_form():
    # logits = A x + b + sigma A delta: mean A x + b, variance sigma^2 ||A_k||^2 per output k.
    torch.manual_seed(0)
    d, k, sigma, num = 6, 3, 0.7, 20_000
    linear = nn.Linear(d, k).double()
    model = nn.Sequential(nn.Flatten(), linear)
    x = torch.rand(2, 1, 2, 3, dtype=torch.float64)
    gen = sampling.make_generator(11, torch.device("cpu"))
    mean, var = sampling.mean_and_variance(model, x, num, sigma, 4096, gen, transform=lambda z: z)
    assert mean.shape == var.shape == (2, k) and mean.dtype == var.dtype == torch.float64
    with torch.no_grad():
        true_mean = linear(x.flatten(1))
        true_var = (sigma**2 * linear.weight.pow(2).sum(dim=1)).expand(2, k)
    # five standard errors of each estimator
    assert torch.all((mean - true_mean).abs() <= 5 * (true_var / num).sqrt())
    assert torch.all((var - true_var).abs() <= 5 * true_var * (2.0 / (num - 1)) ** 0.5)


def test_mean_and_variance_keeps_extra_transform_dimensions():
    gen = sampling.make_generator(0, torch.device("cpu"))
    model = RowCounter(4, 3)
    mean, var = sampling.mean_and_variance(
        model, torch.rand(5, 1, 2, 2), 9, 0.5, 7, gen, transform=lambda z: torch.stack([z.softmax(1), z], dim=1)
    )
    assert mean.shape == var.shape == (5, 2, 3)
    torch.testing.assert_close(mean[:, 0].sum(dim=1), torch.ones(5, dtype=torch.float64))
    assert torch.all(var >= 0)


def test_generator_on_another_device_type_is_rejected():
    with pytest.raises(ValueError, match="generator is on cpu") as excinfo:
        sampling.make_generator(torch.Generator(), torch.device("meta"))
    assert "\n" not in str(excinfo.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_with_cuda_model_is_rejected():
    with pytest.raises(ValueError, match="model's device"):
        sampling.make_generator(torch.Generator(), torch.device("cuda"))


def test_wrong_output_shape_is_a_clear_error():
    x = torch.rand(2, 1, 2, 2)
    gen = sampling.make_generator(0, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"\(batch, num_classes\) = \(\d+, 3\); got \(\d+, 4\)"):
        sampling.class_counts(RowCounter(4, 4), x, 5, 0.5, 3, 8, gen)
    with pytest.raises(ValueError, match="num_classes"):
        sampling.class_counts(lambda z: z.flatten(1).sum(1), x, 5, 0.5, 3, 8, gen)


@pytest.mark.parametrize(("num", "batch_size", "sigma"), [(0, 4, 0.5), (4, 0, 0.5), (4, 4, 0.0), (4, 4, -1.0)])
def test_bad_sampling_arguments(num, batch_size, sigma):
    gen = sampling.make_generator(0, torch.device("cpu"))
    with pytest.raises(ValueError, match="must be"):
        sampling.class_counts(RowCounter(4, 2), torch.rand(1, 1, 2, 2), num, sigma, 2, batch_size, gen)


# ----------------------------------------------------------------------------------------- floating-point noise
class Recorder(nn.Module):
    """Two logits from the first input value; keeps every batch it is given (``dtype``: an optional buffer that
    makes the model's dtype that, as a half-precision network's weights would)."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if dtype is not None:
            self.register_buffer("scale", torch.ones((), dtype=dtype))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        first = x.flatten(1)[:, :1].float()
        return torch.cat([-first, first], dim=1)


def recorded_noise_inputs(x: torch.Tensor, model: Recorder, sigma: float, num: int, seed: int) -> torch.Tensor:
    """The noisy inputs ``class_counts`` hands ``model`` for one image (one pass: ``num`` <= batch size)."""
    sampling.class_counts(model, x, num, sigma, 2, 4 * num, sampling.make_generator(seed, torch.device("cpu")))
    assert len(model.inputs) == 1
    return model.inputs[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_and_float64_inputs_get_noise_in_their_own_dtype_as_before(dtype):
    # Bit for bit the former rule: randn in x's dtype, added with alpha = sigma (Note [floating-point noise]).
    x, sigma, num = torch.rand(1, 2, 3, 3, dtype=dtype), 0.3, 50
    seen = recorded_noise_inputs(x, Recorder(), sigma, num, seed=4)
    noise = torch.randn((1, 1, num, 2, 3, 3), generator=torch.Generator().manual_seed(4), dtype=dtype)
    assert seen.dtype == dtype
    assert torch.equal(seen, torch.add(x.unsqueeze(1), noise, alpha=sigma).view(num, 2, 3, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_get_float32_noise(dtype):
    x, sigma, num = torch.rand(1, 1, 4, 4).to(dtype), 0.25, 200
    seen = recorded_noise_inputs(x, Recorder(), sigma, num, seed=0)
    noise = torch.randn((1, 1, num, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert seen.dtype == torch.float32  # a model without parameters keeps the float32 noisy input
    assert torch.equal(seen, torch.add(x.float().unsqueeze(1), noise, alpha=sigma).view(num, 1, 4, 4))
    # What the model sees is not on the half-precision grid: the noise was neither drawn nor added in it.
    added = seen - x.float()
    assert float((added.to(dtype).float() != added).double().mean()) > 0.9
    assert len(torch.unique(added)) > 0.99 * added.numel()


def test_a_half_precision_model_gets_the_float32_noisy_input_rounded_once():
    x, sigma, num = torch.rand(1, 1, 4, 4).half(), 0.25, 100
    seen = recorded_noise_inputs(x, Recorder(torch.float16), sigma, num, seed=1)
    noise = torch.randn((1, 1, num, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    assert seen.dtype == torch.float16
    assert torch.equal(seen, torch.add(x.float().unsqueeze(1), noise, alpha=sigma).half().view(num, 1, 4, 4))


def test_a_float32_input_is_cast_to_a_float64_model():
    x = torch.rand(2, 1, 2, 2)
    model = Recorder(torch.float64)
    sampling.class_counts(model, x, 5, 0.5, 2, 16, sampling.make_generator(0, torch.device("cpu")))
    assert model.inputs and all(t.dtype == torch.float64 for t in model.inputs)


# ----------------------------------------------------------------------------------------- grid noise in the loop
def test_grid_model_input_is_a_fixed_function_of_the_integer_grid_point():
    # Note [exact grid noise]: the model sees phi(k + V) = (k + V) / levels and nothing else about x or V.
    images = torch.randint(0, 256, (3, 2, 3, 3), generator=torch.Generator().manual_seed(0))
    x = images.float() / 255
    grid = GridNoise(0.5, 255)
    model = Recorder()
    gen = sampling.make_generator(2, torch.device("cpu"))
    sampling.class_counts(model, x, 40, 0.5, 2, 64, gen, grid=grid)
    seen = torch.cat(model.inputs)
    assert seen.dtype == torch.float32 and len(seen) == 3 * 40
    m = (seen.double() * 255).round().long()
    assert torch.equal(seen, m.float() / 255)
    steps = m.view(3, 40, 2, 3, 3) - images.unsqueeze(1)  # the grid noise itself (images 0..2 each take 40 rows)
    assert int(steps.abs().max()) <= grid.support and float(steps.double().std()) == pytest.approx(127.5, rel=0.05)


def test_grid_noise_reads_half_and_float_images_on_the_grid_and_refuses_others():
    grid = GridNoise(0.25, 255)
    k = torch.arange(256)
    assert torch.equal(grid.to_grid(k.float() / 255), k)
    assert torch.equal(grid.to_grid((k.double() / 255).half()), k)
    assert grid.to_grid(torch.zeros(0, 3)).shape == (0, 3)
    with pytest.raises(ValueError, match=r"x in torch.bfloat16 cannot tell the grid points k / 255 apart"):
        grid.to_grid((k.double() / 255).bfloat16())  # 8 significant bits: neighbours would be confused
    for off in (torch.tensor([0.001]), torch.tensor([0.5, 0.3])):
        with pytest.raises(ValueError, match=r"noise='grid' needs inputs on the grid k / 255") as excinfo:
            sampling.class_counts(
                RowCounter(off.numel(), 2),
                off.view(1, 1, 1, -1),
                4,
                0.25,
                2,
                8,
                sampling.make_generator(0, torch.device("cpu")),
                grid=grid,
            )
        assert "\n" not in str(excinfo.value)


def test_grid_noise_must_match_sigma():
    with pytest.raises(ValueError, match=r"grid noise was built for sigma = 0\.25; got sigma = 0\.5"):
        sampling.class_counts(
            RowCounter(4, 2),
            torch.zeros(1, 1, 2, 2),
            4,
            0.5,
            2,
            8,
            sampling.make_generator(0, torch.device("cpu")),
            grid=GridNoise(0.25),
        )


def test_grid_noise_keeps_its_old_import_path():
    from stablenet.smoothing import grid_noise

    assert all(getattr(sampling, name) is getattr(grid_noise, name) for name in grid_noise.__all__)
    assert set(grid_noise.__all__) <= set(sampling.__all__)
