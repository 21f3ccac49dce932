"""Spectral-norm engine: exact values, guaranteed upper bounds and lower estimates of operator norms."""

from stablenet.spectral.dense import (
    GRAM_ROUNDING_SLACK,
    gram_iteration,
    power_iteration,
    spectral_norm_exact,
    spectral_norm_upper_bound,
)
from stablenet.spectral.network import layer_lipschitz_bounds, lipschitz_upper_bound, register_lipschitz_rule

__all__ = [
    "GRAM_ROUNDING_SLACK",
    "gram_iteration",
    "layer_lipschitz_bounds",
    "lipschitz_upper_bound",
    "power_iteration",
    "register_lipschitz_rule",
    "spectral_norm_exact",
    "spectral_norm_upper_bound",
]
