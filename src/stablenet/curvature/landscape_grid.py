"""Resumable landscape grids: the :class:`Landscape` result, the scan over a grid and its ``.npz`` file.

With ``checkpoint=path.npz`` the values computed so far are written atomically every ``save_every`` points
(and when an exception stops the scan), and a rerun skips the points already done. The directions are not
stored: they are regenerated from the same generator seed, and a fingerprint of directions, weights, data and
grid stored in the file must match, else a ``ValueError`` says so. The file is also the raw result, with
``alphas, betas, loss, accuracy, done`` (:func:`load_landscape` reads it).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor, nn

from stablenet.atomic import atomic_write
from stablenet.curvature.landscape_directions import Direction, _parameters, normalize_direction
from stablenet.curvature.landscape_eval import Data, LossFn, _batches, _evaluate, _scope, _set_point

__all__ = ["Landscape", "load_landscape"]

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
