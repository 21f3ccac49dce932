"""``stablenet bench spectral``: every spectral-norm method on ResNet-18's convolutions and a CIFAR layer.

One JSON row per (method, layer): ``method, layer, shape, padding, input_size, value, reference, ratio,
time_ms, device`` (plus ``n_iter`` and ``peak_mem_mb`` where measured). ``reference`` is the exact value where
computable (circular: FFT + SVD), else the 200-step power iteration (a lower estimate, so ratios against
it overstate the gap). Times are medians of ``repeats`` runs after one warm-up. Kernels are Kaiming-normal
with a fixed seed. Strided layers are measured on their unstrided operator (the bounds ignore stride).
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from stablenet.bench.baselines import araujo_bound, reshaped_kernel_norm, singla_feizi_bound
from stablenet.bench.provenance import write_rows  # defined here before provenance existed; still public here
from stablenet.spectral.conv import conv_spectral_norm, conv_spectral_norm_upper_bound, conv_spectral_norm_upper_bounds

__all__ = [
    "HEADER",
    "METHOD_NAMES",
    "RESNET18_CONVS",
    "ConvShape",
    "bench_spectral",
    "cpu_peak_bytes",
    "format_row",
    "resnet18_bound_time",
    "resnet18_kernels",
    "write_rows",
]


@dataclass(frozen=True)
class ConvShape:
    name: str
    c_out: int
    c_in: int
    k: int
    input_size: int
    stride: int = 1


def _resnet18() -> list[ConvShape]:
    shapes = [ConvShape("conv1", 64, 3, 7, 224, 2)]
    shapes += [ConvShape(f"layer1.{i}", 64, 64, 3, 56) for i in range(4)]
    for stage, (c, n) in enumerate([(128, 28), (256, 14), (512, 7)], start=2):
        shapes.append(ConvShape(f"layer{stage}.0.conv1", c, c // 2, 3, 2 * n, 2))
        shapes += [ConvShape(f"layer{stage}.{i}", c, c, 3, n) for i in range(3)]
        shapes.append(ConvShape(f"layer{stage}.0.downsample", c, c // 2, 1, 2 * n, 2))
    return shapes


RESNET18_CONVS = _resnet18()
CIFAR_LAYER = ConvShape("cifar.64x64@32", 64, 64, 3, 32)


def _kernel(shape: ConvShape, device: torch.device, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    fan_in = shape.c_in * shape.k * shape.k
    w = torch.randn(shape.c_out, shape.c_in, shape.k, shape.k, generator=g) * math.sqrt(2.0 / fan_in)
    return w.to(device)


def _timed(fn: Callable[[], Tensor | float], repeats: int, device: torch.device) -> tuple[float, float]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    value = float(fn())  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        value = float(fn())
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return value, statistics.median(times)


def _certified(
    k64: Tensor, n: int, padding: str, names: dict[str, str]
) -> dict[str, tuple[str, Callable[[], Tensor | float]]]:
    """Rows of ``conv_spectral_norm_upper_bound`` with each named method."""
    return {
        name: (padding, functools.partial(conv_spectral_norm_upper_bound, k64, n, padding=padding, method=method))
        for name, method in names.items()
    }


def _methods(shape: ConvShape, kernel: Tensor, quick: bool) -> dict[str, tuple[str, Callable[[], Tensor | float]]]:
    n = shape.input_size
    k64 = kernel.double()
    methods: dict[str, tuple[str, Callable[[], Tensor | float]]] = {
        "circular_exact": ("circular", lambda: conv_spectral_norm(kernel, n, "circular", method="exact")),
        "circular_gram": ("circular", lambda: conv_spectral_norm(kernel, n, "circular", method="gram")),
        **_certified(
            k64, n, "circular", {"circular_gram_certified": "gram", "circular_cholesky_certified": "cholesky"}
        ),
        "circular_power100": (
            "circular",
            lambda: conv_spectral_norm(kernel, n, "circular", method="power", n_iter=100),
        ),
        **_certified(
            k64,
            n,
            "zeros",
            {
                "zeros_embed_certified": "embed",
                "zeros_embed_svd_certified": "svd",
                "zeros_embed_cholesky_certified": "cholesky",
            },
        ),
        "zeros_embed": ("zeros", lambda: conv_spectral_norm(kernel, n, "zeros", method="embed")),
        "zeros_spatial_gram": ("zeros", lambda: conv_spectral_norm(kernel, n, "zeros", method="gram", n_iter=4)),
        "zeros_power100": ("zeros", lambda: conv_spectral_norm(kernel, n, "zeros", method="power", n_iter=100)),
        "baseline_reshaped_kernel": ("zeros", lambda: reshaped_kernel_norm(kernel)),
        "baseline_singla_feizi": ("zeros", lambda: singla_feizi_bound(kernel)),
        "baseline_araujo": ("zeros", lambda: araujo_bound(kernel)),
    }
    if quick:
        for slow in ("circular_power100", "zeros_power100", "circular_gram_certified"):
            methods.pop(slow)
    return methods


#: Every method row of the benchmark (``bench_spectral(methods=...)``, ``stablenet bench spectral --methods``).
METHOD_NAMES = tuple(_methods(CIFAR_LAYER, torch.zeros(1, 1, 3, 3), quick=False))


def bench_spectral(
    *,
    quick: bool = False,
    device: str | torch.device = "cpu",
    repeats: int | None = None,
    seed: int = 0,
    layers: list[ConvShape] | None = None,
    methods: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Run the benchmark and return its rows (see the module docstring).

    ``methods`` keeps only the named methods (default: all; ``quick`` drops the slow ones). The references
    (exact circular norm, 200-step power iteration) are computed on the CPU in float64, whatever the device.
    """
    device = torch.device(device)
    if methods is not None:
        unknown = sorted(set(methods) - set(METHOD_NAMES))
        if unknown or not methods:
            raise ValueError(f"unknown spectral benchmark methods {unknown}; accepted: {', '.join(METHOD_NAMES)}")
    repeats = repeats or (1 if quick else 5)
    shapes = layers or (
        [*RESNET18_CONVS, CIFAR_LAYER]
        if not quick
        else [
            RESNET18_CONVS[0],
            RESNET18_CONVS[1],
            RESNET18_CONVS[6],
            RESNET18_CONVS[11],
            RESNET18_CONVS[16],
            CIFAR_LAYER,
        ]
    )
    rows: list[dict] = []
    for i, shape in enumerate(shapes):
        kernel = _kernel(shape, device, seed + i)
        k64_cpu = kernel.double().cpu()
        n = shape.input_size
        with torch.no_grad():
            reference = {
                "circular": float(conv_spectral_norm(k64_cpu, n, "circular", method="exact")),
                "zeros": float(
                    conv_spectral_norm(
                        k64_cpu,
                        n,
                        "zeros",
                        method="power",
                        n_iter=200,
                        generator=torch.Generator().manual_seed(seed),
                    )
                ),
            }
            for method, (padding, fn) in _methods(shape, kernel, quick and methods is None).items():
                if methods is not None and method not in methods:
                    continue
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                value, ms = _timed(fn, repeats, device)
                row = {
                    "method": method,
                    "layer": shape.name + (f" (stride {shape.stride}, unstrided operator)" if shape.stride > 1 else ""),
                    "shape": [shape.c_out, shape.c_in, shape.k, shape.k],
                    "padding": padding,
                    "input_size": n,
                    "value": value,
                    "reference": reference[padding],
                    "reference_kind": "exact" if padding == "circular" else "power200_lower_estimate",
                    "ratio": value / reference[padding],
                    "time_ms": ms,
                    "device": str(device),
                }
                if device.type == "cuda":
                    row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                rows.append(row)
                if progress is not None:
                    progress(f"{shape.name:28s} {method:32s} ratio {row['ratio']:.5f}  {ms:9.2f} ms")
    return rows


