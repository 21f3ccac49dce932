"""Randomized smoothing (Cohen et al. 2019) and its Lipschitz-aware refinements.

Not implemented yet: see the randomized-smoothing issue. Importing this package is safe and exposes nothing.
"""

__all__: list[str] = []
