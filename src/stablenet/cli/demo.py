"""``stablenet demo``: :func:`stablenet.workflows.run_demo`, summarised by :func:`stablenet.workflows.demo_summary`."""

from __future__ import annotations

import time
from dataclasses import dataclass

from stablenet.cli.command import Command, option, quiet_option
from stablenet.workflows.demo import demo_summary, run_demo

__all__ = ["COMMANDS", "DemoArgs", "demo_command"]


@dataclass(frozen=True, kw_only=True)
class DemoArgs:
    """``stablenet demo``."""

    out: str = option("runs/demo", help="output directory (default runs/demo)")
    quiet: bool = quiet_option()


def demo_command(args: DemoArgs) -> int:
    t0 = time.perf_counter()
    result = run_demo(args.out, progress=not args.quiet)
    print(demo_summary(result))
    print(f"done in {time.perf_counter() - t0:.1f} s; report: {result.report}")
    if result.audit is not None:
        print(f"audit (open in a browser): {result.audit}")
    return 0


COMMANDS = (
    Command("demo", DemoArgs, demo_command, help="train, certify, report and audit on the bundled digits data"),
)
