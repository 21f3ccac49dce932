"""Deprecated alias of :mod:`stablenet.nn.skip` (``Residual``, ``LipResidual``) and :mod:`stablenet.nn.export`
(``export_model``, ``export_branch``), the two concepts this module held. Kept for one release (``CHANGELOG.md``)."""

import warnings

from stablenet.nn.export import *  # noqa: F403
from stablenet.nn.export import __all__ as _export_all
from stablenet.nn.skip import *  # noqa: F403
from stablenet.nn.skip import __all__ as _skip_all

__all__ = sorted([*_skip_all, *_export_all])
DEPRECATED_ALIAS = True
warnings.warn(
    "stablenet.nn.residual is deprecated; import Residual and LipResidual from stablenet.nn.skip, export_model and "
    "export_branch from stablenet.nn.export",
    DeprecationWarning,
    stacklevel=2,
)
