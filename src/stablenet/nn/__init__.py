"""1-Lipschitz layers: each is correct by construction and exposes ``lipschitz_bound()`` and ``export()``.

Residual layers: :class:`SLLLinear`, :class:`SLLConv2d`, :class:`CPLLinear`, :class:`CPLConv2d`. Weight
constraints, as ready layers and as parametrizations of any ``nn.Linear`` / ``nn.Conv2d``: AOL
(:func:`lipschitz_aol`), spectral rescaling (:func:`lipschitz_sr`), spectral normalisation
(:func:`lipschitz_spectral`), orthogonality (:func:`lipschitz_orthogonal`); :class:`CayleyConv2d` is orthogonal
in the Fourier domain. :func:`capture_weight_maps` runs the layers' weight maps as CUDA graphs in training.
Activations, pooling, padding, residual containers and the LLN head complete the zoo. Architectures find a
family's convolution and dense layer by name (:func:`layer_family`, :func:`register_layer_family`).
"""

from stablenet.nn.activations import GroupSort, MaxMin
from stablenet.nn.aol import AOLConv2d, AOLLinear, lipschitz_aol, remove_lipschitz_aol
from stablenet.nn.base import LAYER_ROUNDING_SLACK
from stablenet.nn.cayley_conv import CayleyConv2d
from stablenet.nn.constrained import ConstrainedConv2d, ConstrainedLinear, Constraint
from stablenet.nn.cpl import CPLConv2d, CPLLinear
from stablenet.nn.cuda_graphs import capture_weight_maps
from stablenet.nn.export import export_model
from stablenet.nn.families import LayerFamily, layer_family, list_layer_families, register_layer_family
from stablenet.nn.lln import LinearNormalized
from stablenet.nn.orthogonal import OrthogonalLinear, lipschitz_orthogonal, remove_lipschitz_orthogonal
from stablenet.nn.pooling import L2NormPool2d, LipAvgPool2d
from stablenet.nn.preprocess import ChannelPad, InputNormalization
from stablenet.nn.skip import LipResidual, Residual
from stablenet.nn.sll import SLLConv2d, SLLLinear
from stablenet.nn.spectral_norm import SpectralConv2d, SpectralLinear, lipschitz_spectral, remove_lipschitz_spectral
from stablenet.nn.sr import SRConv2d, SRLinear, lipschitz_sr, remove_lipschitz_sr

__all__ = [
    "LAYER_ROUNDING_SLACK",
    "AOLConv2d",
    "AOLLinear",
    "CPLConv2d",
    "CPLLinear",
    "CayleyConv2d",
    "ChannelPad",
    "ConstrainedConv2d",
    "ConstrainedLinear",
    "Constraint",
    "GroupSort",
    "InputNormalization",
    "L2NormPool2d",
    "LayerFamily",
    "LinearNormalized",
    "LipAvgPool2d",
    "LipResidual",
    "MaxMin",
    "OrthogonalLinear",
    "Residual",
    "SLLConv2d",
    "SLLLinear",
    "SRConv2d",
    "SRLinear",
    "SpectralConv2d",
    "SpectralLinear",
    "capture_weight_maps",
    "export_model",
    "layer_family",
    "lipschitz_aol",
    "lipschitz_orthogonal",
    "lipschitz_spectral",
    "lipschitz_sr",
    "list_layer_families",
    "register_layer_family",
    "remove_lipschitz_aol",
    "remove_lipschitz_orthogonal",
    "remove_lipschitz_spectral",
    "remove_lipschitz_sr",
]
