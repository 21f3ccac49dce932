"""The training loop: reproducible, data-parallel under ``torchrun``, checkpointed every epoch and every few minutes,
resumable after a kill, and plannable to a time budget.

# Note [exact resume]
The shuffling, crops and flips of an epoch are drawn from a loader generator seeded with ``(seed, epoch)``,
its noise augmentation from a second one, and the learning rate is a function of the global step. Everything
else random (dropout, the Rademacher vectors of ``hessian_trace``) comes from torch's global generators, whose
states each rank saves. A checkpoint holds the model, optimiser, EMA and loss states, the global generators'
states and, within an epoch (``checkpoint_minutes``), the step reached, the two epoch generators' states after
that step and the epoch's running sums. A run resumed from any checkpoint therefore performs the same operations
as an uninterrupted run from that step on, and ends with the same weights (bit for bit on the same machine,
device and world size; resuming with another world size is refused). A time budget's plan is made once, before
the first step, and kept by every resume (Note [budgeted schedule] in ``stablenet.train.budget``).

# Note [no host synchronisation]
A step reads nothing back from the device: the loss and accuracy sums, and a flag for a non-finite loss, stay
on the device and are read when an epoch ends or a checkpoint is written (a non-finite loss then stops the run,
naming the epoch). In-epoch checkpoints are decided on the host clock; under data parallelism the ranks agree on
one every ``_AGREE_EVERY`` steps (one small collective), since a checkpoint gathers every rank's generators.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from stablenet.curvature.regularizers import total_penalty
from stablenet.curvature.sam import sam_step
from stablenet.data import (
    DeviceLoader,
    StreamingLoader,
    dataset_info,
    decoded_bytes,
    load_dataset,
    streaming_dataset,
    use_streaming,
)
from stablenet.data.radii import STANDARD_RADII
from stablenet.models import create_model
from stablenet.nn.cuda_graphs import capture_weight_maps
from stablenet.train.budget import BudgetPlan, pilot_timing, plan_epochs
from stablenet.train.checkpoint import (
    MODEL_FILE,
    TRAIN_STATE_FILE,
    load_state_dict_checked,
    load_training_state,
    save_model,
    save_training_state,
)
from stablenet.train.config import TrainConfig
from stablenet.train.distributed import DistributedContext, init_distributed, loss_weight, shard
from stablenet.train.ema import WeightEMA
from stablenet.train.evaluation import evaluate, evaluate_batches
from stablenet.train.losses import build_loss, loss_parameters
from stablenet.train.optimizers import create_optimizer
from stablenet.train.run_files import (
    CONFIG_FILE,
    METRICS_FILE,
    epoch_line,
    open_tensorboard,
    write_config,
    write_metrics,
)
from stablenet.train.schedules import create_schedule, scaled_lr

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "TrainResult",
    "account_step",
    "evaluate",
    "loss_from_config",
    "optimizer_from_config",
    "precision_context",
    "resolve_device",
    "train",
]

logger = logging.getLogger(__name__)
# Config keys a resumed run may change: they decide when checkpoints are written, how the same kernels are
# launched (cuda_graphs, compile), record the plan, or say where the run directory is (out: a moved run resumes),
# not what is computed.
_RESUME_IGNORED = frozenset({"checkpoint_minutes", "cuda_graphs", "compile", "plan", "out"})
#: Steps between the ranks' agreements on an in-epoch checkpoint (Note [no host synchronisation]).
_AGREE_EVERY = 50
#: Training steps the time-budget pilot times (after two untimed ones).
_PILOT_STEPS = 8


@dataclass
class TrainResult:
    """What a finished run returns: its directory, the model (eval mode; the averaged weights when ``ema_decay``
    is set) and one metrics row per epoch."""

    run_dir: Path
    model: nn.Module
    metrics: list[dict[str, Any]]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return device


def _model_metadata(config: TrainConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    info = dataset_info(config.dataset)
    return {
        "model": config.model,
        "model_args": dict(config.model_args),
        "num_classes": info.num_classes,
        "in_channels": info.in_channels,
        "input_size": list(info.input_size),
        "mean": list(mean),
        "std": list(std),
        "dataset": config.dataset,
    }


def _build_regularizers(config: TrainConfig, model: nn.Module) -> list:
    """Regularisers from ``config.regularizers``; activation decay captures features during the training forward."""
    if not config.regularizers:
        return []
    from stablenet.curvature.regularizers import regularizers_from_config

    regs = regularizers_from_config(config.regularizers)
    for reg in regs:
        if hasattr(reg, "attach"):
            reg.attach(model)
    return regs


def optimizer_from_config(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The configured optimizer (SAM around it when ``sam_rho > 0``) over the model's trainable parameters."""
    return create_optimizer(
        config.optimizer,
        [p for p in model.parameters() if p.requires_grad],
        lr=config.lr,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        sam_rho=config.sam_rho,
        sam_adaptive=config.sam_adaptive,
    )


