"""``stablenet bench smoothing``: throughput of the certification sampling loop against a plain forward.

Randomized-smoothing certification spends its time in :func:`stablenet.smoothing.sampling.class_counts`:
``n`` noisy copies of each image through the base model, top classes counted on the device. Its cost
beyond the base model's forward (drawing the noise, repeating the images, counting) should be small. This
benchmark measures noisy samples per second of ``class_counts`` and, as the reference, samples per second of
the same model's plain batched forward at the same batch size (inputs already on the device, no noise, no
counting); the ratio of the two is the loop's efficiency (target: at least 0.95 on a GPU).

Cases:

* ``cifar_cnn``: a small CNN on 3×32×32 inputs, one image at a time, ``n = 100 000`` (quick: 10 000).
* ``mnist_mlp``: a small MLP on 1×28×28 inputs, ``n = 100`` per image, so a batch of 1000 rows holds ten
  images (the batching across images of :func:`~stablenet.smoothing.sampling.noisy_outputs`).
* ``resnet110`` (GPU only, not in quick mode): Cohen et al.'s CIFAR-10 base model (``cifar_resnet``, depth
  110) with ``n = 100 000`` per image; its ``images_per_s`` is the certification rate to compare with their
  published cost of about 15 s per image on a GTX 1080 Ti.

One JSON row per case: ``model, n, batch_size, samples_per_s, plain_samples_per_s, ratio, device`` (plus
``n_images``, ``images_per_s``, ``images_per_batch``, ``time_ms``, ``plain_time_ms``, ``repeats``). Also
``noise_time_ms``, the time to draw just the loop's noise (``noise_images`` noise images), and ``noise_bound``
= plain / (plain + noise): about the highest ratio the loop could reach if adding, counting and the Python loop
were free (itself a timing, so it carries the same few percent of noise). Times are medians of ``repeats`` runs
after one warm-up, the three measurements alternating, with ``torch.cuda.synchronize`` around each on a GPU.
Weights are random with a fixed seed (throughput does not depend on training).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from stablenet.smoothing.sampling import batch_plan, chunk_plan, class_counts, make_generator

__all__ = [
    "HEADER",
    "SmoothingCase",
    "bench_smoothing",
    "cifar_cnn",
    "default_cases",
    "format_row",
    "mnist_mlp",
    "resnet110",
]


def cifar_cnn(num_classes: int = 10, width: int = 32) -> nn.Sequential:
    """A small CIFAR-shaped CNN: three 3×3 convolutions (two strided), a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * 8 * 8, num_classes),
    )


def mnist_mlp(num_classes: int = 10, width: int = 256) -> nn.Sequential:
    """A small MNIST MLP: 784 → width → width → classes."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, num_classes),
    )


@dataclass(frozen=True)
class SmoothingCase:
    """One benchmark case: a model factory, its input shape, and the sampling sizes.

    Attributes:
        name: the row's ``model``.
        make_model: builds the (untrained) base model.
        input_shape: ``(C, H, W)`` of one image.
        n: noisy samples per image.
        n_images: images certified together.
        batch_size: rows per forward pass.
        num_classes: outputs of the model.
    """

    name: str
    make_model: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    n: int
    n_images: int
    batch_size: int = 1000
    num_classes: int = 10


def resnet110(num_classes: int = 10) -> nn.Module:
    """Cohen et al.'s CIFAR-10 base model: the depth-110 CIFAR ResNet (1.7 M parameters)."""
    from stablenet.models.resnet import cifar_resnet

    return cifar_resnet(num_classes, 3, (32, 32), mean=(0.0,) * 3, std=(1.0,) * 3, depth=110)


def default_cases(quick: bool = False, batch_size: int = 1000, gpu: bool = False) -> list[SmoothingCase]:
    """The standard cases (see the module docstring); ``quick`` shrinks ``n`` and the image count.

    ``gpu`` adds the ResNet-110 case (too slow for a CPU: about 25 TFLOP per certified image).
    """
    heavy = [SmoothingCase("resnet110", resnet110, (3, 32, 32), n=100_000, n_images=1, batch_size=batch_size)]
    return (heavy if gpu and not quick else []) + [
        SmoothingCase(
            "cifar_cnn", cifar_cnn, (3, 32, 32), n=10_000 if quick else 100_000, n_images=1, batch_size=batch_size
        ),
        SmoothingCase("mnist_mlp", mnist_mlp, (1, 28, 28), n=100, n_images=50 if quick else 500, batch_size=batch_size),
    ]


