"""Model files: a checkpoint that rebuilds its model alone and loads without executing code, and the run directory.

A model checkpoint is one ``model.safetensors`` file whose header metadata holds (as JSON) the model's
registry name, its arguments and the input normalisation, so :func:`load_model` needs nothing else; a
readable copy of that metadata goes to ``model.json``. Writes are atomic (``stablenet.atomic``).
:func:`load_run` loads what every workflow on a trained run needs: the model, its metadata and a split of the
data set it was trained on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

from stablenet.atomic import atomic_write_bytes, atomic_write_json
from stablenet.models.registry import create_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "META_FILE",
    "MODEL_FILE",
    "LoadedRun",
    "load_model",
    "load_run",
    "load_state_dict_checked",
    "read_model_metadata",
    "save_model",
]

CHECKPOINT_FORMAT = 1
MODEL_FILE = "model.safetensors"
META_FILE = "model.json"
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


@dataclass(frozen=True)
class LoadedRun:
    """A trained run's model (eval mode, on the requested device), its checkpoint metadata and one data split."""

    model: nn.Module
    metadata: dict[str, Any]
    images: Tensor
    labels: Tensor


def load_run(
    run_dir: str | os.PathLike,
    split: str = "test",
    data_root: str | os.PathLike | None = None,
    map_location: str | torch.device = "cpu",
) -> LoadedRun:
    """The model of ``run_dir`` and the ``split`` of the data set it was trained on (pixels in [0, 1]).

    Raises:
        FileNotFoundError: no checkpoint in ``run_dir``, or no data set files found.
        ValueError: a corrupt checkpoint, or a split or data set that does not exist.
    """
    from stablenet.data import load_dataset

    metadata = read_model_metadata(run_dir)
    model = load_model(run_dir, map_location=map_location)
    images, labels = load_dataset(metadata["dataset"], split, data_root)
    return LoadedRun(model, metadata, images, labels)
