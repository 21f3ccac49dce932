"""Where the adaptive circular Gram iteration spends its time on one device (issue 3 GPU target).

    python benchmarks/gram_gpu_micro.py --device cuda

For the circular spectra (at the zero-padding embedding size) of four ResNet-18 shapes and one 1x1 layer, times
(median of 7, after a warm-up): one batched complex matmul ``G^H G``; the same product as 3 real GEMMs (Gauss) and
as one real GEMM of the 2n x 2n real form; one rescale-and-square step; one pruning check; the whole
``gram_iteration_max``, the previous adaptive ``gram_iteration(tol)`` and a fixed 9-step ``gram_iteration``.
Then a CUDA-kernel profile of ``gram_iteration_max`` on the 512-channel and 64-channel layers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from stablenet.bench.provenance import provenance
from stablenet.bench.spectral import RESNET18_CONVS, _kernel
from stablenet.spectral.conv import _Conv, _embedding_size, _half_spectrum
from stablenet.spectral.dense import gram_iteration
from stablenet.spectral.lockstep import _gram_max_many


def timed(fn, device, repeats=7):
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gauss(a, b):
    ar, ai, br, bi = a.real, a.imag, b.real, b.imag
    t1, t2, t3 = ar @ br, ai @ bi, (ar + ai) @ (br + bi)
    return torch.complex(t1 - t2, t3 - t1 - t2)


def measure(name: str, spec: torch.Tensor, device: torch.device) -> None:
    g = spec.reshape(-1, *spec.shape[-2:]).contiguous()
    g = g if g.shape[-2] >= g.shape[-1] else g.mH.contiguous()
    gram = (g.mH @ g).contiguous()
    n, b = gram.shape[-1], gram.shape[0]
    flops = 8 * b * n**3 if gram.is_complex() else 2 * b * n**3
    t_mm = timed(lambda: gram.mH @ gram, device)
    line = f"{name:20s} batch {b:5d} n {n:4d}  matmul {t_mm:7.3f} ms ({flops / t_mm / 1e9:6.1f} TFLOP/s)"
    if gram.is_complex():
        t_gauss = timed(lambda: gauss(gram, gram), device)
        real2 = torch.cat([torch.cat([gram.real, -gram.imag], -1), torch.cat([gram.imag, gram.real], -1)], -2)
        t_real2 = timed(lambda: real2 @ real2, device)
        t_c64 = timed(lambda: gram.to(torch.complex64) @ gram.to(torch.complex64), device)
        line += f"  gauss {t_gauss:7.3f}  real2n {t_real2:7.3f}  c64(+casts) {t_c64:7.3f}"

    def step():
        c = torch.linalg.matrix_norm(gram, ord="fro")
        h = gram / c[:, None, None]
        return h.mH @ h

    def check():
        column = torch.linalg.vector_norm(gram, dim=-2).argmax(dim=-1)
        x = gram.gather(-1, column[:, None, None].expand(-1, n, 1))
        r = torch.linalg.vector_norm(gram @ x, dim=(-2, -1)) / torch.linalg.vector_norm(x, dim=(-2, -1))
        return torch.stack([r, r]).cpu()

    t_step, t_check = timed(step, device), timed(check, device)
    sizes = _gram_max_many([spec], 14, 1e-5)[0].sizes
    t_max = timed(lambda: _gram_max_many([spec], 14, 1e-5)[0].top, device)
    t_old = timed(lambda: float(gram_iteration(spec, 14, tol=1e-5).amax()), device)
    t_fixed = timed(lambda: float(gram_iteration(spec, 9).amax()), device)
    print(line)
    print(
        f"{'':20s} step {t_step:7.3f}  check {t_check:7.3f}  gram_max {t_max:7.3f} (sizes {sizes})  "
        f"old adaptive {t_old:7.3f}  fixed-9 {t_fixed:7.3f}",
        flush=True,
    )


def spectrum(index: int, device: torch.device) -> torch.Tensor:
    shape = RESNET18_CONVS[index]
    k = _kernel(shape, device, index).double()
    conv = _Conv(k, shape.input_size, "zeros", "same", 1, 1, 1)
    return _half_spectrum(conv.grouped, _embedding_size(conv)) if shape.k > 1 else conv.grouped[..., 0, 0]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    print("provenance:", json.dumps(provenance(device=device)))
    picks = {"layer1.0": 1, "layer2.0": 6, "layer3.0": 11, "layer4.0": 16, "layer4.0.downsample": 19}
    for name, i in picks.items():
        measure(name, spectrum(i, device), device)
    if device.type == "cuda":
        for name in ("layer4.0", "layer1.0"):
            spec = spectrum(picks[name], device)
            _gram_max_many([spec], 14, 1e-5)  # warm-up
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=activities) as prof:
                _gram_max_many([spec], 14, 1e-5)
            print(f"--- profile {name}")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=40))


if __name__ == "__main__":
    main()
