"""Deprecated alias of :mod:`stablenet.workflows.demo`.

Kept for one release (``CHANGELOG.md``); import from ``stablenet.workflows.demo``.
"""

import warnings

from stablenet.workflows.demo import *  # noqa: F403
from stablenet.workflows.demo import __all__  # noqa: F401

DEPRECATED_ALIAS = True
warnings.warn("stablenet.demo is deprecated; import from stablenet.workflows.demo", DeprecationWarning, stacklevel=2)
