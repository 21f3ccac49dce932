"""Model architectures, created by name through the registry, and their files (checkpoints, run directories)."""

from stablenet.models import cnn as _cnn  # noqa: F401  (registers the builders)
from stablenet.models import lipnets as _lipnets  # noqa: F401
from stablenet.models import mlp as _mlp  # noqa: F401
from stablenet.models import resnet as _resnet  # noqa: F401
from stablenet.models.persistence import LoadedRun, load_model, load_run, read_model_metadata, save_model
from stablenet.models.registry import create_model, list_models, model_options, register_model

__all__ = [
    "LoadedRun",
    "create_model",
    "list_models",
    "load_model",
    "load_run",
    "model_options",
    "read_model_metadata",
    "register_model",
    "save_model",
]
