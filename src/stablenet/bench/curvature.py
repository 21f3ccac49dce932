r"""``stablenet bench curvature``: the cost of Hessian tools and landscape slices, in units of one gradient.

The model is the registry's ``lenet`` for 1×28×28 inputs and 10 classes (MNIST-shaped). With ``data="random"``
(the default) it has random weights (seed fixed) and is evaluated on uniform images in :math:`[0, 1]` with
uniform labels, so the benchmark needs no download. With ``data="mnist"`` it is first trained for one pass over
the first 10 000 MNIST training images (Adam, learning rate 1e-3, batches of 128, seeded) and evaluated on MNIST
test images: the setting of the issue's reference (a small MNIST CNN). Time per product does not depend on the
data, but the number of products an eigensolver needs does: a trained network's top eigenvalue stands apart,
a random one's sits in a crowded spectrum. The loss is the mean cross-entropy over a batch of 256 images, in
eval mode, through :class:`stablenet.curvature.hessian.Hessian`.

Rows (one JSON object each; common fields ``benchmark, model, value, time_ms, ratio_or_gradient_equivalents,
device``, plus extras named below):

* ``hvp_over_grad`` (``backend`` = ``double_backward``, the default used by the eigensolvers, and
  ``forward_over_reverse``): ``value`` = ``ratio_or_gradient_equivalents`` = :math:`t_{Hv} / t_{\nabla}`, the
  median time of one Hessian-vector product over the median time of one gradient, same batch (target
  :math:`\le 2.5`); ``time_ms`` is :math:`t_{Hv}`, ``grad_time_ms`` is :math:`t_{\nabla}`.
* ``top_eigenvalue`` (``method`` = ``lanczos`` and ``power`` with ``start`` = ``gradient``, the default, then
  ``lanczos`` with ``start`` = ``random``, PyHessian's start, for comparison): ``value`` is :math:`\lambda_{\max}`
  from ``Hessian.eigenvalues(k=1, tol=1e-3, start=...)``; ``time_ms`` its wall time (median of ``repeats``, at most
  3); ``ratio_or_gradient_equivalents`` its cost in gradient-equivalents, the median over the repeats of its time
  over the gradients timed just before it (Note [interleaved gradient timing]). Extras: ``num_hvp`` and
  ``hvp_equivalents`` = ``num_hvp`` × :math:`t_{Hv}/t_{\nabla}` (the same cost predicted from the product
  count; the difference is solver overhead), ``converged``, ``reference`` (Lanczos to ``tol=1e-8``, untimed)
  and ``relative_error`` against it. The power row also has ``relative_difference``
  :math:`|\lambda_{\text{power}} - \lambda_{\text{lanczos}}| / |\lambda_{\text{lanczos}}|` and ``agrees``
  (:math:`\le 10^{-3}`). All three draw their random vector from the same seed.
* ``landscape_2d``: a 21×21 filter-normalised slice (:func:`stablenet.curvature.landscape.landscape_2d`) on
  1000 images (random, or the first MNIST test images), of the registry's ``lipconvnet`` with its defaults
  (AOL convolutions, width 16, dense 256; the row's ``model``). ``value`` is the loss at the grid point nearest
  the origin, ``time_ms`` the wall time (target under 2 minutes on a CPU), ``ratio_or_gradient_equivalents`` =
  ``time_ms`` / :math:`t_{\nabla}` (the gradient on the batch of 256).

Times are medians of ``repeats`` runs after one warm-up for the product and the gradient, of at most 3 for the
eigensolvers, a single run for the landscape, with ``torch.cuda.synchronize`` around each on a GPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.nn import functional

from stablenet.curvature.hessian import Hessian
from stablenet.curvature.landscape import landscape_2d
from stablenet.models import create_model

__all__ = ["DATA_SOURCES", "HEADER", "CurvatureSizes", "bench_curvature", "default_sizes", "format_row"]

_HVP_TARGET = 2.5
_LANDSCAPE_TARGET_S = 120.0
_AGREEMENT = 1e-3
_SOLVE_REPEATS = 3
_REFERENCE_TOL = 1e-8


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class CurvatureSizes:
    """Sizes of the curvature benchmark.

    Attributes:
        batch_size: Images in the batch of the product, gradient and eigenvalue measurements.
        landscape_examples: Images of the landscape's data subset.
        landscape_resolution: Points per axis of the landscape grid.
        width: ``lenet``'s ``width`` (channels of its first convolution).
        hidden: ``lenet``'s ``hidden`` (width of its first dense layer).
        input_size: Image height and width.
        tol: Eigensolvers' relative stopping tolerance.
        max_iter: Eigensolvers' products at most (per eigenpair for power iteration).
    """

    batch_size: int = 256
    landscape_examples: int = 1000
    landscape_resolution: int = 21
    width: int = 32
    hidden: int = 256
    input_size: int = 28
    tol: float = 1e-3
    max_iter: int = 500


def default_sizes(quick: bool = False) -> CurvatureSizes:
    """The issue's sizes; ``quick``: a batch of 64, a 5×5 landscape on 100 images."""
    full = CurvatureSizes()
    return replace(full, batch_size=64, landscape_examples=100, landscape_resolution=5) if quick else full


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wall(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _medians(fns: list[Callable[[], object]], repeats: int, device: torch.device) -> list[float]:
    """Median seconds of each function, after one warm-up, alternating the functions between repeats."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            ts.append(_wall(fn, device)[1])
    return [statistics.median(ts) for ts in times]


def _solve_cost(
    solve: Callable[[], object], gradient: Callable[[], object], repeats: int, device: torch.device
) -> tuple[object, float, float]:
    """``(result, median seconds, median gradient-equivalents)`` of a seeded solve (the same work every time).

    Note [interleaved gradient timing]: each solve is timed right after three gradients, and its cost in
    gradient-equivalents is its time over the median of those three. On a shared machine whose speed drifts
    over seconds, a ratio of neighbouring timings is steadier than one against a gradient timed minutes apart.
    """
    times, ratios = [], []
    result = None
    for _ in range(repeats):
        t_grad = statistics.median(_wall(gradient, device)[1] for _ in range(3))
        result, seconds = _wall(solve, device)
        times.append(seconds)
        ratios.append(seconds / t_grad)
    return result, statistics.median(times), statistics.median(ratios)


def _data(n: int, size: int, generator: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
    images = torch.rand(n, 1, size, size, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return images.to(device), labels.to(device)


DATA_SOURCES = ("random", "mnist")
_TRAIN_IMAGES, _TRAIN_BATCH, _TRAIN_LR = 10_000, 128, 1e-3


def _mnist(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The first ``n`` MNIST test images (``load_dataset``: standard files, ``$STABLENET_DATA`` or torchvision)."""
    from stablenet.data.datasets import load_dataset

    images, labels = load_dataset("mnist", "test")
    return images[:n].to(device), labels[:n].to(device)


def _train_briefly(model: torch.nn.Module, seed: int, device: torch.device) -> None:
    """One seeded pass of Adam over the first training images, so the Hessian is that of a fitted network."""
    from stablenet.data.datasets import load_dataset

    images, labels = load_dataset("mnist", "train")
    order = torch.randperm(_TRAIN_IMAGES, generator=_seeded(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=_TRAIN_LR)
    model.train()
    for index in order.split(_TRAIN_BATCH):
        optimizer.zero_grad(set_to_none=True)
        functional.cross_entropy(model(images[index].to(device)), labels[index].to(device)).backward()
        optimizer.step()
    model.eval()


#: Column titles matching :func:`format_row`.
HEADER = f"{'benchmark':16s} {'method':20s} {'model':7s} {'value':>12s} {'time_ms':>11s} {'ratio/grad-eq':>14s}"


def format_row(row: dict) -> str:
    """One row as a table line under :data:`HEADER`; its method or backend, with its eigensolver start if any."""
    label = row.get("method") or row.get("backend") or "-"
    label = f"{label}/{row['start']}" if "start" in row else label
    return (
        f"{row['benchmark']:16s} {label:20s} {row['model']:7s} "
        f"{row['value']:12.6g} {row['time_ms']:11.2f} {row['ratio_or_gradient_equivalents']:14.3f}"
    )


def bench_curvature(
    *,
    quick: bool = False,
    device: str | torch.device = "cpu",
    repeats: int | None = None,
    sizes: CurvatureSizes | None = None,
    seed: int = 0,
    data: str = "random",
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Run the benchmark and return its rows (see the module docstring).

    Args:
        quick: :func:`default_sizes` ``(quick=True)`` and 3 repeats instead of 10.
        device: where to run.
        repeats: timed repeats of the product and gradient (median reported).
        sizes: replaces :func:`default_sizes` (e.g. smaller sizes in tests).
        seed: weights, data and random vectors.
        data: ``"random"`` (no download) or ``"mnist"`` (train ``lenet`` briefly, measure on test images; see the
            module docstring).
        progress: called with one line per finished row.
    """
    device = torch.device(device)
    repeats = repeats or (3 if quick else 10)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    sizes = sizes if sizes is not None else default_sizes(quick)
    for name in ("batch_size", "landscape_examples", "landscape_resolution", "width", "hidden"):
        if getattr(sizes, name) < (2 if name == "landscape_resolution" else 1):
            raise ValueError(f"sizes.{name} must be >= {2 if name == 'landscape_resolution' else 1}")
    if data not in DATA_SOURCES:
        raise ValueError(f"data must be one of {', '.join(DATA_SOURCES)}; got {data!r}")
    if data == "mnist" and sizes.input_size != 28:
        raise ValueError(f"data='mnist' needs sizes.input_size == 28; got {sizes.input_size}")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = create_model("lenet", 10, 1, sizes.input_size, width=sizes.width, hidden=sizes.hidden).to(device).eval()
    if data == "mnist":
        _train_briefly(model, seed, device)
        batch = _mnist(sizes.batch_size, device)
    else:
        batch = _data(sizes.batch_size, sizes.input_size, generator, device)
    hessian = Hessian(model, functional.cross_entropy, batch)
    common = {"model": "lenet", "device": str(device), "data": data, "num_parameters": hessian.dim}
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        if progress is not None:
            label = "/".join(str(row[key]) for key in ("method", "start", "backend") if key in row)
            extra = f" ({label})" if label else ""
            progress(
                f"{row['benchmark']}{extra}: value {row['value']:.6g}, {row['time_ms']:.1f} ms, "
                f"{row['ratio_or_gradient_equivalents']:.3f} (ratio or gradient-equivalents)"
            )

    v = torch.randn(hessian.dim, generator=generator, dtype=torch.float64).to(device)
    alternative = Hessian(model, functional.cross_entropy, batch, backend="forward_over_reverse")
    t_grad, t_hvp, t_alt = _medians(
        [hessian.gradient, lambda: hessian.hvp(v), lambda: alternative.hvp(v)], repeats, device
    )
    ratio = t_hvp / t_grad
    for backend, t in (("double_backward", t_hvp), ("forward_over_reverse", t_alt)):
        emit(
            {
                "benchmark": "hvp_over_grad",
                "backend": backend,
                **common,
                "value": t / t_grad,
                "time_ms": t * 1e3,
                "ratio_or_gradient_equivalents": t / t_grad,
                "grad_time_ms": t_grad * 1e3,
                "batch_size": sizes.batch_size,
                "repeats": repeats,
                "target": _HVP_TARGET,
                "meets_target": t / t_grad <= _HVP_TARGET,
            }
        )

    # Note [eigenvalue reference]: both Ritz values and Rayleigh quotients are lower bounds on the top
    # eigenvalue; a Lanczos run to a tight tolerance tells which of the two tol=1e-3 answers is off.
    reference, _ = hessian.eigenvalues(k=1, tol=_REFERENCE_TOL, max_iter=sizes.max_iter, generator=_seeded(seed + 1))
    reference_value, reference_hvp = float(reference[0]), hessian.last_num_hvp
    values = {}
    solve_repeats = min(repeats, _SOLVE_REPEATS)
    for method, start in (("lanczos", "gradient"), ("power", "gradient"), ("lanczos", "random")):
        (eigenvalues, _), seconds, equivalents = _solve_cost(
            lambda method=method, start=start: hessian.eigenvalues(
                k=1, method=method, tol=sizes.tol, max_iter=sizes.max_iter, generator=_seeded(seed + 1), start=start
            ),
            hessian.gradient,
            solve_repeats,
            device,
        )
        values[method, start] = float(eigenvalues[0])
        row = {
            "benchmark": "top_eigenvalue",
            "method": method,
            "start": start,
            **common,
            "value": values[method, start],
            "time_ms": seconds * 1e3,
            "ratio_or_gradient_equivalents": equivalents,
            "repeats": solve_repeats,
            "num_hvp": hessian.last_num_hvp,
            "hvp_equivalents": hessian.last_num_hvp * ratio,
            "converged": bool(getattr(hessian.last_result, "converged", True)),
            "tol": sizes.tol,
            "batch_size": sizes.batch_size,
            "reference": reference_value,
            "reference_num_hvp": reference_hvp,
            "relative_error": abs(values[method, start] - reference_value) / max(abs(reference_value), 1e-30),
        }
        if method == "power":
            lanczos = values["lanczos", "gradient"]
            diff = abs(values[method, start] - lanczos) / max(abs(lanczos), 1e-30)
            row["relative_difference"] = diff
            row["agrees"] = diff <= _AGREEMENT
        emit(row)

    # The landscape model: lipconvnet (its defaults: AOL convolutions, width 16, dense 256).
    landscape_model = create_model("lipconvnet", 10, 1, sizes.input_size).to(device).eval()
    if data == "mnist":
        x, y = _mnist(sizes.landscape_examples, device)
    else:
        x, y = _data(sizes.landscape_examples, sizes.input_size, generator, device)
    grid, seconds = _wall(
        lambda: landscape_2d(
            landscape_model,
            functional.cross_entropy,
            (x, y),
            resolution=sizes.landscape_resolution,
            generator=torch.Generator().manual_seed(seed + 2),
            batch_size=256,
        ),
        device,
    )
    centre = int(abs(grid.alphas).argmin())  # the origin for an odd resolution
    emit(
        {
            "benchmark": "landscape_2d",
            **common,
            "model": "lipconvnet",
            "num_parameters": sum(p.numel() for p in landscape_model.parameters()),
            "value": float(grid.loss[centre, centre]),
            "time_ms": seconds * 1e3,
            "ratio_or_gradient_equivalents": seconds / t_grad,
            "resolution": sizes.landscape_resolution,
            "points": sizes.landscape_resolution**2,
            "num_examples": sizes.landscape_examples,
            "time_per_point_ms": seconds * 1e3 / sizes.landscape_resolution**2,
            "target_s": _LANDSCAPE_TARGET_S,
            "meets_target": seconds < _LANDSCAPE_TARGET_S,
        }
    )
    return rows
