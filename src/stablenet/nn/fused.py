"""Deprecated alias of :mod:`stablenet.nn.fused_rescaling` (renamed to say what it fuses: the AOL and SLL rescalings).
Kept for one release (``CHANGELOG.md``)."""

import warnings

from stablenet.nn.fused_rescaling import *  # noqa: F403
from stablenet.nn.fused_rescaling import __all__  # noqa: F401

DEPRECATED_ALIAS = True
warnings.warn(
    "stablenet.nn.fused is deprecated; import from stablenet.nn.fused_rescaling", DeprecationWarning, stacklevel=2
)
