"""Training: configuration, losses, optimizers, checkpoints and the resumable training loop."""

from stablenet.train.checkpoint import load_model, read_model_metadata, save_model
from stablenet.train.config import TrainConfig, apply_overrides, load_config, parse_override_args
from stablenet.train.losses import LOSSES, create_loss
from stablenet.train.optimizers import create_optimizer, list_optimizers, register_optimizer
from stablenet.train.trainer import TrainResult, resolve_device, train

__all__ = [
    "LOSSES",
    "TrainConfig",
    "TrainResult",
    "apply_overrides",
    "create_loss",
    "create_optimizer",
    "list_optimizers",
    "load_config",
    "load_model",
    "parse_override_args",
    "read_model_metadata",
    "register_optimizer",
    "resolve_device",
    "save_model",
    "train",
]
