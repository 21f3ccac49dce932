"""Certificates: Lipschitz-margin radii with their rounding analysis, the PGD attack, and the shared record format.

Certification *runs* over a trained model and a data set, verification and reports are workflows
(:mod:`stablenet.workflows`); their old names here are deprecated aliases (``CHANGELOG.md``).
"""

import importlib
import warnings

from stablenet.certify.lipschitz import (
    ARITHMETICS,
    LipschitzCertifier,
    LogitErrorBound,
    certified_network,
    certify_lipschitz,
    generic_margin_radius,
    lln_margin_radius,
)
from stablenet.certify.records import ABSTAIN, RECORD_FIELDS, CertificationRecord, RecordWriter, read_records

__all__ = [
    "ABSTAIN",
    "ARITHMETICS",
    "RECORD_FIELDS",
    "CertificationRecord",
    "LipschitzCertifier",
    "LogitErrorBound",
    "RecordWriter",
    "certified_network",
    "certify_lipschitz",
    "generic_margin_radius",
    "lln_margin_radius",
    "read_records",
]

#: Names that moved to :mod:`stablenet.workflows`, still importable from here for one release.
_DEPRECATED = {
    "CERTIFY_METHODS": "stablenet.workflows.certification",
    "SMOOTHING_METHODS": "stablenet.workflows.certification",
    "SmoothingParams": "stablenet.workflows.certification",
    "certify_dataset": "stablenet.workflows.certification",
    "certify_run": "stablenet.workflows.certification",
    "STANDARD_RADII": "stablenet.workflows.report",
    "certified_accuracy": "stablenet.workflows.report",
    "write_report": "stablenet.workflows.report",
}


def __getattr__(name: str) -> object:
    if name in _DEPRECATED:
        module = _DEPRECATED[name]
        message = f"stablenet.certify.{name} is deprecated; import it from {module}"
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'stablenet.certify' has no attribute {name!r}")
