r"""``stablenet bench train``: training throughput of a constrained model against its plain twin, and of the data
pipeline on its own.

For each model (default: ``sll_mlp`` and ``lipconvnet`` on a CPU, ``sll_s`` on CUDA; sizes, data set and batch from
:data:`WORKLOADS`), images per second of a training step in three modes, ``fp32``, ``bf16`` and ``bf16`` with
``torch.compile`` (a mode that fails to compile, or bf16 on a GPU without it, costs its rows, not the run), each
next to the same measurement of the model's *plain twin* made in the same run:

.. math:: \text{ratio} = \frac{\text{images/s of the model}}{\text{images/s of its plain twin}}
   \quad (\text{same precision and compile; the issue's targets: } \ge 1/1.3 \text{ on a CPU, } \ge 0.95
   \text{ for sll\_s on a GPU}).

**The step** is the trainer's (:func:`stablenet.train.train`) for a :class:`~stablenet.train.TrainConfig` with
its defaults (Adam, ``lr = 1e-3``, the ``offset_ce`` loss): the trainer's step is a closure inside ``train``, so
:func:`trainer_step` mirrors it operation for operation (the learning rate written into every parameter group,
the forward and the loss under the trainer's bf16 autocast, ``zero_grad(set_to_none=True)``, backward, the
optimizer step, and the device-side bookkeeping of Note [no host synchronisation] in
``stablenet.train.trainer``: non-finite flag, loss and accuracy sums), with the loss built by the trainer's own
builder and the optimizer by :func:`~stablenet.train.trainer.optimizer_from_config`. Not
in the step: SAM, regularisers, noise, clipping and EMA (off by default), data parallelism, and the loader
(measured on its own, below): the batch is a fixed random one on the device.

**The plain twin** (:func:`plain_twin`) has the model's shapes and no constraint: every constrained layer with an
``export()`` becomes the plain torch layers it exports (AOL, SR, spectral, orthogonal: ``nn.Linear`` /
``nn.Conv2d`` with the same parameter shapes; Lipschitz pooling: ``nn.AvgPool2d``), but a residual layer (SLL,
CPL) becomes :class:`~stablenet.bench.layers.PlainResidualLinear` / ``PlainResidualConv2d``,
:math:`x - W^\top \mathrm{ReLU}(Wx + b)`, and the LLN head ``nn.Linear``. Why not ``export()`` for residual layers:
it unties :math:`W` and :math:`W^\top S` into two weights, so the exported twin has twice the parameters (the
same FLOPs, but twice the optimizer's work and memory), which flatters the constrained model; the tied twin has
the model's parameters less SLL's ``q`` (one per inner channel) and is the twin of ``stablenet bench layers``.
Rows carry both parameter counts (``params``, ``plain_params``).

**Timing**: per mode, a fresh model and twin (same seed), ``warmup`` untimed steps each (compilation happens
there), then ``repeats`` timed blocks of ``steps_per_repeat`` steps, model and twin alternating, with
``torch.cuda.synchronize`` around each block on a GPU; the median block gives images/s. ``peak_mem_mb`` (CUDA
only, else ``None``): parameters, buffers and optimizer state plus the peak allocated during one more step above
what was allocated before it, gradients freed (activations, gradients, workspaces; the batch not counted).

**The data pipeline** on its own (:func:`stablenet.data.loader_throughput`, the first ``loader_batches``
batches of a pass): the trainer's in-memory :class:`~stablenet.data.DeviceLoader` (shuffled, with the
workload's crop and flip, on the training device) over random float32 images of the training split's shape and
size (its cost does not depend on pixel values), and with ``data_streaming`` the
:class:`~stablenet.data.StreamingLoader` over the real files (``streaming_dataset``, the config's
``num_workers``). Its ratio is to the model's fastest constrained training throughput (the issue's target:
at least 5).

Rows, one per (model, variant, precision, compile) and per loader, all with the keys :data:`ROW_KEYS`:
``variant`` is ``constrained``, ``plain`` or ``data`` (then ``loader`` is ``device`` or ``streaming``);
``ratio`` is to what ``ratio_to`` names (``plain`` or ``training``). Training rows add ``step_ms``, ``params``,
``plain_params``, ``steps_per_repeat`` and ``finite`` (whether every loss stayed finite); data rows add
``batches``, ``first_batch_s``, ``crop_padding``, ``flip`` and ``data`` (``random`` or the data set).

Example:
    >>> rows = bench_train(model="sll_mlp", quick=True, modes=(("fp32", False),))
    >>> [(r["variant"], r["precision"]) for r in rows]
    [('constrained', 'fp32'), ('plain', 'fp32'), ('data', None)]
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from stablenet.bench.layers import PlainResidualConv2d, PlainResidualLinear
from stablenet.data import DeviceLoader, StreamingLoader, dataset_info, loader_throughput, streaming_dataset
from stablenet.models import create_model, list_models
from stablenet.nn import LinearNormalized, export_model, layer_family, list_layer_families
from stablenet.train.config import TrainConfig
from stablenet.train.trainer import account_step, loss_from_config, optimizer_from_config, precision_context

__all__ = [
    "HEADER",
    "MODES",
    "ROW_KEYS",
    "WORKLOADS",
    "Workload",
    "bench_train",
    "default_models",
    "format_row",
    "plain_twin",
    "trainer_step",
]

#: ``(precision, compile)`` of the measured modes, in row order.
MODES: tuple[tuple[str, bool], ...] = (("fp32", False), ("bf16", False), ("bf16", True))

#: The keys of every row.
ROW_KEYS = (
    "model",
    "variant",
    "loader",
    "precision",
    "compile",
    "images_per_s",
    "ratio",
    "ratio_to",
    "peak_mem_mb",
    "device",
    "batch_size",
    "dataset",
    "model_args",
    "warmup",
    "repeats",
)


@dataclass(frozen=True)
class Workload:
    """What one model is trained on in the benchmark.

    Attributes:
        dataset: a registered data set (its shape, classes and training-split size).
        n_train: images in its training split (the loader's pass).
        model_args: options of ``create_model``.
        batch_size: the global batch.
        crop_padding, flip: the augmentation of its training config (for the loader).
        quick_args: ``model_args`` of the ``quick`` smoke test (batch 8).
    """

    dataset: str
    n_train: int
    model_args: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 256
    crop_padding: int = 0
    flip: bool = False
    quick_args: dict[str, Any] = field(default_factory=dict)


_MNIST, _CIFAR10 = ("mnist", 60_000), ("cifar10", 50_000)
_CIFAR_AUGMENTATION = {"crop_padding": 4, "flip": True}  # random 32x32 crops of the 4-padded image, flips

#: The workload of each model by name; other registered models get :data:`DEFAULT_WORKLOAD`.
WORKLOADS: dict[str, Workload] = {
    # configs/mnist_sll_mlp.yaml
    "sll_mlp": Workload(
        *_MNIST, {"width": 784, "depth": 6, "inner_width": 1024}, 256, quick_args={"depth": 1, "inner_width": 16}
    ),
    # configs/mnist_curvature_lipconvnet_base.yaml
    "lipconvnet": Workload(
        *_MNIST, {"family": "aol", "width": 32, "hidden": 512}, 256, quick_args={"width": 4, "hidden": 8}
    ),
    # the SLL paper's CIFAR-10 network; batch 512 as the bf16 rows of `stablenet bench layers`
    "sll_s": Workload(
        *_CIFAR10, {}, 512, **_CIFAR_AUGMENTATION, quick_args={"width": 8, "n_conv": 2, "n_dense": 1, "dense_inner": 16}
    ),
}
#: The workload of a registered model not in :data:`WORKLOADS`: CIFAR-10 with its augmentation, default options.
DEFAULT_WORKLOAD = Workload(*_CIFAR10, **_CIFAR_AUGMENTATION)


def default_models(device: str | torch.device) -> tuple[str, ...]:
    """``("sll_s",)`` on CUDA, else ``("sll_mlp", "lipconvnet")``."""
    return ("sll_s",) if torch.device(device).type == "cuda" else ("sll_mlp", "lipconvnet")


# ------------------------------------------------------------------------------------------- the twin
def _residual_classes() -> tuple[type, ...]:
    """The layer classes of the registered residual families (``x + B ReLU(Wx + b)``)."""
    families = (layer_family(name) for name in list_layer_families())
    return tuple(cls for f in families if f.residual for cls in (f.dense, f.conv) if isinstance(cls, type))


def _tied_plain(module: nn.Module, residual: tuple[type, ...]) -> nn.Module | None:
    """The tied plain layer of a residual layer or an LLN head (weights copied), else ``None``."""
    if isinstance(module, residual):
        weight = module.weight
        if weight.dim() == 2:
            plain = PlainResidualLinear(weight.shape[1], weight.shape[0])
        else:
            plain = PlainResidualConv2d(weight.shape[1], weight.shape[0], weight.shape[-1])
    elif isinstance(module, LinearNormalized):
        plain = nn.Linear(module.in_features, module.out_features, module.bias is not None)
    else:
        return None
    plain = plain.to(module.weight.device)
    with torch.no_grad():
        for name, value in plain.named_parameters():
            source = getattr(module, name, None)
            if isinstance(source, Tensor) and source.shape == value.shape:
                value.copy_(source)
    return plain


def _replace_tied(module: nn.Module, residual: tuple[type, ...]) -> None:
    for name, child in list(module.named_children()):
        plain = _tied_plain(child, residual)
        if plain is not None:
            setattr(module, name, plain)
        else:
            _replace_tied(child, residual)


def plain_twin(model: nn.Module, example_input: Tensor | None = None) -> nn.Module:
    """The model's plain twin (module docstring): same shapes, no constraint, trainable, on the model's device.

    Args:
        model: the constrained network (left unchanged).
        example_input: a batch, for layers whose export needs the input size (``CayleyConv2d``).

    Example:
        >>> net = create_model("sll_mlp", 10, 1, (8, 8), depth=2)
        >>> twin = plain_twin(net)
        >>> sum(p.numel() for p in twin.parameters()) == sum(
        ...     p.numel() for n, p in net.named_parameters() if not n.endswith("q_log"))
        True
    """
    residual = _residual_classes()
    whole = _tied_plain(model, residual)
    if whole is not None:  # the model is one layer
        return whole.train(model.training)
    twin = copy.deepcopy(model)
    _replace_tied(twin, residual)
    return export_model(twin, example_input).train(model.training)


# ------------------------------------------------------------------------------------------- the step
def trainer_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    *,
    lr: float,
    autocast: Callable[[], Any],
    sums: Tensor,
    nonfinite: Tensor,
) -> None:
    """One step of the trainer's loop (single process, the config's defaults), as the module docstring says.

    Args:
        net: the model (compiled or not) in training mode.
        optimizer: its optimizer.
        loss_fn: the trainer's loss.
        x, y: the batch, on the device.
        lr: written into every parameter group, as the schedule's value is.
        autocast: returns the trainer's autocast context (``contextlib.nullcontext`` for fp32).
        sums: float64 ``[loss sum, correct, seen]`` on the device, updated in place.
        nonfinite: a bool flag on the device, set in place when the loss is not finite.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast():
        logits = net(x)
        value = loss_fn(logits, y)
    loss = value.float()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    account_step((loss.detach(), logits.detach(), y), sums, nonfinite)


