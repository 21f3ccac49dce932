"""Deprecated alias of :mod:`stablenet.atomic` (renamed: ``io`` shadowed the standard library's name).

Kept for one release (``CHANGELOG.md``); import from ``stablenet.atomic``.
"""

import warnings

from stablenet.atomic import *  # noqa: F403
from stablenet.atomic import __all__  # noqa: F401

DEPRECATED_ALIAS = True
warnings.warn("stablenet.io is deprecated; import from stablenet.atomic", DeprecationWarning, stacklevel=2)
