"""The training loop: reproducible, checkpointed every epoch and every few minutes, resumable after a kill.

# Note [exact resume]
The shuffling, crops and flips of an epoch are drawn from a loader generator seeded with ``(seed, epoch)``,
its noise augmentation from a second one, and the learning rate is a function of the global step. Everything
else random (dropout, the Rademacher vectors of ``hessian_trace``) comes from torch's global generators. A
checkpoint holds the model and optimiser states, the global generators' states and, within an epoch
(``checkpoint_minutes``), the step reached, the two epoch generators' states after that step and the epoch's
running sums. A run resumed from any checkpoint therefore performs the same operations as an uninterrupted
run from that step on, and ends with the same weights (bit for bit on the same machine and device).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from stablenet.atomic import atomic_write_text, atomic_write_yaml
from stablenet.certify.lipschitz import LipschitzCertifier
from stablenet.curvature.regularizers import total_penalty
from stablenet.curvature.sam import sam_step
from stablenet.data import DeviceLoader, dataset_info, load_dataset
from stablenet.data.radii import STANDARD_RADII
from stablenet.models import create_model
from stablenet.nn.cuda_graphs import capture_weight_maps
from stablenet.train.checkpoint import (
    MODEL_FILE,
    TRAIN_STATE_FILE,
    load_state_dict_checked,
    load_training_state,
    save_model,
    save_training_state,
)
from stablenet.train.config import TrainConfig
from stablenet.train.losses import create_loss
from stablenet.train.optimizers import create_optimizer

__all__ = ["TrainResult", "evaluate", "resolve_device", "train"]

logger = logging.getLogger(__name__)
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
# Config keys a resumed run may change: they decide when checkpoints are written, or how the same kernels are
# launched (cuda_graphs), not what is computed.
_RESUME_IGNORED = frozenset({"checkpoint_minutes", "cuda_graphs"})


@dataclass
class TrainResult:
    """What a finished run returns: its directory, the model (eval mode) and one metrics row per epoch."""

    run_dir: Path
    model: nn.Module
    metrics: list[dict[str, float]]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return device


def _lr_at(config: TrainConfig, step: int, total: int) -> float:
    if config.schedule == "constant":
        return config.lr
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


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


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, radius: float, batch_size: int = 1024):
    """Clean accuracy and Lipschitz-certified accuracy at ``radius`` (NaN when the model cannot be bounded)."""
    model.eval()
    try:
        certifier = LipschitzCertifier(model, input_shape=tuple(images.shape[1:]))
    except TypeError:
        certifier = None
    correct = certified = 0
    for start in range(0, len(images), batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        if certifier is None:
            pred, rad = model(x).argmax(1), torch.zeros(len(x), dtype=torch.float64, device=x.device)
        else:
            pred, rad = certifier(x)
        ok = pred == y
        correct += int(ok.sum())
        certified += int((ok & (rad >= radius)).sum())
    n = max(len(images), 1)
    return correct / n, (certified / n if certifier is not None else float("nan"))


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


def _write_metrics(run_dir: Path, rows: list[dict[str, float]]) -> None:
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / METRICS_FILE, buf.getvalue())


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``config.model`` on ``config.dataset``, writing everything to the run directory ``config.out``.

    The run directory receives ``config.yaml`` (resolved config), ``metrics.csv`` (one row per epoch),
    ``model.safetensors`` + ``model.json`` (for :func:`stablenet.load_model`) and ``train_state.pt`` (for
    resuming), all written atomically after every epoch; ``train_state.pt`` also within an epoch, every
    ``config.checkpoint_minutes`` (see Note [exact resume]).

    Args:
        config: the resolved configuration.
        resume: continue the run in ``config.out`` from its last checkpoint. The saved config must equal
            ``config`` except for ``checkpoint_minutes``. A run that already finished returns at once.
        progress: show tqdm progress bars.
        callback: called as ``callback(epoch, metrics_row)`` after each epoch's checkpoint is written.

    Raises:
        ValueError: the run directory already holds a run (without ``resume``), or its config differs.
    """
    run_dir = Path(config.out)
    has_state = (run_dir / TRAIN_STATE_FILE).exists()
    if not resume and (has_state or (run_dir / MODEL_FILE).exists()):
        raise ValueError(
            f"run directory {run_dir} already holds a run; resume it (resume=True, --resume on the command line) "
            "or choose another out directory"
        )
    if resume and not has_state:
        raise ValueError(f"cannot resume: {run_dir / TRAIN_STATE_FILE} does not exist")

    device = resolve_device(config.device)
    info = dataset_info(config.dataset)
    mean = tuple(info.mean)
    std = tuple(info.std) if config.normalize_std else (1.0,) * info.in_channels
    torch.manual_seed(config.seed)
    model = create_model(
        config.model,
        info.num_classes,
        info.in_channels,
        info.input_size,
        mean=mean,
        std=std,
        **config.model_args,
    ).to(device)
    if config.cuda_graphs and device.type == "cuda":
        logger.info("weight maps of %d layers run as CUDA graphs", capture_weight_maps(model))
    optimizer = create_optimizer(
        config.optimizer,
        [p for p in model.parameters() if p.requires_grad],
        lr=config.lr,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        sam_rho=config.sam_rho,
        sam_adaptive=config.sam_adaptive,
    )
    start_epoch, rows, partial = 0, [], None
    if resume:
        state = load_training_state(run_dir, map_location=device)
        diff = _resume_config_differences(state["config"], config)
        if diff:
            raise ValueError(f"cannot resume {run_dir}: config differs from the saved one in {', '.join(diff)}")
        load_state_dict_checked(model, state["model"], f"training state in {run_dir}")
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, rows = int(state["epoch"]), list(state["metrics"])
        partial = state.get("partial")  # a checkpoint within epoch start_epoch
        if "rng" in state:  # absent from checkpoints written before the global state was saved
            _set_global_rng_state(state["rng"])
        step = f", step {partial['step']}" if partial else ""
        logger.info("resuming %s at epoch %d/%d%s", run_dir, start_epoch, config.epochs, step)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_yaml(run_dir / CONFIG_FILE, config.to_dict())

    train_set = load_dataset(config.dataset, "train", config.data_root)
    test_set = load_dataset(config.dataset, "test", config.data_root)
    x_train, y_train = train_set.images.to(device), train_set.labels.to(device)
    x_test, y_test = test_set.images.to(device), test_set.labels.to(device)
    loss_fn = create_loss(config.loss, config.loss_offset, config.loss_temperature)
    regularizers = _build_regularizers(config, model)
    radius = STANDARD_RADII.get(config.dataset, (0.5,))[0]
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    writer = _tensorboard(run_dir) if start_epoch < config.epochs else None
    metadata = _model_metadata(config, mean, std)
    checkpoint_seconds = 60.0 * config.checkpoint_minutes
    last_checkpoint = time.monotonic()

    def checkpoint(epoch: int, within: dict[str, Any] | None) -> None:
        """Write ``train_state.pt``: after ``epoch`` whole epochs, plus the progress ``within`` the next one."""
        nonlocal last_checkpoint
        state = {
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "metrics": rows,
            "config": config.to_dict(),
            "rng": _global_rng_state(),
        }
        save_training_state(run_dir, state if within is None else {**state, "partial": within})
        last_checkpoint = time.monotonic()

    epochs = tqdm(
        range(start_epoch, config.epochs),
        desc="train",
        disable=not progress,
        initial=start_epoch,
        total=config.epochs,
    )
    for epoch in epochs:
        t0 = time.perf_counter()
        resumed, partial = partial, None
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        # Note [exact resume]: the noise of an epoch comes from a generator seeded by (seed, epoch) too.
        noise_gen = torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + epoch + 7919)
        loader = DeviceLoader(
            x_train,
            y_train,
            config.batch_size,
            shuffle=True,
            generator=generator,
            crop_padding=config.crop_padding,
            flip=config.flip,
        )
        model.train()
        loss_sum = correct = seen = start = 0
        if resumed is not None:
            start, loss_sum, correct, seen = (resumed[k] for k in ("step", "loss_sum", "correct", "seen"))
            t0 -= resumed["time_s"]
            noise_gen.set_state(resumed["noise_rng"].cpu())
        batches = loader.batches(start, resumed["loader_rng"].cpu() if resumed is not None else None)
        for i, (x, y) in enumerate(batches, start=start):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(config, epoch * steps_per_epoch + i, total_steps)
            if config.noise_sigma > 0:
                x = x + config.noise_sigma * torch.randn(x.shape, generator=noise_gen, device=x.device, dtype=x.dtype)
            outputs: dict[str, torch.Tensor] = {}

            def objective(x=x, y=y, outputs=outputs) -> torch.Tensor:
                logits = model(x)
                outputs.setdefault("logits", logits)
                value = loss_fn(logits, y)
                if regularizers:
                    value = value + total_penalty(regularizers, model, x, y, logits, loss_fn)
                return value

            if config.sam_rho > 0:
                loss = sam_step(model, optimizer, objective)  # Note: BN statistics are updated once per step
            else:
                loss = objective()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss.item()} at epoch {epoch}, step {i}; lower lr (now {config.lr})"
                )
            logits = outputs["logits"]
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += len(y)
            if checkpoint_seconds > 0 and i + 1 < steps_per_epoch:
                if time.monotonic() - last_checkpoint >= checkpoint_seconds:
                    progress_in_epoch = {
                        "step": i + 1,
                        "loss_sum": loss_sum,
                        "correct": correct,
                        "seen": seen,
                        "time_s": time.perf_counter() - t0,
                        "loader_rng": generator.get_state(),
                        "noise_rng": noise_gen.get_state(),
                    }
                    checkpoint(epoch, progress_in_epoch)
        test_acc, cert_acc = evaluate(model, x_test, y_test, radius)
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "test_acc": test_acc,
            f"cert_acc@{radius:.4g}": cert_acc,
            "lr": optimizer.param_groups[0]["lr"],
            "time_s": time.perf_counter() - t0,
        }
        rows.append(row)
        checkpoint(epoch + 1, None)
        save_model(run_dir, model, {**metadata, "epoch": epoch + 1})
        _write_metrics(run_dir, rows)
        if writer is not None:
            for key, value in row.items():
                if key != "epoch":
                    writer.add_scalar(key, value, epoch + 1)
            writer.flush()
        epochs.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{test_acc:.3f}", cert=f"{cert_acc:.3f}")
        logger.info("epoch %d: %s", epoch + 1, row)
        if callback is not None:
            callback(epoch + 1, row)
    if writer is not None:
        writer.close()
    if not (run_dir / MODEL_FILE).exists():  # resumed a finished run whose export was lost
        save_model(run_dir, model, {**metadata, "epoch": config.epochs})
    return TrainResult(run_dir=run_dir, model=model.eval(), metrics=rows)
