"""Deprecated alias of :mod:`stablenet.smoothing.arguments` (renamed for what it holds: argument checks, eval mode,
the model's device). Kept for one release (``CHANGELOG.md``)."""

import warnings

from stablenet.smoothing.arguments import *  # noqa: F403
from stablenet.smoothing.arguments import __all__  # noqa: F401

DEPRECATED_ALIAS = True
_MESSAGE = "stablenet.smoothing.base is deprecated; import from stablenet.smoothing.arguments"
warnings.warn(_MESSAGE, DeprecationWarning, stacklevel=2)
