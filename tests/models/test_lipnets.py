"""The registry's 1-Lipschitz CNNs: every name builds, runs, is bounded, and the bound holds on a tiny instance."""

import math

import pytest
import torch
from torch import nn

from stablenet.models import create_model, list_models, model_options
from stablenet.models.lipnets import DENSE_INNER, FAMILIES, SIZES, SLL_CONV_INNER, lipnet
from stablenet.nn import LinearNormalized
from stablenet.nn.base import LAYER_ROUNDING_SLACK
from stablenet.nn.pooling import L2NormPool2d, LipAvgPool2d
from stablenet.nn.skip import LipResidual
from stablenet.spectral import layer_lipschitz_bounds, lipschitz_upper_bound

NAMES = [f"{family}_{size}" for family in FAMILIES for size in SIZES] + ["lipconvnet"]
SHAPES = [(3, 32, 32), (1, 28, 28)]


def small_options(name: str) -> dict:
    """Overrides that make any size tiny (the sizes differ only in these defaults)."""
    if name == "lipconvnet":
        return {"width": 4, "hidden": 8}
    if name.startswith(("sll_", "cpl_")):
        return {"width": 6, "n_conv": 2, "n_dense": 2, "conv_inner": 4, "dense_inner": 12}
    return {"width": 6, "n_conv": 2, "n_dense": 2, "dense_width": 12}


def bound_ceiling(model: nn.Module, input_shape, std) -> float:
    """1/min(std) times the head's bound times the rounding slack of every other layer."""
    bounds = layer_lipschitz_bounds(model, input_shape)
    head = [m for m in model.modules() if isinstance(m, LinearNormalized)][-1]
    return (1 / min(std)) * head.lipschitz_bound() * (1 + LAYER_ROUNDING_SLACK) ** (2 * len(bounds)) * (1 + 1e-9)


def test_every_name_is_registered():
    assert set(NAMES) <= set(list_models())
    assert {"sll_mlp", "lenet"} <= set(list_models())


def test_sizes_match_the_sll_paper():
    table = {"s": (20, 7, 45), "m": (30, 10, 60), "l": (50, 10, 90), "xl": (70, 15, 120), "xs": (10, 5, 32)}
    for size, (n_conv, n_dense, width) in table.items():
        opts = model_options(f"sll_{size}")
        assert (opts["n_conv"], opts["n_dense"], opts["width"]) == (n_conv, n_dense, width)
        assert opts["dense_inner"] == DENSE_INNER == 2048
        maxmin = model_options(f"aol_{size}")
        assert maxmin["width"] == width + width % 2 and maxmin["residual"] is True


def test_sll_s_matches_the_official_parameter_count():
    # Official SLL S: 41M parameters, almost all in the 7 dense layers 2880 -> 2048 inner.
    with torch.device("meta"):
        model = create_model("sll_s", 10, 3, 32)
    n_params = sum(p.numel() for p in model.parameters())
    assert 41e6 < n_params < 42e6
    convs = [m for m in model if type(m).__name__ == "SLLConv2d"]
    assert len(convs) == 20 and len([m for m in model if type(m).__name__ == "SLLLinear"]) == 7
    assert sum(p.numel() for p in convs[0].parameters() if p.dim() == 4) == SLL_CONV_INNER * 45 * 9
    assert isinstance(model[22], LipAvgPool2d) and model[22].divisor == 4


@pytest.mark.parametrize("name", NAMES)
def test_builds_runs_and_is_bounded(name):
    torch.manual_seed(0)
    for shape in SHAPES:
        std = (0.25, 0.5, 0.5)[: shape[0]]
        model = create_model(name, 10, shape[0], shape[1:], mean=(0.5,) * shape[0], std=std, **small_options(name))
        model.eval()
        out = model(torch.rand(2, *shape))
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        bound = lipschitz_upper_bound(model, shape)
        assert 1 / min(std) <= bound * (1 + 1e-6)  # normalisation counted (the head has bound >= 1)
        assert bound <= bound_ceiling(model, shape, std)


