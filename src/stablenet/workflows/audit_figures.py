"""The figures of a stability audit, rendered from the audit dict alone (never by re-running a stage) as PNG bytes.

Each function takes the audit dict of :mod:`stablenet.workflows.audit` (``audit.json``) and returns the PNG
bytes of one figure, or ``None`` when the audit has no data for it (no per-layer bounds, no smoothing method,
no landscape ...), so a report can leave the figure out and say why.

# Note [figure size]
Every figure is at most 11 inches wide at 100 dpi (1100 px: the report's column at 1280 px) and uses fonts of
at least 9 pt, so that a figure shown at its natural size stays readable on a laptop screen.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from stablenet.certify.records import ABSTAIN, CertificationRecord
from stablenet.curvature.landscape_plot import mark_weights, new_figure
from stablenet.workflows.report import format_radius, step_curve

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "certified_accuracy_figure",
    "landscape_figure",
    "lipschitz_figure",
    "radius_scatter_figure",
    "render_figures",
    "short_label",
    "thumbnails_figure",
]

_DPI = 100
_MAX_WIDTH = 11.0  # inches; Note [figure size]
_STYLE = {"font.size": 10, "axes.titlesize": 11, "legend.fontsize": 9, "xtick.labelsize": 9, "ytick.labelsize": 9}
_SHORT = {"lipschitz": "Lip", "smoothing": "Cohen", "lvm-rs": "LVM-RS", "cpm": "CPM"}


def _styled(make: Callable[..., bytes | None]) -> Callable[..., bytes | None]:
    """Run ``make`` under the house font sizes: text properties are fixed when an artist is created."""

    @functools.wraps(make)
    def wrapper(*args: Any, **kwargs: Any) -> bytes | None:
        from matplotlib import rc_context

        with rc_context(_STYLE):
            return make(*args, **kwargs)

    return wrapper


def _png(fig: Figure) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def short_label(key: str, entry: Mapping[str, Any], several_sigmas: bool) -> str:
    """A few characters naming a method in crowded places (``"Cohen"``, ``"LVM-RS σ=0.5"`` when σ varies)."""
    name = _SHORT.get(entry.get("method", ""), key)
    sigma = entry.get("sigma")
    return f"{name} σ={sigma:g}" if several_sigmas and sigma is not None else name


def _methods(audit: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return dict((audit.get("certificates") or {}).get("methods") or {})


def _several_sigmas(methods: Mapping[str, Mapping[str, Any]]) -> bool:
    return len({m.get("sigma") for m in methods.values() if m.get("sigma") is not None}) > 1


def _records(entry: Mapping[str, Any], labels: list[int]) -> list[CertificationRecord]:
    """Records with which :func:`~stablenet.workflows.report.step_curve` draws a method's curve.

    Only whether an example is correct and its radius matter to certified accuracy, so a wrong example becomes
    an abstention (radius 0), which counts the same.
    """
    return [
        CertificationRecord(i, y, y if ok else ABSTAIN, float(r) if ok else 0.0, bool(ok), entry["method"], "l2", 0.0)
        for i, (y, r, ok) in enumerate(zip(labels, entry["radii"], entry["correct"], strict=True))
    ]


def _effective_radii(entry: Mapping[str, Any]) -> np.ndarray:
    """Per-example radius counted the way certified accuracy counts it: 0 for a wrong prediction."""
    radii = np.asarray(entry["radii"], dtype=np.float64)
    return np.where(np.asarray(entry["correct"], dtype=bool), radii, 0.0)


@_styled
def lipschitz_figure(audit: Mapping[str, Any]) -> bytes | None:
    """Bar chart of the per-layer upper bounds (log scale), with the network's upper and lower bounds as lines."""
    from matplotlib.ticker import LogFormatter

    lip = audit.get("lipschitz") or {}
    layers = lip.get("layers") or []
    if not layers:
        return None
    names = [layer["name"] if len(layer["name"]) <= 20 else "…" + layer["name"][-19:] for layer in layers]
    fig = new_figure((min(_MAX_WIDTH, 4.0 + 0.45 * len(layers)), 4.2))
    ax = fig.add_subplot()
    ax.bar(range(len(layers)), [layer["bound"] for layer in layers], color="C0", label="layer upper bound")
    if lip.get("upper") is not None:
        ax.axhline(lip["upper"], color="C3", linewidth=1.6, label=f"network upper bound {lip['upper']:.4g}")
    if lip.get("lower") is not None:
        ax.axhline(lip["lower"], color="C2", linestyle="--", linewidth=1.6, label=f"empirical lower {lip['lower']:.4g}")
    ax.set_yscale("log")
    # Headroom above the bars for the legend; plain numbers (0.6, not 6×10⁻¹) on the log axis.
    values = [v for v in [*(layer["bound"] for layer in layers), lip.get("upper"), lip.get("lower")] if v and v > 0]
    if values:
        ax.set_ylim(min(values) / 2, max(values) * 6)
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.6)))
    ax.set_xticks(range(len(layers)), names, rotation=45, ha="right")
    ax.set_ylabel("Lipschitz bound (l2)")
    ax.set_title("Lipschitz bound per layer")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(loc="upper right")
    return _png(fig)


