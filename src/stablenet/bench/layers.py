"""``stablenet bench layers``: cost of each 1-Lipschitz layer family against unconstrained layers of the same shapes.

For every family (``sll``, ``cpl``, ``aol``, ``sr``, ``spectral``, ``cayley`` convolutions at CIFAR-10 shapes,
batch 256, 32×32, widths 64 and 128; ``orthogonal`` dense layers at ``16 · width`` features) and for a whole
model (``sll_s``), three measurements, each next to the same measurement of a *plain twin* made in the same run:

* ``train``: one training step, forward + backward of a scalar loss + an SGD step (the constraint's map from
  free parameters to weights runs, and is differentiated, at every step);
* ``eval``: one forward in eval mode under ``torch.no_grad()``, where layers reuse their cached constrained
  weights (Note [eval cache] in ``stablenet.nn.base``);
* ``eval_grad``: what an attack step costs, one forward in eval mode and the gradient with respect to the input,
  the parameters requiring grad as torch leaves them (Note [cached weights with gradients]); besides the plain
  twin, the row has the same step on a frozen copy (``requires_grad_(False)``): ``frozen_time_ms`` and
  ``ratio_to_frozen``;
* ``train_bf16`` (model only, CUDA only): the training step under ``torch.autocast(dtype=torch.bfloat16)`` at
  batch 512, with ``images_per_s``;
* ``train_graphs`` (layers with a capturable weight map, ``stablenet.nn.cuda_graphs.capturable``; CUDA only) and
  ``train_bf16_graphs`` (model, CUDA only):
  the same steps with the weight maps recorded as CUDA graphs (``stablenet.nn.capture_weight_maps``, Note
  [captured weight maps]); ``captured_layers`` counts the layers recorded.

Plain twins: a non-residual layer ``L`` is measured as ``Sequential(L, ReLU)`` against
``Sequential(nn.Conv2d, ReLU)`` of the same shape (Cayley: circular padding; orthogonal: ``nn.Linear``), so the
ratio isolates the constraint. Residual layers (SLL, CPL) are measured against the same residual shape without
the constraint, :math:`x - K^\\top \\mathrm{ReLU}(K x + b)` (``PlainResidualConv2d``). The model's twin
replaces every SLL layer by that plain residual, the pooling by ``nn.AvgPool2d`` and the head by ``nn.Linear``.

Independent implementations (:data:`REFERENCE_FAMILIES`, only when ``families`` names them): the ``orthogonium``
package's SLL and AOL convolutions, measured against the same plain twins as our ``sll`` and ``aol`` rows, so the
two ratios come from one run (the package is an optional install, not a dependency).

Times are medians of ``repeats`` runs after ``warmup`` runs, layer and twin alternating, with
``torch.cuda.synchronize`` around each run on a GPU. ``peak_mem_mb`` (CUDA only, else ``None``) is the memory a
step needs: the module's parameters and buffers plus the peak of ``torch.cuda.max_memory_allocated`` above what
was allocated before the step (activations, gradients, workspaces); the shared input is not counted. On the
CPU there is no allocator statistic as cheap and as faithful, so it is ``None``.

One JSON row per (layer, shape, mode): ``layer, shape, mode, time_ms, ratio_to_plain, peak_mem_mb, device``
plus ``plain_time_ms``, ``plain_peak_mem_mb``, ``mem_ratio_to_plain``, ``width``, ``repeats``, for
``train_bf16``, ``images_per_s`` and ``plain_images_per_s``, and for ``eval_grad``, ``frozen_time_ms`` and
``ratio_to_frozen``.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablenet.nn.cuda_graphs import capturable, capture_weight_maps
from stablenet.nn.families import layer_family
from stablenet.spectral.conv import CIRCULAR_BOUND_METHODS

__all__ = [
    "HEADER",
    "LAYER_FAMILIES",
    "MODES",
    "REFERENCE_FAMILIES",
    "LayersBenchConfig",
    "PlainResidualConv2d",
    "PlainResidualLinear",
    "bench_layers",
    "default_config",
    "format_row",
    "plain_sll_network",
]

#: Layer families of the benchmark, in row order.
LAYER_FAMILIES = ("sll", "cpl", "aol", "sr", "spectral", "cayley", "orthogonal")


#: Independent implementations measured beside ours, in the same run, when ``families`` lists them (never by
#: default): the SLL convolution and the AOL convolution of the ``orthogonium`` package (``pip install
#: orthogonium``), the layers a user would otherwise take, with the same plain twins as our ``sll`` and ``aol`` rows.
REFERENCE_FAMILIES = ("orthogonium_sll", "orthogonium_aol")

#: The row of each benchmark family: a layer family's convolution (``stablenet.nn.families``), or its dense layer.
_ROWS = {family: (family, "conv") for family in LAYER_FAMILIES}
_ROWS["orthogonal"] = ("cayley", "dense")


@dataclass(frozen=True)
class LayersBenchConfig:
    """Sizes of one benchmark run.

    Attributes:
        batch_size: examples per step for the layers and the model.
        image_size: height and width of the feature maps and of the model's input images.
        widths: channels of the convolutional layers (dense layers use ``16 * width`` features).
        families: layer families, a subset of :data:`LAYER_FAMILIES` and :data:`REFERENCE_FAMILIES`.
        model: a registry name of an SLL or CPL network (``None``: no model rows).
        model_options: options passed to ``create_model`` (e.g. a smaller width for smoke tests).
        bf16_batch_size: batch of the bf16 autocast training rows (CUDA only).
        bound_method: how spectral and CPL layers bound their circular norm (``"auto"``, ``"cholesky"`` or
            ``"gram"``; Note [circular bound method] in ``stablenet.nn.spectral_norm``); recorded in their rows.
        spectral_n_iter: Gram steps of the spectral layers (``None``: adaptive); a fixed count makes their map
            capturable as CUDA graphs; recorded in their rows.
        warmup: untimed runs before the timed ones.
        repeats: timed runs (median reported).
    """

    batch_size: int = 256
    image_size: int = 32
    widths: tuple[int, ...] = (64, 128)
    families: tuple[str, ...] = LAYER_FAMILIES
    model: str | None = "sll_s"
    model_options: dict[str, Any] = field(default_factory=dict)
    bf16_batch_size: int = 512
    bound_method: str = "auto"
    spectral_n_iter: int | None = None
    warmup: int = 3
    repeats: int = 10


def default_config(quick: bool = False) -> LayersBenchConfig:
    """The CIFAR-10 sizes, or (``quick``, a smoke test) batch 8, 16×16, width 16, one repeat, and ``sll_s``
    cut to 2 convolutions and 1 dense layer of 256 inner features (the rows record ``model_options``)."""
    if quick:
        return LayersBenchConfig(
            batch_size=8,
            image_size=16,
            widths=(16,),
            model_options={"n_conv": 2, "n_dense": 1, "dense_inner": 256},
            bf16_batch_size=32,
            warmup=1,
            repeats=1,
        )
    return LayersBenchConfig()


# ------------------------------------------------------------------------------------------ plain twins
class PlainResidualConv2d(nn.Module):
    r""":math:`x - K^\top \mathrm{ReLU}(K x + b)`: the shape of an SLL / CPL convolution without its constraint."""

    def __init__(self, channels: int, inner_channels: int | None = None, kernel_size: int = 3) -> None:
        super().__init__()
        inner = inner_channels or channels
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(inner, channels, kernel_size, kernel_size) / math.sqrt(9 * channels))
        self.bias = nn.Parameter(torch.zeros(inner))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(F.conv2d(x, self.weight, self.bias, padding=self.padding))
        return x - F.conv_transpose2d(h, self.weight, padding=self.padding)


class PlainResidualLinear(nn.Module):
    r""":math:`x - W^\top \mathrm{ReLU}(W x + b)`: the shape of an SLL / CPL dense layer without its constraint."""

    def __init__(self, features: int, inner_features: int | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(inner_features or features, features) / math.sqrt(features))
        self.bias = nn.Parameter(torch.zeros(inner_features or features))

    def forward(self, x: Tensor) -> Tensor:
        return x - F.linear(torch.relu(F.linear(x, self.weight, self.bias)), self.weight.T)


def plain_sll_network(
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    width: int,
    n_conv: int,
    n_dense: int,
    conv_inner: int,
    dense_inner: int,
    kernel_size: int = 3,
    pool: int = 4,
) -> nn.Sequential:
    """The plain twin of an SLL / CPL network of ``stablenet.models.lipnets`` (same shapes, no constraint)."""
    from stablenet.nn.preprocess import ChannelPad, InputNormalization

    features = width * (image_size // pool) ** 2
    return nn.Sequential(
        InputNormalization((0.0,) * in_channels, (1.0,) * in_channels),
        ChannelPad(in_channels, width),
        *[PlainResidualConv2d(width, conv_inner, kernel_size) for _ in range(n_conv)],
        nn.AvgPool2d(pool, divisor_override=pool),
        nn.Flatten(),
        *[PlainResidualLinear(features, dense_inner) for _ in range(n_dense)],
        nn.Linear(features, num_classes),
    )


def _orthogonium(family: str) -> Callable[[int], nn.Module]:
    """The constructor of a reference row's layer (width -> module); ImportError naming the package if missing."""
    try:
        from orthogonium.layers.conv.AOL.aol import AOLConv2D
        from orthogonium.layers.conv.SLL.sll_layer import SDPBasedLipschitzResBlock
    except ImportError as e:
        raise ImportError(
            f"the {family} row measures the orthogonium package's layer, which is not installed "
            "(pip install orthogonium); leave the row out or install it"
        ) from e
    if family == "orthogonium_sll":
        return lambda width: SDPBasedLipschitzResBlock(width, inner_dim_factor=1, kernel_size=3)
    return lambda width: nn.Sequential(AOLConv2D(width, width, 3, padding=1), nn.ReLU())


