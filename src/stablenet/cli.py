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
    p.add_argument("--method", default="lipschitz", help="certification method (lipschitz)")
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
    from stablenet.certify.run import certify_run
    from stablenet.train.trainer import resolve_device

    out = certify_run(
        args.run,
        args.out,
        method=args.method,
        form=args.form,
        split=args.split,
        data_root=args.data_root,
        batch_size=args.batch_size,
        max_examples=args.max_examples,
        skip=args.skip,
        device=resolve_device(args.device),
        progress=not args.quiet,
    )
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