def loss_from_config(
    config: TrainConfig, model: nn.Module, input_shape: tuple[int, ...], distributed: bool = False
) -> Callable[[Tensor, Tensor], Tensor]:
    """The configured loss: the margin from ``target_radius`` (else ``loss_offset``) for margin losses,
    ``loss_temperature`` for losses that take one, and ``loss_options`` (``stablenet.train.losses``)."""
    accepted = loss_parameters(config.loss)
    options = dict(config.loss_options)
    if "margin" in accepted and not {"offset", "target_radius"} & set(options):
        if config.target_radius is not None:
            options["target_radius"] = config.target_radius
        else:
            options["offset"] = config.loss_offset
    if "temperature" in accepted:
        options.setdefault("temperature", config.loss_temperature)
    return build_loss(config.loss, options, model=model, input_shape=input_shape, distributed=distributed)


def _global_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_global_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"].cpu())  # generator states are CPU byte tensors, whatever map_location did
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])


def _resume_config_differences(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """Config keys whose values differ, ignoring those that do not change what a run computes."""
    current = config.to_dict()
    defaults = TrainConfig().to_dict()  # a key missing from an older saved config had its default
    return sorted(
        k
        for k in set(saved) | set(current)
        if k not in _RESUME_IGNORED and saved.get(k, defaults.get(k)) != current.get(k)
    )


def _check_before_training(config: TrainConfig, device: torch.device, context: DistributedContext) -> None:
    """One-line errors for a run that cannot work, before anything is trained."""
    if config.batch_size % context.world:
        raise ValueError(
            f"batch_size is the global batch and must be divisible by the world size {context.world}; "
            f"got {config.batch_size}"
        )
    if config.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision 'bf16' needs a GPU that supports bfloat16; {device} does not (use 'fp32')")


def precision_context(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for the forward and the loss; the layers' constraint math runs with autocast off."""
    if config.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class _Data:
    """The training and test data: whole on the device (``x_train`` ...) or streamed (``train_set`` ...)."""

    streaming: bool
    n_train: int
    input_shape: tuple[int, ...]
    x_train: torch.Tensor | None = None
    y_train: torch.Tensor | None = None
    x_test: torch.Tensor | None = None
    y_test: torch.Tensor | None = None
    train_set: Any = None
    test_set: Any = None


def _load_data(config: TrainConfig, device: torch.device) -> _Data:
    if config.data_streaming is not False:
        train_set = streaming_dataset(config.dataset, "train", config.data_root)
        test_set = streaming_dataset(config.dataset, "test", config.data_root)
        size = decoded_bytes(train_set) + decoded_bytes(test_set)
        if use_streaming(config.data_streaming, size, device=device):
            shape = tuple(train_set[0][0].shape)
            return _Data(True, len(train_set), shape, train_set=train_set, test_set=test_set)
    train = load_dataset(config.dataset, "train", config.data_root)
    test = load_dataset(config.dataset, "test", config.data_root)
    return _Data(
        False,
        len(train.images),
        tuple(train.images.shape[1:]),
        train.images.to(device),
        train.labels.to(device),
        test.images.to(device),
        test.labels.to(device),
    )


def _loader(data: _Data, config: TrainConfig, generator: torch.Generator, context: DistributedContext, device):
    """This epoch's loader of global batches (in memory: sliced per rank by the trainer; streamed: per rank)."""
    options = {"shuffle": True, "generator": generator, "crop_padding": config.crop_padding, "flip": config.flip}
    if not data.streaming:
        return DeviceLoader(data.x_train, data.y_train, config.batch_size, **options)
    return StreamingLoader(
        data.train_set,
        config.batch_size,
        **options,
        device=device,
        num_workers=config.num_workers,
        rank=context.rank,
        world_size=context.world,
    )


def _evaluate(model: nn.Module, data: _Data, radius: float, context: DistributedContext, device) -> tuple:
    if not data.streaming:
        return evaluate(model, data.x_test, data.y_test, radius, context=context)
    loader = StreamingLoader(
        data.test_set, 1024, device=device, num_workers=0, rank=context.rank, world_size=context.world
    )
    return evaluate_batches(model, loader, radius, context=context)


def _lr_schedule(config: TrainConfig, steps_per_epoch: int) -> Callable[[int, int], float]:
    peak = scaled_lr(config.lr, config.batch_size, config.reference_batch_size, config.lr_scaling)
    return create_schedule(
        config.schedule,
        lr=peak,
        warmup_steps=round(config.warmup_epochs * steps_per_epoch),
        pct_start=config.onecycle_pct_start,
        step_size=config.lr_step_epochs * steps_per_epoch,
        gamma=config.lr_gamma,
    )


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``config.model`` on ``config.dataset``, writing everything to the run directory ``config.out``.

    The run directory receives ``config.yaml`` (resolved config, and a time budget's plan), ``metrics.csv``
    (one row per epoch), ``model.safetensors`` + ``model.json`` (for :func:`stablenet.load_model`; the EMA's
    weights when ``ema_decay`` is set) and ``train_state.pt`` (for resuming), all written atomically after every
    epoch; ``train_state.pt`` also within an epoch, every ``config.checkpoint_minutes`` (see Note [exact
    resume]). Under ``torchrun`` every rank runs this function and rank 0 writes the files (Note [global batch]
    in ``stablenet.train.distributed``).

    Args:
        config: the resolved configuration.
        resume: continue the run in ``config.out`` from its last checkpoint. The saved config must equal
            ``config`` except for keys that do not change what is computed (``checkpoint_minutes``,
            ``compile`` ...). A run that already finished returns at once.
        progress: show a progress bar (images/s and the time left).
        callback: called as ``callback(epoch, metrics_row)`` after each epoch's checkpoint is written.

    Raises:
        ValueError: the run directory already holds a run (without ``resume``), its config or world size
            differs, or the run cannot work (a global batch the world size does not divide, bf16 on a GPU
            without it, CUDA where there is none, a time budget shorter than one epoch).
    """
    wall_start = time.perf_counter()
    run_dir = Path(config.out)
    has_state = (run_dir / TRAIN_STATE_FILE).exists()
    if not resume and (has_state or (run_dir / MODEL_FILE).exists()):
        raise ValueError(
            f"run directory {run_dir} already holds a run; resume it (resume=True, --resume on the command line) "
            "or choose another out directory"
        )
    if resume and not has_state:
        raise ValueError(f"cannot resume: {run_dir / TRAIN_STATE_FILE} does not exist")

    context = init_distributed(resolve_device(config.device))
    device = context.device
    _check_before_training(config, device, context)
    info = dataset_info(config.dataset)
    mean = tuple(info.mean)
    std = tuple(info.std) if config.normalize_std else (1.0,) * info.in_channels
    torch.manual_seed(config.seed)
    model = create_model(
        config.model, info.num_classes, info.in_channels, info.input_size, mean=mean, std=std, **config.model_args
    ).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.cuda_graphs and device.type == "cuda":
        logger.info("weight maps of %d layers run as CUDA graphs", capture_weight_maps(model))
    optimizer = optimizer_from_config(config, model)
    ema = WeightEMA(model, config.ema_decay) if config.ema_decay > 0 else None
    data = _load_data(config, device)
    loss_fn = loss_from_config(config, model, data.input_shape, context.active)
    regularizers = _build_regularizers(config, model)
    radius = STANDARD_RADII.get(config.dataset, (0.5,))[0]
    steps_per_epoch = math.ceil(data.n_train / config.batch_size)

    def wrap(module: nn.Module) -> nn.Module:
        """The speed and parallelism options around a model (the run's, and the pilot's copy)."""
        if context.active:
            ids = [device] if device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        return torch.compile(module) if config.compile else module

    def step(net: nn.Module, opt: torch.optim.Optimizer, batch: tuple, live: bool = False) -> tuple:
        """One optimizer step on a global batch: ``(loss, logits, rank's labels)``, all on the device."""
        x_batch, y_batch, noise_gen, size = batch
        if data.streaming:  # a streaming loader yields this rank's share of the global batch of `size` images
            x, y = x_batch, y_batch
        else:
            x, y = shard(x_batch, context), shard(y_batch, context)
        if config.noise_sigma > 0:  # drawn for the global batch on every rank, then sliced (Note [global batch])
            shape = (size, *x.shape[1:])
            noise = shard(torch.randn(shape, generator=noise_gen, device=x.device, dtype=x.dtype), context)
            x = x + config.noise_sigma * noise
        if config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = loss_weight(len(y), size, context)
        outputs: dict[str, torch.Tensor] = {}

        def objective() -> torch.Tensor:
            with precision_context(config, device):
                logits = net(x)
                outputs.setdefault("logits", logits)
                value = loss_fn(logits, y)
                if regularizers and live:
                    value = value + total_penalty(regularizers, model, x, y, logits, loss_fn)
            return value.float() * weight

        if config.sam_rho > 0:
            loss = sam_step(net, opt, objective)  # Note: BN statistics are updated once per step
        else:
            loss = objective()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip_norm > 0:
                params = [p for group in opt.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip_norm)
            opt.step()
        if live and ema is not None:
            ema.update()
        return loss.detach() / weight, outputs["logits"].detach(), y

    start_epoch, rows, partial = 0, [], None
    if resume:
        state = load_training_state(run_dir, map_location=device)
        saved = state["config"]
        if config.time_budget > 0 and saved.get("plan") and saved.get("time_budget") == config.time_budget:
            # Note [budgeted schedule]: the plan made before the first step stays; never planned again
            config = dataclasses.replace(config, epochs=saved["epochs"], plan=saved["plan"])
        diff = _resume_config_differences(saved, config)
        if diff:
            raise ValueError(f"cannot resume {run_dir}: config differs from the saved one in {', '.join(diff)}")
        saved_world = int(state.get("world_size", 1))
        if saved_world != context.world:
            raise ValueError(
                f"cannot resume {run_dir}: it was trained with {saved_world} process(es), this run has "
                f"{context.world}; resume with the same world size"
            )
        load_state_dict_checked(model, state["model"], f"training state in {run_dir}")
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        loss_fn.load_state_dict(state.get("loss", {}))
        start_epoch, rows = int(state["epoch"]), list(state["metrics"])
        partial = state.get("partial")  # a checkpoint within epoch start_epoch
        if "rng" in state:  # absent from checkpoints written before the global state was saved
            rng = state["rng"]
            _set_global_rng_state(rng[context.rank] if isinstance(rng, list) else rng)
        if context.is_main:
            where = f", step {partial['step']}" if partial else ""
            logger.info("resuming %s at epoch %d/%d%s", run_dir, start_epoch, config.epochs, where)
    else:
        if config.time_budget > 0:
            metadata = _model_metadata(config, mean, std)
            config = _plan(config, model, optimizer, data, step, wrap, radius, context, device, wall_start, metadata)
        if context.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_config(run_dir, config.to_dict())

    net = wrap(model)
    schedule = _lr_schedule(config, steps_per_epoch)
    total_steps = steps_per_epoch * config.epochs
    schedule(0, total_steps)  # bad schedule options fail here, before training
    writer = open_tensorboard(run_dir) if (context.is_main and start_epoch < config.epochs) else None
    metadata = _model_metadata(config, mean, std)
    checkpoint_seconds = 60.0 * config.checkpoint_minutes
    last_checkpoint = time.monotonic()
    wall_before = rows[-1].get("wall_time_s", 0.0) if rows else 0.0  # seconds spent before this session

    def checkpoint(epoch: int, within: dict[str, Any] | None) -> None:
        """Write ``train_state.pt``: after ``epoch`` whole epochs, plus the progress ``within`` the next one."""
        nonlocal last_checkpoint
        rng = context.gather(_global_rng_state())
        if context.is_main:
            state = {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "metrics": rows,
                "config": config.to_dict(),
                "rng": rng if context.active else rng[0],
                "world_size": context.world,
                "loss": loss_fn.state_dict(),
            }
            if ema is not None:
                state["ema"] = ema.state_dict()
            save_training_state(run_dir, state if within is None else {**state, "partial": within})
        context.barrier()
        last_checkpoint = time.monotonic()

    bar = tqdm(
        total=config.epochs * data.n_train,
        initial=start_epoch * data.n_train,
        desc="train",
        unit="img",
        unit_scale=True,
        disable=not progress or not context.is_main,
    )
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        resumed, partial = partial, None
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        # Note [exact resume]: the noise of an epoch comes from a generator seeded by (seed, epoch) too.
        noise_gen = torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + epoch + 7919)
        loader = _loader(data, config, generator, context, device)
        model.train()
        if getattr(loss_fn.margin, "weight_dependent", None):
            loss_fn.refresh()  # a margin from the bound of unconstrained layers follows their weights
        # Note [no host synchronisation]: loss sum, correct count, seen count and a non-finite flag, on the device.
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        start = 0
        if resumed is not None:
            start = resumed["step"]
            # checkpoints written before the sums moved to the device kept three separate numbers
            done = resumed["sums"] if "sums" in resumed else [resumed[k] for k in ("loss_sum", "correct", "seen")]
            sums += torch.tensor(done, dtype=torch.float64, device=device)
            t0 -= resumed["time_s"]
            noise_gen.set_state(resumed["noise_rng"].cpu())
        lr = schedule(epoch * steps_per_epoch + start, total_steps)
        batches = loader.batches(start, resumed["loader_rng"].cpu() if resumed is not None else None)
        for i, (x_batch, y_batch) in enumerate(batches, start=start):
            lr = schedule(epoch * steps_per_epoch + i, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            size = min(config.batch_size, data.n_train - i * config.batch_size)  # the global batch
            account_step(step(net, optimizer, (x_batch, y_batch, noise_gen, size), live=True), sums, nonfinite)
            bar.update(size)
            due = checkpoint_seconds > 0 and time.monotonic() - last_checkpoint >= checkpoint_seconds
            if context.active:
                due = (i + 1) % _AGREE_EVERY == 0 and context.any_true(due)
            if due and i + 1 < steps_per_epoch:
                _raise_if_nonfinite(nonfinite, context, epoch)
                progress_in_epoch = {
                    "step": i + 1,
                    "sums": sums.tolist(),
                    "time_s": time.perf_counter() - t0,
                    "loader_rng": generator.get_state(),
                    "noise_rng": noise_gen.get_state(),
                }
                checkpoint(epoch, progress_in_epoch)
        _raise_if_nonfinite(nonfinite, context, epoch)
        loss_sum, correct_sum, seen = context.sum(sums).tolist()
        train_seconds = time.perf_counter() - t0
        last = epoch + 1 == config.epochs
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct_sum / seen}
        # Evaluated, certified and saved: the averaged weights, swapped in place (Note [EMA swap] in
        # stablenet.train.ema); the training state keeps the live ones.
        with ema.swapped() if ema is not None else contextlib.nullcontext():
            if last or (epoch + 1) % config.eval_every == 0:
                test_acc, cert_acc = _evaluate(model, data, radius, context, device)
                row |= {"test_acc": test_acc, f"cert_acc@{radius:.4g}": cert_acc}
            if context.is_main:
                save_model(run_dir, model, {**metadata, "epoch": epoch + 1})
        row |= {"lr": lr, "time_s": time.perf_counter() - t0, "images_per_s": seen / max(train_seconds, 1e-9)}
        if config.plan:
            row["planned_wall_time_s"] = _planned_elapsed(config.plan, epoch + 1)
        row["wall_time_s"] = wall_before + time.perf_counter() - wall_start
        rows.append(row)
        checkpoint(epoch + 1, None)
        if context.is_main:
            write_metrics(run_dir, rows)
            if writer is not None:
                for key, value in row.items():
                    if key != "epoch":
                        writer.add_scalar(key, value, epoch + 1)
                writer.flush()
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row.get('test_acc', float('nan')):.3f}")
            logger.info(epoch_line(row, config.epochs))
        if callback is not None:
            callback(epoch + 1, row)
    bar.close()
    if writer is not None:
        writer.close()
    if context.is_main:
        if not (run_dir / MODEL_FILE).exists():  # resumed a finished run whose export was lost
            with ema.swapped() if ema is not None else contextlib.nullcontext():
                save_model(run_dir, model, {**metadata, "epoch": config.epochs})
        if config.plan and rows and "actual_s" not in config.plan:
            config.plan["actual_s"] = rows[-1]["wall_time_s"]
            write_config(run_dir, config.to_dict())
    context.barrier()
    if ema is not None:
        model.load_state_dict(ema.averaged_state_dict())
    return TrainResult(run_dir=run_dir, model=model.eval(), metrics=rows)


def account_step(step_result: tuple, sums: torch.Tensor, nonfinite: torch.Tensor) -> None:
    """Add a step's loss sum, correct count and batch size to ``sums`` and flag a non-finite loss, on the device
    (Note [no host synchronisation])."""
    loss, logits, y = step_result
    nonfinite |= ~torch.isfinite(loss)
    correct = (logits.argmax(1) == y).sum()
    sums += torch.stack([loss.double() * len(y), correct.double(), torch.tensor(len(y), device=y.device)])


def _raise_if_nonfinite(flag: torch.Tensor, context: DistributedContext, epoch: int) -> None:
    """Read the non-finite flag (a host read: only at epoch ends and checkpoints, Note [no host synchronisation])."""
    if context.any_true(bool(flag.item())):
        raise FloatingPointError(f"the loss became non-finite during epoch {epoch + 1}; lower lr")


def _planned_elapsed(plan: dict[str, Any], epochs_done: int) -> float:
    """The wall time the plan predicted after ``epochs_done`` epochs (Note [budgeted schedule])."""
    fields = {f.name for f in dataclasses.fields(BudgetPlan)}
    return BudgetPlan(**{k: v for k, v in plan.items() if k in fields}).planned_elapsed(epochs_done)


def _pilot_batches(data: _Data, config: TrainConfig, context: DistributedContext, device) -> Iterator[tuple]:
    """Batches for the time-budget pilot, from generators of their own (the run's epoch 0 must not change)."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + 999_983)
    noise_gen = torch.Generator(device=device).manual_seed(config.seed + 104_729)
    while True:
        for i, (x, y) in enumerate(_loader(data, config, generator, context, device)):
            yield x, y, noise_gen, min(config.batch_size, data.n_train - i * config.batch_size)


def _plan(config, model, optimizer, data, step, wrap, radius, context, device, wall_start, metadata) -> TrainConfig:
    """Time a short pilot on copies of model and optimizer, then fix the epochs that fit ``config.time_budget``.

    The pilot's ``checkpoint_s`` is everything an epoch adds to its steps (Note [budgeted schedule] in
    ``stablenet.train.budget``): building the epoch's loader and drawing its first batch (a streaming loader
    starts its workers), and writing the model files, the training state and ``metrics.csv``, as the loop does.
    """
    schedule = _lr_schedule(config, 1)
    for group in optimizer.param_groups:
        group["lr"] = schedule(0, 1)

    sums = torch.zeros(3, dtype=torch.float64, device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    def timed_step(net, opt, batch):  # the loop's work per step: the schedule, the step, the bookkeeping
        for group in opt.param_groups:
            group["lr"] = schedule(0, 1)
        account_step(step(net, opt, batch), sums, nonfinite)

    def time_evaluation(m):
        return _evaluate(m, data, radius, context, device)

    def time_epoch_end(m, opt):
        loader = _loader(data, config, torch.Generator().manual_seed(config.seed), context, device)
        next(iter(loader.batches()))
        with tempfile.TemporaryDirectory() as name:
            scratch = Path(name)
            if context.is_main:
                save_model(scratch, m, metadata)
                state = {"model": m.state_dict(), "optimizer": opt.state_dict(), "rng": _global_rng_state()}
                save_training_state(scratch, state)
                write_metrics(scratch, [{"epoch": 1, "train_loss": 0.0, "wall_time_s": 0.0}])
            context.barrier()

    timing = pilot_timing(
        timed_step,
        model,
        optimizer,
        _pilot_batches(data, config, context, device),
        steps=_PILOT_STEPS,
        evaluate=time_evaluation,
        checkpoint=time_epoch_end,
        wrap=wrap,
    )
    measured = [timing.step_s, timing.eval_s or 0.0, timing.checkpoint_s or 0.0]
    step_s, eval_s, checkpoint_s = (max(values) for values in zip(*context.gather(measured), strict=True))
    plan = plan_epochs(
        budget_s=60.0 * config.time_budget,
        step_s=step_s,
        steps_per_epoch=math.ceil(data.n_train / config.batch_size),
        eval_s=eval_s,
        checkpoint_s=checkpoint_s,
        eval_every=config.eval_every,
        elapsed_s=time.perf_counter() - wall_start,
        checkpoint_interval_s=60.0 * config.checkpoint_minutes,
    )
    if config.warmup_epochs > plan.epochs:
        raise ValueError(
            f"the time budget of {config.time_budget:g} min fits {plan.epochs} epoch(s), fewer than warmup_epochs "
            f"({config.warmup_epochs:g}); lower warmup_epochs or raise the budget"
        )
    if context.is_main:
        logger.info(
            "time budget %g min: %d epochs planned (%.3f s per step, %.1f s per evaluation), %.1f min predicted",
            config.time_budget,
            plan.epochs,
            step_s,
            eval_s,
            plan.planned_s / 60.0,
        )
    return dataclasses.replace(config, epochs=plan.epochs, plan={"budget_min": config.time_budget, **plan.to_dict()})
