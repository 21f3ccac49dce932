"""Benchmarks behind ``stablenet bench``: timings and tightness measured in one run, as JSON rows."""

__all__: list[str] = []