def _layer_class(family: str) -> Callable[..., nn.Module]:
    if family in REFERENCE_FAMILIES:
        return _orthogonium(family)
    if family not in _ROWS:
        raise ValueError(f"family must be one of {', '.join(LAYER_FAMILIES)}; got {family!r}")
    name, role = _ROWS[family]
    return getattr(layer_family(name), role)


def _layer_pair(
    family: str, width: int, size: int, bound_method: str = "auto", spectral_n_iter: int | None = None
) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """``(layer, plain twin, input shape without batch)`` of one family at one width."""
    cls = _layer_class(family)
    if family == "orthogonium_sll":
        return cls(width), PlainResidualConv2d(width), (width, size, size)
    if family == "orthogonium_aol":
        return cls(width), nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU()), (width, size, size)
    if family in ("sll", "cpl"):
        kw = {"method": bound_method} if family == "cpl" else {}  # CPL takes its input size from its first forward
        return cls(width, **kw), PlainResidualConv2d(width), (width, size, size)
    if family == "orthogonal":
        features = 16 * width
        return (
            nn.Sequential(cls(features, features), nn.ReLU()),
            nn.Sequential(nn.Linear(features, features), nn.ReLU()),
            (features,),
        )
    if family == "cayley":
        layer = cls(width, width, 3)
        plain = nn.Conv2d(width, width, 3, padding=1, padding_mode="circular")
    else:
        # the torch signature: a spectral layer takes its input size from its first forward (lazy)
        kw = {"method": bound_method, "n_iter": spectral_n_iter} if family == "spectral" else {}
        layer = cls(width, width, 3, padding=1, **kw)
        plain = nn.Conv2d(width, width, 3, padding=1)
    return nn.Sequential(layer, nn.ReLU()), nn.Sequential(plain, nn.ReLU()), (width, size, size)