@_styled
def certified_accuracy_figure(audit: Mapping[str, Any]) -> bytes | None:
    """Certified accuracy vs radius of every method, with the attack's robust accuracy as an upper bound."""
    methods = _methods(audit)
    attack = (audit.get("soundness") or {}).get("attack") or {}
    points = [
        (r, a)
        for r, a in zip(attack.get("radii") or [], attack.get("robust_accuracy") or [], strict=True)
        if a is not None
    ]
    if not methods and not points:
        return None
    labels = list(audit["certificates"]["labels"]) if methods else []
    headline = (audit.get("summary") or {}).get("headline_radius")
    radii = [r for r, _ in points] + [headline or 0.0]
    radii += [r for m in methods.values() for r, ok in zip(m["radii"], m["correct"], strict=True) if ok]
    x_max = 1.1 * max(radii) if max(radii) > 0 else 1.0
    fig = new_figure((7.6, 4.6))
    ax = fig.add_subplot()
    for entry in methods.values():
        xs, ys = step_curve(_records(entry, labels), x_max)
        ax.step(xs, ys, where="post", linewidth=1.6, label=entry.get("label", entry["method"]))
    if points:
        ax.plot(
            [r for r, _ in points],
            [100 * a for _, a in points],
            color="k",
            linestyle="--",
            marker="o",
            label="PGD on the model: bounds its Lipschitz certificate",
        )
    if headline is not None:
        ax.axvline(headline, color="0.4", linewidth=1.0, linestyle=":", label=f"headline ε={format_radius(headline)}")
    ax.set_xlim(0.0, x_max)
    ax.set_ylim(-2.0, 102.0)  # slack, so curves at 0 % and 100 % stay visible
    ax.set_xlabel("radius ε (l2)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Certified accuracy vs radius, same examples")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    return _png(fig)


@_styled
def radius_scatter_figure(audit: Mapping[str, Any]) -> bytes | None:
    """Per example: the Lipschitz margin radius (x) against each smoothing method's radius (y)."""
    methods = _methods(audit)
    lipschitz = next((m for m in methods.values() if m["method"] == "lipschitz"), None)
    smoothing = {k: m for k, m in methods.items() if m["method"] != "lipschitz"}
    if lipschitz is None or not smoothing:
        return None
    x = _effective_radii(lipschitz)
    fig = new_figure((6.0, 5.2))
    ax = fig.add_subplot()
    top = float(x.max(initial=0.0))
    for entry in smoothing.values():
        y = _effective_radii(entry)
        top = max(top, float(y.max(initial=0.0)))
        ax.scatter(x, y, s=28, alpha=0.75, label=entry.get("label", entry["method"]))
    top = 1.05 * top if top > 0 else 1.0
    ax.plot([0.0, top], [0.0, top], color="0.5", linewidth=1.0, linestyle="--", label="equal radii")
    ax.set_xlim(-0.02 * top, top)
    ax.set_ylim(-0.02 * top, top)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel(f"{lipschitz.get('label', 'Lipschitz')} radius")
    ax.set_ylabel("smoothing radius")
    ax.set_title("Radius per example (0 when wrong)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left")
    return _png(fig)


