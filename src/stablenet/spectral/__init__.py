"""Spectral-norm engine: exact values, guaranteed upper bounds and lower estimates of operator norms."""

from stablenet.spectral.cholesky_bound import cholesky_circular_bound, gram_spectrum
from stablenet.spectral.conv import (
    CONV_METHODS,
    conv_operator,
    conv_operator_matrix,
    conv_spectral_norm,
    conv_spectral_norm_upper_bound,
    conv_spectral_norm_upper_bounds,
    spatial_gram_bound,
)
from stablenet.spectral.dense import (
    GRAM_ROUNDING_SLACK,
    gram_iteration,
    gram_iteration_amax,
    gram_iteration_max,
    power_iteration,
    spectral_norm_exact,
    spectral_norm_upper_bound,
)
from stablenet.spectral.lockstep import gram_iteration_max_many
from stablenet.spectral.network import (
    BoundNode,
    layer_lipschitz_bounds,
    lipschitz_bound_tree,
    lipschitz_lower_bound,
    lipschitz_upper_bound,
    register_lipschitz_rule,
    unbounded_modules,
)
from stablenet.spectral.rescaling import (
    aol_conv_rescaling,
    aol_rescaling,
    conv_gram_kernel,
    conv_gram_power_rowsums,
    dilate_kernel,
    safe_reciprocal,
    sll_rescaling,
    sr_conv_rescaling,
    sr_rescaling,
)

__all__ = [
    "CONV_METHODS",
    "GRAM_ROUNDING_SLACK",
    "BoundNode",
    "aol_conv_rescaling",
    "aol_rescaling",
    "cholesky_circular_bound",
    "conv_gram_kernel",
    "conv_gram_power_rowsums",
    "conv_operator",
    "conv_operator_matrix",
    "conv_spectral_norm",
    "conv_spectral_norm_upper_bound",
    "conv_spectral_norm_upper_bounds",
    "dilate_kernel",
    "gram_iteration",
    "gram_iteration_amax",
    "gram_iteration_max",
    "gram_iteration_max_many",
    "gram_spectrum",
    "layer_lipschitz_bounds",
    "lipschitz_bound_tree",
    "lipschitz_lower_bound",
    "lipschitz_upper_bound",
    "power_iteration",
    "register_lipschitz_rule",
    "safe_reciprocal",
    "sll_rescaling",
    "spatial_gram_bound",
    "spectral_norm_exact",
    "spectral_norm_upper_bound",
    "sr_conv_rescaling",
    "sr_rescaling",
    "unbounded_modules",
]
