"""Where a benchmark result came from: code, versions, machine, date and command, recorded with every row.

A figure is only worth quoting if anyone can rerun the command that produced it and knows on what. So every row
that ``stablenet bench --json`` writes, and every results file of the scripts in ``benchmarks/``, carries one
``provenance`` record (:func:`provenance`)::

    {"commit": "638abf3...", "dirty": false, "torch": "2.13.0+cpu", "cuda": null,
     "device": "AMD EPYC (2 cores)", "python": "3.11.7", "date": "2026-12-08T09:30:00+00:00",
     "command": "stablenet bench spectral --quick --json rows.jsonl"}

JSON Lines files carry it in every row (so rows of several runs merged into one file keep theirs); a JSON
document carries it once, at its top level. ``benchmarks/tables.py`` prints it above each table of
``benchmarks/README.md``.

# Note [dirty checkout]
``dirty`` is ``git status --porcelain`` over the checkout *except* ``benchmarks/results/``: result files are the
benchmarks' outputs, not code, and a session that writes several of them in turn must not mark its later ones
as run from modified code. Untracked files elsewhere count (a new module can change what runs).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

__all__ = ["PROVENANCE_KEYS", "provenance", "write_rows"]

#: The keys of every provenance record, in order.
PROVENANCE_KEYS = ("commit", "dirty", "torch", "cuda", "device", "python", "date", "command")

_OUTPUTS = "benchmarks/results"  # Note [dirty checkout]


def _git(cwd: Path, *args: str) -> str | None:
    """``git args`` run in ``cwd``: its stripped output, or ``None`` if git is missing or fails."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _package_dir() -> Path:
    """The directory of the ``stablenet`` package that runs (an older checkout's, when one is on the path)."""
    package = sys.modules.get("stablenet")
    return Path(getattr(package, "__file__", None) or Path(__file__).parent).resolve().parent


def _commit() -> tuple[str | None, bool | None]:
    """``(HEAD, dirty)`` of the git checkout the package runs from; ``(None, None)`` outside one (an installed
    package, even inside some repository's ignored folder, is not a checkout of its code)."""
    package = _package_dir()
    if _git(package, "ls-files", "--error-unmatch", "__init__.py") is None:
        return None, None
    head = _git(package, "rev-parse", "HEAD")
    top = _git(package, "rev-parse", "--show-toplevel")
    if head is None or top is None:
        return None, None
    status = _git(Path(top), "status", "--porcelain", "--", ".", f":(exclude){_OUTPUTS}")
    return head, None if status is None else bool(status)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use, not the host's
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _device(device: str | torch.device | None) -> str:
    """The GPU's name for a CUDA device, else the CPU's model and the cores this process may use."""
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{_cpu_model()} ({_cores()} cores)"


def _command_line() -> str:
    """This process's command line as one would type it: ``stablenet ...``, ``python -m module ...`` or
    ``python path/script.py ...`` with the path relative to the working directory."""
    argv = sys.argv or [""]
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        program = ["python", "-m", spec.name.removesuffix(".__main__")]
    elif argv[0] in ("-c", "-"):
        program = ["python", argv[0]]
    elif argv[0].endswith(".py"):
        relative = os.path.relpath(os.path.abspath(argv[0]))
        program = ["python", Path(argv[0]).name if relative.startswith("..") else relative]
    else:
        program = [Path(argv[0]).name]  # an entry point on PATH
    return shlex.join(program + argv[1:])


def provenance(command: str | None = None, *, device: str | torch.device | None = None) -> dict:
    """The record of where a result comes from; it never fails (what cannot be found is ``None``).

    Args:
        command: the command that produced the result; default: this process's command line.
        device: the device the result was measured on; a CUDA device is named by its GPU, anything else by the
            CPU (model and core count).

    Returns:
        ``commit`` and ``dirty`` (git HEAD of the checkout the package runs from, and whether it has changes,
        Note [dirty checkout]; both ``None`` outside a checkout), ``torch``, ``cuda`` (``torch.version.cuda``),
        ``device``, ``python``, ``date`` (UTC, ISO 8601) and ``command``: the keys :data:`PROVENANCE_KEYS`.

    Example:
        >>> sorted(provenance("python bench.py", device="cpu")) == sorted(PROVENANCE_KEYS)
        True
    """
    commit, dirty = _commit()
    return {
        "commit": commit,
        "dirty": dirty,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": _device(device),
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else _command_line(),
    }


def write_rows(rows: list[dict], path: str | os.PathLike, *, command: str | None = None) -> None:
    """The rows of any suite as a JSON Lines file, written atomically, each with a ``provenance`` record.

    The record names the device of the rows' ``device`` field (the first row's); a row that already carries a
    ``provenance`` keeps it.
    """
    # Imported here, not above: benchmarks/certify_arithmetic.py loads this module by path into the process of
    # an older checkout, which has no stablenet.atomic.
    from stablenet.atomic import atomic_write_text

    record = provenance(command, device=rows[0].get("device") if rows else None)
    lines = (json.dumps(row if "provenance" in row else {**row, "provenance": record}) + "\n" for row in rows)
    atomic_write_text(path, "".join(lines))
