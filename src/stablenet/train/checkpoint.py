"""Checkpoints that rebuild their model alone and load without executing code.

A model checkpoint is one ``model.safetensors`` file whose header metadata holds (as JSON) the model's
registry name, its arguments and the input normalisation, so :func:`load_model` needs nothing else; a
readable copy of that metadata goes to ``model.json``. The training state (optimiser, epoch, metrics) goes to
``train_state.pt``, loaded with ``torch.load(weights_only=True)``. All writes are atomic
(``stablenet.io``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from stablenet.io import atomic_write, atomic_write_bytes, atomic_write_json

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

CHECKPOINT_FORMAT = 1
MODEL_FILE = "model.safetensors"
META_FILE = "model.json"
TRAIN_STATE_FILE = "train_state.pt"
_META_KEY = "stablenet"
_REQUIRED = ("model", "model_args", "num_classes", "in_channels", "input_size", "mean", "std")


def _model_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}; pass a run directory holding {MODEL_FILE} or the file itself"
        )
    return path


def save_model(run_dir: str | os.PathLike, model: nn.Module, metadata: dict[str, Any]) -> Path:
    """Write ``run_dir/model.safetensors`` (weights + metadata) and ``run_dir/model.json``.

    ``metadata`` must hold ``model, model_args, num_classes, in_channels, input_size, mean, std``.
    """
    missing = [k for k in _REQUIRED if k not in metadata]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {', '.join(missing)}; required: {', '.join(_REQUIRED)}")
    meta = {"format": CHECKPOINT_FORMAT, **metadata}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    blob = safetensors_save(tensors, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
    run_dir = Path(run_dir)
    path = atomic_write_bytes(run_dir / MODEL_FILE, blob)
    atomic_write_json(run_dir / META_FILE, meta)
    return path


def read_model_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata stored in a model checkpoint (a run directory or a ``.safetensors`` file)."""
    path = _model_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({str(e).splitlines()[0]})") from None
    if raw is None:
        raise ValueError(f"{path} is a safetensors file without stablenet metadata; save it with save_model()")
    meta = json.loads(raw)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint {path} has format {meta.get('format')!r}; this stablenet reads {CHECKPOINT_FORMAT}"
        )
    return meta


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from its checkpoint alone, in eval mode, taking images with pixels in [0, 1].

    Args:
        path: a run directory or a ``model.safetensors`` file written by :func:`save_model`.
        map_location: device for the weights.

    Raises:
        FileNotFoundError: no checkpoint there.
        ValueError: the file is truncated or corrupt, or its weights do not match the model it names.
    """
    from stablenet.models import create_model

    path = _model_path(path)
    meta = read_model_metadata(path)
    model = create_model(
        meta["model"],
        meta["num_classes"],
        meta["in_channels"],
        tuple(meta["input_size"]),
        mean=meta["mean"],
        std=meta["std"],
        **meta["model_args"],
    )
    try:
        state = safetensors_load(path.read_bytes())
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({str(e).splitlines()[0]})") from None
    load_state_dict_checked(model, state, f"checkpoint {path}")
    return model.to(map_location).eval()


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``model.load_state_dict(state)`` with a one-line error naming the mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}")
        if wrong:
            parts.append(
                "shape mismatch "
                + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:5])
            )
        raise ValueError(f"{what} does not match the model it names: {'; '.join(parts)}")
    model.load_state_dict(state)


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
