r"""Curvature of a trained run's loss: the Hessian's spectrum and a loss-landscape slice.

Both look at the mean cross-entropy over the first ``num_examples`` test images of the data set the run was
trained on, in eval mode,

.. math::

    L(w) = \frac{1}{N} \sum_{i=1}^{N} \operatorname{CE}(f_w(x_i), y_i),

:func:`hessian_report` through the Hessian :math:`\nabla^2 L(w)` over all trainable parameters
(:class:`stablenet.curvature.hessian.Hessian`), :func:`landscape_report` through :math:`L` on a line or plane
of filter-normalised random directions (Li et al. 2018, :mod:`stablenet.curvature.landscape`). They are what
``stablenet hessian`` and ``stablenet landscape`` run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional

from stablenet.curvature.hessian import STARTS, Hessian
from stablenet.curvature.landscape import (
    Landscape,
    landscape_1d,
    landscape_2d,
    plot_landscape_1d,
    plot_landscape_contour,
    plot_landscape_surface,
)
from stablenet.models.persistence import LoadedRun, load_run, read_model_metadata

__all__ = ["LandscapeReport", "hessian_report", "landscape_report"]


def _test_batches(
    run_dir: str | os.PathLike, num_examples: int, batch_size: int, data_root: str | None, device: torch.device
) -> tuple[LoadedRun, list[tuple[Tensor, Tensor]]]:
    """The run (model on ``device``) and its first ``num_examples`` test images in batches on ``device``."""
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1; got {num_examples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if "dataset" not in read_model_metadata(run_dir):
        raise ValueError(f"checkpoint {run_dir} does not name its data set, so there are no test images to use")
    run = load_run(run_dir, "test", data_root, map_location=device)
    x, y = run.images[:num_examples].to(device), run.labels[:num_examples].to(device)
    return run, [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def hessian_report(
    run_dir: str | os.PathLike,
    *,
    top_k: int = 1,
    method: str = "lanczos",
    tol: float = 1e-3,
    max_iter: int = 100,
    start: str = "gradient",
    trace: bool = False,
    trace_samples: int = 100,
    density: bool = False,
    density_runs: int = 10,
    density_steps: int = 50,
    num_examples: int = 1000,
    batch_size: int = 256,
    data_root: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """The top eigenvalues of a run's loss Hessian, optionally its trace and spectral density, as a JSON record.

    Args:
        run_dir: the run directory (holding ``model.safetensors``).
        top_k, method, tol, max_iter, start: of :meth:`Hessian.eigenvalues`.
        trace, trace_samples: also Hutchinson's trace estimate with its standard error (Rademacher vectors).
        density, density_runs, density_steps: also the spectral density by stochastic Lanczos quadrature.
        num_examples, batch_size: the first test images used, and how many per forward pass.
        data_root: the directory holding the data set files.
        device: where the model and images go.
        seed: seeds one generator that draws, in turn, the eigensolver's, the trace's and the density's vectors.

    Returns:
        ``run, dataset, split, num_examples, num_parameters, loss, seed, method, tol, start, top_eigenvalues,
        eigen_num_hvp, eigen_converged, eigen_time_s``, and ``trace`` and ``density`` records when asked for
        (each with its options and its ``time_s``).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1; got {top_k}")
    if start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(STARTS)}; got {start!r}")
    if trace and trace_samples < 2:
        raise ValueError(f"trace_samples must be >= 2 (for a standard error); got {trace_samples}")
    if density and (density_runs < 1 or density_steps < 1):
        raise ValueError(f"density_runs and density_steps must be >= 1; got {density_runs}, {density_steps}")
    run, batches = _test_batches(run_dir, num_examples, batch_size, data_root, torch.device(device))
    hessian = Hessian(run.model, functional.cross_entropy, batches)
    generator = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    values, _ = hessian.eigenvalues(
        k=top_k, method=method, max_iter=max_iter, tol=tol, generator=generator, start=start
    )
    record: dict[str, Any] = {
        "run": str(run_dir),
        "dataset": run.metadata["dataset"],
        "split": "test",
        "num_examples": sum(len(x) for x, _ in batches),
        "num_parameters": hessian.dim,
        "loss": "cross_entropy",
        "seed": seed,
        "method": method,
        "tol": tol,
        "start": start,
        "top_eigenvalues": [float(v) for v in values],
        "eigen_num_hvp": hessian.last_num_hvp,
        "eigen_converged": bool(getattr(hessian.last_result, "converged", True)),
        "eigen_time_s": time.perf_counter() - t0,
    }
    if trace:
        t0 = time.perf_counter()
        estimate, se = hessian.trace(num_samples=trace_samples, generator=generator)
        record["trace"] = {
            "estimate": estimate,
            "standard_error": se,
            "num_samples": trace_samples,
            "time_s": time.perf_counter() - t0,
        }
    if density:
        t0 = time.perf_counter()
        grid, curve = hessian.density(num_runs=density_runs, num_steps=density_steps, generator=generator)
        record["density"] = {
            "grid": grid.tolist(),
            "density": curve.tolist(),
            "num_runs": density_runs,
            "num_steps": density_steps,
            "num_hvp": hessian.last_num_hvp,
            "time_s": time.perf_counter() - t0,
        }
    return record


