r"""Loss-landscape slices and ε-sharpness (Li et al., 2018, "Visualizing the Loss Landscape of Neural Nets").

A *slice* evaluates the mean loss (and accuracy) of a model on a fixed data subset at

.. math::

    L(\alpha, \beta) = \frac{1}{N} \sum_{i=1}^{N} \ell\big(f(x_i;\, w + \alpha d_1 + \beta d_2),\, y_i\big)

on a 1-D line (:func:`landscape_1d`, :math:`\beta = 0`) or a 2-D grid (:func:`landscape_2d`). The directions
:math:`d_1, d_2` are Gaussian and *filter-normalised* (:func:`random_directions`): every output filter
(row of a linear weight, output channel of a convolution) is rescaled to the norm of the corresponding filter
of the weights, :math:`d_{k,i} \leftarrow d_{k,i} \, \lVert w_{k,i} \rVert / \lVert d_{k,i} \rVert`, and
every 1-D parameter (biases, BatchNorm weights and biases) is set to zero. This removes the scale invariance
of ReLU networks, so slices of different networks are comparable.

:func:`epsilon_sharpness` is the largest loss increase within an :math:`\ell_2` ball of radius
:math:`\varepsilon` around the weights (Keskar et al., 2017, with an :math:`\ell_2` ball instead of a box),

.. math::

    S_\varepsilon(w) = \max_{\lVert \delta \rVert_2 \le \varepsilon} L(w + \delta) - L(w),

found by projected gradient ascent. For a quadratic :math:`L(w) = \tfrac12 (w - w^*)^\top A (w - w^*)` at
its minimum, :math:`S_\varepsilon(w^*) = \tfrac12 \varepsilon^2 \lambda_{\max}(A)`.

# Note [landscape weights]
Evaluation writes :math:`w + \alpha d_1 + \beta d_2` into the parameters in place (under ``no_grad``) and
puts every module in eval mode (BatchNorm uses its running statistics, dropout is off). On exit, normal or
not, the parameters and buffers are copied back from clones taken on entry, so they are restored bit for bit,
and each module's ``training`` flag is restored.

Grids are resumable: with ``checkpoint=path.npz`` the values computed so far are written atomically every
``save_every`` points (and when an exception stops the scan), and a rerun skips the points already done. The
directions are not stored: they are regenerated from the same generator seed, and a fingerprint of
directions, weights, data and grid stored in the file must match, else a ``ValueError`` says so.

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

import io
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from stablenet.atomic import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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

NORMALIZATIONS = ("filter", "layer", "none")
"""Accepted values of ``normalize``: per output filter (Li et al.), per parameter tensor, or raw Gaussian."""

Data = tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]]
LossFn = Callable[[Tensor, Tensor], Tensor]
Direction = list[Tensor]

_FORMAT = 1


@dataclass(frozen=True, eq=False)
class Landscape:
    """A 1-D or 2-D loss-landscape slice.

    Attributes:
        alphas: Coefficients of the first direction, shape ``(n,)``.
        betas: Coefficients of the second direction, shape ``(m,)``; ``None`` for a 1-D slice.
        loss: Mean loss, shape ``(n,)`` or ``(n, m)`` with ``loss[i, j]`` at :math:`w + \\alpha_i d_1 + \\beta_j d_2`.
        accuracy: Accuracy in ``[0, 1]``, same shape (NaN where the targets are not class labels).
        computed: Grid points evaluated by the call that returned this (the rest came from a checkpoint).
    """

    alphas: np.ndarray
    betas: np.ndarray | None
    loss: np.ndarray
    accuracy: np.ndarray
    computed: int = 0


def _parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters that require grad; a landscape needs at least one")
    return params


def normalize_direction(direction: Sequence[Tensor], params: Sequence[Tensor], normalize: str = "filter") -> Direction:
    r"""Rescale a direction to the weights' scale, as in Li et al. (2018).

    * ``"filter"``: each output filter (index along dim 0) of a parameter with 2 or more dimensions gets the norm
      of the same filter of the weights, :math:`d_i \leftarrow d_i \lVert w_i \rVert / \lVert d_i \rVert`.
    * ``"layer"``: each such parameter tensor as a whole gets the norm of the weight tensor.
    * ``"none"``: unchanged (1-D parameters included).

    With ``"filter"`` and ``"layer"``, 1-D and scalar parameters (biases, BatchNorm) are set to zero.

    Args:
        direction: One tensor per parameter.
        params: The parameters, in the same order.
        normalize: One of :data:`NORMALIZATIONS`.

    Returns:
        New tensors on the parameters' devices and dtypes.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {', '.join(map(repr, NORMALIZATIONS))}; got {normalize!r}")
    if len(direction) != len(params):
        raise ValueError(f"direction must have one tensor per parameter ({len(params)}); got {len(direction)}")
    out = []
    for d, w in zip(direction, params, strict=True):
        if d.shape != w.shape:
            raise ValueError(f"direction tensor of shape {tuple(d.shape)} does not match parameter {tuple(w.shape)}")
        d = d.detach().to(device=w.device, dtype=w.dtype)
        w = w.detach()
        if normalize == "none":
            out.append(d.clone())
        elif w.dim() <= 1:
            out.append(torch.zeros_like(w))
        elif normalize == "filter":
            dims = tuple(range(1, w.dim()))
            norm = torch.linalg.vector_norm
            scale = norm(w, dim=dims, keepdim=True) / norm(d, dim=dims, keepdim=True).clamp_min(1e-30)
            out.append(d * scale)
        else:
            out.append(d * (w.norm() / d.norm().clamp_min(1e-30)))
    return out


