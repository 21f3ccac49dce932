"""``stablenet certify``, ``report``, ``lipschitz`` and ``verify``: certificates of a trained run and their checks."""

from __future__ import annotations

import os
from dataclasses import dataclass

from stablenet.atomic import atomic_write_json
from stablenet.cli.command import DATA_ROOT_HELP, DEVICE_HELP, RUN_HELP, Command, option, pick, quiet_option
from stablenet.train.trainer import resolve_device
from stablenet.workflows.certification import CERTIFY_METHODS, SMOOTHING_METHODS, SmoothingParams, certify_run
from stablenet.workflows.lipschitz import lipschitz_report
from stablenet.workflows.report import write_report
from stablenet.workflows.verification import verify_run

__all__ = [
    "COMMANDS",
    "CertifyArgs",
    "LipschitzArgs",
    "ReportArgs",
    "VerifyArgs",
    "certify_command",
    "lipschitz_command",
    "report_command",
    "verify_command",
]


@dataclass(frozen=True, kw_only=True)
class CertifyArgs:
    """``stablenet certify``: :func:`stablenet.workflows.certify_run`."""

    run: str = option(help=RUN_HELP)
    method: str = option("lipschitz", help="lipschitz, smoothing (Cohen et al.), lvm-rs or cpm")
    sigma: float | None = option(None, help="smoothing noise level (randomized methods)")
    n0: int = option(100, help="selection samples per image (randomized methods)")
    n: int = option(100_000, help="estimation samples per image (randomized methods)")
    alpha: float = option(0.001, help="failure probability per certificate")
    seed: int = option(0, help="noise seed (randomized methods)")
    noise: str = option(
        "float",
        help="randomized methods: float (torch.randn, the usual practice; default) or grid (the Gaussian rounded to "
        "the pixel grid, drawn exactly: sound for any base model, for inputs on the grid; cpm then uses hard votes)",
    )
    levels: str | None = option(
        None,
        help="with --noise grid: grid steps per pixel unit, pixels k / LEVELS (default: the data set's, 16 for digits, "
        "255 for mnist, fashion-mnist, cifar10, cifar100)",
    )
    form: str = option("auto", help="Lipschitz certificate form: auto, generic, lln")
    arithmetic: str = option(
        "float64",
        choices=("float64", "native"),
        help="what a Lipschitz certificate covers: the network evaluated in float64 (default) or its own dtype's "
        "forward (sound but pessimistic)",
    )
    out: str = option(help="JSON Lines output; existing indices are skipped")
    split: str = option("test", help="data split to certify (train or test)")
    data_root: str | None = option(None, help=DATA_ROOT_HELP)
    batch_size: int = option(256)
    max_examples: int | None = option(None)
    skip: int = option(0, help="skip the first K examples")
    device: str = option("auto", help=DEVICE_HELP)
    quiet: bool = quiet_option()


