"""Training: configuration, losses, checkpoints and the resumable training loop."""

from stablenet.train.checkpoint import load_model, read_model_metadata, save_model
from stablenet.train.config import TrainConfig, apply_overrides, load_config, parse_override_args
from stablenet.train.losses import LOSSES, create_loss
from stablenet.train.trainer import TrainResult, resolve_device, train

__all__ = [
    "LOSSES",
    "TrainConfig",
    "TrainResult",
    "apply_overrides",
    "create_loss",
    "load_config",
    "load_model",
    "parse_override_args",
    "read_model_metadata",
    "resolve_device",
    "save_model",
    "train",
]