#: The modes measured on every device (the CUDA-only ones are added on a GPU).
MODES = ("train", "eval", "eval_grad")

#: Column titles matching :func:`format_row`.
HEADER = f"{'layer':12s} {'shape':22s} {'mode':10s} {'time_ms':>10s} {'ratio':>7s} {'peak_mem_mb':>12s}"


def format_row(row: dict) -> str:
    """One row as a table line under :data:`HEADER`."""
    mem = "-" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.1f}"
    shape = "x".join(map(str, row["shape"]))
    return (
        f"{row['layer']:12s} {shape:22s} {row['mode']:10s} {row['time_ms']:10.2f} {row['ratio_to_plain']:7.2f} "
        f"{mem:>12s}" + (f"  x{row['ratio_to_frozen']:.2f} frozen" if "ratio_to_frozen" in row else "")
    )


# -------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_fn(module: nn.Module, x: Tensor, mode: str, target: Tensor | None) -> Callable[[], None]:
    """One train step (forward, backward, SGD) or one no-grad eval forward."""
    if mode == "eval":
        module.eval()

        def run() -> None:
            with torch.no_grad():
                module(x)

        return run
    if mode == "eval_grad":
        module.eval()
        leaf = x.detach().requires_grad_(True)

        def attack_step() -> None:
            torch.autograd.grad(module(leaf).float().square().sum(), leaf)

        return attack_step
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=1e-4)
    autocast = mode.startswith("train_bf16")

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = module(x)
            loss = F.cross_entropy(out.float(), target) if target is not None else out.float().square().mean()
        loss.backward()
        opt.step()

    return run


