"""Plots of loss-landscape slices (line, contour, surface) as PNG files, written atomically.

Matplotlib is imported when a plot is made, and only its object-oriented API is used (no ``pyplot``).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stablenet.atomic import atomic_write
from stablenet.curvature.landscape_grid import Landscape

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["mark_weights", "new_figure", "plot_landscape_1d", "plot_landscape_contour", "plot_landscape_surface"]


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A matplotlib figure on the Agg canvas, of ``figsize`` inches."""
    # Figure + FigureCanvasAgg directly: no pyplot, so no global backend switch and no figure registry.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _write_png(fig: Figure, path: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return atomic_write(Path(path), lambda f: f.write(buffer.getvalue()))


def plot_landscape_1d(landscape: Landscape, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Line plot of loss (and accuracy, on a second axis, where defined) against α; written atomically."""
    fig = new_figure((6.4, 4.2))
    ax = fig.add_subplot()
    loss = np.asarray(landscape.loss)
    if loss.ndim != 1:
        raise ValueError(f"plot_landscape_1d needs a 1-D landscape; got loss of shape {loss.shape}")
    ax.plot(landscape.alphas, loss, color="C0", linewidth=1.6, label="loss")
    ax.set_xlabel("α (filter-normalised direction)")
    ax.set_ylabel("loss", color="C0")
    ax.grid(True, alpha=0.3)
    if np.isfinite(landscape.accuracy).any():
        twin = ax.twinx()
        twin.plot(landscape.alphas, 100 * np.asarray(landscape.accuracy), color="C1", linestyle="--", label="acc")
        twin.set_ylabel("accuracy (%)", color="C1")
    ax.set_title(title or "Loss along a random direction")
    fig.tight_layout()
    return _write_png(fig, path)


def _check_2d(landscape: Landscape) -> np.ndarray:
    loss = np.asarray(landscape.loss)
    if landscape.betas is None or loss.ndim != 2:
        raise ValueError(f"a contour or surface plot needs a 2-D landscape; got loss of shape {loss.shape}")
    return loss


def mark_weights(ax: Axes, label: str, size: float) -> None:
    """The trained weights as a star at the origin of a 2-D slice's axes, named and square."""
    ax.plot([0.0], [0.0], marker="*", color="C3", markersize=size, linestyle="none", label=label)
    ax.set_xlabel("α (direction 1)")
    ax.set_ylabel("β (direction 2)")
    ax.set_aspect("equal", adjustable="box")


def plot_landscape_contour(
    landscape: Landscape, path: str | os.PathLike, *, levels: int = 30, title: str | None = None
) -> Path:
    """Contour plot of a 2-D slice (the weights marked at the origin); written atomically."""
    loss = _check_2d(landscape)
    fig = new_figure((5.6, 4.8))
    ax = fig.add_subplot()
    a, b = np.meshgrid(landscape.alphas, landscape.betas, indexing="ij")
    finite = loss[np.isfinite(loss)]
    if finite.size and finite.max() > finite.min():
        contours = ax.contour(a, b, loss, levels=levels, cmap="viridis", linewidths=0.9)
        ax.clabel(contours, inline=True, fontsize=7, fmt="%.3g")
        fig.colorbar(contours, ax=ax, label="loss")
    mark_weights(ax, "weights", 9)
    ax.set_title(title or "Loss landscape (contours)")
    fig.tight_layout()
    return _write_png(fig, path)


def plot_landscape_surface(landscape: Landscape, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """3-D surface plot of a 2-D slice (``mpl_toolkits.mplot3d``); written atomically."""
    from mpl_toolkits.mplot3d import Axes3D  # noqa: F401  (registers the "3d" projection)

    loss = _check_2d(landscape)
    fig = new_figure((6.4, 5.2))
    ax = fig.add_subplot(projection="3d")
    a, b = np.meshgrid(landscape.alphas, landscape.betas, indexing="ij")
    ax.plot_surface(a, b, loss, cmap="viridis", linewidth=0, antialiased=True)
    ax.set_xlabel("α")
    ax.set_ylabel("β")
    ax.set_zlabel("loss")
    ax.set_title(title or "Loss landscape (surface)")
    fig.tight_layout()
    return _write_png(fig, path)
