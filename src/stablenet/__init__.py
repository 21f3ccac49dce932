"""stablenet: neural networks that are stable, with proofs.

Lipschitz layers and bounds, certificates, randomized smoothing and curvature tools in one package.
"""

from stablenet.data import load_dataset
from stablenet.models import create_model, list_models, load_model, load_run

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "list_models", "load_dataset", "load_model", "load_run"]
