"""Certificates: Lipschitz-margin radii, the shared record format, certification runs and reports."""

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
from stablenet.certify.report import STANDARD_RADII, certified_accuracy, write_report
from stablenet.certify.run import CERTIFY_METHODS, SMOOTHING_METHODS, SmoothingParams, certify_dataset, certify_run

__all__ = [
    "ABSTAIN",
    "ARITHMETICS",
    "CERTIFY_METHODS",
    "RECORD_FIELDS",
    "SMOOTHING_METHODS",
    "STANDARD_RADII",
    "CertificationRecord",
    "LipschitzCertifier",
    "LogitErrorBound",
    "RecordWriter",
    "SmoothingParams",
    "certified_accuracy",
    "certified_network",
    "certify_dataset",
    "certify_lipschitz",
    "certify_run",
    "generic_margin_radius",
    "lln_margin_radius",
    "read_records",
    "write_report",
]
