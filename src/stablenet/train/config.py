"""Training configuration: one dataclass, set from YAML, overridden by ``--key value`` flags.

Every key is validated: unknown keys and values of the wrong type raise ``ValueError`` with one line that
names the key and what it accepts. The resolved configuration is saved in the run directory.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stablenet.data.sizing import STREAMING_MODES
from stablenet.train.losses import list_losses
from stablenet.train.optimizers import list_optimizers
from stablenet.train.schedules import list_schedules

__all__ = ["TrainConfig", "apply_overrides", "load_config", "parse_override_args"]


@dataclass
class TrainConfig:
    """Everything a training run depends on (so a run is reproducible from this alone)."""

    dataset: str = "digits"
    data_root: str | None = None
    model: str = "sll_mlp"
    model_args: dict[str, Any] = field(default_factory=dict)
    normalize_std: bool = False  # False: centre inputs only, keeping the model's Lipschitz constant in pixels
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    # Learning-rate schedule by name (stablenet.train.schedules): constant, cosine (with warmup_epochs of linear
    # warm-up), onecycle (rising for onecycle_pct_start of the run), step (times lr_gamma every lr_step_epochs).
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    onecycle_pct_start: float = 0.3
    lr_step_epochs: int = 30
    lr_gamma: float = 0.1
    # lr is the rate at reference_batch_size; "linear" or "sqrt" scale it to batch_size (the global batch).
    lr_scaling: str = "none"
    reference_batch_size: int = 128
    # Loss by name (stablenet.train.losses): ce, offset_ce, hinge, kr, hkr. Margin losses take their margin from
    # target_radius (the certified radius to aim for; the margin the certificate needs there) or, without it,
    # from loss_offset; loss_temperature goes to the losses that take one; loss_options holds the rest (alpha...).
    loss: str = "offset_ce"
    loss_offset: float = 0.7071
    loss_temperature: float = 0.25
    target_radius: float | None = None
    loss_options: dict[str, Any] = field(default_factory=dict)
    # Exponential moving average of the weights (0: off); the averaged weights are evaluated, certified and saved.
    ema_decay: float = 0.0
    # Clip the gradient's global l2 norm to this value (0: off).
    grad_clip_norm: float = 0.0
    # Stream the data from its files with DataLoader workers (True), hold it on the device (False), or choose by
    # its decoded size ("auto": stream when it exceeds a quarter of the device's memory; stablenet.data.sizing).
    data_streaming: bool | str = "auto"
    num_workers: int = 2
    # Plan the run to end within this many minutes (0: off): a short pilot times the steps, then the number of
    # epochs and the schedule's length are fixed (stablenet.train.budget); epochs is then ignored.
    time_budget: float = 0.0
    crop_padding: int = 0
    flip: bool = False
    # Gaussian noise augmentation for randomized smoothing (Cohen et al.): train at the certification sigma.
    noise_sigma: float = 0.0
    # Curvature regularisers, e.g. [{name: activation_decay, weight: 0.01}] (stablenet.curvature.regularizers).
    regularizers: list[dict[str, Any]] = field(default_factory=list)
    # Sharpness-aware minimisation around the optimizer: rho > 0 enables SAM (ASAM with sam_adaptive).
    sam_rho: float = 0.0
    sam_adaptive: bool = False
    seed: int = 0
    device: str = "auto"
    out: str = "runs/train"
    # Also checkpoint within an epoch when this many minutes have passed since the last checkpoint (0: only at
    # the end of each epoch). How often a run saves does not change what it computes (Note [exact resume]).
    checkpoint_minutes: float = 10.0
    # On a GPU, run the layers' weight maps as CUDA graphs (stablenet.nn.capture_weight_maps): same values, less
    # launch overhead. Not with regularizers that differentiate gradients (only activation_decay is accepted).
    cuda_graphs: bool = False
    # Arithmetic of the forward and the loss: "fp32", or "bf16" autocast (the layers' constraint math and every
    # bound stay in float64/float32, so the guarantee is unchanged).
    precision: str = "fp32"
    # torch.compile the model (with its parametrizations) for training; the saved weights are the same.
    compile: bool = False
    # Keep convolution inputs and weights in channels-last memory format (faster convolutions on some GPUs).
    channels_last: bool = False
    # Evaluate (and certify) the test set every this many epochs, and always after the last one.
    eval_every: int = 1
    # Written by the trainer, ignored as input: the time budget's plan and the wall time it took.
    plan: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_types(self)
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.crop_padding >= 0, "crop_padding must be >= 0"),
            (self.loss_temperature > 0, "loss_temperature must be > 0"),
            (self.loss_offset >= 0, "loss_offset must be >= 0"),
            (self.noise_sigma >= 0, "noise_sigma must be >= 0"),
            (self.sam_rho >= 0, "sam_rho must be >= 0"),
            (self.checkpoint_minutes >= 0, "checkpoint_minutes must be >= 0"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (0 < self.onecycle_pct_start < 1, "onecycle_pct_start must be in (0, 1)"),
            (self.lr_step_epochs >= 1, "lr_step_epochs must be >= 1"),
            (self.lr_gamma > 0, "lr_gamma must be > 0"),
            (self.reference_batch_size >= 1, "reference_batch_size must be >= 1"),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)"),
            (self.grad_clip_norm >= 0, "grad_clip_norm must be >= 0"),
            (self.time_budget >= 0, "time_budget must be >= 0"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
            (self.target_radius is None or self.target_radius > 0, "target_radius must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}; got {dataclasses.asdict(self)[message.split()[0]]}")
        choices = {  # the registered names of stablenet.train.{optimizers, schedules, losses}
            "optimizer": list_optimizers(),
            "schedule": list_schedules(),
            "loss": list_losses(),
            "precision": ("fp32", "bf16"),
            "lr_scaling": ("none", "linear", "sqrt"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        names = {str(r.get("name")) for r in self.regularizers if isinstance(r, Mapping)}
        second_order = sorted(names - {"activation_decay"})
        if self.cuda_graphs and second_order:
            raise ValueError(
                f"cuda_graphs cannot differentiate gradients, which regularizer(s) {', '.join(second_order)} need; "
                "accepted with cuda_graphs: activation_decay"
            )
        if self.data_streaming not in STREAMING_MODES:
            raise ValueError(f"data_streaming must be one of true, false, auto; got {self.data_streaming!r}")
        if self.grad_clip_norm > 0 and self.sam_rho > 0:
            raise ValueError("grad_clip_norm cannot be combined with sam_rho > 0 (SAM steps twice per batch); use one")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith(("cuda", "mps"))):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        if not isinstance(values, Mapping):
            raise ValueError(f"a config must be a mapping of key: value; got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {', '.join(unknown)}; accepted: {', '.join(sorted(known))}")
        return cls(**dict(values))


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is dict:
        return "a mapping"
    if typing.get_origin(hint) is list:
        item = (typing.get_args(hint) or (Any,))[0]
        return "a list of mappings" if typing.get_origin(item) is dict else f"a list of {_type_name(item)} values"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _check_types(config: TrainConfig) -> None:
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _type_ok(value, hints[f.name]):
            raise ValueError(f"config key {f.name!r} must be {_type_name(hints[f.name])}; got {value!r}")
        if hints[f.name] is float and isinstance(value, int):
            setattr(config, f.name, float(value))


def load_config(path: str | os.PathLike | None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config (``None``: defaults) and apply ``overrides`` (dotted keys allowed)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of key: value; got {type(loaded).__name__}")
        values = loaded or {}
    return apply_overrides(TrainConfig.from_dict(values), overrides or {})


def apply_overrides(config: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """A copy of ``config`` with ``overrides`` applied; ``model_args.width: 64`` sets a nested key."""
    values = config.to_dict()
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            if head != "model_args":
                raise ValueError(f"only model_args takes nested keys (model_args.NAME); got {key!r}")
            values["model_args"] = {**values["model_args"], rest: value}
        else:
            values[head] = value
    return TrainConfig.from_dict(values)


def parse_override_args(args: Sequence[str]) -> dict[str, Any]:
    """Parse ``["--epochs", "5", "--data-root", "d", "--model_args.width=64"]`` into ``{"epochs": 5, ...}``.

    Values are read as YAML scalars. Keys are config keys with dashes read as underscores, so ``--data-root``
    and ``--data_root`` both set ``data_root`` (the CLI spells its flags with dashes).
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"expected --key value pairs for config overrides; got {arg!r}")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ValueError(f"config override --{key} needs a value")
            raw = args[i + 1]
            i += 1
        key = key.replace("-", "_")  # --data-root, like every other flag; --data_root still works
        try:
            out[key] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            out[key] = raw
        i += 1
    return out