@pytest.mark.parametrize("name", [f"{family}_xs" for family in FAMILIES] + ["lipconvnet"])
def test_measured_jacobian_norm_is_below_the_bound(name):
    torch.manual_seed(0)
    shape = (1, 8, 8) if name == "lipconvnet" else (3, 8, 8)
    std = (0.5, 0.25, 1.0)[: shape[0]]
    model = create_model(name, 4, shape[0], shape[1:], std=std, **small_options(name)).double()
    bound = lipschitz_upper_bound(model, shape)
    model.eval()
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.rand(shape, generator=g, dtype=torch.float64)
        jac = torch.func.jacrev(lambda v: model(v[None])[0])(x).reshape(4, -1)
        assert torch.linalg.matrix_norm(jac, 2).item() <= bound


def test_maxmin_families_wrap_blocks_in_lip_residual():
    model = create_model("aol_xs", 10, 3, 16, **small_options("aol_xs"))
    assert sum(isinstance(m, LipResidual) for m in model) == 3  # 2 conv blocks + 1 square dense block
    flat = create_model("aol_xs", 10, 3, 16, residual=False, **small_options("aol_xs"))
    assert not any(isinstance(m, LipResidual) for m in flat.modules())


def test_lipconvnet_variants():
    for family in ("aol", "sll"):
        for pooling, cls in (("avg", LipAvgPool2d), ("l2", L2NormPool2d)):
            model = create_model("lipconvnet", 10, 1, 28, family=family, pooling=pooling, width=4, hidden=8)
            assert sum(isinstance(m, cls) for m in model) == 2
            assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
            assert lipschitz_upper_bound(model, (1, 28, 28)) <= bound_ceiling(model, (1, 28, 28), (1.0,))


def test_input_sizes_and_options_are_validated():
    with pytest.raises(ValueError, match=r"multiples of 4; got 30x30"):
        create_model("sll_xs", 10, 3, 30, width=8)
    with pytest.raises(ValueError, match=r"multiples of 8; got 32x28"):
        create_model("sll_xs", 10, 3, (32, 28), width=8, pool=8)
    with pytest.raises(ValueError, match="lipconvnet pools by 4"):
        create_model("lipconvnet", 10, 1, 26)
    with pytest.raises(ValueError, match="width and dense_width must be even; got 7 and 2048"):
        create_model("aol_xs", 10, 3, 32, width=7)
    with pytest.raises(ValueError, match="width and dense_width must be even; got 32 and 9"):
        create_model("sr_xs", 10, 3, 32, dense_width=9)
    with pytest.raises(ValueError, match=r"width must be >= in_channels \(3\); got 2"):
        create_model("sll_xs", 10, 3, 32, width=2)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        create_model("sll_xs", 10, 3, 32, kernel_size=4)
    with pytest.raises(ValueError, match="n_conv and n_dense must be >= 0"):
        create_model("cpl_xs", 10, 3, 32, n_conv=-1)
    with pytest.raises(ValueError, match="family must be one of 'aol', 'sll'; got 'cpl'"):
        create_model("lipconvnet", 10, 1, 28, family="cpl")
    with pytest.raises(ValueError, match="pooling must be one of 'avg', 'l2'"):
        create_model("lipconvnet", 10, 1, 28, pooling="max")
    with pytest.raises(ValueError, match="family must be one of 'sll', 'cpl'"):
        lipnet("lot", 10, 3, (32, 32), mean=(0,) * 3, std=(1,) * 3, n_conv=1, n_dense=1, width=8)
    with pytest.raises(ValueError, match=r"expected inputs of shape \(N, 3, 32, 32\)"):
        create_model("sll_xs", 10, 3, 32, **small_options("sll_xs"))(torch.rand(1, 3, 16, 16))


def test_zero_dense_layers_and_head_width():
    model = create_model("sr_xs", 10, 3, 16, width=4, n_conv=1, n_dense=0)
    assert model[-1].in_features == 4 * 4 * 4
    model = create_model("cayley_xs", 10, 3, 16, width=4, n_conv=1, n_dense=1, dense_width=32)
    assert model[-1].in_features == 32
    assert math.isfinite(lipschitz_upper_bound(model, (3, 16, 16)))


