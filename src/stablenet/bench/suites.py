"""The benchmark suites by name: what runs each, the options only it takes, and its table.

``stablenet bench SUITE`` is :func:`run_suite` then :func:`format_table`::

    rows = run_suite("spectral", quick=True)
    print(format_table("spectral", rows))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from stablenet.bench import curvature, layers, smoothing, spectral, train

__all__ = ["SUITES", "Suite", "format_table", "run_suite"]


@dataclass(frozen=True)
class Suite:
    """A benchmark suite.

    Attributes:
        run: ``run(*, quick, device, repeats, progress, **options) -> rows``.
        header: the table's column titles.
        format_row: one row as a table line under ``header``.
        options: the keyword options of ``run`` that only this suite takes.
    """

    run: Callable[..., list[dict]]
    header: str
    format_row: Callable[[dict], str]
    options: tuple[str, ...] = ()


SUITES: dict[str, Suite] = {
    "spectral": Suite(spectral.bench_spectral, spectral.HEADER, spectral.format_row, ("methods",)),
    "smoothing": Suite(smoothing.bench_smoothing, smoothing.HEADER, smoothing.format_row),
    "curvature": Suite(curvature.bench_curvature, curvature.HEADER, curvature.format_row, ("data",)),
    "layers": Suite(
        layers.bench_layers,
        layers.HEADER,
        layers.format_row,
        ("batch_size", "families", "bound_method", "spectral_n_iter"),
    ),
    "train": Suite(
        train.bench_train, train.HEADER, train.format_row, ("model", "batch_size", "data_streaming", "data_root")
    ),
}


def _suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"suite must be one of {', '.join(SUITES)}; got {name!r}")
    return SUITES[name]


def run_suite(
    name: str,
    *,
    quick: bool = False,
    device: str | torch.device = "cpu",
    repeats: int | None = None,
    progress: Callable[[str], None] | None = None,
    **options: Any,
) -> list[dict]:
    """The rows of suite ``name``; ``options`` left ``None`` are not passed, the others must be the suite's own.

    Raises:
        ValueError: an unknown suite, ``repeats < 1``, or an option of another suite.
    """
    suite = _suite(name)
    if repeats is not None and repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    given = {key: value for key, value in options.items() if value is not None}
    for key in given:
        if key not in suite.options:
            owners = [n for n, s in SUITES.items() if key in s.options]
            if not owners:
                accepted = sorted({o for s in SUITES.values() for o in s.options})
                raise ValueError(f"unknown benchmark option {key!r}; accepted: {', '.join(accepted)}")
            suites = f"{' and '.join(owners)} suite{'s' if len(owners) > 1 else ''}"
            raise ValueError(f"{key} applies to the {suites} only; got it with {name!r}")
    return suite.run(quick=quick, device=device, repeats=repeats, progress=progress, **given)


def format_table(name: str, rows: list[dict]) -> str:
    """The rows of suite ``name`` as a text table: its header line, then one line per row."""
    suite = _suite(name)
    return "\n".join([suite.header, *(suite.format_row(row) for row in rows)])