# ------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_step_s(
    steps: Sequence[Callable[[], None]], warmup: int, repeats: int, per_repeat: int, device: torch.device
) -> list[float]:
    """Median seconds per step of each of ``steps``, timed in alternating blocks of ``per_repeat`` steps."""
    for _ in range(warmup):
        for step in steps:
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for step, bucket in zip(steps, times, strict=True):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(per_repeat):
                step()
            _sync(device)
            bucket.append((time.perf_counter() - t0) / per_repeat)
    return [statistics.median(bucket) for bucket in times]


def _state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    tensors += [t for state in optimizer.state.values() for t in state.values() if isinstance(t, Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class _Variant:
    """A model or its twin, ready to step: the trainer's optimizer, loss and bookkeeping around it."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[], None]
    nonfinite: Tensor

    def peak_mb(self, device: torch.device) -> float | None:
        """Memory one training step needs (module docstring); ``None`` off CUDA."""
        if device.type != "cuda":
            return None
        self.optimizer.zero_grad(set_to_none=True)
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        self.step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return (peak + _state_bytes(self.module, self.optimizer)) / 2**20


def _variant(module: nn.Module, config: TrainConfig, x: Tensor, y: Tensor) -> _Variant:
    """``module`` with what ``stablenet.train.train`` builds around it for ``config`` (one process)."""
    device = x.device
    optimizer = optimizer_from_config(config, module)
    loss_fn = loss_from_config(config, module, tuple(x.shape[1:]))
    net = torch.compile(module) if config.compile else module
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    def step() -> None:
        trainer_step(
            net,
            optimizer,
            loss_fn,
            x,
            y,
            lr=config.lr,
            autocast=lambda: precision_context(config, device),
            sums=sums,
            nonfinite=nonfinite,
        )

    return _Variant(module.train(), optimizer, step, nonfinite)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------- the table
#: Column titles matching :func:`format_row`.
HEADER = (
    f"{'model':12s} {'variant':16s} {'precision':9s} {'compile':7s} {'images/s':>10s} {'ratio':>7s} "
    f"{'peak_mem_mb':>11s}"
)


def format_row(row: dict) -> str:
    """One row as a table line under :data:`HEADER` (``ratio``: to the plain twin, or a loader's to training)."""
    variant = row["variant"] if row["loader"] is None else f"{row['variant']}/{row['loader']}"
    precision = row["precision"] or "-"
    compiled = "-" if row["compile"] is None else ("yes" if row["compile"] else "no")
    ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
    mem = "-" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.1f}"
    return (
        f"{row['model']:12s} {variant:16s} {precision:9s} {compiled:7s} {row['images_per_s']:10.4g} {ratio:>7s} "
        f"{mem:>11s}"
    )


# ------------------------------------------------------------------------------------------- the benchmark
def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    return value


def _check_options(models: Sequence[str], modes: Sequence[tuple[str, bool]]) -> None:
    if not models:
        raise ValueError("model must name at least one model; got none")
    unknown = [m for m in models if m not in list_models()]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(map(repr, unknown))}; available: {', '.join(list_models())}")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"modes must be among {', '.join(map(str, MODES))}; got {mode!r}")


def _loader(
    workload: Workload, config: TrainConfig, n: int, streaming: bool, root: str | None, device: torch.device
) -> tuple[Any, str]:
    """The trainer's loader for ``config`` (Note [exact resume]: a CPU generator), and what data it reads."""
    options = {"shuffle": True, "generator": torch.Generator().manual_seed(config.seed)}
    options |= {"crop_padding": config.crop_padding, "flip": config.flip}
    if streaming:
        dataset = streaming_dataset(workload.dataset, "train", root)
        loader = StreamingLoader(dataset, config.batch_size, **options, device=device, num_workers=config.num_workers)
        return loader, workload.dataset
    info = dataset_info(workload.dataset)
    images = torch.rand(n, info.in_channels, *info.input_size, device=device)
    labels = torch.randint(0, info.num_classes, (n,), device=device)
    return DeviceLoader(images, labels, config.batch_size, **options), "random"


def bench_train(
    *,
    quick: bool = False,
    device: str | torch.device = "cpu",
    repeats: int | None = None,
    model: str | Sequence[str] | None = None,
    batch_size: int | None = None,
    data_streaming: bool = False,
    data_root: str | None = None,
    modes: Sequence[tuple[str, bool]] = MODES,
    warmup: int | None = None,
    steps_per_repeat: int | None = None,
    loader_batches: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Run the benchmark and return its rows (see the module docstring).

    Args:
        quick: a smoke test: batch 8, each workload's ``quick_args``, one warm-up step, one timed step, two
            loader batches over random data of that many images.
        device: where to train.
        repeats: timed blocks per measurement (default 10; quick: 1).
        model: a registered model name, or several (default :func:`default_models`).
        batch_size: replaces every workload's batch.
        data_streaming: also measure the :class:`~stablenet.data.StreamingLoader` over the data set's files.
        data_root: a directory searched first for those files (only with ``data_streaming``).
        modes: ``(precision, compile)`` pairs, a subset of :data:`MODES`.
        warmup: untimed steps of each variant per mode (default 3; quick: 1).
        steps_per_repeat: steps per timed block (default 5 on CUDA, else 1).
        loader_batches: batches of each loader pass (default 100; quick: 2).
        progress: called with one line per row, and with the reason a mode is skipped.

    Raises:
        ValueError: an unknown model or mode, a count below 1, or ``data_root`` without ``data_streaming``.
        FileNotFoundError: ``data_streaming`` and the data set's files are not found.
    """
    device = torch.device(device)
    models = default_models(device) if model is None else (model,) if isinstance(model, str) else tuple(model)
    _check_options(models, modes)
    if data_root is not None and not data_streaming:
        raise ValueError("data_root is read only by the streaming loader; give data_streaming too")
    repeats = _check_positive("repeats", repeats if repeats is not None else (1 if quick else 10))
    warmup = _check_positive("warmup", warmup if warmup is not None else (1 if quick else 3))
    per_repeat = _check_positive("steps_per_repeat", steps_per_repeat or (5 if device.type == "cuda" else 1))
    loader_batches = _check_positive("loader_batches", loader_batches or (2 if quick else 100))
    if batch_size is not None:
        _check_positive("batch_size", batch_size)
    say = progress or (lambda line: None)
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        say(format_row(row))

    for name in models:
        workload = WORKLOADS.get(name, DEFAULT_WORKLOAD)
        args = {**workload.model_args, **(workload.quick_args if quick else {})}
        batch = batch_size or (8 if quick else workload.batch_size)
        base = TrainConfig(
            dataset=workload.dataset,
            model=name,
            model_args=args,
            batch_size=batch,
            crop_padding=workload.crop_padding,
            flip=workload.flip,
            device=str(device),
        )
        info = dataset_info(base.dataset)
        common = {"model": name, "device": str(device), "batch_size": batch, "dataset": base.dataset}
        common["model_args"] = args
        best = 0.0
        for precision, compiled in modes:
            if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
                say(f"{name} {precision}: skipped, {device} does not support bfloat16")
                continue
            config = replace(base, precision=precision, compile=compiled)
            std = info.std if config.normalize_std else (1.0,) * info.in_channels
            torch.manual_seed(config.seed)
            net = create_model(
                name, info.num_classes, info.in_channels, info.input_size, mean=info.mean, std=std, **args
            ).to(device)
            x = torch.rand(batch, info.in_channels, *info.input_size, device=device)
            y = torch.randint(0, info.num_classes, (batch,), device=device)
            twin = plain_twin(net, x[:1])
            pair = (_variant(net, config, x, y), _variant(twin, config, x, y))
            try:
                seconds = _median_step_s([v.step for v in pair], warmup, repeats, per_repeat, device)
            except Exception as e:  # a mode torch.compile cannot build costs its rows, not the run
                if not compiled:
                    raise
                say(f"{name} {precision}+compile: skipped, compile failed: {str(e).strip().splitlines()[0][:200]}")
                continue
            mems = [v.peak_mb(device) for v in pair]
            speeds = [batch / s for s in seconds]
            best = max(best, speeds[0])
            for variant, v, s, speed, mem in zip(("constrained", "plain"), pair, seconds, speeds, mems, strict=True):
                emit(
                    {
                        **common,
                        "variant": variant,
                        "loader": None,
                        "precision": precision,
                        "compile": compiled,
                        "images_per_s": speed,
                        "ratio": speed / speeds[1],
                        "ratio_to": "plain",
                        "peak_mem_mb": mem,
                        "warmup": warmup,
                        "repeats": repeats,
                        "step_ms": 1e3 * s,
                        "params": _count(net),
                        "plain_params": _count(twin),
                        "steps_per_repeat": per_repeat,
                        "finite": not bool(v.nonfinite.item()),
                    }
                )
            del net, twin, pair
            if device.type == "cuda":
                torch.cuda.empty_cache()

        n = loader_batches * batch if quick else workload.n_train
        for streaming in (False, True) if data_streaming else (False,):
            loader, data = _loader(workload, base, n, streaming, data_root, device)
            stats = loader_throughput(loader, max_batches=loader_batches)
            emit(
                {
                    **common,
                    "variant": "data",
                    "loader": "streaming" if streaming else "device",
                    "precision": None,
                    "compile": None,
                    "images_per_s": stats["images_per_s"],
                    "ratio": stats["images_per_s"] / best if best > 0 else None,
                    "ratio_to": "training",
                    "peak_mem_mb": None,
                    "warmup": 0,
                    "repeats": 1,
                    "batches": stats["batches"],
                    "first_batch_s": stats["first_batch_s"],
                    "crop_padding": base.crop_padding,
                    "flip": base.flip,
                    "data": data,
                }
            )
            del loader
    return rows
