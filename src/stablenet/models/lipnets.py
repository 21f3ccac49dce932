r"""1-Lipschitz convolutional classifiers: the SLL networks and the same trunk built from other layer families.

**The SLL trunk** (Araujo et al., ICLR 2023, arXiv 2303.03169; layout and sizes as in the official code,
github.com/araujoalexandre/Lipschitz-SLL-Networks, ``core/models/model.py`` and ``reproduce_tables.py``):

    InputNormalization → ChannelPad(in_channels → width) → n_conv × SLLConv2d(width, inner 5, 3×3)
    → LipAvgPool2d(4) (= ``AvgPool2d(4, divisor_override=4)``) → Flatten
    → n_dense × SLLLinear(width·H/4·W/4, inner 2048) → LinearNormalized(→ num_classes)

with (n_conv, n_dense, width) = S (20, 7, 45), M (30, 10, 60), L (50, 10, 90), XL (70, 15, 120), and our
own extra-small XS (10, 5, 32) for quick experiments. The official code uses 5 inner channels for every SLL
convolution and 2048 inner features for every dense SLL layer, for all sizes (options ``conv_inner``,
``dense_inner`` change them).

**The other families** (``cpl_*``, ``aol_*``, ``sr_*``, ``cayley_*``) keep the trunk and swap the layers, found by
name in the registry of layer families (``stablenet.nn.families``, where a user's family can be registered too):

* ``cpl``: ``CPLConv2d`` / ``CPLLinear`` (residual layers like SLL; conv inner channels default to the width).
* ``aol``, ``sr``, ``cayley``: a width → width 3×3 convolution (``AOLConv2d``, ``SRConv2d`` with zero padding 1;
  ``CayleyConv2d``, circular padding) followed by ``MaxMin``; the dense part is a ``features → dense_width``
  layer then ``dense_width → dense_width`` layers (``AOLLinear``, ``SRLinear``, ``OrthogonalLinear`` for
  Cayley), each followed by ``MaxMin``. With ``residual=True`` (default) every square block becomes
  ``LipResidual(block)``, :math:`x \mapsto \alpha x + (1 - \alpha)\,\mathrm{block}(x)`, still 1-Lipschitz,
  which keeps deep stacks trainable. MaxMin pairs channels, so the width must be even: these families round
  the default width up (S: 46).

**lipconvnet**: a small MNIST-sized network (below), from AOL or SLL layers.

Every model takes pixels in [0, 1] and normalises inside; its Lipschitz constant, bounded by
``stablenet.spectral.lipschitz_upper_bound(model, (c, h, w))``, is at most :math:`1/\min_c \mathrm{std}_c`
times the head's bound, up to the rounding slack of each layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from stablenet.models.registry import register_model
from stablenet.nn.activations import MaxMin
from stablenet.nn.families import LayerFamily, layer_family
from stablenet.nn.lln import LinearNormalized
from stablenet.nn.pooling import L2NormPool2d, LipAvgPool2d
from stablenet.nn.preprocess import ChannelPad, InputNormalization
from stablenet.nn.skip import LipResidual

__all__ = ["DENSE_INNER", "FAMILIES", "SIZES", "SLL_CONV_INNER", "LipNetSize", "lipconvnet", "lipnet"]


@dataclass(frozen=True)
class LipNetSize:
    """One row of the size table: convolutions, dense layers and channels."""

    n_conv: int
    n_dense: int
    width: int


#: (n_conv, n_dense, width) of the SLL paper's S, M, L, XL networks, plus our own smaller XS.
SIZES: dict[str, LipNetSize] = {
    "xs": LipNetSize(10, 5, 32),
    "s": LipNetSize(20, 7, 45),
    "m": LipNetSize(30, 10, 60),
    "l": LipNetSize(50, 10, 90),
    "xl": LipNetSize(70, 15, 120),
}

#: Layer families (``stablenet.nn.families``) with registered models ``{family}_{size}``: residual ones (their own
#: layers are residual) and MaxMin ones. :func:`lipnet` takes any registered family.
FAMILIES = ("sll", "cpl", "aol", "sr", "cayley")

#: Inner channels of every SLL convolution in the official code (``conv_inner_dim = 5``).
SLL_CONV_INNER = 5
#: Inner features of every dense SLL layer in the official code (``dense_inner_dim = 2048``); also the default
#: width of the dense blocks of the other families.
DENSE_INNER = 2048
#: Default inner channels of a residual family's convolutions, where not the width (the official SLL code's).
_CONV_INNER = {"sll": SLL_CONV_INNER}


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")


def _check_spatial(input_size: Sequence[int], factor: int, model: str) -> tuple[int, int]:
    if len(input_size) != 2:
        raise ValueError(f"{model} needs a 2-d input_size (H, W); got {tuple(input_size)}")
    h, w = (int(v) for v in input_size)
    if h % factor or w % factor or h < factor or w < factor:
        raise ValueError(
            f"{model} pools by {factor}, so the input height and width must be positive multiples of {factor}; "
            f"got {h}x{w}"
        )
    return h, w


def lipnet(
    family: str | LayerFamily,
    num_classes: int,
    in_channels: int,
    input_size: Sequence[int],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    n_conv: int,
    n_dense: int,
    width: int,
    kernel_size: int = 3,
    pool: int = 4,
    conv_inner: int | None = None,
    dense_inner: int | None = None,
    dense_width: int = DENSE_INNER,
    residual: bool = True,
) -> nn.Sequential:
    """The trunk of the module docstring from one layer family.

    Args:
        family: a registered layer family (:func:`stablenet.nn.families.layer_family`; the models are registered
            for :data:`FAMILIES`), or a :class:`~stablenet.nn.families.LayerFamily`.
        num_classes, in_channels, input_size, mean, std: as for every registry builder.
        n_conv: convolutional blocks at full resolution.
        n_dense: dense blocks.
        width: channels of the trunk (``in_channels`` are zero-padded up to it); even for MaxMin families.
        kernel_size: odd side of the convolution kernels (a circular family, Cayley, checks its own).
        pool: side of the non-overlapping :class:`~stablenet.nn.LipAvgPool2d` window (the input height and
            width must be multiples of it).
        conv_inner: inner channels of residual (SLL / CPL) convolutions (default: 5 for SLL as in the official
            code, the width otherwise).
        dense_inner: inner features of SLL / CPL dense layers (default 2048).
        dense_width: features of the dense blocks of MaxMin families (the first maps the flattened features
            to it).
        residual: wrap the square blocks of MaxMin families in :class:`~stablenet.nn.skip.LipResidual`.

    Raises:
        ValueError: an unknown family, a non-positive size, an odd width for a MaxMin family, an even kernel
            for a zero-padded convolution, or an input size that the pooling does not divide.
    """
    layers_of = layer_family(family)
    family = layers_of.name
    _check_positive(width=width, kernel_size=kernel_size, pool=pool, dense_width=dense_width)
    if n_conv < 0 or n_dense < 0:
        raise ValueError(f"n_conv and n_dense must be >= 0; got {n_conv} and {n_dense}")
    if width < in_channels:
        raise ValueError(f"width must be >= in_channels ({in_channels}); got {width}")
    if not layers_of.circular and kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (same-size zero padding); got {kernel_size}")
    if not layers_of.residual and (width % 2 or dense_width % 2):
        raise ValueError(
            f"{family} blocks end with MaxMin, which pairs channels: width and dense_width must be even; got {width} "
            f"and {dense_width}"
        )
    h, w = _check_spatial(input_size, pool, f"{family} network")
    features = width * (h // pool) * (w // pool)

    layers: list[nn.Module] = [InputNormalization(mean, std, input_size=(h, w)), ChannelPad(in_channels, width)]
    conv_cls, dense_cls = layers_of.conv, layers_of.dense
    conv_kw = {"input_size": (h, w)} if layers_of.input_size else {}
    if layers_of.residual:
        conv_inner = conv_inner if conv_inner is not None else _CONV_INNER.get(family, width)
        dense_inner = dense_inner if dense_inner is not None else DENSE_INNER
        _check_positive(conv_inner=conv_inner, dense_inner=dense_inner)
        layers += [conv_cls(width, conv_inner, kernel_size, **conv_kw) for _ in range(n_conv)]
        layers += [LipAvgPool2d(pool), nn.Flatten()]
        layers += [dense_cls(features, dense_inner) for _ in range(n_dense)]
        layers.append(LinearNormalized(features, num_classes))
        return nn.Sequential(*layers)

    padding = {} if layers_of.circular else {"padding": kernel_size // 2}

    def conv() -> nn.Module:
        return conv_cls(width, width, kernel_size, **padding, **conv_kw)

    def block(layer: nn.Module) -> nn.Module:
        body = nn.Sequential(layer, MaxMin())
        return LipResidual(body) if residual else body

    layers += [block(conv()) for _ in range(n_conv)]
    layers += [LipAvgPool2d(pool), nn.Flatten()]
    if n_dense > 0:
        layers += [nn.Sequential(dense_cls(features, dense_width), MaxMin())]
        layers += [block(dense_cls(dense_width, dense_width)) for _ in range(n_dense - 1)]
    layers.append(LinearNormalized(dense_width if n_dense > 0 else features, num_classes))
    return nn.Sequential(*layers)


def _register_sizes(family: str) -> None:
    """Register ``{family}_{size}`` for every size, with the size's values as visible option defaults."""
    for size, cfg in SIZES.items():
        name = f"{family}_{size}"
        if layer_family(family).residual:
            builder = _residual_family_builder(family, cfg)
        else:
            builder = _maxmin_family_builder(family, LipNetSize(cfg.n_conv, cfg.n_dense, cfg.width + cfg.width % 2))
        builder.__name__ = builder.__qualname__ = name
        builder.__doc__ = (
            f"{family.upper()} network of size {size.upper()}: {cfg.n_conv} conv blocks, {cfg.n_dense} dense blocks "
            f"(see ``stablenet.models.lipnets``)."
        )
        register_model(name)(builder)


