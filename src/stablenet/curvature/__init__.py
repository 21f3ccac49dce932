"""Curvature: Hessian tools, curvature regularisers, SAM/ASAM, and loss-landscape slices."""

from stablenet.curvature.hessian import Hessian
from stablenet.curvature.regularizers import (
    REGULARIZERS,
    create_regularizer,
    register_regularizer,
    regularizers_from_config,
    total_penalty,
)
from stablenet.curvature.sam import ASAM, SAM, sam_bn_guard, sam_step

__all__ = [
    "ASAM",
    "REGULARIZERS",
    "SAM",
    "Hessian",
    "create_regularizer",
    "register_regularizer",
    "regularizers_from_config",
    "sam_bn_guard",
    "sam_step",
    "total_penalty",
]
