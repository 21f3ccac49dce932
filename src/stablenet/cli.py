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
    p.add_argument("--form", default="auto", help="Lipschitz certificate form: auto, generic, lln")
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

    p = sub.add_parser("bench", allow_abbrev=False, help="benchmarks (timings and tightness as JSON rows)")
    p.add_argument("suite", choices=["spectral", "smoothing"], help="which benchmark")
    p.add_argument("--quick", action="store_true", help="a subset of layers, one repeat")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median reported)")
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
    from stablenet.certify.run import SMOOTHING_METHODS, SmoothingParams, certify_run
    from stablenet.train.trainer import resolve_device

    smoothing = None
    if args.method in SMOOTHING_METHODS:
        if args.sigma is None:
            raise ValueError(f"--method {args.method} needs --sigma (the noise level the base model was trained for)")
        smoothing = SmoothingParams(sigma=args.sigma, n0=args.n0, n=args.n, alpha=args.alpha, seed=args.seed)
    out = certify_run(
        args.run,
        args.out,
        method=args.method,
        smoothing=smoothing,
        form=args.form,
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
    from stablenet.certify.report import write_report

    names = args.names.split(",") if args.names else None
    path = write_report(args.records, args.out, radii=_floats(args.radii, "--radii"), dataset=args.dataset, names=names)
    print(f"report: {path}")
    return 0


def _lipschitz(args: argparse.Namespace) -> int:
    import torch

    from stablenet.io import atomic_write_json
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
    from stablenet.certify.verify import verify_run
    from stablenet.io import atomic_write_json
    from stablenet.train.trainer import resolve_device

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


def _bench_smoothing(args: argparse.Namespace) -> int:
    from stablenet.bench.smoothing import bench_smoothing
    from stablenet.bench.spectral import write_rows
    from stablenet.train.trainer import resolve_device

    rows = bench_smoothing(
        quick=args.quick,
        device=resolve_device(args.device),
        repeats=args.repeats,
        progress=None if args.quiet else lambda line: print(line, flush=True),
    )
    print(f"{'model':12s} {'n':>8s} {'batch':>6s} {'samples/s':>12s} {'plain/s':>12s} {'ratio':>7s}")
    for row in rows:
        print(
            f"{row['model']:12s} {row['n']:8d} {row['batch_size']:6d} {row['samples_per_s']:12.4g} "
            f"{row['plain_samples_per_s']:12.4g} {row['ratio']:7.3f}"
        )
    if args.json:
        write_rows(rows, args.json)
        print(f"rows: {args.json}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from stablenet.bench.spectral import bench_spectral, write_rows
    from stablenet.train.trainer import resolve_device

    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1; got {args.repeats}")
    if args.suite == "smoothing":
        return _bench_smoothing(args)
    rows = bench_spectral(
        quick=args.quick,
        device=resolve_device(args.device),
        repeats=args.repeats,
        progress=None if args.quiet else lambda line: print(line, flush=True),
    )
    print(f"{'layer':44s} {'method':26s} {'ratio':>9s} {'time_ms':>10s}")
    for row in rows:
        print(f"{row['layer']:44s} {row['method']:26s} {row['ratio']:9.5f} {row['time_ms']:10.2f}")
    if args.json:
        write_rows(rows, args.json)
        print(f"rows: {args.json}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from stablenet.certify.records import read_records
    from stablenet.certify.report import STANDARD_RADII, certified_accuracy
    from stablenet.demo import run_demo

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