def _residual_family_builder(family: str, cfg: LipNetSize) -> Callable[..., nn.Module]:
    def builder(
        num_classes: int,
        in_channels: int,
        input_size: Sequence[int],
        *,
        mean: Sequence[float],
        std: Sequence[float],
        width: int = cfg.width,
        n_conv: int = cfg.n_conv,
        n_dense: int = cfg.n_dense,
        conv_inner: int | None = None,
        dense_inner: int = DENSE_INNER,
        kernel_size: int = 3,
        pool: int = 4,
    ) -> nn.Module:
        return lipnet(
            family,
            num_classes,
            in_channels,
            input_size,
            mean=mean,
            std=std,
            n_conv=n_conv,
            n_dense=n_dense,
            width=width,
            kernel_size=kernel_size,
            pool=pool,
            conv_inner=conv_inner,
            dense_inner=dense_inner,
        )

    return builder


def _maxmin_family_builder(family: str, cfg: LipNetSize) -> Callable[..., nn.Module]:
    def builder(
        num_classes: int,
        in_channels: int,
        input_size: Sequence[int],
        *,
        mean: Sequence[float],
        std: Sequence[float],
        width: int = cfg.width,
        n_conv: int = cfg.n_conv,
        n_dense: int = cfg.n_dense,
        dense_width: int = DENSE_INNER,
        kernel_size: int = 3,
        pool: int = 4,
        residual: bool = True,
    ) -> nn.Module:
        return lipnet(
            family,
            num_classes,
            in_channels,
            input_size,
            mean=mean,
            std=std,
            n_conv=n_conv,
            n_dense=n_dense,
            width=width,
            kernel_size=kernel_size,
            pool=pool,
            dense_width=dense_width,
            residual=residual,
        )

    return builder


