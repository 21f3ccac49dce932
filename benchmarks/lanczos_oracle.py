"""How many Lanczos steps the curvature benchmark's top eigenvalue needs, with an oracle stopping rule.

The issue-6 target (top Hessian eigenvalue at relative tolerance 1e-3 in at most 12 gradient-equivalents) is
measured by `stablenet bench curvature` on `lenet` with a batch of 256 random images. This script runs the same
Lanczos process (same model, batch and starting vector) step by step and prints, per step, the top Ritz value,
its error relative to the tight reference (Lanczos to tol 1e-8) and the residual estimate: the first step whose
error is at most 1e-3 is the fewest products any stopping rule could use.

Usage: PYTHONPATH=src python benchmarks/lanczos_oracle.py [STEPS]
"""

from __future__ import annotations

import sys

import torch
from torch.nn import functional

from stablenet.bench.curvature import _REFERENCE_TOL, _data, _seeded, default_sizes
from stablenet.curvature import Hessian
from stablenet.curvature.lanczos import _lanczos_steps, tridiagonal_eigh
from stablenet.models import create_model


def main(steps: int = 16, seed: int = 0) -> None:
    sizes = default_sizes()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = create_model("lenet", 10, 1, sizes.input_size, width=sizes.width, hidden=sizes.hidden).eval()
    hessian = Hessian(model, functional.cross_entropy, _data(sizes.batch_size, sizes.input_size, generator, "cpu"))
    reference = float(hessian.eigenvalues(k=1, tol=_REFERENCE_TOL, generator=_seeded(seed + 1))[0][0])
    start = _seeded(seed + 1)
    v0 = torch.randn(hessian.dim, generator=start, dtype=torch.float64)
    print(f"reference top eigenvalue {reference:.6f} (tol {_REFERENCE_TOL:g})")
    first = None
    for alpha, beta, _, residual in _lanczos_steps(
        hessian.hvp, v0, steps, reorthogonalize=True, restart=True, generator=start
    ):
        theta, s = tridiagonal_eigh(alpha, beta)
        top, error = float(theta[-1]), abs(reference - float(theta[-1])) / abs(reference)
        if first is None and error <= 1e-3:
            first = alpha.numel()
        estimate = float(residual * s[-1, -1].abs())
        print(f"step {alpha.numel():2d}: Ritz {top:.6f}  relative error {error:.2e}  residual {estimate:.2e}")
    print(f"fewest products reaching 1e-3: {first}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16)
