"""``stablenet hessian`` and ``landscape``: the curvature of a trained run's loss."""

from __future__ import annotations

from dataclasses import dataclass

from stablenet.atomic import atomic_write_json
from stablenet.cli.command import DATA_ROOT_HELP, DEVICE_HELP, RUN_HELP, Command, option, pick, quiet_option
from stablenet.train.trainer import resolve_device
from stablenet.workflows.curvature import hessian_report, landscape_report

__all__ = ["COMMANDS", "HessianArgs", "LandscapeArgs", "hessian_command", "landscape_command"]


@dataclass(frozen=True, kw_only=True)
class HessianArgs:
    """``stablenet hessian``: :func:`stablenet.workflows.hessian_report`, written to ``json``."""

    run: str = option(help=RUN_HELP)
    top_k: int = option(1, help="number of top eigenvalues (default 1)")
    method: str = option("lanczos", help="eigenvalue method: lanczos or power (default lanczos)")
    tol: float = option(1e-3, help="relative error estimate that stops the eigensolver (1e-3)")
    max_iter: int = option(100, help="eigensolver products at most (default 100)")
    start: str = option("gradient", help="eigensolver start: gradient (plus a random vector; default) or random")
    trace: bool = option(False, help="also estimate the trace (Hutchinson, Rademacher)")
    trace_samples: int = option(100, help="Hutchinson samples (default 100)")
    density: bool = option(False, help="also estimate the spectral density (SLQ)")
    density_runs: int = option(10, help="SLQ runs (default 10)")
    density_steps: int = option(50, help="Lanczos steps per SLQ run (default 50)")
    num_examples: int = option(1000, help="test images used (default 1000)")
    batch_size: int = option(256, help="examples per forward pass (default 256)")
    data_root: str | None = option(None, help=DATA_ROOT_HELP)
    device: str = option("auto", help=DEVICE_HELP)
    seed: int = option(0, help="seed of the random vectors (default 0)")
    json: str = option(help="write the results to this JSON file")
    quiet: bool = quiet_option()


def hessian_command(args: HessianArgs) -> int:
    options = pick(args, "top_k", "method", "tol", "max_iter", "start", "trace", "trace_samples", "density")
    options |= pick(args, "density_runs", "density_steps", "num_examples", "batch_size", "data_root", "seed")
    record = hessian_report(args.run, device=resolve_device(args.device), **options)
    n, products = record["num_examples"], record["eigen_num_hvp"]
    print(f"top eigenvalues ({record['method']}, {products} Hessian-vector products, {n} test images):")
    for i, v in enumerate(record["top_eigenvalues"], start=1):
        print(f"  lambda_{i} = {v:.6g}")
    if "trace" in record:
        trace = record["trace"]
        estimate, se = trace["estimate"], trace["standard_error"]
        print(f"trace (Hutchinson, {trace['num_samples']} samples): {estimate:.6g} ± {se:.3g}")
    if "density" in record:
        grid = record["density"]["grid"]
        print(f"spectral density (SLQ): {len(grid)} points on [{grid[0]:.4g}, {grid[-1]:.4g}]")
    print(f"hessian: {atomic_write_json(args.json, record)}")
    return 0


@dataclass(frozen=True, kw_only=True)
class LandscapeArgs:
    """``stablenet landscape``: :func:`stablenet.workflows.landscape_report`."""

    run: str = option(help=RUN_HELP)
    dims: int = option(2, help="1 (a line) or 2 (a grid; default)")
    resolution: int | None = option(None, help="points per axis (default 51 for 1-D, 21 for 2-D)")
    span: float = option(1.0, help="coefficients run from -SPAN to SPAN (default 1.0)")
    num_examples: int = option(1000, help="test images used (default 1000)")
    batch_size: int = option(256, help="examples per forward pass (default 256)")
    data_root: str | None = option(None, help=DATA_ROOT_HELP)
    device: str = option("auto", help=DEVICE_HELP)
    seed: int = option(0, help="seed of the random directions (default 0)")
    out: str = option(help="output directory")
    quiet: bool = quiet_option()


def landscape_command(args: LandscapeArgs) -> int:
    report = landscape_report(
        args.run,
        args.out,
        device=resolve_device(args.device),
        progress=not args.quiet,
        **pick(args, "dims", "resolution", "span", "num_examples", "batch_size", "data_root", "seed"),
    )
    landscape = report.landscape
    print(
        f"{args.dims}-D landscape of {report.model} on {report.num_examples} {report.dataset} test images: "
        f"{landscape.computed} new points of {landscape.loss.size} in {report.time_s:.1f} s"
    )
    print(f"loss from {float(landscape.loss.min()):.4g} to {float(landscape.loss.max()):.4g}")
    print(f"grid: {report.grid}")
    for path in report.plots:
        print(f"plot: {path}")
    return 0


COMMANDS = (
    Command(
        "hessian",
        HessianArgs,
        hessian_command,
        help="top eigenvalues, trace and spectral density of a run's loss Hessian",
        description="Hessian of the mean cross-entropy over the first N test images of a run's data set, with "
        "respect to all trainable parameters (eval mode): top eigenvalues by Lanczos, optionally Hutchinson's "
        "trace with its standard error and the spectral density by stochastic Lanczos quadrature.",
    ),
    Command(
        "landscape",
        LandscapeArgs,
        landscape_command,
        help="loss-landscape slice of a run along filter-normalised random directions (Li et al. 2018)",
        description="Mean cross-entropy and accuracy on the first N test images at w + a d1 (+ b d2), d1 and d2 "
        "random Gaussian directions normalised filter by filter (biases and BatchNorm left out). Writes "
        "OUT/landscape.npz (alphas, betas, loss, accuracy; resumable: a rerun skips the points done) and "
        "landscape_1d.png, or landscape_2d_contour.png and landscape_2d_surface.png.",
    ),
)
