"""Abstention: what a certifier predicts for an input it cannot decide.

It lives below every certifier (Lipschitz margins, randomized smoothing) and the record format, which all use it.
"""

__all__ = ["ABSTAIN"]

ABSTAIN: int = -1
"""The prediction of an example on which a certifier abstained (never correct, radius 0)."""
