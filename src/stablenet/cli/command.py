"""A command of the ``stablenet`` CLI: one config dataclass (STYLE §9) and one function of it.

The config's fields are the command's flags: a field made with :func:`option` becomes ``--name-with-dashes``
(a ``bool`` a switch, a field without a default a required flag), with its type and default taken from the
field. So every flag is declared once, and a command can be run from Python with the same values::

    from stablenet.cli.curvature import HessianArgs, hessian_command

    hessian_command(HessianArgs(run="runs/x", json="h.json", top_k=3))
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DATA_ROOT_HELP",
    "DEVICE_HELP",
    "RUN_HELP",
    "Command",
    "add_command",
    "comma_separated",
    "config_from",
    "option",
    "pick",
    "quiet_option",
]

#: Help of the flags that several commands take.
RUN_HELP = "run directory (holding model.safetensors)"
DATA_ROOT_HELP = "directory holding the data set files"
DEVICE_HELP = "auto, cpu, cuda, cuda:N"


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, config dataclass and the function that runs it (returning the exit status).

    ``extra`` names the config field that receives the arguments the parser does not know, as a tuple of
    strings (``train``'s ``--key value`` config overrides); ``None``: they are an error.
    """

    name: str
    config: type
    run: Callable[[Any], int]
    help: str
    description: str | None = None
    extra: str | None = None


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str | None = None,
    short: str | None = None,
    positional: bool = False,
    nargs: str | None = None,
    choices: Sequence[str] | None = None,
    parse: Callable[[str], Any] | None = None,
    exclusive: str | None = None,
) -> Any:
    """A config field that is also a flag.

    Args:
        default: the flag's default; none: the flag is required.
        help: the ``--help`` line.
        short: a one-letter alias, e.g. ``"-c"``.
        positional: an argument without a flag.
        nargs, choices: as in :meth:`argparse.ArgumentParser.add_argument`.
        parse: turns the string into the value (default: ``int`` or ``float`` for such a field, else the string).
        exclusive: fields with the same name form a required group of which exactly one is given.
    """
    metadata = {
        "cli": {
            "help": help,
            "short": short,
            "positional": positional,
            "nargs": nargs,
            "choices": choices,
            "parse": parse,
            "exclusive": exclusive,
        }
    }
    return dataclasses.field(default=default, metadata=metadata)


def quiet_option() -> Any:
    """The ``--quiet`` switch that most commands take."""
    return option(False, help="no progress bars or info logs")


def comma_separated(text: str) -> tuple[str, ...]:
    """``"a, b,"`` as ``("a", "b")``: the value of a flag that takes a list."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def pick(args: Any, *names: str) -> dict[str, Any]:
    """``{name: args.name}``: the config fields that go to the library call unchanged, as keyword arguments."""
    return {name: getattr(args, name) for name in names}


def _scalar(hint: Any) -> Any:
    """``int`` of ``int | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [h for h in typing.get_args(hint) if h is not type(None)]
    return hint


def add_command(subparsers: Any, command: Command) -> argparse.ArgumentParser:
    """Add ``command``'s parser, one argument per :func:`option` field of its config, in field order."""
    parser = subparsers.add_parser(command.name, allow_abbrev=False, help=command.help, description=command.description)
    hints = typing.get_type_hints(command.config)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(command.config):
        spec = f.metadata.get("cli")
        if spec is None:
            continue
        target: Any = parser
        if spec["exclusive"] is not None:
            if spec["exclusive"] not in groups:
                groups[spec["exclusive"]] = parser.add_mutually_exclusive_group(required=True)
            target = groups[spec["exclusive"]]
        kwargs: dict[str, Any] = {"help": spec["help"]}
        if hints[f.name] is bool:
            kwargs["action"] = "store_true"
        else:
            scalar = _scalar(hints[f.name])
            kwargs["type"] = spec["parse"] or (scalar if scalar in (int, float) else None)
            kwargs.update({k: spec[k] for k in ("nargs", "choices") if spec[k] is not None})
            if f.default is not dataclasses.MISSING:
                kwargs["default"] = f.default
        if spec["positional"]:
            target.add_argument(f.name, **kwargs)
            continue
        if f.default is dataclasses.MISSING:
            kwargs["required"] = True
        flags = [spec["short"]] if spec["short"] else []
        target.add_argument(*flags, "--" + f.name.replace("_", "-"), dest=f.name, **kwargs)
    return parser


def config_from(command: Command, args: argparse.Namespace, extra: Sequence[str] = ()) -> Any:
    """The config of ``command`` from parsed ``args`` (and the unknown arguments ``extra``); lists as tuples."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(command.config) if "cli" in f.metadata}
    values = {name: tuple(v) if isinstance(v, list) else v for name, v in values.items()}
    if command.extra is not None:
        values[command.extra] = tuple(extra)
    return command.config(**values)
