r"""Layer families by name: a family's 1-Lipschitz convolution and dense layer, for architectures that swap them.

An architecture written once for "a 1-Lipschitz convolution and a 1-Lipschitz dense layer" (the trunk of
``stablenet.models.lipnets``) takes a family's name and finds its layers here (STYLE §5: registries, not
if-chains), so a user's family is one call to :func:`register_layer_family`, and a :class:`LayerFamily` is
accepted wherever a name is.

Architectures build the two kinds of family differently:

* **residual** (``residual=True``): blocks :math:`x + B\,\mathrm{ReLU}(Wx + b)` that keep their size, built as
  ``conv(channels, inner_channels, kernel_size)`` and ``dense(features, inner_features)`` (SLL, CPL);
* **maps** (``residual=False``): layers with the torch constructors, ``conv(in_channels, out_channels,
  kernel_size, padding=kernel_size // 2)`` and ``dense(in_features, out_features)`` (AOL, SR, spectral
  normalisation), which architectures follow with an activation such as ``MaxMin``. A ``circular`` convolution
  pads circularly by itself and is built without ``padding`` (Cayley, with :class:`OrthogonalLinear` as its dense
  layer).

``input_size=True`` marks a convolution whose bound is tighter at a known input size (``input_size=(h, w)``).

Example:
    >>> from stablenet.nn import AOLConv2d, AOLLinear
    >>> family = register_layer_family("aol_demo", conv=AOLConv2d, dense=AOLLinear)
    >>> layer_family("aol_demo").conv is AOLConv2d and not family.residual
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from stablenet.nn.aol import AOLConv2d, AOLLinear
from stablenet.nn.cayley_conv import CayleyConv2d
from stablenet.nn.cpl import CPLConv2d, CPLLinear
from stablenet.nn.orthogonal import OrthogonalLinear
from stablenet.nn.sll import SLLConv2d, SLLLinear
from stablenet.nn.spectral_norm import SpectralConv2d, SpectralLinear
from stablenet.nn.sr import SRConv2d, SRLinear

__all__ = ["LayerFamily", "layer_family", "list_layer_families", "register_layer_family"]


@dataclass(frozen=True)
class LayerFamily:
    """A family of 1-Lipschitz layers: its convolution and dense layer, and how architectures build them.

    Attributes:
        name: the registry name.
        conv: the convolution class (or any callable with its constructor).
        dense: the dense layer class (or callable).
        residual: the layers are size-keeping residual blocks (see the module docstring).
        circular: the convolution pads circularly by itself and takes no ``padding`` argument.
        input_size: the convolution takes the input's spatial size, ``input_size=(h, w)``.
    """

    name: str
    conv: Callable[..., nn.Module]
    dense: Callable[..., nn.Module]
    residual: bool = False
    circular: bool = False
    input_size: bool = False


_FAMILIES: dict[str, LayerFamily] = {}


def register_layer_family(
    name: str,
    *,
    conv: Callable[..., nn.Module],
    dense: Callable[..., nn.Module],
    residual: bool = False,
    circular: bool = False,
    input_size: bool = False,
) -> LayerFamily:
    """Register a layer family under ``name`` (names are unique) and return it.

    Args:
        name: the family's name, e.g. ``"sll"``.
        conv, dense, residual, circular, input_size: as in :class:`LayerFamily`.

    Raises:
        ValueError: an empty name, a layer that is not callable, or a name already registered to another family.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a layer family needs a non-empty string name; got {name!r}")
    for role, layer in (("conv", conv), ("dense", dense)):
        if not callable(layer):
            raise ValueError(f"{role} must be a layer class or callable; got {type(layer).__name__}")
    family = LayerFamily(name, conv, dense, residual=residual, circular=circular, input_size=input_size)
    if name in _FAMILIES and _FAMILIES[name] != family:
        raise ValueError(f"layer family {name!r} is already registered")
    _FAMILIES[name] = family
    return family


def layer_family(family: str | LayerFamily) -> LayerFamily:
    """The registered family of that name (a :class:`LayerFamily` is returned as it is).

    Raises:
        ValueError: an unregistered name; the message lists the registered ones.
    """
    if isinstance(family, LayerFamily):
        return family
    if family not in _FAMILIES:
        raise ValueError(f"layer family must be one of {', '.join(map(repr, _FAMILIES))}; got {family!r}")
    return _FAMILIES[family]


def list_layer_families() -> list[str]:
    """Names of the registered layer families, in registration order."""
    return list(_FAMILIES)


register_layer_family("sll", conv=SLLConv2d, dense=SLLLinear, residual=True)
register_layer_family("cpl", conv=CPLConv2d, dense=CPLLinear, residual=True, input_size=True)
register_layer_family("aol", conv=AOLConv2d, dense=AOLLinear)
register_layer_family("sr", conv=SRConv2d, dense=SRLinear)
register_layer_family("cayley", conv=CayleyConv2d, dense=OrthogonalLinear, circular=True)
register_layer_family("spectral", conv=SpectralConv2d, dense=SpectralLinear, input_size=True)