for _family in FAMILIES:
    _register_sizes(_family)
del _family


@register_model("lipconvnet")
def lipconvnet(
    num_classes: int,
    in_channels: int,
    input_size: Sequence[int],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    family: str = "aol",
    width: int = 16,
    hidden: int = 256,
    pooling: str = "avg",
) -> nn.Sequential:
    """A small 1-Lipschitz CNN for MNIST-sized inputs: four 3×3 convolutions, two poolings, two dense layers.

    ``family="aol"``::

        AOLConv2d(in → w) MaxMin, AOLConv2d(w → w) MaxMin, pool 2,
        AOLConv2d(w → 2w) MaxMin, AOLConv2d(2w → 2w) MaxMin, pool 2, Flatten,
        AOLLinear(2w·H/4·W/4 → hidden) MaxMin, AOLLinear(hidden → hidden) MaxMin, LinearNormalized

    ``family="sll"``: the same with residual layers, which keep their size: zero channel padding (in → w, then
    w → 2w after the first pooling) and SLLConv2d / SLLLinear (on the flattened features, inner ``hidden``).

    Args:
        family: ``"aol"`` or ``"sll"``.
        width: channels ``w`` of the first stage (even: MaxMin pairs channels).
        hidden: dense features (AOL) or inner features of the dense SLL layers.
        pooling: ``"avg"`` (:class:`~stablenet.nn.pooling.LipAvgPool2d`) or ``"l2"``
            (:class:`~stablenet.nn.pooling.L2NormPool2d`), 2×2 non-overlapping windows.
    """
    if family not in ("aol", "sll"):
        raise ValueError(f"family must be one of 'aol', 'sll'; got {family!r}")
    if pooling not in ("avg", "l2"):
        raise ValueError(f"pooling must be one of 'avg', 'l2'; got {pooling!r}")
    _check_positive(width=width, hidden=hidden)
    if width % 2 or hidden % 2:
        raise ValueError(f"width and hidden must be even (MaxMin pairs features); got {width} and {hidden}")
    if width < in_channels:
        raise ValueError(f"width must be >= in_channels ({in_channels}); got {width}")
    h, w = _check_spatial(input_size, 4, "lipconvnet")
    pool_cls = LipAvgPool2d if pooling == "avg" else L2NormPool2d
    features = 2 * width * (h // 4) * (w // 4)
    layers_of = layer_family(family)
    conv_cls, dense_cls = layers_of.conv, layers_of.dense
    layers: list[nn.Module] = [InputNormalization(mean, std, input_size=(h, w))]
    if not layers_of.residual:

        def conv(c_in: int, c_out: int) -> list[nn.Module]:
            return [conv_cls(c_in, c_out, 3, padding=1), MaxMin()]

        layers += [*conv(in_channels, width), *conv(width, width), pool_cls(2)]
        layers += [*conv(width, 2 * width), *conv(2 * width, 2 * width), pool_cls(2), nn.Flatten()]
        layers += [dense_cls(features, hidden), MaxMin(), dense_cls(hidden, hidden), MaxMin()]
        layers.append(LinearNormalized(hidden, num_classes))
    else:
        layers += [ChannelPad(in_channels, width), conv_cls(width), conv_cls(width), pool_cls(2)]
        layers += [ChannelPad(width, 2 * width), conv_cls(2 * width), conv_cls(2 * width), pool_cls(2), nn.Flatten()]
        layers += [dense_cls(features, hidden), dense_cls(features, hidden)]
        layers.append(LinearNormalized(features, num_classes))
    return nn.Sequential(*layers)
