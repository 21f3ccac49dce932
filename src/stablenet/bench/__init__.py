"""Benchmarks behind ``stablenet bench``: timings and tightness measured in one run, as JSON rows.

One module per suite (``spectral``, ``smoothing``, ``curvature``, ``layers``, ``train``), each with its ``bench_*``
function and its table format; :mod:`stablenet.bench.suites` names them (:func:`run_suite`, :func:`format_table`).
:mod:`stablenet.bench.provenance` records where each row comes from (:func:`provenance`, :func:`write_rows`).
"""

from stablenet.bench.provenance import provenance, write_rows
from stablenet.bench.suites import SUITES, Suite, format_table, run_suite

__all__ = ["SUITES", "Suite", "format_table", "provenance", "run_suite", "write_rows"]
