"""Workflows on trained runs: certification runs, verification by attack, reports, bounds, curvature, the demo.

They compose the tiers below (models and their files, certificates, smoothing) into resumable jobs that read a
run directory and write record files and reports; the CLI is a thin layer over them.
"""

from stablenet.workflows.certification import (
    CERTIFY_METHODS,
    SMOOTHING_METHODS,
    SmoothingParams,
    certify_dataset,
    certify_run,
)
from stablenet.workflows.curvature import LandscapeReport, hessian_report, landscape_report
from stablenet.workflows.demo import DemoResult, demo_summary, run_demo
from stablenet.workflows.lipschitz import LipschitzReport, lipschitz_report
from stablenet.workflows.report import STANDARD_RADII, certified_accuracy, summarize, write_report
from stablenet.workflows.verification import VerifyResult, verify_records, verify_run

__all__ = [
    "CERTIFY_METHODS",
    "SMOOTHING_METHODS",
    "STANDARD_RADII",
    "DemoResult",
    "LandscapeReport",
    "LipschitzReport",
    "SmoothingParams",
    "VerifyResult",
    "certified_accuracy",
    "certify_dataset",
    "certify_run",
    "demo_summary",
    "hessian_report",
    "landscape_report",
    "lipschitz_report",
    "run_demo",
    "summarize",
    "verify_records",
    "verify_run",
    "write_report",
]
