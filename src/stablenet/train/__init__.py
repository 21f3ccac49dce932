"""Training: configuration, losses, optimizers, schedules, weight averaging, time budgets, checkpoints and the
resumable training loop."""

from stablenet.train.budget import BudgetPlan, pilot_timing, plan_epochs
from stablenet.train.checkpoint import load_model, read_model_metadata, save_model
from stablenet.train.config import TrainConfig, apply_overrides, load_config, parse_override_args
from stablenet.train.ema import WeightEMA
from stablenet.train.losses import LOSSES, create_loss
from stablenet.train.optimizers import create_optimizer, list_optimizers, register_optimizer
from stablenet.train.schedules import create_schedule, list_schedules, register_schedule, scaled_lr
from stablenet.train.trainer import TrainResult, resolve_device, train

__all__ = [
    "LOSSES",
    "BudgetPlan",
    "TrainConfig",
    "TrainResult",
    "WeightEMA",
    "apply_overrides",
    "create_loss",
    "create_optimizer",
    "create_schedule",
    "list_optimizers",
    "list_schedules",
    "load_config",
    "load_model",
    "parse_override_args",
    "pilot_timing",
    "plan_epochs",
    "read_model_metadata",
    "register_optimizer",
    "register_schedule",
    "resolve_device",
    "save_model",
    "scaled_lr",
    "train",
]