def _median_seconds(fns: list[Callable[[], object]], repeats: int, device: torch.device) -> list[float]:
    """Median seconds of each function; the functions alternate within each repeat, so drift hits all alike."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns:
        fn()  # warm-up: kernel selection, allocator, lazy initialisation
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times, strict=True):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _run_case(case: SmoothingCase, device: torch.device, repeats: int, seed: int, sigma: float) -> dict:
    torch.manual_seed(seed)
    model = case.make_model().to(device).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((case.n_images, *case.input_shape), generator=g).to(device)
    noise_gen = make_generator(seed, device)
    total = case.n * case.n_images

    def certify_loop() -> None:
        class_counts(model, x, case.n, sigma, case.num_classes, case.batch_size, noise_gen)

    # The reference: the same model on the same number of rows, in full batches already on the device.
    plain_batch = torch.rand((case.batch_size, *case.input_shape), generator=g).to(device)
    n_batches = -(-total // case.batch_size)

    @torch.no_grad()
    def plain_forward() -> None:
        for _ in range(n_batches):
            model(plain_batch)

    # The noise the loop must draw: reps noise images per forward pass (Note [noise layout]), drawn for k passes
    # at once (Note [noise chunks]).
    plan = batch_plan(case.n_images, case.n, case.batch_size)
    chunks = chunk_plan(case.n_images, case.n, case.batch_size, x[0].numel() * x.element_size(), device)

    def draw_noise() -> None:
        for _, _, reps, k, _ in chunks:
            torch.randn((k, 1, reps, *case.input_shape), generator=noise_gen, device=device)

    t_loop, t_plain, t_noise = _median_seconds([certify_loop, plain_forward, draw_noise], repeats, device)
    samples_per_s = total / t_loop
    plain_samples_per_s = n_batches * case.batch_size / t_plain
    images_per_batch = plan[0][1]
    return {
        "model": case.name,
        "n": case.n,
        "batch_size": case.batch_size,
        "samples_per_s": samples_per_s,
        "plain_samples_per_s": plain_samples_per_s,
        "ratio": samples_per_s / plain_samples_per_s,
        "device": str(device),
        "n_images": case.n_images,
        "images_per_s": case.n_images / t_loop,
        "images_per_batch": images_per_batch,
        "time_ms": t_loop * 1e3,
        "plain_time_ms": t_plain * 1e3,
        "noise_time_ms": t_noise * 1e3,
        "noise_images": sum(k * reps for _, _, reps, k, _ in chunks),
        "noise_bound": t_plain / (t_plain + t_noise),
        "repeats": repeats,
    }


#: Column titles matching :func:`format_row`.
HEADER = f"{'model':12s} {'n':>8s} {'batch':>6s} {'samples/s':>12s} {'plain/s':>12s} {'ratio':>7s} {'noise bound':>11s}"


def format_row(row: dict) -> str:
    """One row as a table line under :data:`HEADER`."""
    return (
        f"{row['model']:12s} {row['n']:8d} {row['batch_size']:6d} {row['samples_per_s']:12.4g} "
        f"{row['plain_samples_per_s']:12.4g} {row['ratio']:7.3f} {row['noise_bound']:11.3f}"
    )


def bench_smoothing(
    *,
    quick: bool = False,
    device: str | torch.device = "cpu",
    repeats: int | None = None,
    cases: list[SmoothingCase] | None = None,
    sigma: float = 0.25,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Run the benchmark and return its rows (see the module docstring).

    Args:
        quick: smaller ``n`` and fewer images (default cases only) and 3 repeats instead of 5.
        device: where to run.
        repeats: timed repeats per measurement (median reported).
        cases: replaces :func:`default_cases` (e.g. smaller sizes in tests).
        sigma: noise level (does not affect throughput).
        seed: weights, inputs and noise.
        progress: called with one line per finished case.
    """
    device = torch.device(device)
    repeats = repeats or (3 if quick else 5)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    rows = []
    for case in cases if cases is not None else default_cases(quick, gpu=device.type == "cuda"):
        row = _run_case(case, device, repeats, seed, sigma)
        rows.append(row)
        if progress is not None:
            progress(
                f"{row['model']:12s} n={row['n']:<7d} {row['samples_per_s']:11.4g} samples/s, "
                f"plain {row['plain_samples_per_s']:11.4g}/s, ratio {row['ratio']:.3f}"
            )
    return rows
