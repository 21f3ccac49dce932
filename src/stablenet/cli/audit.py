"""``stablenet audit``: :func:`stablenet.workflows.audit.audit` of a run or of a plain PyTorch classifier."""

from __future__ import annotations

import time
from dataclasses import dataclass

from stablenet.cli.command import DATA_ROOT_HELP, DEVICE_HELP, Command, option, quiet_option
from stablenet.train.trainer import resolve_device
from stablenet.workflows.audit import AuditSettings, audit_factory, audit_run

__all__ = ["COMMANDS", "AuditArgs", "audit_command"]


@dataclass(frozen=True, kw_only=True)
class AuditArgs:
    """``stablenet audit``."""

    run: str | None = option(None, help="run directory (holding model.safetensors)", exclusive="subject")
    model: str | None = option(
        None,
        help="a plain classifier instead of a run: module:function returning an nn.Module that maps [0, 1] "
        "pixels to logits (with --data)",
        exclusive="subject",
    )
    data: str | None = option(None, help="data set of --model (e.g. mnist, cifar10); a run names its own")
    data_root: str | None = option(None, help=DATA_ROOT_HELP)
    max_examples: int | None = option(None, help="test images audited (default 500; --quick 50)")
    sigma: tuple[float, ...] | None = option(
        None,
        nargs="+",
        parse=float,
        help="noise levels of the smoothing certificates (default: the run's σ, else "
        "0.25 for digits and CIFAR, 0.5 for MNIST)",
    )
    n: int | None = option(None, help="Monte-Carlo samples per smoothing certificate (default 10000; --quick 400)")
    quick: bool = option(False, help="small settings: about a minute for a small MNIST network on a laptop CPU")
    seed: int = option(0, help="seed of every random draw (default 0)")
    device: str = option("auto", help=DEVICE_HELP)
    out: str = option(help="output folder: audit.json, audit.md, audit.html (a rerun resumes)")
    quiet: bool = quiet_option()


def audit_command(args: AuditArgs) -> int:
    overrides = {k: v for k, v in (("max_examples", args.max_examples), ("n", args.n)) if v is not None}
    overrides |= {"seed": args.seed, **({"sigmas": args.sigma} if args.sigma else {})}
    settings = AuditSettings.for_quick(**overrides) if args.quick else AuditSettings(**overrides)
    options = {"data_root": args.data_root, "device": resolve_device(args.device), "progress": not args.quiet}
    t0 = time.perf_counter()
    if args.run is not None:
        if args.data is not None:
            raise ValueError("--data goes with --model; a run audits the data set it was trained on")
        result = audit_run(args.run, args.out, settings, **options)
    else:
        if args.data is None:
            raise ValueError("--model needs --data NAME, the data set to audit it on (e.g. mnist)")
        result = audit_factory(args.model, args.data, args.out, settings, **options)
    summary = result["summary"]
    best = summary["best_method"]
    radius = summary["headline_radius"]
    print(f"clean accuracy {100 * summary['clean_accuracy']:.1f}%", end="")
    if best is not None:
        label = result["certificates"]["methods"][best]["label"]
        print(f"; certified at r = {radius:.4g}: {100 * summary['best_certified_accuracy']:.1f}% ({label})", end="")
    print(f"; attack at r = {radius:.4g}: {100 * summary['empirical_robust_accuracy']:.1f}%")
    for warning in summary["warnings"]:
        print(f"warning: {warning}")
    print(f"audit in {time.perf_counter() - t0:.1f} s: {args.out}/audit.html")
    return 0


COMMANDS = (
    Command(
        "audit",
        AuditArgs,
        audit_command,
        help="one report of a model's stability: Lipschitz bounds, certificates, attacks and curvature",
        description="Audit a trained run (--run) or a plain classifier (--model module:function --data NAME) on "
        "the same test images: Lipschitz upper and lower bounds, Lipschitz-margin, Cohen, LVM-RS and CPM "
        "certificates, verify's attack on each, PGD robust accuracy, Hessian eigenvalues and trace and a 2-D "
        "loss landscape. Writes OUT/audit.json, OUT/audit.md and a self-contained OUT/audit.html; each stage is "
        "cached in OUT, so a killed audit resumes.",
    ),
)
