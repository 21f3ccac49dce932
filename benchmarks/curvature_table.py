"""Summarise the curvature experiment (benchmarks/curvature_experiment.sh) into table.md and landscapes.png.

Usage: ``curvature_table.py OUT [RUN_PREFIX]`` (default prefix ``runs/mnist_curvature_``; the run of variant
``v`` is ``RUN_PREFIX + v``). Reads, for each variant, the run's metrics.csv, the Lipschitz records,
hessian.json and landscape.npz; writes
OUT/table.md and OUT/landscapes.png (the three 2-D landscapes side by side, one shared colour scale).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from stablenet.atomic import atomic_write, atomic_write_text
from stablenet.certify.records import read_records
from stablenet.workflows.report import certified_accuracy

VARIANTS = {"base": "plain", "ad": "activation decay (λ=0.01)", "sam": "SAM (ρ=0.05)"}
RADII = (0.5, 1.0, 1.58)


def main(out: Path, run_prefix: str = "runs/mnist_curvature_") -> None:
    rows = [
        "| variant | test acc (%) | certified (%) at ε=0.5 / 1.0 / 1.58 | top Hessian eigenvalue | trace ± SE |",
        "|---|---:|---:|---:|---:|",
    ]
    grids = {}
    for key, label in VARIANTS.items():
        with open(f"{run_prefix}{key}/metrics.csv") as f:
            last = list(csv.DictReader(f))[-1]
        records = read_records(out / f"lipschitz_{key}.jsonl")
        cert = certified_accuracy(records, RADII)
        hess = json.loads((out / f"hessian_{key}.json").read_text())
        trace = hess["trace"]
        rows.append(
            f"| {label} | {100 * float(last['test_acc']):.2f} | {' / '.join(f'{100 * c:.1f}' for c in cert)} | "
            f"{hess['top_eigenvalues'][0]:.4g} | {trace['estimate']:.4g} ± {trace['standard_error']:.2g} |"
        )
        grids[label] = np.load(out / f"landscape_{key}" / "landscape.npz")
    atomic_write_text(out / "table.md", "\n".join(rows) + "\n")
    print("\n".join(rows))

    fig = Figure(figsize=(5 * len(grids), 4.4))
    FigureCanvasAgg(fig)
    losses = [np.log10(np.maximum(g["loss"], 1e-12)) for g in grids.values()]
    lo, hi = min(float(v.min()) for v in losses), max(float(v.max()) for v in losses)
    levels = np.linspace(lo, hi, 25)
    for i, ((label, g), z) in enumerate(zip(grids.items(), losses, strict=True)):
        ax = fig.add_subplot(1, len(grids), i + 1)
        keys = set(g.files)
        a = g["alphas"] if "alphas" in keys else np.linspace(-1, 1, z.shape[0])
        b = g["betas"] if "betas" in keys else np.linspace(-1, 1, z.shape[1])
        cs = ax.contourf(a, b, z.T, levels=levels, cmap="viridis")
        ax.set_title(label)
        ax.set_xlabel("direction 1 (filter-normalised)")
        if i == 0:
            ax.set_ylabel("direction 2")
    fig.colorbar(cs, ax=fig.axes, label="log10 test loss (1000 MNIST test images)")
    atomic_write(out / "landscapes.png", lambda f: fig.savefig(f, format="png", dpi=110))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/cpu/curvature"), *sys.argv[2:3])
