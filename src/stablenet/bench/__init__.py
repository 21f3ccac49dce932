"""Benchmarks behind ``stablenet bench``: timings and tightness measured in one run, as JSON rows.

One module per suite (``spectral``, ``smoothing``, ``curvature``, ``layers``), each with its ``bench_*`` function
and its table format; :mod:`stablenet.bench.suites` names them (:func:`run_suite`, :func:`format_table`).
"""

from stablenet.bench.suites import SUITES, Suite, format_table, run_suite

__all__ = ["SUITES", "Suite", "format_table", "run_suite"]
