"""Deprecated alias of :mod:`stablenet.workflows.report` (a workflow, moved out of the certificates' tier).

Kept for one release (``CHANGELOG.md``); import from ``stablenet.workflows.report``.
"""

import warnings

from stablenet.workflows.report import *  # noqa: F403
from stablenet.workflows.report import __all__  # noqa: F401

DEPRECATED_ALIAS = True
warnings.warn(
    "stablenet.certify.report is deprecated; import from stablenet.workflows.report", DeprecationWarning, stacklevel=2
)
