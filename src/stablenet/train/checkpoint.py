"""Training checkpoints: the optimiser, random-generator and loop state that ``--resume`` needs.

The training state goes to ``train_state.pt``, loaded with ``torch.load(weights_only=True)``; writes are atomic
(``stablenet.atomic``). The model itself is saved by :func:`stablenet.models.save_model` (re-exported here).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from stablenet.atomic import atomic_write
from stablenet.models.persistence import (
    CHECKPOINT_FORMAT,
    MODEL_FILE,
    load_model,
    load_state_dict_checked,
    read_model_metadata,
    save_model,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "MODEL_FILE",
    "TRAIN_STATE_FILE",
    "load_model",
    "load_state_dict_checked",
    "load_training_state",
    "read_model_metadata",
    "save_model",
    "save_training_state",
]

TRAIN_STATE_FILE = "train_state.pt"


def save_training_state(run_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write ``run_dir/train_state.pt`` (tensors, numbers, strings, lists and dicts only)."""
    return atomic_write(Path(run_dir) / TRAIN_STATE_FILE, lambda f: torch.save(state, f))


def load_training_state(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read ``run_dir/train_state.pt`` without executing code (``weights_only=True``)."""
    path = Path(run_dir) / TRAIN_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no training state at {path}; nothing to resume")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated files
        raise ValueError(f"training state {path} is truncated or corrupt ({str(e).splitlines()[0]})") from None
