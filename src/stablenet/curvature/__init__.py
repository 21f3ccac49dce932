"""Hessian tools and curvature regularisers.

Not implemented yet: see the curvature issue. Importing this package is safe and exposes nothing.
"""

__all__: list[str] = []
