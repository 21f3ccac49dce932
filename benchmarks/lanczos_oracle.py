"""How many Lanczos steps the curvature benchmark's top eigenvalue needs, with an oracle stopping rule.

The issue-6 target (top Hessian eigenvalue at relative tolerance 1e-3 in at most 12 gradient-equivalents) is
measured by `stablenet bench curvature` on `lenet` with a batch of 256 images. This script runs the same Lanczos
process (same model, batch and starting vectors) step by step, from each of the Hessian's starting vectors
(`start="gradient"`, the default, and `start="random"`), and prints per step the top Ritz value, its error
relative to the tight reference (Lanczos to tol 1e-8), the residual estimate and the error estimate of
Note [residual stopping rule]. The first step whose error is at most 1e-3 is the fewest products any stopping
rule could use; the step where `lanczos_eigsh` stops is marked.

Usage: PYTHONPATH=src python benchmarks/lanczos_oracle.py [STEPS] [random|mnist]
(`mnist` trains lenet as `bench curvature --data mnist` does; it needs the MNIST files, e.g. STABLENET_DATA).
"""

from __future__ import annotations

import json
import sys

import torch
from torch.nn import functional

from stablenet.bench.curvature import _REFERENCE_TOL, _data, _mnist, _seeded, _train_briefly, default_sizes
from stablenet.bench.provenance import provenance
from stablenet.curvature import Hessian
from stablenet.curvature.hessian import STARTS
from stablenet.curvature.lanczos import _error_estimate, _lanczos_steps, lanczos_eigsh, tridiagonal_eigh
from stablenet.models import create_model

TOL = 1e-3


def main(steps: int = 16, data: str = "random", seed: int = 0) -> None:
    print("provenance:", json.dumps(provenance(device="cpu")))
    sizes = default_sizes()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = create_model("lenet", 10, 1, sizes.input_size, width=sizes.width, hidden=sizes.hidden).eval()
    if data == "mnist":
        _train_briefly(model, seed, torch.device("cpu"))
        batch = _mnist(sizes.batch_size, torch.device("cpu"))
    else:
        batch = _data(sizes.batch_size, sizes.input_size, generator, "cpu")
    hessian = Hessian(model, functional.cross_entropy, batch)
    reference = float(hessian.eigenvalues(k=1, tol=_REFERENCE_TOL, generator=_seeded(seed + 1))[0][0])
    print(f"data {data}; reference top eigenvalue {reference:.6f} (tol {_REFERENCE_TOL:g})")
    for start in STARTS:
        with hessian._cached_graphs():
            v0 = hessian._start_vector(hessian._space, start, _seeded(seed + 1))
            matvec = hessian._matvec(hessian._space)
            stop = lanczos_eigsh(matvec, hessian.dim, 1, max_iter=steps, tol=TOL, v0=v0).num_matvec
            first = None
            print(f"start={start} (lanczos_eigsh at tol {TOL:g} stops after {stop} products)")
            for alpha, beta, _, residual, _ in _lanczos_steps(
                matvec, v0, steps, reorthogonalize=True, restart=True, generator=_seeded(seed + 2)
            ):
                theta, s = tridiagonal_eigh(alpha, beta)
                ritz, s = theta.flip(0), s.flip(1)
                top, error = float(ritz[0]), abs(reference - float(ritz[0])) / abs(reference)
                if first is None and error <= TOL:
                    first = alpha.numel()
                r = residual * s[-1, :1].abs()
                estimate = float(_error_estimate(ritz, r, 1)[0]) / abs(top)
                mark = "  <- stops" if alpha.numel() == stop else ""
                print(
                    f"  step {alpha.numel():2d}: Ritz {top:.6f}  relative error {error:.2e}  "
                    f"residual {float(r[0]):.2e}  relative error estimate {estimate:.2e}{mark}"
                )
            print(f"  fewest products reaching {TOL:g}: {first}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16, sys.argv[2] if len(sys.argv) > 2 else "random")
