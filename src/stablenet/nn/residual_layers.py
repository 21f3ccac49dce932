"""Deprecated alias of :mod:`stablenet.nn.relu_residual` (renamed to say what it holds: the shared base of SLL
and CPL, x + B ReLU(Wx + b)). Kept for one release (``CHANGELOG.md``)."""

import warnings

from stablenet.nn.relu_residual import *  # noqa: F403
from stablenet.nn.relu_residual import __all__  # noqa: F401

DEPRECATED_ALIAS = True
warnings.warn(
    "stablenet.nn.residual_layers is deprecated; import from stablenet.nn.relu_residual",
    DeprecationWarning,
    stacklevel=2,
)
