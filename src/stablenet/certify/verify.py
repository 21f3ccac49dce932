"""Deprecated alias of :mod:`stablenet.workflows.verification` (a workflow, moved out of the certificates' tier).

Kept for one release (``CHANGELOG.md``); import from ``stablenet.workflows.verification``.
"""

import warnings

from stablenet.workflows.verification import *  # noqa: F403
from stablenet.workflows.verification import __all__  # noqa: F401

DEPRECATED_ALIAS = True
_MESSAGE = "stablenet.certify.verify is deprecated; import from stablenet.workflows.verification"
warnings.warn(_MESSAGE, DeprecationWarning, stacklevel=2)