def resnet18_kernels(device: str | torch.device = "cpu", seed: int = 0) -> list[Tensor]:
    """The benchmark's Kaiming-normal kernels of the 20 ResNet-18 convolutions."""
    return [_kernel(s, torch.device(device), seed + i) for i, s in enumerate(RESNET18_CONVS)]


def cpu_peak_bytes(fn: Callable[[], object]) -> tuple[object, int]:
    """``(fn(), peak)``: the most bytes the CPU allocator held while ``fn`` ran, beyond what it held before (from
    the profiler's memory events; the profiler slows ``fn``, so time it separately)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = prof.profiler.kineto_results.events()
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    return result, max(itertools.accumulate(change for _, change in changes), default=0)


def resnet18_bound_time(
    device: str | torch.device = "cpu",
    method: str = "auto",
    seed: int = 0,
    kernels: list[Tensor] | None = None,
    **options: object,
) -> dict:
    """Time and peak memory (CUDA only) of the certified zero-padding bound over all 20 ResNet-18 convolutions
    (the kernels are drawn before the clock starts; pass ``kernels`` to reuse them). ``options`` go to
    :func:`~stablenet.spectral.conv.conv_spectral_norm_upper_bounds` (e.g. ``max_memory_bytes``)."""
    device = torch.device(device)
    kernels = kernels if kernels is not None else resnet18_kernels(device, seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    problems = [{"kernel": k, "input_size": s.input_size} for k, s in zip(kernels, RESNET18_CONVS, strict=True)]
    values = conv_spectral_norm_upper_bounds(problems, method=method, **options)  # zero padding (the default)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out = {"method": method, "total_ms": (time.perf_counter() - t0) * 1e3, "device": str(device), "values": values}
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


#: Column titles matching :func:`format_row`.
HEADER = f"{'layer':44s} {'method':32s} {'ratio':>9s} {'time_ms':>10s}"


def format_row(row: dict) -> str:
    """One row as a table line under :data:`HEADER`."""
    return f"{row['layer']:44s} {row['method']:32s} {row['ratio']:9.5f} {row['time_ms']:10.2f}"
