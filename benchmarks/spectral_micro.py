"""Why the verified bound writes its Gram matrices into one reused buffer: a GEMM into a fresh 100 MB tensor
pays its page faults, which cost about as much as the GEMM itself.

    python benchmarks/spectral_micro.py > benchmarks/results/cpu/spectral_micro.txt

Shapes: the DFT of the Gram kernel (D = 25 offsets, complex) for the frequencies of ResNet-18 layers at their
embedding sizes (1625 x 64 x 64, 421 x 128 x 128, 113 x 256 x 256). Median of 7 after a warm-up.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from stablenet.bench.provenance import provenance


def median_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    print("provenance:", json.dumps(provenance(device="cpu")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'frequencies x c x c':>22s} {'MB':>6s} {'fresh output ms':>16s} {'reused output ms':>17s}")
    for freqs, c in ((1625, 64), (421, 128), (113, 256)):
        gen = torch.Generator().manual_seed(0)
        phases = torch.polar(
            torch.ones(freqs, 25, dtype=torch.float64), torch.rand(freqs, 25, generator=gen, dtype=torch.float64)
        )
        kernel = torch.randn(25, c * c, dtype=torch.float64, generator=gen).to(torch.complex128)
        out = torch.empty(freqs, c * c, dtype=torch.complex128)
        fresh = median_ms(lambda a=phases, b=kernel: a @ b)
        reused = median_ms(lambda a=phases, b=kernel, o=out: torch.mm(a, b, out=o))
        print(f"{f'{freqs} x {c} x {c}':>22s} {out.numel() * 16 / 2**20:6.0f} {fresh:16.1f} {reused:17.1f}")


if __name__ == "__main__":
    main()