def _image(array: np.ndarray) -> tuple[np.ndarray, str | None]:
    array = np.clip(np.asarray(array, dtype=np.float64), 0.0, 1.0)
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"thumbnail must be an array of shape (C, H, W) with C 1 or 3; got shape {array.shape}")
    return (array[0], "gray") if array.shape[0] == 1 else (array.transpose(1, 2, 0), None)


@_styled
def thumbnails_figure(audit: Mapping[str, Any], thumbnails: Mapping[int, np.ndarray] | None) -> bytes | None:
    """The disagreement examples in a row, each with its index, label and radius per method (✗: wrong).

    An example without an image in ``thumbnails`` is left out; ``None`` if none has one.

    Raises:
        ValueError: If a thumbnail is not of shape (C, H, W) with C 1 (grayscale) or 3 (RGB).
    """
    methods = _methods(audit)
    disagreements = [
        d for d in (audit.get("certificates") or {}).get("disagreements") or [] if d["index"] in (thumbnails or {})
    ]
    if not disagreements:
        return None
    several = _several_sigmas(methods)
    n = len(disagreements)
    fig = new_figure((min(_MAX_WIDTH, 0.4 + 1.45 * n), 1.9 + 0.2 * len(methods)))
    for k, item in enumerate(disagreements):
        ax = fig.add_subplot(1, n, k + 1)
        image, cmap = _image(thumbnails[item["index"]])
        ax.imshow(image, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"#{item['index']}  y={item['label']}", fontsize=10)
        lines = [
            f"{short_label(key, methods.get(key, {}), several)} {radius:.3g}"
            + ("" if item.get("correct", {}).get(key, True) else " ✗")
            for key, radius in item["radii"].items()
        ]
        ax.set_xlabel("\n".join(lines), fontsize=9)
    return _png(fig)


@_styled
def landscape_figure(audit: Mapping[str, Any]) -> bytes | None:
    """Contours of the loss on the 2-D landscape slice, the trained weights marked at the origin."""
    landscape = (audit.get("curvature") or {}).get("landscape")
    if not landscape:
        return None
    # None (a JSON null) becomes NaN, which contourf leaves blank.
    loss = np.array(landscape["loss"], dtype=np.float64)
    alphas = np.asarray(landscape["alphas"], dtype=np.float64)
    betas = np.asarray(landscape["betas"], dtype=np.float64)
    fig = new_figure((6.0, 5.0))
    ax = fig.add_subplot()
    a, b = np.meshgrid(alphas, betas, indexing="ij")
    finite = loss[np.isfinite(loss)]
    if finite.size and finite.max() > finite.min():
        filled = ax.contourf(a, b, loss, levels=20, cmap="viridis")
        lines = ax.contour(a, b, loss, levels=filled.levels[::4], colors="white", linewidths=0.7)
        ax.clabel(lines, inline=True, fontsize=9, fmt="%.3g")
        fig.colorbar(filled, ax=ax, label="loss")
    mark_weights(ax, "trained weights", 13)
    ax.set_title("Loss landscape around the weights")
    ax.legend(loc="upper right")
    return _png(fig)


def render_figures(audit: Mapping[str, Any], thumbnails: Mapping[int, np.ndarray] | None = None) -> dict[str, bytes]:
    """Every figure the audit has data for, by name (``"lipschitz"``, ``"certified_accuracy"``, ...)."""
    made = {
        "lipschitz": lipschitz_figure(audit),
        "certified_accuracy": certified_accuracy_figure(audit),
        "radius_scatter": radius_scatter_figure(audit),
        "thumbnails": thumbnails_figure(audit, thumbnails),
        "landscape": landscape_figure(audit),
    }
    return {name: png for name, png in made.items() if png is not None}
