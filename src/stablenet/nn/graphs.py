"""Deprecated alias of :mod:`stablenet.nn.cuda_graphs` (renamed to say which graphs: CUDA graphs of the weight maps).
Kept for one release (``CHANGELOG.md``)."""

import warnings

from stablenet.nn.cuda_graphs import *  # noqa: F403
from stablenet.nn.cuda_graphs import __all__  # noqa: F401

DEPRECATED_ALIAS = True
warnings.warn(
    "stablenet.nn.graphs is deprecated; import from stablenet.nn.cuda_graphs", DeprecationWarning, stacklevel=2
)
