"""The ``stablenet`` command: thin subcommands over library calls.

Each command is one config dataclass and one library call (:mod:`stablenet.cli.command`), grouped by what they
work on: :mod:`~stablenet.cli.train`, :mod:`~stablenet.cli.certify` (certify, report, lipschitz, verify),
:mod:`~stablenet.cli.curvature` (hessian, landscape), :mod:`~stablenet.cli.bench` and :mod:`~stablenet.cli.demo`.
Errors in user input print one line (``stablenet: error: ...``) and exit with status 2. Set
``STABLENET_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from stablenet.cli import audit, bench, certify, curvature, demo, train
from stablenet.cli.command import Command, add_command, config_from

__all__ = ["COMMANDS", "main"]

EXIT_USAGE = 2

#: The subcommands by name, in the order ``stablenet --help`` lists them.
COMMANDS: dict[str, Command] = {
    command.name: command for module in (train, certify, audit, curvature, bench, demo) for command in module.COMMANDS
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stablenet", description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        add_command(sub, command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stablenet`` command; returns the exit status."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    command = COMMANDS[args.command]
    if extra and command.extra is None:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return command.run(config_from(command, args, extra))
    except (ValueError, FileNotFoundError, TypeError, FloatingPointError) as e:
        if os.environ.get("STABLENET_DEBUG"):
            raise
        message = " ".join(str(e).split())
        print(f"stablenet: error: {message}", file=sys.stderr)
        return EXIT_USAGE
