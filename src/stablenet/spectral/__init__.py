"""Spectral-norm engine: exact values, guaranteed upper bounds and lower estimates of operator norms."""

from stablenet.spectral.conv import (
    CONV_METHODS,
    conv_operator,
    conv_operator_matrix,
    conv_spectral_norm,
    conv_spectral_norm_upper_bound,
    spatial_gram_bound,
)
from stablenet.spectral.dense import (
    GRAM_ROUNDING_SLACK,
    gram_iteration,
    power_iteration,
    spectral_norm_exact,
    spectral_norm_upper_bound,
)
from stablenet.spectral.network import (
    layer_lipschitz_bounds,
    lipschitz_lower_bound,
    lipschitz_upper_bound,
    register_lipschitz_rule,
)

__all__ = [
    "CONV_METHODS",
    "GRAM_ROUNDING_SLACK",
    "conv_operator",
    "conv_operator_matrix",
    "conv_spectral_norm",
    "conv_spectral_norm_upper_bound",
    "gram_iteration",
    "layer_lipschitz_bounds",
    "lipschitz_lower_bound",
    "lipschitz_upper_bound",
    "power_iteration",
    "register_lipschitz_rule",
    "spatial_gram_bound",
    "spectral_norm_exact",
    "spectral_norm_upper_bound",
]