@dataclass(frozen=True)
class LandscapeReport:
    """What :func:`landscape_report` computed and wrote.

    Attributes:
        landscape: the slice (its ``computed`` points are the new ones; the rest came from ``grid``).
        grid: the resumable ``landscape.npz``.
        plots: the PNG files.
        model, dataset: the run's model name and data set.
        num_examples: the test images used.
        time_s: the wall time of the scan and the plots.
    """

    landscape: Landscape
    grid: Path
    plots: list[Path]
    model: str
    dataset: str
    num_examples: int
    time_s: float


def landscape_report(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dims: int = 2,
    resolution: int | None = None,
    span: float = 1.0,
    num_examples: int = 1000,
    batch_size: int = 256,
    data_root: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> LandscapeReport:
    """Scan a run's loss on a line (``dims=1``) or plane (``dims=2``) around its weights and plot it under ``out``.

    Writes ``out/landscape.npz`` (resumable: a rerun computes only the points missing) and ``landscape_1d.png``,
    or ``landscape_2d_contour.png`` and ``landscape_2d_surface.png``. ``resolution`` points per axis (default 51
    for a line, 21 for a plane) with coefficients from ``-span`` to ``span``; ``seed`` draws the directions.
    """
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2; got {dims}")
    resolution = resolution if resolution is not None else (51 if dims == 1 else 21)
    if resolution < 2:
        raise ValueError(f"resolution must be >= 2; got {resolution}")
    if not span > 0:
        raise ValueError(f"span must be > 0; got {span}")
    run, batches = _test_batches(run_dir, num_examples, batch_size, data_root, torch.device(device))
    out = Path(out)
    grid = out / "landscape.npz"
    common = {"generator": torch.Generator().manual_seed(seed), "checkpoint": grid, "progress": progress}
    t0 = time.perf_counter()
    if dims == 1:
        result = landscape_1d(run.model, nn.CrossEntropyLoss(), batches, steps=resolution, span=span, **common)
        plots = [plot_landscape_1d(result, out / "landscape_1d.png")]
    else:
        result = landscape_2d(run.model, nn.CrossEntropyLoss(), batches, resolution=resolution, span=span, **common)
        plots = [
            plot_landscape_contour(result, out / "landscape_2d_contour.png"),
            plot_landscape_surface(result, out / "landscape_2d_surface.png"),
        ]
    return LandscapeReport(
        landscape=result,
        grid=grid,
        plots=plots,
        model=run.metadata["model"],
        dataset=run.metadata["dataset"],
        num_examples=sum(len(x) for x, _ in batches),
        time_s=time.perf_counter() - t0,
    )
