r"""Certified-accuracy tables and plots, made from record files alone (never by re-running a certifier).

The central quantity is the *certified accuracy* at radius :math:`r` over :math:`n` test examples,

.. math::

    \mathrm{CA}(r) = \frac{1}{n} \sum_{i=1}^{n} \mathbb{1}[\hat y_i = y_i \ \wedge\ R_i \ge r],

the fraction of examples that are classified correctly *and* certified at radius at least :math:`r`.
:math:`\mathrm{CA}(0)` is the clean accuracy (with abstentions counted as errors), and :math:`\mathrm{CA}` is
non-increasing in :math:`r`. The *average certified radius* (Zhai et al., 2020, "MACER") is
:math:`\mathrm{ACR} = \frac{1}{n} \sum_i R_i \, \mathbb{1}[\hat y_i = y_i]`, i.e. the area under the
:math:`\mathrm{CA}` curve.

Example:
    >>> from stablenet.certify.records import read_records
    >>> records = read_records("runs/cert/lipschitz.jsonl")
    >>> certified_accuracy(records, [0.0, 0.5, 1.0])  # doctest: +SKIP
    array([0.92, 0.71, 0.43])
    >>> files = ["runs/cert/lipschitz.jsonl", "runs/cert/smoothing.jsonl"]
    >>> write_report(files, "runs/cert")  # doctest: +SKIP
    PosixPath('runs/cert/report.md')
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stablenet.atomic import atomic_write, atomic_write_text
from stablenet.certify.records import ABSTAIN, CertificationRecord, read_metadata, read_records
from stablenet.data.radii import STANDARD_RADII

__all__ = [
    "STANDARD_RADII",
    "average_certified_radius",
    "certified_accuracy",
    "format_radius",
    "format_time",
    "step_curve",
    "summarize",
    "write_report",
]

logger = logging.getLogger(__name__)


_PNG_NAME = "certified_accuracy.png"
_REPORT_NAME = "report.md"


def _check_records(records: Sequence[CertificationRecord]) -> Sequence[CertificationRecord]:
    records = list(records)
    if not records:
        raise ValueError("records must be a non-empty sequence of CertificationRecord; got 0 records")
    for record in records:
        if not isinstance(record, CertificationRecord):
            raise TypeError(f"records must be CertificationRecord objects; got {type(record).__name__}")
    return records


def _check_radii(radii: Iterable[float] | float) -> np.ndarray:
    values = np.atleast_1d(np.asarray(radii, dtype=np.float64))
    if values.ndim != 1:
        raise ValueError(f"radii must be a 1-D sequence of numbers; got shape {values.shape}")
    for r in values:
        if not r >= 0.0:  # also rejects NaN
            raise ValueError(f"radius must be >= 0; got {float(r)!r}")
    return values


def certified_accuracy(records: Sequence[CertificationRecord], radii: Sequence[float] | float) -> np.ndarray:
    r"""Fraction of examples that are correct and certified at least at each radius.

    .. math:: \mathrm{CA}(r) = \frac{1}{n} \#\{i : \mathrm{correct}_i \wedge R_i \ge r\}

    At ``r = 0`` this is the clean accuracy (abstentions count as errors). A record's radius guarantees
    that its prediction is constant on the closed ball of that radius, hence ``>=``.

    Args:
        records: Non-empty sequence of records (one file's worth).
        radii: Radii ``>= 0`` (a sequence, or one number).

    Returns:
        Float64 array of the same length as ``radii``, values in ``[0, 1]``.

    Raises:
        ValueError: If ``records`` is empty or a radius is negative or NaN.

    Example:
        >>> recs = [CertificationRecord(i, 0, 0, r, True, "lipschitz", "l2", 0.0)
        ...         for i, r in enumerate([0.0, 1.0])]
        >>> certified_accuracy(recs, [0.0, 0.5, 1.0, 2.0])
        array([1. , 0.5, 0.5, 0. ])
    """
    records = _check_records(records)
    values = _check_radii(radii)
    radius = np.array([r.radius for r in records], dtype=np.float64)
    correct = np.array([r.correct for r in records], dtype=bool)
    return np.array([np.mean(correct & (radius >= r)) for r in values], dtype=np.float64)


def average_certified_radius(records: Sequence[CertificationRecord]) -> float:
    r"""Average certified radius, counting incorrect (and abstained) examples as radius 0.

    .. math:: \mathrm{ACR} = \frac{1}{n} \sum_{i=1}^{n} R_i \, \mathbb{1}[\mathrm{correct}_i]

    Raises:
        ValueError: If ``records`` is empty.
    """
    records = _check_records(records)
    return float(np.mean([r.radius if r.correct else 0.0 for r in records]))


def _auto_radii(records: Iterable[CertificationRecord]) -> tuple[float, ...]:
    """Four evenly spaced radii up to the largest certified radius of a correct record.

    Values are rounded *down* to 2 decimals, so that the largest column is not empty by rounding; if that
    collapses them (tiny radii), 2 significant digits are kept instead.
    """
    top = max((r.radius for r in records if r.correct), default=0.0)
    if top <= 0.0:
        return (0.0,)
    grid = np.linspace(top / 4, top, 4)
    values = tuple(math.floor(v * 100 + 1e-9) / 100 for v in grid)
    if len(set(values)) < 4 or values[0] <= 0.0:
        values = tuple(float(f"{v:.2g}") for v in grid)
    return values


def format_radius(r: float) -> str:
    """Short label for a radius: ``0.5``, ``1.58``, ``36/255`` (CIFAR-style pixel fractions), ``1``."""
    if abs(r - round(r, 2)) < 1e-9:
        return f"{round(r, 2):g}"
    k = r * 255
    if abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{r:.4g}"


def format_time(seconds: float) -> str:
    """``1.23 s``, or ``45.6 ms`` under a second."""
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.3g} ms"


def summarize(
    path_or_records: str | os.PathLike | Sequence[CertificationRecord],
    radii: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Summary statistics of one run, as a JSON-serialisable dict.

    Args:
        path_or_records: A record file (its sidecar supplies ``dataset``) or a sequence of records.
        radii: Radii for the certified accuracy. ``None``: the data set's :data:`STANDARD_RADII` if known,
            else four evenly spaced radii up to the largest certified radius.

    Returns:
        A dict with keys ``n``, ``dataset`` (or ``None``), ``methods`` and ``norms`` (sorted lists),
        ``clean_accuracy``, ``radii``, ``certified_accuracy`` (a list aligned with ``radii``), ``acr``,
        ``abstain_rate`` and ``mean_time_s``. Accuracies and rates are fractions in ``[0, 1]``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If there are no records, or a radius is negative.
    """
    dataset: str | None = None
    if isinstance(path_or_records, (str, os.PathLike)):
        path = Path(path_or_records)
        records = read_records(path)
        if not records:
            raise ValueError(f"record file {path} has no records")
        dataset = read_metadata(path).get("dataset")
    else:
        records = _check_records(path_or_records)
    if radii is None:
        radii = STANDARD_RADII[dataset] if dataset in STANDARD_RADII else _auto_radii(records)
    values = _check_radii(radii)
    return {
        "n": len(records),
        "dataset": dataset,
        "methods": sorted({r.method for r in records}),
        "norms": sorted({r.norm for r in records}),
        "clean_accuracy": float(certified_accuracy(records, [0.0])[0]),
        "radii": [float(r) for r in values],
        "certified_accuracy": [float(a) for a in certified_accuracy(records, values)],
        "acr": average_certified_radius(records),
        "abstain_rate": float(np.mean([r.prediction == ABSTAIN for r in records])),
        "mean_time_s": float(np.mean([r.time_s for r in records])),
    }


def _display_names(paths: Sequence[Path], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != len(paths):
            raise ValueError(f"names must have one entry per record file ({len(paths)}); got {len(names)}")
        return names
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    # Same file name in different run directories: qualify with the directory.
    return [f"{p.parent.name}/{p.stem}" for p in paths]


def _resolve_dataset(paths: Sequence[Path], metas: Sequence[dict[str, Any]], dataset: str | None) -> str | None:
    found = {str(p): m["dataset"] for p, m in zip(paths, metas, strict=True) if m.get("dataset") is not None}
    if len(set(found.values())) > 1:
        listing = ", ".join(f"{p}: {d!r}" for p, d in found.items())
        raise ValueError(f"record files must share one dataset; got {listing}")
    if dataset is None:
        return next(iter(found.values()), None)
    if found and dataset not in found.values():
        raise ValueError(
            f"dataset={dataset!r} disagrees with the record files' sidecar dataset "
            f"{next(iter(found.values()))!r}; pass the matching dataset or omit it"
        )
    return dataset


def step_curve(records: Sequence[CertificationRecord], x_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Points of CA(r) on [0, x_max] for ``Axes.step(..., where="post")``.

    CA is left-continuous: it equals CA(b) up to and including each breakpoint b (a certified radius) and
    drops just after it, so the value plotted from b on is the fraction with radius > b.
    """
    radius = np.array([r.radius for r in records if r.correct], dtype=np.float64)
    n = len(records)
    breaks = np.unique(radius[radius < x_max])
    xs = np.concatenate([[0.0], breaks, [x_max]])
    ys = np.concatenate([[radius.size / n], [np.sum(radius > b) / n for b in breaks], [0.0]])
    ys[-1] = ys[-2]
    return xs, 100.0 * ys


def _plot(
    curves: Sequence[tuple[str, Sequence[CertificationRecord]]],
    radii: Sequence[float],
    norm_label: str,
) -> bytes:
    # Figure + FigureCanvasAgg directly: no pyplot, so no global backend switch and no figure registry.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    largest = max([*radii, *(r.radius for _, records in curves for r in records if r.correct)], default=0.0)
    x_max = 1.1 * largest if largest > 0 else 1.0
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in radii:
        ax.axvline(r, color="0.85", linewidth=0.8, linestyle="--", zorder=0)
    for name, records in curves:
        xs, ys = step_curve(records, x_max)
        ax.step(xs, ys, where="post", label=name, linewidth=1.6)
    ax.set_xlim(0.0, x_max)
    ax.set_ylim(-2.0, 102.0)  # a little slack so curves at 0 % and 100 % stay visible
    ax.set_xlabel(f"radius ε ({norm_label})" if norm_label else "radius ε")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_title("Certified accuracy vs radius")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def write_report(
    record_files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    radii: Sequence[float] | None = None,
    dataset: str | None = None,
    names: Sequence[str] | None = None,
) -> Path:
    """Write a Markdown report and a certified-accuracy plot comparing one or more record files.

    Writes ``out_dir/report.md`` (a table with one row per file: name, method, n, clean accuracy, certified
    accuracy at each radius, ACR and mean time per example; the radii used and the data set; a link to the
    plot) and ``out_dir/certified_accuracy.png`` (certified accuracy vs radius, one step curve per file,
    the table's radii marked). Both are written atomically, the plot first.

    Args:
        record_files: JSON Lines record files (see :mod:`stablenet.certify.records`).
        out_dir: Output directory (created if needed).
        radii: Radii for the table. ``None``: :data:`STANDARD_RADII` of the data set if known, else four
            evenly spaced radii up to the largest certified radius, rounded down to 2 decimals (the report
            says which).
        dataset: Data set name; ``None`` takes it from the files' ``.meta.json`` sidecars.
        names: Row and legend names, one per file; default: the file stems.

    Returns:
        The path of ``report.md``.

    Raises:
        FileNotFoundError: If a record file does not exist.
        ValueError: If a file has no records, a radius is negative, ``names`` has the wrong length, or the
            files (or ``dataset``) disagree on the data set.
    """
    if isinstance(record_files, (str, os.PathLike)):
        record_files = [record_files]
    paths = [Path(p) for p in record_files]
    if not paths:
        raise ValueError("record_files must name at least one record file; got none")
    display = _display_names(paths, names)
    all_records: list[list[CertificationRecord]] = []
    metas: list[dict[str, Any]] = []
    for path in paths:
        records = read_records(path)
        if not records:
            raise ValueError(f"record file {path} has no records")
        all_records.append(records)
        metas.append(read_metadata(path))
    dataset = _resolve_dataset(paths, metas, dataset)

    flat = [r for records in all_records for r in records]
    if radii is not None:
        chosen = tuple(float(r) for r in _check_radii(radii))
        if not chosen:
            raise ValueError("radii must hold at least one radius >= 0; got none")
        radii_note = "given explicitly"
    elif dataset in STANDARD_RADII:
        chosen = STANDARD_RADII[dataset]
        radii_note = f"the standard radii for `{dataset}`"
    else:
        chosen = _auto_radii(flat)
        top = max((r.radius for r in flat if r.correct), default=0.0)
        why = f"no standard radii for data set `{dataset}`" if dataset else "no data set given"
        radii_note = (
            f"{why}: 4 evenly spaced radii up to the largest certified radius ({top:.4g}), rounded down to 2 decimals"
        )
    norms = sorted({r.norm for r in flat})
    norm_label = ", ".join(norms)

    png = _plot(list(zip(display, all_records, strict=True)), chosen, norm_label)
    atomic_write(Path(out_dir) / _PNG_NAME, lambda f: f.write(png))

    labels = [format_radius(r) for r in chosen]
    header = [
        "name",
        "method",
        "n",
        "clean acc (%)",
        *(f"ε={label}" for label in labels),
        "ACR",
        "time / example",
    ]
    lines = [
        "# Certification report",
        "",
        f"Data set: {f'`{dataset}`' if dataset else 'not given'}. "
        f"Norm: {norm_label}. Radii: {radii_note} (ε = {', '.join(labels)}).",
        "",
        "Columns `ε=…` give the certified accuracy (%) at that radius: the fraction of test examples that "
        "are classified correctly and certified at radius ≥ ε. ACR is the average certified radius "
        "(incorrect examples count as 0).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
    ]
    for name, records in zip(display, all_records, strict=True):
        s = summarize(records, chosen)
        row = [
            name.replace("|", r"\|"),
            ", ".join(s["methods"]),
            str(s["n"]),
            f"{100 * s['clean_accuracy']:.1f}",
            *(f"{100 * a:.1f}" for a in s["certified_accuracy"]),
            f"{s['acr']:.3f}",
            format_time(s["mean_time_s"]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"![Certified accuracy vs radius]({_PNG_NAME})", "", "Record files:", ""]
    lines += [f"- {name}: `{path}`" for name, path in zip(display, paths, strict=True)]
    report = Path(out_dir) / _REPORT_NAME
    atomic_write_text(report, "\n".join(lines) + "\n")
    logger.info("wrote %s", report)
    return report
