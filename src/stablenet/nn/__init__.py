"""1-Lipschitz layers: each is correct by construction and exposes ``lipschitz_bound()``."""

from stablenet.nn.activations import GroupSort, MaxMin
from stablenet.nn.base import LAYER_ROUNDING_SLACK
from stablenet.nn.lln import LinearNormalized
from stablenet.nn.preprocess import ChannelPad, InputNormalization
from stablenet.nn.residual import Residual
from stablenet.nn.sll import SLLLinear

__all__ = [
    "LAYER_ROUNDING_SLACK",
    "ChannelPad",
    "GroupSort",
    "InputNormalization",
    "LinearNormalized",
    "MaxMin",
    "Residual",
    "SLLLinear",
]