def certify_command(args: CertifyArgs) -> int:
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
        smoothing = SmoothingParams(levels=levels, **pick(args, "sigma", "n0", "n", "alpha", "seed", "noise"))
    elif args.method in CERTIFY_METHODS and (args.noise != "float" or levels is not None):
        raise ValueError(
            f"--noise and --levels apply to the randomized methods ({', '.join(SMOOTHING_METHODS)}); "
            f"got them with --method {args.method}"
        )
    out = certify_run(
        args.run,
        args.out,
        smoothing=smoothing,
        device=resolve_device(args.device),
        progress=not args.quiet,
        **pick(args, "method", "form", "arithmetic", "split", "data_root", "batch_size", "max_examples", "skip"),
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports the merged file
        print(f"records: {out}")
    return 0


@dataclass(frozen=True, kw_only=True)
class ReportArgs:
    """``stablenet report``: :func:`stablenet.workflows.write_report`."""

    records: tuple[str, ...] = option(positional=True, nargs="+", help="JSON Lines record files")
    out: str = option(help="output directory (report.md, certified_accuracy.png)")
    dataset: str | None = option(None, help="data set name, to choose the standard radii")
    radii: str | None = option(None, help="comma-separated radii, e.g. 0.5,1,1.58")
    names: str | None = option(None, help="comma-separated curve names, one per file")


def report_command(args: ReportArgs) -> int:
    radii = None
    if args.radii is not None:
        try:
            radii = [float(v) for v in args.radii.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--radii must be comma-separated numbers, e.g. 0.5,1,1.58; got {args.radii!r}") from None
    names = args.names.split(",") if args.names else None
    print(f"report: {write_report(args.records, args.out, radii=radii, dataset=args.dataset, names=names)}")
    return 0


@dataclass(frozen=True, kw_only=True)
class LipschitzArgs:
    """``stablenet lipschitz``: :func:`stablenet.workflows.lipschitz_report`."""

    run: str | None = option(None, exclusive="source", help=RUN_HELP + "; inputs: its test images")
    model: str | None = option(
        None, exclusive="source", help="registry model name (untrained); inputs: uniform random in [0, 1]"
    )
    num_classes: int = option(10, help="with --model (default 10)")
    in_channels: int = option(1, help="with --model (default 1)")
    input_size: int = option(28, help="with --model: image height and width (default 28)")
    num_inputs: int = option(64, help="inputs for the lower bound (default 64)")
    data_root: str | None = option(None, help="with --run: " + DATA_ROOT_HELP)
    seed: int = option(0, help="random seed (untrained weights, inputs, lower bound)")
    json: str | None = option(None, help="also write the bounds to this JSON file")
    quiet: bool = quiet_option()


def lipschitz_command(args: LipschitzArgs) -> int:
    options = pick(args, "model", "num_classes", "in_channels", "input_size", "num_inputs", "data_root", "seed")
    report = lipschitz_report(args.run, **options)
    print(f"upper bound (certified): {report.upper:.6g}")
    print(f"lower bound (empirical, {report.inputs}): {report.lower:.6g}")
    width = max([len("layer"), *(len(name) for name, _ in report.layers)])
    print(f"{'layer':<{width}}  bound")
    for name, bound in report.layers:
        print(f"{name:<{width}}  {bound:.6g}")
    if args.json is not None:
        print(f"bounds: {atomic_write_json(args.json, report.to_dict())}")
    return 0


@dataclass(frozen=True, kw_only=True)
class VerifyArgs:
    """``stablenet verify``: :func:`stablenet.workflows.verify_run`."""

    run: str = option(help=RUN_HELP)
    records: str = option(help="JSON Lines record file (with its .meta.json sidecar)")
    attack: str = option("pgd", help="attack (pgd)")
    restarts: int = option(3, help="random restarts per example (default 3)")
    steps: int = option(50, help="gradient steps per restart (default 50)")
    max_examples: int | None = option(None, help="attack at most M certified records")
    batch_size: int = option(256, help="examples attacked together (default 256)")
    data_root: str | None = option(None, help=DATA_ROOT_HELP)
    smoothing_n: int | None = option(None, help="noisy samples of the smoothed predict (default: the records' n)")
    seed: int = option(0, help="seed for random starts and noise (default 0)")
    device: str = option("auto", help=DEVICE_HELP)
    json: str | None = option(None, help="also write the result to this JSON file")
    quiet: bool = quiet_option()


def verify_command(args: VerifyArgs) -> int:
    result = verify_run(
        args.run,
        args.records,
        device=resolve_device(args.device),
        progress=not args.quiet,
        **pick(args, "attack", "restarts", "steps", "max_examples", "batch_size", "data_root", "smoothing_n", "seed"),
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


COMMANDS = (
    Command("certify", CertifyArgs, certify_command, help="certify a trained run, one JSON record per example"),
    Command("report", ReportArgs, report_command, help="tables and plots from record files"),
    Command(
        "lipschitz",
        LipschitzArgs,
        lipschitz_command,
        help="certified upper and empirical lower bounds on a model's Lipschitz constant",
        description="Bound the l2 Lipschitz constant of a trained run or of a registry model: the certified upper "
        "bound (product of per-layer bounds, listed) and an empirical lower bound from Jacobians at sample inputs.",
    ),
    Command(
        "verify",
        VerifyArgs,
        verify_command,
        help="attack certified predictions; exit 1 if any changed inside its certified radius",
        description="Attack every certified record (PGD in l2 at 0.99 x its radius) and count the predictions "
        "that change. Exit status 0: none changed; 1: some did, which for a deterministic certificate "
        "(lipschitz) is a real failure, a wrong certificate, and for randomized smoothing is strong evidence "
        "of one (an empirical check through the Monte-Carlo expectation); 2: bad input.",
    ),
)
