"""``stablenet train``: :func:`stablenet.train.train` on a YAML config overridden by ``--key value`` flags."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from stablenet.cli.command import Command, option, quiet_option
from stablenet.train.config import load_config, parse_override_args
from stablenet.train.trainer import CONFIG_FILE, train

__all__ = ["COMMANDS", "TrainArgs", "train_command"]


@dataclass(frozen=True, kw_only=True)
class TrainArgs:
    """``stablenet train``; ``overrides`` are the ``--key value`` pairs (any :class:`TrainConfig` key)."""

    config: str | None = option(None, short="-c", help="YAML config file (default: built-in defaults)")
    resume: bool = option(False, help="continue the run in --out from its last checkpoint")
    quiet: bool = quiet_option()
    overrides: tuple[str, ...] = ()


def train_command(args: TrainArgs) -> int:
    overrides = parse_override_args(args.overrides)
    config_path = args.config
    if args.resume and config_path is None:
        if "out" not in overrides:
            raise ValueError("--resume needs the run directory: pass --out DIR (or -c with the run's config)")
        config_path = Path(str(overrides["out"])) / CONFIG_FILE
    config = load_config(config_path, overrides)
    result = train(config, resume=args.resume, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 speaks for the run
        return 0
    last = result.metrics[-1] if result.metrics else {}
    summary = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k not in ("epoch", "lr", "time_s"))
    print(f"trained {config.model} on {config.dataset}: {summary}")
    print(f"run directory: {result.run_dir}")
    return 0


COMMANDS = (
    Command(
        "train",
        TrainArgs,
        train_command,
        help="train a model from a YAML config",
        description="Train from a YAML config; any config key can be overridden with --key value, dashes or "
        "underscores alike (e.g. --epochs 5 --data-root data --model_args.width 256 --out runs/x).",
        extra="overrides",
    ),
)
