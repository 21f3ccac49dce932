r"""Loss-landscape slices (Li et al., 2018, "Visualizing the Loss Landscape of Neural Nets").

A *slice* evaluates the mean loss (and accuracy) of a model on a fixed data subset at

.. math::

    L(\alpha, \beta) = \frac{1}{N} \sum_{i=1}^{N} \ell\big(f(x_i;\, w + \alpha d_1 + \beta d_2),\, y_i\big)

on a 1-D line (:func:`landscape_1d`, :math:`\beta = 0`) or a 2-D grid (:func:`landscape_2d`). The directions
:math:`d_1, d_2` are Gaussian and *filter-normalised* (:func:`random_directions`): every output filter
(row of a linear weight, output channel of a convolution) is rescaled to the norm of the corresponding filter
of the weights, :math:`d_{k,i} \leftarrow d_{k,i} \, \lVert w_{k,i} \rVert / \lVert d_{k,i} \rVert`, and
every 1-D parameter (biases, BatchNorm weights and biases) is set to zero. This removes the scale invariance
of ReLU networks, so slices of different networks are comparable.

Each point is evaluated in eval mode, and the weights are restored bit for bit afterwards
(Note [landscape weights]). Grids are resumable through a ``checkpoint`` file
(:mod:`stablenet.curvature.landscape_grid`).

This module is the landscape API: it also exports the directions (:mod:`stablenet.curvature.landscape_directions`),
:func:`loss_and_accuracy` (:mod:`stablenet.curvature.landscape_eval`), :class:`Landscape` and
:func:`load_landscape` (:mod:`stablenet.curvature.landscape_grid`), :func:`epsilon_sharpness`
(:mod:`stablenet.curvature.sharpness`) and the plots (:mod:`stablenet.curvature.landscape_plot`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> grid = landscape_2d(model, nn.CrossEntropyLoss(), (x, y), resolution=5)
    >>> grid.loss.shape, float(grid.loss[2, 2]) == loss_and_accuracy(model, nn.CrossEntropyLoss(), (x, y))[0]
    ((5, 5), True)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from stablenet.curvature.landscape_directions import (
    NORMALIZATIONS,
    Direction,
    normalize_direction,
    random_directions,
)
from stablenet.curvature.landscape_eval import Data, LossFn, loss_and_accuracy
from stablenet.curvature.landscape_grid import Landscape, _scan, load_landscape
from stablenet.curvature.landscape_plot import plot_landscape_1d, plot_landscape_contour, plot_landscape_surface
from stablenet.curvature.sharpness import epsilon_sharpness

__all__ = [
    "NORMALIZATIONS",
    "Landscape",
    "epsilon_sharpness",
    "landscape_1d",
    "landscape_2d",
    "load_landscape",
    "loss_and_accuracy",
    "normalize_direction",
    "plot_landscape_1d",
    "plot_landscape_contour",
    "plot_landscape_surface",
    "random_directions",
]


def _grid(span: float | tuple[float, float], n: int, what: str) -> np.ndarray:
    if n < 2:
        raise ValueError(f"{what} must be >= 2; got {n}")
    if isinstance(span, (int, float)):
        span = (-float(span), float(span))
    lo, hi = (float(s) for s in span)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"span must be a positive number s (for (-s, s)) or a pair lo < hi; got {span!r}")
    # lo + (hi - lo) * (i / (n - 1)) puts an exact 0.0 in the middle of a symmetric span with odd n.
    return np.array([lo + (hi - lo) * (i / (n - 1)) for i in range(n)], dtype=np.float64)


def _directions(
    model: nn.Module,
    num: int,
    given: Sequence[Direction] | None,
    generator: torch.Generator | None,
    normalize: str,
) -> tuple[list[Direction], Tensor | None]:
    if given is not None:
        if len(given) != num:
            raise ValueError(f"directions must hold {num} direction(s); got {len(given)}")
        return [list(d) for d in given], None
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    state = generator.get_state().clone()
    return random_directions(model, num, generator, normalize=normalize), state


def landscape_1d(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    steps: int = 51,
    span: float | tuple[float, float] = (-1.0, 1.0),
    direction: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
    normalize: str = "filter",
    batch_size: int = 256,
    checkpoint: str | os.PathLike | None = None,
    save_every: int = 10,
    callback: Callable[[int, int], None] | None = None,
    progress: bool = False,
) -> Landscape:
    r"""Mean loss and accuracy along a line :math:`w + \alpha d`, :math:`\alpha` from ``span[0]`` to ``span[1]``.

    Args:
        model: The network; weights and modes are restored exactly afterwards (Note [landscape weights]).
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean.
        data: The fixed subset: an ``(inputs, targets)`` pair or an iterable of pairs.
        steps: Number of points, evenly spaced, ends included.
        span: ``(lo, hi)``, or ``s`` for ``(-s, s)``.
        direction: One tensor per parameter (used as given); ``None`` draws one by :func:`random_directions`.
        generator: Seeds the random direction; ``None`` means ``torch.Generator().manual_seed(0)``.
        normalize: Normalisation of the random direction (one of :data:`NORMALIZATIONS`).
        batch_size: Examples per forward pass (pairs only).
        checkpoint: ``.npz`` file for resuming (:mod:`~stablenet.curvature.landscape_grid`); it is also the raw
            result.
        save_every: Write the checkpoint after this many new points.
        callback: ``callback(computed, total)`` after each new point (e.g. to stop a scan early).
        progress: Show a tqdm bar.

    Returns:
        A :class:`Landscape` with ``betas=None``.
    """
    axis = _grid(span, steps, "steps")
    directions, state = _directions(model, 1, None if direction is None else [direction], generator, normalize)
    return _scan(
        model,
        loss_fn,
        data,
        directions,
        [axis],
        batch_size=batch_size,
        checkpoint=checkpoint,
        save_every=save_every,
        callback=callback,
        progress=progress,
        generator_state=state,
    )


def landscape_2d(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    resolution: int = 21,
    span: float | tuple[float, float] = (-1.0, 1.0),
    directions: Sequence[Sequence[Tensor]] | None = None,
    generator: torch.Generator | None = None,
    normalize: str = "filter",
    batch_size: int = 256,
    checkpoint: str | os.PathLike | None = None,
    save_every: int = 10,
    callback: Callable[[int, int], None] | None = None,
    progress: bool = False,
) -> Landscape:
    r"""Mean loss and accuracy on the grid :math:`w + \alpha d_1 + \beta d_2`, ``resolution`` × ``resolution``.

    Both :math:`\alpha` and :math:`\beta` run over ``span``; ``loss[i, j]`` is at :math:`(\alpha_i, \beta_j)`.
    Points are evaluated row by row (:math:`\alpha` outer); with ``checkpoint``, an interrupted scan resumes
    where it stopped and gives the same values as an uninterrupted one.

    Args:
        model: The network; weights and modes are restored exactly afterwards (Note [landscape weights]).
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean.
        data: The fixed subset: an ``(inputs, targets)`` pair or an iterable of pairs.
        resolution: Points per axis.
        span: ``(lo, hi)``, or ``s`` for ``(-s, s)``.
        directions: Two directions, each one tensor per parameter (used as given); ``None`` draws them by
            :func:`random_directions`.
        generator: Seeds the random directions; ``None`` means ``torch.Generator().manual_seed(0)``.
        normalize: Normalisation of the random directions (one of :data:`NORMALIZATIONS`).
        batch_size: Examples per forward pass (pairs only).
        checkpoint: ``.npz`` file for resuming (:mod:`~stablenet.curvature.landscape_grid`); it is also the raw
            result, with ``alphas, betas, loss, accuracy, done``.
        save_every: Write the checkpoint after this many new points.
        callback: ``callback(computed, total)`` after each new point.
        progress: Show a tqdm bar.

    Returns:
        A :class:`Landscape`.
    """
    axis = _grid(span, resolution, "resolution")
    dirs, state = _directions(model, 2, directions, generator, normalize)
    return _scan(
        model,
        loss_fn,
        data,
        dirs,
        [axis, axis.copy()],
        batch_size=batch_size,
        checkpoint=checkpoint,
        save_every=save_every,
        callback=callback,
        progress=progress,
        generator_state=state,
    )
