"""How far the lockstep Gram iteration's pruning is from what its upper bounds allow (issue 3, a negative result).

    python benchmarks/gram_pruning_limits.py > benchmarks/results/cpu/gram_pruning_limits.txt

For each of the 20 Kaiming-normal ResNet-18 convolutions (their embedding spectra, as the certified zero-padding
bound uses them), three counts of matrices squared per step, and their cost in matrix products (sum of the batch
sizes times c^3, relative to the current iteration):

* ``gram``: the current iteration (``stablenet.spectral.lockstep._gram_max_many``: lower estimates from the Gram
  iterate's column, pruning from step 4);
* ``oracle``: the same Gram upper bounds, but pruned against the *exact* maximum (float64 eigenvalues) from the
  first step: no lower estimate can prune more;
* ``chebyshev``: a Chebyshev-accelerated iteration, Y <- 2 Y^2 - I on Y_0 = 2 A / c - I with A = W^H W and
  c = (1 - delta) times a 20-step power-iteration estimate (its bound max(c, c (1 + cosh(acosh(||Y_t||_F) / 2^t)) / 2)
  is valid for any c > 0), pruned against its own lower estimates; ``delta`` is the first argument. Its cost
  counts the product forming A and the power steps.

Prints one line per layer and the totals; nothing is certified here (a design study, not a bound).
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import torch

from stablenet.bench.provenance import provenance
from stablenet.bench.spectral import RESNET18_CONVS, resnet18_kernels
from stablenet.spectral.conv import _circular_matrices, _Conv, _embedding_size
from stablenet.spectral.dense import gram_iteration
from stablenet.spectral.lockstep import _gram_max_many


def _chebyshev_sizes(a: torch.Tensor, delta: float, power_steps: int, tol: float) -> tuple[list[int], float]:
    """Batch sizes per Chebyshev step and the largest bound on the top eigenvalue of ``a`` (Hermitian PSD)."""
    n = a.shape[-1]
    v = torch.randn(a.shape[0], n, 1, dtype=a.dtype, generator=torch.Generator().manual_seed(0))
    for _ in range(power_steps):
        v = a @ v
        v = v / torch.linalg.vector_norm(v, dim=(-2, -1), keepdim=True)
    floor = float((v.mH @ a @ v).real.max())
    c = (1 - delta) * floor
    eye = torch.eye(n, dtype=a.dtype)
    y = 2 * a / c - eye
    sizes, top = [], math.inf

    def inverse(f: np.ndarray, degree: float) -> np.ndarray:  # T_N^{-1} on [1, inf), 1 below
        return np.cosh(np.arccosh(np.maximum(f, 1.0)) / degree)

    for t in range(1, 15):
        sizes.append(y.shape[0])
        y = 2 * (y @ y) - eye
        degree = 2.0**t
        upper = c * (1 + inverse(torch.linalg.matrix_norm(y).numpy(), degree)) / 2
        column = y.diagonal(dim1=-2, dim2=-1).real.argmax(-1)
        x = y.gather(-1, column[:, None, None].expand(-1, n, 1))
        ratio = (torch.linalg.vector_norm(y @ x, dim=(-2, -1)) / torch.linalg.vector_norm(x, dim=(-2, -1))).numpy()
        lower = np.where(ratio > 1, c * (1 + inverse(ratio, degree)) / 2, 0.0)
        floor = max(floor, float(lower.max()))
        top = float(upper.max())
        if top <= (1 + 2 * tol) * floor:
            break
        y = y[torch.from_numpy(upper >= (1 - 1e-4) * floor)]
    return sizes, top


def main() -> None:
    delta = float(sys.argv[1]) if len(sys.argv) > 1 else 0.03
    power_steps = 20
    print("provenance:", json.dumps(provenance(device="cpu")))
    print(f"torch {torch.__version__}; chebyshev delta={delta}, {power_steps} power steps")
    totals = {"gram": 0.0, "oracle": 0.0, "chebyshev": 0.0}
    for shape, kernel in zip(RESNET18_CONVS, resnet18_kernels("cpu"), strict=True):
        conv = _Conv(kernel.double(), shape.input_size, "zeros", "same", shape.stride, 1, 1)
        m = _circular_matrices(conv.grouped, _embedding_size(conv))
        m = m.reshape(-1, *m.shape[-2:])
        m = m if m.shape[-2] >= m.shape[-1] else m.mH
        n = m.shape[-1]
        a = m.mH @ m
        exact = float(torch.linalg.eigvalsh(a)[..., -1].max())
        (problem,) = _gram_max_many([m], 14, 1e-5)
        oracle = [len(m)]
        for t in range(1, problem.steps):
            kept = int((gram_iteration(m, t) ** 2 >= exact * (1 - 1e-4)).sum())
            oracle.append(min(kept, oracle[-1]))
        cheb, top = _chebyshev_sizes(a, delta, power_steps, 1e-5)
        assert top >= exact * (1 - 1e-9), (shape.name, top, exact)
        cost = {
            "gram": sum(problem.sizes),
            "oracle": sum(oracle),
            "chebyshev": len(m) + sum(cheb) + power_steps * len(m) / n,
        }
        for key in totals:
            totals[key] += cost[key] * n**3
        oracle_ratio, chebyshev_ratio = cost["oracle"] / cost["gram"], cost["chebyshev"] / cost["gram"]
        ratios = f"oracle/gram {oracle_ratio:.2f}, chebyshev/gram {chebyshev_ratio:.2f}"
        print(f"{shape.name:22s} c={n:3d} batch={len(m):5d} gram={problem.sizes} oracle={oracle} chebyshev={cheb}")
        print(f"{'':22s} cost {ratios}")
    print(
        f"total products relative to gram: oracle {totals['oracle'] / totals['gram']:.3f}, "
        f"chebyshev {totals['chebyshev'] / totals['gram']:.3f}"
    )


if __name__ == "__main__":
    main()