def _peak_mb(module: nn.Module, step: Callable[[], None], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    _sync(device)
    own = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    return (torch.cuda.max_memory_allocated(device) - before + own) / 2**20


def _time_pair(
    steps: tuple[Callable[[], None], ...], warmup: int, repeats: int, device: torch.device
) -> tuple[float, ...]:
    """Median milliseconds of two (or more) steps, run alternately."""
    for _ in range(warmup):
        for step in steps:
            step()
    times: tuple[list[float], ...] = tuple([] for _ in steps)
    for _ in range(repeats):
        for step, bucket in zip(steps, times, strict=True):
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            bucket.append((time.perf_counter() - t0) * 1e3)
    return tuple(statistics.median(t) for t in times)


def _compare(
    name: str,
    layer: nn.Module,
    plain: nn.Module,
    x: Tensor,
    mode: str,
    cfg: LayersBenchConfig,
    target: Tensor | None = None,
    **extra: Any,
) -> dict:
    device = x.device
    graphs = mode.endswith("_graphs")
    captured = capture_weight_maps(layer) if graphs else 0
    try:
        steps = (_step_fn(layer, x, mode, target), _step_fn(plain, x, mode, target))
        if mode == "eval_grad":
            frozen = copy.deepcopy(layer).requires_grad_(False)
            ms, plain_ms, frozen_ms = _time_pair(
                (*steps, _step_fn(frozen, x, mode, None)), cfg.warmup, cfg.repeats, device
            )
            extra |= {"frozen_time_ms": frozen_ms, "ratio_to_frozen": ms / frozen_ms}
            del frozen
        else:
            ms, plain_ms = _time_pair(steps, cfg.warmup, cfg.repeats, device)
        mem, plain_mem = _peak_mb(layer, steps[0], device), _peak_mb(plain, steps[1], device)
    finally:
        if graphs:
            capture_weight_maps(layer, enabled=False)
    if graphs:
        extra["captured_layers"] = captured
    row = {
        "layer": name,
        "shape": list(x.shape),
        "mode": mode,
        "time_ms": ms,
        "ratio_to_plain": ms / plain_ms,
        "peak_mem_mb": mem,
        "device": str(device),
        "plain_time_ms": plain_ms,
        "plain_peak_mem_mb": plain_mem,
        "mem_ratio_to_plain": mem / plain_mem if mem is not None and plain_mem else None,
        "repeats": cfg.repeats,
        **extra,
    }
    if mode.startswith("train_bf16"):
        row["images_per_s"] = x.shape[0] / (ms / 1e3)
        row["plain_images_per_s"] = x.shape[0] / (plain_ms / 1e3)
    return row


def _model_pair(name: str, cfg: LayersBenchConfig, device: torch.device) -> tuple[nn.Module, nn.Module, int]:
    """The model, its plain twin (same shapes) and its width."""
    from stablenet.models import create_model, model_options
    from stablenet.models.lipnets import SLL_CONV_INNER

    if not name.startswith(("sll_", "cpl_")) or name == "sll_mlp":
        raise ValueError(f"the layers benchmark compares SLL or CPL networks (sll_xs ... cpl_xl); got {name!r}")
    opts = {**model_options(name), **cfg.model_options}
    model = create_model(name, 10, 3, cfg.image_size, **cfg.model_options)
    conv_inner = opts["conv_inner"] or (SLL_CONV_INNER if name.startswith("sll_") else opts["width"])
    plain = plain_sll_network(
        10,
        3,
        cfg.image_size,
        width=opts["width"],
        n_conv=opts["n_conv"],
        n_dense=opts["n_dense"],
        conv_inner=conv_inner,
        dense_inner=opts["dense_inner"],
        kernel_size=opts["kernel_size"],
        pool=opts["pool"],
    )
    return model.to(device), plain.to(device), opts["width"]


def bench_layers(
    *,
    quick: bool = False,
    device: str | torch.device = "cpu",
    repeats: int | None = None,
    config: LayersBenchConfig | None = None,
    batch_size: int | None = None,
    families: Sequence[str] | None = None,
    bound_method: str | None = None,
    spectral_n_iter: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Run the benchmark and return its rows (see the module docstring).

    Args:
        quick: use ``default_config(quick=True)`` (ignored when ``config`` is given).
        device: where to run.
        repeats: timed runs per measurement (default: the config's).
        config: the sizes (default: :func:`default_config`).
        batch_size: replaces the config's batch size (e.g. a smaller one on a CPU).
        families: run only these layer families and, if its name is listed, the config's model.
        bound_method: replaces the config's ``bound_method`` (``"auto"``, ``"cholesky"`` or ``"gram"``).
        spectral_n_iter: replaces the config's ``spectral_n_iter``.
        seed: seed of the random weights and inputs.
        progress: called with one line per row.

    Raises:
        ValueError: an unknown family or a model that is not an SLL / CPL network.
        ImportError: a family whose layer module is missing.
    """
    device = torch.device(device)
    cfg = config or default_config(quick)
    if repeats is not None:
        cfg = replace(cfg, repeats=repeats)
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        cfg = replace(cfg, batch_size=batch_size)
    if families is not None:
        accepted = (*LAYER_FAMILIES, *REFERENCE_FAMILIES, *([cfg.model] if cfg.model else []))
        unknown = [f for f in families if f not in accepted]
        if unknown or not families:
            raise ValueError(f"families must be among {', '.join(accepted)}; got {', '.join(families) or 'none'}")
        cfg = replace(
            cfg,
            families=tuple(f for f in (*LAYER_FAMILIES, *REFERENCE_FAMILIES) if f in families),
            model=cfg.model if cfg.model in families else None,
        )
    if bound_method is not None:
        if bound_method not in CIRCULAR_BOUND_METHODS:
            raise ValueError(f"bound_method must be one of {', '.join(CIRCULAR_BOUND_METHODS)}; got {bound_method!r}")
        cfg = replace(cfg, bound_method=bound_method)
    if spectral_n_iter is not None:
        if isinstance(spectral_n_iter, bool) or not isinstance(spectral_n_iter, int) or spectral_n_iter < 1:
            raise ValueError(f"spectral_n_iter must be a positive int; got {spectral_n_iter!r}")
        cfg = replace(cfg, spectral_n_iter=spectral_n_iter)
    for family in cfg.families:
        _layer_class(family)  # fail before measuring anything
    torch.manual_seed(seed)
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        if progress is not None:
            progress(format_row(row))

    def emit_graphed(*args: Any, **kw: Any) -> None:
        # A capture that fails (a driver without graph support, say) costs its row, not the run.
        try:
            emit(_compare(*args, **kw))
        except RuntimeError as e:
            if progress is not None:
                progress(f"{args[0]} {args[4]}: capture failed: {str(e).splitlines()[0]}")

    n, size = cfg.batch_size, cfg.image_size
    for family in cfg.families:
        for width in cfg.widths:
            layer, plain, shape = _layer_pair(family, width, size, cfg.bound_method, cfg.spectral_n_iter)
            layer, plain = layer.to(device), plain.to(device)
            x = torch.randn(n, *shape, device=device)
            extra = {"bound_method": cfg.bound_method} if family in ("spectral", "cpl") else {}
            if family == "spectral":
                extra["n_iter"] = cfg.spectral_n_iter
            for mode in MODES:
                emit(_compare(family, layer, plain, x, mode, cfg, width=width, **extra))
            if device.type == "cuda" and any(capturable(m) for m in layer.modules()):
                emit_graphed(family, layer, plain, x, "train_graphs", cfg, width=width, **extra)
            del layer, plain, x
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if cfg.model is not None:
        model, plain, width = _model_pair(cfg.model, cfg, device)
        options = dict(cfg.model_options)
        x = torch.rand(n, 3, size, size, device=device)
        y = torch.randint(0, 10, (n,), device=device)
        kw = {"width": width, "model_options": options}
        for mode in MODES:
            emit(_compare(cfg.model, model, plain, x, mode, cfg, target=y, **kw))
        if device.type == "cuda":
            emit_graphed(cfg.model, model, plain, x, "train_graphs", cfg, target=y, **kw)
            xb = torch.rand(cfg.bf16_batch_size, 3, size, size, device=device)
            yb = torch.randint(0, 10, (cfg.bf16_batch_size,), device=device)
            emit(_compare(cfg.model, model, plain, xb, "train_bf16", cfg, target=yb, **kw))
            emit_graphed(cfg.model, model, plain, xb, "train_bf16_graphs", cfg, target=yb, **kw)
    return rows