@pytest.mark.parametrize(
    "name,options",
    [
        ("sll_xs", {"n_conv": 2, "n_dense": 1, "width": 8}),
        ("aol_xs", {"n_conv": 2, "n_dense": 1, "width": 8}),
        ("cayley_xs", {"n_conv": 2, "n_dense": 1, "width": 8}),
        ("lipconvnet", {}),
    ],
)
def test_export_model_is_plain_and_equal(name, options):
    from stablenet.nn import export_model
    from stablenet.nn.constrained import ConstrainedConv2d, ConstrainedLinear
    from stablenet.nn.relu_residual import _ResidualConv2d, _ResidualLinear

    torch.manual_seed(0)
    net = create_model(name, num_classes=10, in_channels=3, input_size=(16, 16), **options).eval()
    x = torch.rand(3, 3, 16, 16)
    plain = export_model(net, example_input=x).eval()
    constrained = (ConstrainedConv2d, ConstrainedLinear, _ResidualConv2d, _ResidualLinear)
    assert not any(isinstance(m, constrained) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), net(x), rtol=1e-5, atol=1e-5)


def _trunk(layers: list, features: int, head_in: int) -> nn.Sequential:
    """``InputNormalization, ChannelPad(3 -> 6), *layers`` with the pooling at 16x16 inputs, as the builders do."""
    return nn.Sequential(*layers[0], LipAvgPool2d(4), nn.Flatten(), *layers[1], LinearNormalized(head_in, 10))


def _reference(name: str) -> nn.Sequential:
    """The model of ``create_model(name, 10, 3, 16, **small_options(name))`` written out layer by layer, in the
    order the builders construct them before the layer-family registry (same parameters for the same seed)."""
    from stablenet.nn import (
        AOLConv2d,
        AOLLinear,
        CayleyConv2d,
        ChannelPad,
        CPLConv2d,
        CPLLinear,
        InputNormalization,
        MaxMin,
        OrthogonalLinear,
        SLLConv2d,
        SLLLinear,
        SRConv2d,
        SRLinear,
    )

    stem = [InputNormalization((0.0,) * 3, (1.0,) * 3, input_size=(16, 16)), ChannelPad(3, 6)]
    features = 6 * 4 * 4
    if name in ("sll_xs", "cpl_xs"):
        conv_kw = {"input_size": (16, 16)} if name == "cpl_xs" else {}
        conv, dense = (SLLConv2d, SLLLinear) if name == "sll_xs" else (CPLConv2d, CPLLinear)
        convs = [conv(6, 4, 3, **conv_kw) for _ in range(2)]
        return _trunk([stem + convs, [dense(features, 12) for _ in range(2)]], features, features)
    conv, dense, padding = {
        "aol_xs": (AOLConv2d, AOLLinear, {"padding": 1}),
        "sr_xs": (SRConv2d, SRLinear, {"padding": 1}),
        "cayley_xs": (CayleyConv2d, OrthogonalLinear, {}),
    }[name]
    convs = [LipResidual(nn.Sequential(conv(6, 6, 3, **padding), MaxMin())) for _ in range(2)]
    first = nn.Sequential(dense(features, 12), MaxMin())
    return _trunk([stem + convs, [first, LipResidual(nn.Sequential(dense(12, 12), MaxMin()))]], features, 12)


@pytest.mark.parametrize("name", [f"{family}_xs" for family in FAMILIES])
def test_models_by_name_are_the_written_out_architectures(name):
    """The registry of layer families builds the same modules, in the same order, as the explicit architecture:
    equal state dicts (names, shapes and initial values) for the same seed."""
    torch.manual_seed(3)
    model = create_model(name, 10, 3, 16, **small_options(name))
    torch.manual_seed(3)
    reference = _reference(name)
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)


def test_lipnet_takes_a_users_layer_family(monkeypatch):
    from stablenet.nn import AOLConv2d, AOLLinear, families

    monkeypatch.setattr(families, "_FAMILIES", dict(families._FAMILIES))
    mine = families.register_layer_family("my_aol", conv=AOLConv2d, dense=AOLLinear)
    options = {"mean": (0.0,) * 3, "std": (1.0,) * 3, "n_conv": 2, "n_dense": 2, "width": 6, "dense_width": 12}
    built = []
    for family in ("my_aol", mine, "aol"):
        torch.manual_seed(4)
        built.append(lipnet(family, 10, 3, (16, 16), **options).state_dict())
    for state in built[:2]:
        assert list(state) == list(built[2]) and all(torch.equal(state[k], built[2][k]) for k in state)
