"""Deprecated alias of :mod:`stablenet.spectral.cholesky_bound` (renamed to say what it holds: the circular norm
verified by Cholesky factorisations). Kept for one release (``CHANGELOG.md``)."""

import warnings

from stablenet.spectral.cholesky_bound import *  # noqa: F403
from stablenet.spectral.cholesky_bound import __all__  # noqa: F401

DEPRECATED_ALIAS = True
warnings.warn(
    "stablenet.spectral.verified is deprecated; import from stablenet.spectral.cholesky_bound",
    DeprecationWarning,
    stacklevel=2,
)
