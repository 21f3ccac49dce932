"""Micro-measurements behind three speed-ups of the layer zoo (this CPU; one thread; medians of repeats).

1. MaxMin: a MaxMin CNN forward (``lipconvnet``, batch 256, 28×28) with pairs sorted (the former implementation,
   ``GroupSort`` on pairs via ``sort``) against the elementwise max/min of ``MaxMin`` now.
2. Eval cache: per-call time of ``AOLConv2d`` in eval mode against ``nn.Conv2d`` on a tiny input (the difference
   is the cache check).
3. Conv Gram kernel in float64 (128×128×3×3, forward + backward): ``conv2d`` cross-correlation against the
   batched GEMM of ``stablenet.spectral.rescaling.conv_gram_kernel``.

Usage: PYTHONPATH=src python benchmarks/zoo_micro.py
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import stablenet.nn as snn
from stablenet.bench.provenance import provenance
from stablenet.models import create_model
from stablenet.spectral.rescaling import conv_gram_kernel


def median_ms(fn: Callable[[], object], repeats: int, inner: int = 1) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times) * 1e3


class SortedPairs(nn.Module):
    """The former MaxMin: a descending sort of each pair."""

    def forward(self, x: Tensor) -> Tensor:
        grouped = x.unflatten(1, (x.shape[1] // 2, 2))
        return grouped.sort(dim=2, descending=True).values.flatten(1, 2)


def conv_gram_reference(kernel: Tensor) -> Tensor:
    """The Gram kernel as one conv2d cross-correlation (the former implementation, groups = 1)."""
    kh, kw = kernel.shape[-2:]
    return F.conv2d(kernel, kernel, padding=(kh - 1, kw - 1))


def main() -> None:
    print("provenance:", json.dumps(provenance(device="cpu")))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = create_model("lipconvnet", 10, 1, (28, 28)).eval()
    x = torch.rand(256, 1, 28, 28)
    with torch.no_grad():
        t_new = median_ms(lambda: net(x), 5)
        for module in list(net.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, snn.MaxMin):
                    setattr(module, child_name, SortedPairs())
        t_old = median_ms(lambda: net(x), 5)
    print(f"lipconvnet forward, batch 256: sorted pairs {t_old:.1f} ms, max/min {t_new:.1f} ms ({t_old / t_new:.2f}x)")

    small = torch.randn(1, 4, 4, 4)
    aol, plain = snn.AOLConv2d(4, 4, 3, padding=1).eval(), nn.Conv2d(4, 4, 3, padding=1).eval()
    with torch.no_grad():
        t_aol = median_ms(lambda: aol(small), 7, inner=2000) * 1e3
        t_plain = median_ms(lambda: plain(small), 7, inner=2000) * 1e3
    print(f"eval call on a 1x4x4x4 input: AOLConv2d {t_aol:.1f} us, nn.Conv2d {t_plain:.1f} us")

    kernel = torch.randn(128, 128, 3, 3, dtype=torch.float64, requires_grad=True)
    same = torch.allclose(conv_gram_kernel(kernel)[0], conv_gram_reference(kernel), rtol=1e-12, atol=1e-10)
    t_conv = median_ms(lambda: conv_gram_reference(kernel).abs().sum().backward(), 5)
    t_gemm = median_ms(lambda: conv_gram_kernel(kernel).abs().sum().backward(), 5)
    print(
        f"float64 Gram kernel 128x128x3x3, forward + backward: conv2d {t_conv:.0f} ms, GEMM {t_gemm:.0f} ms "
        f"({t_conv / t_gemm:.2f}x; equal: {same})"
    )


if __name__ == "__main__":
    main()
