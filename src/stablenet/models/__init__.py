"""Model architectures, created by name through the registry."""

from stablenet.models import cnn as _cnn  # noqa: F401  (registers the builders)
from stablenet.models import lipnets as _lipnets  # noqa: F401
from stablenet.models import mlp as _mlp  # noqa: F401
from stablenet.models import resnet as _resnet  # noqa: F401
from stablenet.models.registry import create_model, list_models, model_options, register_model

__all__ = ["create_model", "list_models", "model_options", "register_model"]