def random_directions(
    model: nn.Module, num: int = 2, generator: torch.Generator | None = None, *, normalize: str = "filter"
) -> list[Direction]:
    """``num`` random Gaussian directions in parameter space, normalised by :func:`normalize_direction`.

    Each direction is a list with one tensor per parameter of ``model`` that requires grad (in
    ``model.parameters()`` order), on the parameter's device and dtype. The Gaussians are drawn on the
    generator's device (CPU by default), so a seed gives the same directions whatever the model's device.

    Args:
        model: The network.
        num: How many directions.
        generator: Source of randomness; ``None`` uses the global CPU generator.
        normalize: One of :data:`NORMALIZATIONS` (default ``"filter"``, Li et al. 2018).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> (d,) = random_directions(net, 1, torch.Generator().manual_seed(0))
        >>> torch.allclose(d[0].norm(dim=1), net[0].weight.norm(dim=1)), bool(d[1].abs().sum() == 0)
        (True, True)
    """
    if num < 1:
        raise ValueError(f"num must be >= 1; got {num}")
    params = _parameters(model)
    device = generator.device if generator is not None else torch.device("cpu")
    directions = []
    for _ in range(num):
        raw = [
            torch.randn(p.shape, generator=generator, device=device, dtype=p.dtype if p.is_floating_point() else None)
            for p in params
        ]
        directions.append(normalize_direction(raw, params, normalize))
    return directions


def _model_device(model: nn.Module) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")


