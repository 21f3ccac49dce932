"""Deprecated alias of :mod:`stablenet.workflows.certification` (a workflow, moved out of the certificates' tier).

Kept for one release (``CHANGELOG.md``); import from ``stablenet.workflows.certification``.
"""

import warnings

from stablenet.workflows.certification import *  # noqa: F403
from stablenet.workflows.certification import __all__  # noqa: F401

DEPRECATED_ALIAS = True
_MESSAGE = "stablenet.certify.run is deprecated; import from stablenet.workflows.certification"
warnings.warn(_MESSAGE, DeprecationWarning, stacklevel=2)
