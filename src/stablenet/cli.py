"""The ``stablenet`` command: thin subcommands over library calls.

Errors in user input print one line (``stablenet: error: ...``) and exit with status 2. Set
``STABLENET_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

EXIT_USAGE = 2


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or info logs")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stablenet", description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        allow_abbrev=False,
        help="train a model from a YAML config",
        description="Train from a YAML config; any config key can be overridden with --key value "
        "(e.g. --epochs 5 --model_args.width 256 --out runs/x).",
    )
    p.add_argument("-c", "--config", help="YAML config file (default: built-in defaults)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    _add_quiet(p)

    p = sub.add_parser("certify", allow_abbrev=False, help="certify a trained run, one JSON record per example")
    p.add_argument("--run", required=True, help="run directory (holding model.safetensors)")
    p.add_argument("--method", default="lipschitz", help="lipschitz, smoothing (Cohen et al.), lvm-rs or cpm")
    p.add_argument("--sigma", type=float, default=None, help="smoothing noise level (randomized methods)")
    p.add_argument("--n0", type=int, default=100, help="selection samples per image (randomized methods)")
    p.add_argument("--n", type=int, default=100_000, help="estimation samples per image (randomized methods)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability per certificate")
    p.add_argument("--seed", type=int, default=0, help="noise seed (randomized methods)")
    p.add_argument(
        "--noise",
        default="float",
        help="randomized methods: float (torch.randn, the usual practice; default) or grid (the Gaussian rounded to "
        "the pixel grid, drawn exactly: sound for any base model, for inputs on the grid; cpm then uses hard votes)",
    )
    p.add_argument(
        "--levels",
        default=None,
        help="with --noise grid: grid steps per pixel unit, pixels k / LEVELS (default: the data set's, 16 for digits, "
        "255 for mnist, fashion-mnist, cifar10, cifar100)",
    )
    p.add_argument("--form", default="auto", help="Lipschitz certificate form: auto, generic, lln")
    p.add_argument(
        "--arithmetic",
        default="float64",
        choices=("float64", "native"),
        help="what a Lipschitz certificate covers: the network evaluated in float64 (default) or its own dtype's "
        "forward (sound but pessimistic)",
    )
    p.add_argument("--out", required=True, help="JSON Lines output; existing indices are skipped")
    p.add_argument("--split", default="test", help="data split to certify (train or test)")
    p.add_argument("--data-root", default=None, help="directory holding the data set files")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--skip", type=int, default=0, help="skip the first K examples")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    _add_quiet(p)

    p = sub.add_parser("report", allow_abbrev=False, help="tables and plots from record files")
    p.add_argument("records", nargs="+", help="JSON Lines record files")
    p.add_argument("--out", required=True, help="output directory (report.md, certified_accuracy.png)")
    p.add_argument("--dataset", default=None, help="data set name, to choose the standard radii")
    p.add_argument("--radii", default=None, help="comma-separated radii, e.g. 0.5,1,1.58")
    p.add_argument("--names", default=None, help="comma-separated curve names, one per file")

    p = sub.add_parser(
        "lipschitz",
        allow_abbrev=False,
        help="certified upper and empirical lower bounds on a model's Lipschitz constant",
        description="Bound the l2 Lipschitz constant of a trained run or of a registry model: the certified upper "
        "bound (product of per-layer bounds, listed) and an empirical lower bound from Jacobians at sample inputs.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory (holding model.safetensors); inputs: its test images")
    source.add_argument("--model", help="registry model name (untrained); inputs: uniform random in [0, 1]")
    p.add_argument("--num-classes", type=int, default=10, help="with --model (default 10)")
    p.add_argument("--in-channels", type=int, default=1, help="with --model (default 1)")
    p.add_argument("--input-size", type=int, default=28, help="with --model: image height and width (default 28)")
    p.add_argument("--num-inputs", type=int, default=64, help="inputs for the lower bound (default 64)")
    p.add_argument("--data-root", default=None, help="with --run: directory holding the data set files")
    p.add_argument("--seed", type=int, default=0, help="random seed (untrained weights, inputs, lower bound)")
    p.add_argument("--json", default=None, help="also write the bounds to this JSON file")
    _add_quiet(p)

    p = sub.add_parser(
        "verify",
        allow_abbrev=False,
        help="attack certified predictions; exit 1 if any changed inside its certified radius",
        description="Attack every certified record (PGD in l2 at 0.99 x its radius) and count the predictions "
        "that change. Exit status 0: none changed; 1: some did, which for a deterministic certificate "
        "(lipschitz) is a real failure, a wrong certificate, and for randomized smoothing is strong evidence "
        "of one (an empirical check through the Monte-Carlo expectation); 2: bad input.",
    )
    p.add_argument("--run", required=True, help="run directory (holding model.safetensors)")
    p.add_argument("--records", required=True, help="JSON Lines record file (with its .meta.json sidecar)")
    p.add_argument("--attack", default="pgd", help="attack (pgd)")
    p.add_argument("--restarts", type=int, default=3, help="random restarts per example (default 3)")
    p.add_argument("--steps", type=int, default=50, help="gradient steps per restart (default 50)")
    p.add_argument("--max-examples", type=int, default=None, help="attack at most M certified records")
    p.add_argument("--batch-size", type=int, default=256, help="examples attacked together (default 256)")
    p.add_argument("--data-root", default=None, help="directory holding the data set files")
    p.add_argument(
        "--smoothing-n", type=int, default=None, help="noisy samples of the smoothed predict (default: the records' n)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for random starts and noise (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    _add_quiet(p)

    p = sub.add_parser(
        "hessian",
        allow_abbrev=False,
        help="top eigenvalues, trace and spectral density of a run's loss Hessian",
        description="Hessian of the mean cross-entropy over the first N test images of a run's data set, with "
        "respect to all trainable parameters (eval mode): top eigenvalues by Lanczos, optionally Hutchinson's "
        "trace with its standard error and the spectral density by stochastic Lanczos quadrature.",
    )
    p.add_argument("--run", required=True, help="run directory (holding model.safetensors)")
    p.add_argument("--top-k", type=int, default=1, help="number of top eigenvalues (default 1)")
    p.add_argument("--method", default="lanczos", help="eigenvalue method: lanczos or power (default lanczos)")
    p.add_argument("--tol", type=float, default=1e-3, help="relative error estimate that stops the eigensolver (1e-3)")
    p.add_argument("--max-iter", type=int, default=100, help="eigensolver products at most (default 100)")
    p.add_argument(
        "--start", default="gradient", help="eigensolver start: gradient (plus a random vector; default) or random"
    )
    p.add_argument("--trace", action="store_true", help="also estimate the trace (Hutchinson, Rademacher)")
    p.add_argument("--trace-samples", type=int, default=100, help="Hutchinson samples (default 100)")
    p.add_argument("--density", action="store_true", help="also estimate the spectral density (SLQ)")
    p.add_argument("--density-runs", type=int, default=10, help="SLQ runs (default 10)")
    p.add_argument("--density-steps", type=int, default=50, help="Lanczos steps per SLQ run (default 50)")
    p.add_argument("--num-examples", type=int, default=1000, help="test images used (default 1000)")
    p.add_argument("--batch-size", type=int, default=256, help="examples per forward pass (default 256)")
    p.add_argument("--data-root", default=None, help="directory holding the data set files")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the random vectors (default 0)")
    p.add_argument("--json", required=True, help="write the results to this JSON file")
    _add_quiet(p)

    p = sub.add_parser(
        "landscape",
        allow_abbrev=False,
        help="loss-landscape slice of a run along filter-normalised random directions (Li et al. 2018)",
        description="Mean cross-entropy and accuracy on the first N test images at w + a d1 (+ b d2), d1 and d2 "
        "random Gaussian directions normalised filter by filter (biases and BatchNorm left out). Writes "
        "OUT/landscape.npz (alphas, betas, loss, accuracy; resumable: a rerun skips the points done) and "
        "landscape_1d.png, or landscape_2d_contour.png and landscape_2d_surface.png.",
    )
    p.add_argument("--run", required=True, help="run directory (holding model.safetensors)")
    p.add_argument("--dims", type=int, default=2, help="1 (a line) or 2 (a grid; default)")
    p.add_argument("--resolution", type=int, default=None, help="points per axis (default 51 for 1-D, 21 for 2-D)")
    p.add_argument("--span", type=float, default=1.0, help="coefficients run from -SPAN to SPAN (default 1.0)")
    p.add_argument("--num-examples", type=int, default=1000, help="test images used (default 1000)")
    p.add_argument("--batch-size", type=int, default=256, help="examples per forward pass (default 256)")
    p.add_argument("--data-root", default=None, help="directory holding the data set files")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions (default 0)")
    p.add_argument("--out", required=True, help="output directory")
    _add_quiet(p)

    p = sub.add_parser("bench", allow_abbrev=False, help="benchmarks (timings and tightness as JSON rows)")
    p.add_argument("suite", choices=["spectral", "smoothing", "curvature", "layers"], help="which benchmark")
    p.add_argument("--quick", action="store_true", help="a subset of layers, one repeat")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median reported)")
    p.add_argument("--batch-size", type=int, default=None, help="layers suite only: batch size (default 256)")
    p.add_argument(
        "--data",
        default=None,
        help="curvature suite only: random (default, no download) or mnist (lenet trained briefly, test images)",
    )
    p.add_argument(
        "--families",
        default=None,
        help="layers suite only: comma-separated layer families and/or the model to run (default: all and sll_s)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="spectral suite only: comma-separated method rows to run (default: all; see stablenet.bench.spectral)",
    )
    p.add_argument(
        "--bound-method",
        default=None,
        help="layers suite only: how spectral and CPL layers bound their circular norm: auto (default), cholesky, gram",
    )
    p.add_argument(
        "--spectral-n-iter",
        type=int,
        default=None,
        help="layers suite only: fixed Gram steps of the spectral layers (default: adaptive; fixed ones capture as "
        "CUDA graphs)",
    )
    p.add_argument("--json", default=None, help="write the rows to this JSON Lines file")
    _add_quiet(p)

    p = sub.add_parser("demo", allow_abbrev=False, help="train, certify and report on the bundled digits data")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    _add_quiet(p)
    return parser


def _train(args: argparse.Namespace, extra: list[str]) -> int:
    from stablenet.train.config import load_config, parse_override_args
    from stablenet.train.trainer import CONFIG_FILE, train

    overrides = parse_override_args(extra)
    config_path = args.config
    if args.resume and config_path is None:
        if "out" not in overrides:
            raise ValueError("--resume needs the run directory: pass --out DIR (or -c with the run's config)")
        config_path = Path(str(overrides["out"])) / CONFIG_FILE
    config = load_config(config_path, overrides)
    result = train(config, resume=args.resume, progress=not args.quiet)
    last = result.metrics[-1] if result.metrics else {}
    summary = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k not in ("epoch", "lr", "time_s"))
    print(f"trained {config.model} on {config.dataset}: {summary}")
    print(f"run directory: {result.run_dir}")
    return 0


def _certify(args: argparse.Namespace) -> int:
    from stablenet.train.trainer import resolve_device
    from stablenet.workflows.certification import CERTIFY_METHODS, SMOOTHING_METHODS, SmoothingParams, certify_run

    levels = args.levels
    if levels is not None:  # parsed here, not by argparse, for a one-line error
        try:
            levels = int(levels)
        except ValueError:
            raise ValueError(f"--levels must be an int >= 1; got {args.levels!r}") from None
    smoothing = None
    if args.method in SMOOTHING_METHODS:
        if args.sigma is None:
            raise ValueError(f"--method {args.method} needs --sigma (the noise level the base model was trained for)")
        smoothing = SmoothingParams(
            sigma=args.sigma,
            n0=args.n0,
            n=args.n,
            alpha=args.alpha,
            seed=args.seed,
            noise=args.noise,
            levels=levels,
        )
    elif args.method in CERTIFY_METHODS and (args.noise != "float" or levels is not None):
        raise ValueError(
            f"--noise and --levels apply to the randomized methods ({', '.join(SMOOTHING_METHODS)}); "
            f"got them with --method {args.method}"
        )
    out = certify_run(
        args.run,
        args.out,
        method=args.method,
        smoothing=smoothing,
        form=args.form,
        arithmetic=args.arithmetic,
        split=args.split,
        data_root=args.data_root,
        batch_size=args.batch_size,
        max_examples=args.max_examples,
        skip=args.skip,
        device=resolve_device(args.device),
        progress=not args.quiet,
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports the merged file
        print(f"records: {out}")
    return 0


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, e.g. 0.5,1,1.58; got {text!r}") from None


def _report(args: argparse.Namespace) -> int:
    from stablenet.workflows.report import write_report

    names = args.names.split(",") if args.names else None
    path = write_report(args.records, args.out, radii=_floats(args.radii, "--radii"), dataset=args.dataset, names=names)
    print(f"report: {path}")
    return 0


def _lipschitz(args: argparse.Namespace) -> int:
    import torch

    from stablenet.atomic import atomic_write_json
    from stablenet.spectral.network import layer_lipschitz_bounds, lipschitz_lower_bound, lipschitz_upper_bound

    if args.num_inputs < 1:
        raise ValueError(f"--num-inputs must be >= 1; got {args.num_inputs}")
    generator = torch.Generator().manual_seed(args.seed)
    if args.run is not None:
        from stablenet.data import load_dataset
        from stablenet.train.checkpoint import load_model, read_model_metadata

        meta = read_model_metadata(args.run)
        model = load_model(args.run)
        input_shape = (int(meta["in_channels"]), *(int(s) for s in meta["input_size"]))
        if "dataset" not in meta:
            raise ValueError(f"checkpoint {args.run} does not name its data set; use --model for random inputs")
        inputs = load_dataset(meta["dataset"], "test", root=args.data_root).images[: args.num_inputs]
        source = f"{len(inputs)} {meta['dataset']} test images"
    else:
        from stablenet.models import create_model

        input_shape = (args.in_channels, args.input_size, args.input_size)
        torch.manual_seed(args.seed)  # the untrained model's weights
        model = create_model(args.model, args.num_classes, args.in_channels, args.input_size).eval()
        inputs = torch.rand((args.num_inputs, *input_shape), generator=generator)
        source = f"{len(inputs)} uniform random inputs in [0, 1]"
    layers = layer_lipschitz_bounds(model, input_shape)
    upper = lipschitz_upper_bound(model, input_shape)
    lower = lipschitz_lower_bound(model, inputs, generator=generator)
    print(f"upper bound (certified): {upper:.6g}")
    print(f"lower bound (empirical, {source}): {lower:.6g}")
    width = max([len("layer"), *(len(name) for name, _ in layers)])
    print(f"{'layer':<{width}}  bound")
    for name, bound in layers:
        print(f"{name:<{width}}  {bound:.6g}")
    if args.json is not None:
        record = {
            "upper": upper,
            "lower": lower,
            "layers": [{"name": name, "bound": bound} for name, bound in layers],
            "input_shape": list(input_shape),
        }
        print(f"bounds: {atomic_write_json(args.json, record)}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from stablenet.atomic import atomic_write_json
    from stablenet.train.trainer import resolve_device
    from stablenet.workflows.verification import verify_run

    result = verify_run(
        args.run,
        args.records,
        attack=args.attack,
        restarts=args.restarts,
        steps=args.steps,
        max_examples=args.max_examples,
        device=resolve_device(args.device),
        batch_size=args.batch_size,
        data_root=args.data_root,
        smoothing_n=args.smoothing_n,
        seed=args.seed,
        progress=not args.quiet,
    )
    kind = "empirical check of randomized certificates" if result.empirical else "deterministic certificates"
    print(f"method: {result.method} ({kind})")
    print(f"certified: {result.n_certified} of {result.n_records} records")
    print(f"attacked: {result.n_attacked} (PGD l2, {args.restarts} restarts x {args.steps} steps, 0.99 x radius)")
    print(f"broken: {result.n_broken}")
    if result.broken_indices:
        print(f"broken indices: {', '.join(str(i) for i in result.broken_indices)}")
    if args.json is not None:
        print(f"result: {atomic_write_json(args.json, result.to_dict())}")
    return 0 if result.ok else 1


def _run_test_subset(
    run: str, num_examples: int, batch_size: int, data_root: str | None, device_name: str
) -> tuple[Any, dict[str, Any], list[tuple[Any, Any]]]:
    """The run's model on its device, its metadata, and its first test images in batches on that device."""
    from stablenet.data import load_dataset
    from stablenet.train.checkpoint import load_model, read_model_metadata
    from stablenet.train.trainer import resolve_device

    if num_examples < 1:
        raise ValueError(f"--num-examples must be >= 1; got {num_examples}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {batch_size}")
    device = resolve_device(device_name)
    meta = read_model_metadata(run)
    if "dataset" not in meta:
        raise ValueError(f"checkpoint {run} does not name its data set, so there are no test images to use")
    model = load_model(run, map_location=device)
    data = load_dataset(meta["dataset"], "test", root=data_root)
    x, y = data.images[:num_examples].to(device), data.labels[:num_examples].to(device)
    return model, meta, [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def _curvature_label(row: dict) -> str:
    """A curvature row's method or backend, with its eigensolver start where it has one."""
    label = row.get("method") or row.get("backend") or "-"
    return f"{label}/{row['start']}" if "start" in row else label


def _hessian(args: argparse.Namespace) -> int:
    import torch
    from torch.nn import functional

    from stablenet.atomic import atomic_write_json
    from stablenet.curvature.hessian import STARTS, Hessian

    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1; got {args.top_k}")
    if args.start not in STARTS:
        raise ValueError(f"--start must be one of {', '.join(STARTS)}; got {args.start!r}")
    if args.trace and args.trace_samples < 2:
        raise ValueError(f"--trace-samples must be >= 2 (for a standard error); got {args.trace_samples}")
    if args.density and (args.density_runs < 1 or args.density_steps < 1):
        raise ValueError(
            f"--density-runs and --density-steps must be >= 1; got {args.density_runs}, {args.density_steps}"
        )
    model, meta, batches = _run_test_subset(args.run, args.num_examples, args.batch_size, args.data_root, args.device)
    n = sum(len(x) for x, _ in batches)
    hessian = Hessian(model, functional.cross_entropy, batches)
    generator = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    values, _ = hessian.eigenvalues(
        k=args.top_k, method=args.method, max_iter=args.max_iter, tol=args.tol, generator=generator, start=args.start
    )
    top = [float(v) for v in values]
    record: dict[str, Any] = {
        "run": str(args.run),
        "dataset": meta["dataset"],
        "split": "test",
        "num_examples": n,
        "num_parameters": hessian.dim,
        "loss": "cross_entropy",
        "seed": args.seed,
        "method": args.method,
        "tol": args.tol,
        "start": args.start,
        "top_eigenvalues": top,
        "eigen_num_hvp": hessian.last_num_hvp,
        "eigen_converged": bool(getattr(hessian.last_result, "converged", True)),
        "eigen_time_s": time.perf_counter() - t0,
    }
    print(f"top eigenvalues ({args.method}, {hessian.last_num_hvp} Hessian-vector products, {n} test images):")
    for i, v in enumerate(top, start=1):
        print(f"  lambda_{i} = {v:.6g}")
    if args.trace:
        t0 = time.perf_counter()
        estimate, se = hessian.trace(num_samples=args.trace_samples, generator=generator)
        record["trace"] = {
            "estimate": estimate,
            "standard_error": se,
            "num_samples": args.trace_samples,
            "time_s": time.perf_counter() - t0,
        }
        print(f"trace (Hutchinson, {args.trace_samples} samples): {estimate:.6g} ± {se:.3g}")
    if args.density:
        t0 = time.perf_counter()
        grid, density = hessian.density(num_runs=args.density_runs, num_steps=args.density_steps, generator=generator)
        record["density"] = {
            "grid": grid.tolist(),
            "density": density.tolist(),
            "num_runs": args.density_runs,
            "num_steps": args.density_steps,
            "num_hvp": hessian.last_num_hvp,
            "time_s": time.perf_counter() - t0,
        }
        print(f"spectral density (SLQ): {len(grid)} points on [{float(grid[0]):.4g}, {float(grid[-1]):.4g}]")
    print(f"hessian: {atomic_write_json(args.json, record)}")
    return 0


def _landscape(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    from stablenet.curvature.landscape import (
        landscape_1d,
        landscape_2d,
        plot_landscape_1d,
        plot_landscape_contour,
        plot_landscape_surface,
    )

    if args.dims not in (1, 2):
        raise ValueError(f"--dims must be 1 or 2; got {args.dims}")
    resolution = args.resolution if args.resolution is not None else (51 if args.dims == 1 else 21)
    if resolution < 2:
        raise ValueError(f"--resolution must be >= 2; got {resolution}")
    if not args.span > 0:
        raise ValueError(f"--span must be > 0; got {args.span}")
    model, meta, batches = _run_test_subset(args.run, args.num_examples, args.batch_size, args.data_root, args.device)
    out = Path(args.out)
    grid_path = out / "landscape.npz"
    common = {
        "generator": torch.Generator().manual_seed(args.seed),
        "checkpoint": grid_path,
        "progress": not args.quiet,
    }
    t0 = time.perf_counter()
    if args.dims == 1:
        result = landscape_1d(model, nn.CrossEntropyLoss(), batches, steps=resolution, span=args.span, **common)
        plots = [plot_landscape_1d(result, out / "landscape_1d.png")]
    else:
        result = landscape_2d(model, nn.CrossEntropyLoss(), batches, resolution=resolution, span=args.span, **common)
        plots = [
            plot_landscape_contour(result, out / "landscape_2d_contour.png"),
            plot_landscape_surface(result, out / "landscape_2d_surface.png"),
        ]
    n = sum(len(x) for x, _ in batches)
    print(
        f"{args.dims}-D landscape of {meta['model']} on {n} {meta['dataset']} test images: "
        f"{result.computed} new points of {result.loss.size} in {time.perf_counter() - t0:.1f} s"
    )
    print(f"loss from {float(result.loss.min()):.4g} to {float(result.loss.max()):.4g}")
    print(f"grid: {grid_path}")
    for path in plots:
        print(f"plot: {path}")
    return 0


def _bench_suite(suite: str):
    """``(run, header, format_row)`` of a benchmark suite (imported lazily)."""
    if suite == "smoothing":
        from stablenet.bench.smoothing import bench_smoothing

        header = (
            f"{'model':12s} {'n':>8s} {'batch':>6s} {'samples/s':>12s} {'plain/s':>12s} {'ratio':>7s} "
            f"{'noise bound':>11s}"
        )
        return (
            bench_smoothing,
            header,
            lambda r: (
                f"{r['model']:12s} {r['n']:8d} {r['batch_size']:6d} {r['samples_per_s']:12.4g} "
                f"{r['plain_samples_per_s']:12.4g} {r['ratio']:7.3f} {r['noise_bound']:11.3f}"
            ),
        )
    if suite == "curvature":
        from stablenet.bench.curvature import bench_curvature

        header = f"{'benchmark':16s} {'method':20s} {'model':7s} {'value':>12s} {'time_ms':>11s} {'ratio/grad-eq':>14s}"
        return (
            bench_curvature,
            header,
            lambda r: (
                f"{r['benchmark']:16s} {_curvature_label(r):20s} {r['model']:7s} "
                f"{r['value']:12.6g} {r['time_ms']:11.2f} {r['ratio_or_gradient_equivalents']:14.3f}"
            ),
        )
    if suite == "layers":
        from stablenet.bench.layers import HEADER, bench_layers, format_row

        return bench_layers, HEADER, format_row
    from stablenet.bench.spectral import bench_spectral

    header = f"{'layer':44s} {'method':32s} {'ratio':>9s} {'time_ms':>10s}"
    return (
        bench_spectral,
        header,
        lambda r: f"{r['layer']:44s} {r['method']:32s} {r['ratio']:9.5f} {r['time_ms']:10.2f}",
    )


#: ``stablenet bench`` options that belong to one suite: (argument name, suite).
_SUITE_ONLY_OPTIONS = (
    ("data", "curvature"),
    ("families", "layers"),
    ("methods", "spectral"),
    ("bound_method", "layers"),
    ("spectral_n_iter", "layers"),
)
#: Those given as comma-separated lists.
_LIST_OPTIONS = ("families", "methods")


def _bench(args: argparse.Namespace) -> int:
    from stablenet.bench.spectral import write_rows
    from stablenet.train.trainer import resolve_device

    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1; got {args.repeats}")
    extra = {}
    if args.batch_size is not None:
        if args.suite != "layers" or args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1 and applies to the layers suite only; got {args.batch_size}")
        extra["batch_size"] = args.batch_size
    for name, suite in _SUITE_ONLY_OPTIONS:
        value = getattr(args, name)
        if value is None:
            continue
        if args.suite != suite:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} applies to the {suite} suite only; got it with {args.suite!r}")
        extra[name] = [v.strip() for v in value.split(",") if v.strip()] if name in _LIST_OPTIONS else value
    run, header, format_row = _bench_suite(args.suite)
    rows = run(
        quick=args.quick,
        device=resolve_device(args.device),
        repeats=args.repeats,
        progress=None if args.quiet else lambda line: print(line, flush=True),
        **extra,
    )
    print(header)
    for row in rows:
        print(format_row(row))
    if args.json:
        write_rows(rows, args.json)
        print(f"rows: {args.json}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from stablenet.certify.records import read_records
    from stablenet.workflows.demo import run_demo
    from stablenet.workflows.report import STANDARD_RADII, certified_accuracy

    t0 = time.perf_counter()
    result = run_demo(args.out, progress=not args.quiet)
    records = read_records(result.records)
    radii = STANDARD_RADII["digits"]
    accs = certified_accuracy(records, (0.0, *radii))
    cert = ", ".join(f"{r:g}: {100 * a:.1f}%" for r, a in zip(radii, accs[1:], strict=True))
    print(f"digits test set ({len(records)} images): clean accuracy {100 * accs[0]:.1f}%, certified (l2) {cert}")
    print(f"done in {time.perf_counter() - t0:.1f} s; report: {result.report}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stablenet`` command; returns the exit status."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    commands = {
        "train": lambda: _train(args, extra),
        "certify": lambda: _certify(args),
        "report": lambda: _report(args),
        "lipschitz": lambda: _lipschitz(args),
        "verify": lambda: _verify(args),
        "hessian": lambda: _hessian(args),
        "landscape": lambda: _landscape(args),
        "bench": lambda: _bench(args),
        "demo": lambda: _demo(args),
    }
    try:
        return commands[args.command]()
    except (ValueError, FileNotFoundError, TypeError, FloatingPointError) as e:
        if os.environ.get("STABLENET_DEBUG"):
            raise
        message = " ".join(str(e).split())
        print(f"stablenet: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