def _batches(data: Data, batch_size: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if len(x) != len(y):
            raise ValueError(f"inputs and targets must have the same length; got {len(x)} and {len(y)}")
        pairs = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    else:
        try:
            pairs = [(x, y) for x, y in data]
        except (TypeError, ValueError):
            raise ValueError("data must be an (inputs, targets) pair of tensors or an iterable of such pairs") from None
    pairs = [(x.to(device), y.to(device)) for x, y in pairs if len(x) > 0]
    if not pairs:
        raise ValueError("data must hold at least one example; got none")
    return pairs


def _evaluate(model: nn.Module, loss_fn: LossFn, batches: Sequence[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    # loss_fn returns the batch mean; weight each batch by its size so the result is the mean over examples.
    total = correct = 0.0
    count = 0
    classify = True
    with torch.no_grad():
        for x, y in batches:
            out = model(x)
            total += float(loss_fn(out, y)) * len(x)
            count += len(x)
            classify = classify and out.dim() == 2 and y.dim() == 1 and not y.is_floating_point()
            if classify:
                correct += float((out.argmax(dim=1) == y).sum())
    return total / count, (correct / count if classify else math.nan)


@contextmanager
def _scope(model: nn.Module) -> Iterator[tuple[list[nn.Parameter], list[Tensor]]]:
    """Eval mode and exact restoration of parameters, buffers and flags (see Note [landscape weights])."""
    params = _parameters(model)
    originals = [p.detach().clone() for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield params, originals
    finally:
        with torch.no_grad():
            for p, w in zip(params, originals, strict=True):
                p.copy_(w)
            for b, saved in buffers:
                b.copy_(saved)
        for m, training in flags:
            m.training = training


def _set_point(
    params: Sequence[Tensor], originals: Sequence[Tensor], directions: Sequence[Direction], coeffs: Sequence[float]
) -> None:
    with torch.no_grad():
        for i, (p, w) in enumerate(zip(params, originals, strict=True)):
            p.copy_(w)
            for d, c in zip(directions, coeffs, strict=True):
                if c != 0.0:  # skipping keeps the origin bit-identical to the weights
                    p.add_(d[i], alpha=c)


def loss_and_accuracy(model: nn.Module, loss_fn: LossFn, data: Data, *, batch_size: int = 256) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` (in eval mode) on ``data``, as used for every landscape point.

    Args:
        model: The network; its mode is restored afterwards.
        loss_fn: ``loss_fn(outputs, targets)`` returning the *batch mean* (``reduction="mean"``).
        data: An ``(inputs, targets)`` pair of tensors (split into batches of ``batch_size``) or an iterable
            of such pairs. Moved to the model's device.
        batch_size: Examples per forward pass.

    Returns:
        ``(loss, accuracy)``; accuracy is NaN unless outputs are ``N×C`` logits and targets integer labels.
    """
    batches = _batches(data, batch_size, _model_device(model))
    with _scope(model):
        return _evaluate(model, loss_fn, batches)


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


def _fingerprint(
    params: Sequence[Tensor], directions: Sequence[Direction], batches: Sequence[tuple[Tensor, Tensor]]
) -> np.ndarray:
    # The direction norms alone would not do: filter-normalised directions share the weights' filter norms.
    values = [float(len(params)), float(sum(p.numel() for p in params))]
    values += [sum(float(p.detach().double().square().sum()) for p in params)]
    for d in directions:
        values.append(sum(float((di.double() * p.detach().double()).sum()) for di, p in zip(d, params, strict=True)))
        values.append(sum(float(di.double().sum()) for di in d))
    values.append(float(sum(len(x) for x, _ in batches)))
    values.append(sum(float(x.double().sum()) for x, _ in batches))
    values.append(sum(float(y.double().sum()) for _, y in batches))
    return np.array(values, dtype=np.float64)


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def _load_checkpoint(path: Path, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Loss, accuracy and done arrays from an existing checkpoint that matches ``arrays``, else ``None``."""
    if not path.exists():
        return None
    try:
        with np.load(path) as f:
            saved = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"landscape checkpoint {path} is unreadable ({e}); delete it to start over") from None
    for key in ("format", "alphas", "betas", "fingerprint"):
        if key not in saved:
            raise ValueError(f"{path} is not a stablenet landscape checkpoint (no {key!r}); delete it or pick another")
    if not (np.array_equal(saved["alphas"], arrays["alphas"]) and np.array_equal(saved["betas"], arrays["betas"])):
        raise ValueError(
            f"landscape checkpoint {path} holds another grid (resolution or span); delete it or pass the same grid"
        )
    if saved["fingerprint"].shape != arrays["fingerprint"].shape or not np.allclose(
        saved["fingerprint"], arrays["fingerprint"], rtol=1e-6, atol=0.0
    ):
        raise ValueError(
            f"landscape checkpoint {path} was computed with other weights, directions (seed) or data; "
            "delete it or pass the same ones"
        )
    return saved["loss"], saved["accuracy"], saved["done"]


def _scan(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    directions: Sequence[Direction],
    axes: Sequence[np.ndarray],
    *,
    batch_size: int,
    checkpoint: str | os.PathLike | None,
    save_every: int,
    callback: Callable[[int, int], None] | None,
    progress: bool,
    generator_state: Tensor | None,
) -> Landscape:
    if save_every < 1:
        raise ValueError(f"save_every must be >= 1; got {save_every}")
    params = _parameters(model)
    directions = [normalize_direction(d, params, "none") for d in directions]
    batches = _batches(data, batch_size, params[0].device)
    shape = tuple(len(a) for a in axes)
    alphas = axes[0]
    betas = axes[1] if len(axes) > 1 else np.zeros(0)
    arrays = {
        "format": np.array(_FORMAT),
        "alphas": alphas,
        "betas": betas,
        "fingerprint": _fingerprint(params, directions, batches),
        "generator_state": (generator_state.numpy() if generator_state is not None else np.zeros(0, dtype=np.uint8)),
    }
    path = Path(checkpoint) if checkpoint is not None else None
    loaded = _load_checkpoint(path, arrays) if path is not None else None
    if loaded is None:
        loss, acc, done = np.full(shape, np.nan), np.full(shape, np.nan), np.zeros(shape, dtype=bool)
    else:
        loss, acc, done = (a.copy() for a in loaded)

    def save() -> None:
        if path is not None:
            _save(path, {**arrays, "loss": loss, "accuracy": acc, "done": done})

    todo = [idx for idx in np.ndindex(*shape) if not done[idx]]
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="landscape", unit="pt", leave=False)
    computed = unsaved = 0
    try:
        with _scope(model) as (params, originals):
            for idx in todo:
                coeffs = [float(axis[i]) for axis, i in zip(axes, idx, strict=True)]
                _set_point(params, originals, directions, coeffs)
                loss[idx], acc[idx] = _evaluate(model, loss_fn, batches)
                done[idx] = True
                computed += 1
                unsaved += 1
                if unsaved >= save_every:
                    save()
                    unsaved = 0
                if bar is not None:
                    bar.update()
                if callback is not None:
                    callback(computed, len(todo))
    finally:
        if bar is not None:
            bar.close()
        if unsaved or (path is not None and not path.exists()):
            save()  # also when an exception stopped the scan: the points done are valid
    return Landscape(alphas, axes[1] if len(axes) > 1 else None, loss, acc, computed)


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
        checkpoint: ``.npz`` file for resuming (see the module docstring); it is also the raw result.
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
        checkpoint: ``.npz`` file for resuming (see the module docstring); it is also the raw result, with
            ``alphas, betas, loss, accuracy, done``.
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


def load_landscape(path: str | os.PathLike) -> Landscape:
    """Read a landscape written through ``checkpoint=`` (points not computed yet are NaN)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no landscape file at {path}")
    with np.load(path) as f:
        missing = [k for k in ("alphas", "betas", "loss", "accuracy") if k not in f.files]
        if missing:
            raise ValueError(f"{path} is not a landscape file: it lacks {', '.join(missing)}")
        betas = f["betas"]
        return Landscape(f["alphas"], betas if betas.size else None, f["loss"], f["accuracy"], 0)


def epsilon_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    epsilon: float,
    steps: int = 20,
    *,
    relative: bool = False,
    step_size: float | None = None,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> float:
    r"""Largest increase of the mean loss within an :math:`\ell_2` ball in parameter space.

    .. math::

        S_\varepsilon(w) = \max_{\lVert \delta \rVert_2 \le r} L(w + \delta) - L(w), \qquad
        r = \varepsilon \ \text{(absolute)} \quad\text{or}\quad r = \varepsilon \lVert w \rVert_2
        \ \text{(``relative=True``)},

    over all parameters that require grad (biases included), with the model in eval mode. Projected
    normalised gradient ascent: from a random point at radius :math:`r/2` (a zero start would stall at a
    critical point), :math:`\delta \leftarrow \Pi_r(\delta + \eta\, g / \lVert g \rVert)` with
    :math:`g = \nabla L(w + \delta)` and :math:`\eta = r/2` by default. The result is the best increase seen,
    a lower bound on :math:`S_\varepsilon` that is at least 0 (:math:`\delta = 0` is feasible). For a quadratic
    at its minimum the ascent is a shifted power iteration and reaches
    :math:`\tfrac12 r^2 \lambda_{\max}(A)`.

    Args:
        model: The network; weights and modes are restored exactly afterwards.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean (differentiable).
        data: An ``(inputs, targets)`` pair or an iterable of pairs.
        epsilon: Radius (``>= 0``).
        steps: Gradient-ascent steps.
        relative: Radius :math:`\varepsilon \lVert w \rVert_2` instead of :math:`\varepsilon`.
        step_size: :math:`\eta`; default ``r / 2``.
        batch_size: Examples per forward pass (pairs only).
        generator: Seeds the random start; ``None`` means ``torch.Generator().manual_seed(0)``.

    Returns:
        The loss increase (a float ``>= 0``).
    """
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite number >= 0; got {epsilon}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if step_size is not None and not (step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"step_size must be None or a finite number > 0; got {step_size}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    batches = _batches(data, batch_size, _parameters(model)[0].device)
    count = sum(len(x) for x, _ in batches)
    with _scope(model) as (params, originals), torch.enable_grad():
        base, _ = _evaluate(model, loss_fn, batches)
        radius = epsilon * math.sqrt(sum(float(w.double().square().sum()) for w in originals)) if relative else epsilon
        if radius == 0.0:
            return 0.0
        eta = radius / 2 if step_size is None else float(step_size)

        def norm(ts: Sequence[Tensor]) -> float:
            return math.sqrt(sum(float(t.double().square().sum()) for t in ts))

        start = [torch.randn(w.shape, generator=generator, device=generator.device, dtype=w.dtype) for w in originals]
        scale = radius / 2 / max(norm(start), 1e-30)
        delta = [s.to(w.device) * scale for s, w in zip(start, originals, strict=True)]
        best = 0.0
        for _ in range(steps + 1):
            _set_point(params, originals, [delta], [1.0])
            total = 0.0
            grads = [torch.zeros_like(w) for w in originals]
            for x, y in batches:
                loss = loss_fn(model(x), y) * (len(x) / count)
                total += float(loss.detach())
                for g, gi in zip(grads, torch.autograd.grad(loss, params, allow_unused=True), strict=True):
                    if gi is not None:
                        g.add_(gi)
            best = max(best, total - base)
            g_norm = norm(grads)
            if g_norm == 0.0:
                break
            delta = [d + (eta / g_norm) * g for d, g in zip(delta, grads, strict=True)]
            d_norm = norm(delta)
            if d_norm > radius:
                delta = [d * (radius / d_norm) for d in delta]
    return best


def _figure(figsize: tuple[float, float]) -> Figure:
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
    fig = _figure((6.4, 4.2))
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


def plot_landscape_contour(
    landscape: Landscape, path: str | os.PathLike, *, levels: int = 30, title: str | None = None
) -> Path:
    """Contour plot of a 2-D slice (the weights marked at the origin); written atomically."""
    loss = _check_2d(landscape)
    fig = _figure((5.6, 4.8))
    ax = fig.add_subplot()
    a, b = np.meshgrid(landscape.alphas, landscape.betas, indexing="ij")
    finite = loss[np.isfinite(loss)]
    if finite.size and finite.max() > finite.min():
        contours = ax.contour(a, b, loss, levels=levels, cmap="viridis", linewidths=0.9)
        ax.clabel(contours, inline=True, fontsize=7, fmt="%.3g")
        fig.colorbar(contours, ax=ax, label="loss")
    ax.plot([0.0], [0.0], marker="*", color="C3", markersize=9, linestyle="none", label="weights")
    ax.set_xlabel("α (direction 1)")
    ax.set_ylabel("β (direction 2)")
    ax.set_aspect("equal", adjustable="box")
    ax.set_title(title or "Loss landscape (contours)")
    fig.tight_layout()
    return _write_png(fig, path)


def plot_landscape_surface(landscape: Landscape, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """3-D surface plot of a 2-D slice (``mpl_toolkits.mplot3d``); written atomically."""
    from mpl_toolkits.mplot3d import Axes3D  # noqa: F401  (registers the "3d" projection)

    loss = _check_2d(landscape)
    fig = _figure((6.4, 5.2))
    ax = fig.add_subplot(projection="3d")
    a, b = np.meshgrid(landscape.alphas, landscape.betas, indexing="ij")
    ax.plot_surface(a, b, loss, cmap="viridis", linewidth=0, antialiased=True)
    ax.set_xlabel("α")
    ax.set_ylabel("β")
    ax.set_zlabel("loss")
    ax.set_title(title or "Loss landscape (surface)")
    fig.tight_layout()
    return _write_png(fig, path)
