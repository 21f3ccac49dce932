"""SRLinear / SRConv2d and lipschitz_sr: the property protocol, the iteration count, parametrizations, errors."""

import pytest
import torch
from lipschitz_checks import check_layer
from torch import nn

from stablenet.nn.aol import AOLConstraint
from stablenet.nn.sr import SRConstraint, SRConv2d, SRLinear, lipschitz_sr, remove_lipschitz_sr
from stablenet.spectral.conv import conv_operator_matrix


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny float64 problems: intra-op threads only contend (10x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DENSE = [(1, 5), (5, 1), (6, 6), (4, 9), (9, 4)]
# (c_in, c_out, kernel, padding, padding_mode, stride, groups, dilation, spatial size)
CONV = [
    (1, 1, 1, 0, "zeros", 1, 1, 1, (5, 5)),
    (2, 3, 3, 1, "zeros", 1, 1, 1, (4, 6)),
    (3, 2, 3, "same", "circular", 1, 1, 1, (5, 5)),
    (2, 3, 5, 2, "zeros", 1, 1, 1, (1, 7)),
    (3, 2, 5, 2, "circular", 1, 1, 1, (4, 6)),
    (2, 3, 3, 0, "circular", 1, 1, 1, (5, 5)),
    (1, 1, 3, 1, "circular", 1, 1, 1, (1, 7)),
    (3, 2, 1, 2, "zeros", 1, 1, 1, (4, 6)),
    (2, 3, 3, 1, "zeros", 2, 1, 1, (5, 5)),
    (4, 2, 3, "same", "circular", 1, 2, 1, (4, 6)),
    (2, 3, 3, 2, "circular", 1, 1, 2, (5, 5)),
    (3, 2, 5, "same", "zeros", 1, 1, 1, (1, 7)),
]


def conv_kwargs(case):
    _, _, _, padding, padding_mode, stride, groups, dilation, _ = case
    return {"padding": padding, "padding_mode": padding_mode, "stride": stride, "groups": groups, "dilation": dilation}


def explicit_norm(conv: nn.Conv2d, size) -> float:
    """SVD norm of the module's own operator (float64), from the identity basis through ``conv.forward``."""
    d = conv.in_channels * size[0] * size[1]
    eye = torch.eye(d, dtype=torch.float64).reshape(d, conv.in_channels, *size)
    with torch.no_grad():
        out = conv(eye) - (conv.bias[:, None, None] if conv.bias is not None else 0)
    return float(torch.linalg.matrix_norm(out.reshape(d, -1), 2))


@pytest.mark.parametrize("n_iter", [1, 3, 5])
@pytest.mark.parametrize("features", DENSE)
def test_sr_linear_protocol(features, n_iter):
    check_layer(lambda: SRLinear(*features, n_iter=n_iter), (features[0],))


@pytest.mark.parametrize(("index", "case"), list(enumerate(CONV)))
def test_sr_conv_protocol(index, case):
    c_in, c_out, kernel, *_, size = case
    n_iter = 1 + index % 3  # 1, 2 and 3 iterations across the grid
    check_layer(lambda: SRConv2d(c_in, c_out, kernel, **conv_kwargs(case), n_iter=n_iter), (c_in, *size), n_points=2)


@pytest.mark.parametrize("case", CONV[1::3])
def test_sr_conv_explicit_operator_norm(case):
    c_in, c_out, kernel, *_, size = case
    torch.manual_seed(3)
    for n_iter in (1, 4):
        conv = SRConv2d(c_in, c_out, kernel, **conv_kwargs(case), n_iter=n_iter).double()
        assert explicit_norm(conv, size) <= 1 + 1e-12
        assert explicit_norm(conv.export(), size) <= 1 + 1e-12


def test_iteration_count_one_is_aol_and_more_approach_spectral_normalisation():
    torch.manual_seed(0)
    layers = {n: SRLinear(6, 8, n_iter=n).double() for n in (1, 2, 10)}
    for layer in layers.values():
        with torch.no_grad():
            layer.weight.copy_(layers[1].weight)
    w = layers[1].weight.detach()
    torch.testing.assert_close(layers[1].constrained_weight(), AOLConstraint()(w.T).T)
    norms = [float(torch.linalg.matrix_norm(layer.constrained_weight().detach(), 2)) for layer in layers.values()]
    assert norms[0] < norms[1] < norms[2] <= 1 + 1e-12
    assert norms[2] >= 0.99


def test_parametrization_on_linear_registers_and_removes():
    torch.manual_seed(0)
    plain = nn.Linear(5, 7).double()
    free = plain.weight.detach().clone()
    lipschitz_sr(plain, n_iter=4)
    reference = SRLinear(5, 7, n_iter=4).double()
    with torch.no_grad():
        reference.weight.copy_(free)
    torch.testing.assert_close(plain.weight, reference.constrained_weight())
    assert float(torch.linalg.matrix_norm(plain.weight.detach(), 2)) <= 1 + 1e-12
    value = plain.weight.detach().clone()
    remove_lipschitz_sr(plain)
    assert type(plain.weight) is nn.Parameter
    torch.testing.assert_close(plain.weight.detach(), value)
    with pytest.raises(ValueError, match="no SRConstraint"):
        remove_lipschitz_sr(plain)


def test_parametrized_modules_pass_the_protocol():
    check_layer(lambda: lipschitz_sr(nn.Linear(4, 6), n_iter=2), (4,), check_export=False)
    case = CONV[9]  # groups 2, circular
    check_layer(lambda: lipschitz_sr(nn.Conv2d(4, 2, 3, **conv_kwargs(case))), (4, 4, 6), check_export=False)


def test_parametrization_on_conv_matches_the_layer():
    torch.manual_seed(1)
    kwargs = conv_kwargs(CONV[10])  # dilation 2, circular
    conv = nn.Conv2d(2, 3, 3, **kwargs).double()
    layer = SRConv2d(2, 3, 3, **kwargs, n_iter=2).double()
    with torch.no_grad():
        layer.weight.copy_(conv.weight)
    lipschitz_sr(conv, n_iter=2)
    torch.testing.assert_close(conv.weight, layer.constrained_weight())
    assert explicit_norm(conv, (5, 5)) <= 1 + 1e-12
    remove_lipschitz_sr(conv)
    assert explicit_norm(conv, (5, 5)) <= 1 + 1e-12


def test_zero_rows_stay_zero_with_finite_gradients():
    layer = SRConv2d(2, 3, 3, padding=1).double()
    with torch.no_grad():
        layer.weight[1] = 0
    out = layer(torch.randn(2, 2, 5, 5, dtype=torch.float64))
    assert float(out[:, 1].detach().sub(layer.bias[1].detach()).abs().max()) == 0
    out.sum().backward()
    assert bool(torch.isfinite(layer.weight.grad).all())


def test_bad_inputs_raise():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n_iter"):
            SRLinear(3, 3, n_iter=bad)
    with pytest.raises(ValueError, match="n_iter"):
        SRConv2d(3, 3, 3, n_iter=0)
    with pytest.raises(ValueError, match="n_iter"):
        lipschitz_sr(nn.Linear(3, 3), n_iter=0)
    with pytest.raises(ValueError, match=r"nn\.Linear and nn\.Conv2d"):
        lipschitz_sr(nn.ConvTranspose2d(2, 2, 3))
    with pytest.raises(ValueError, match="padding_mode"):
        lipschitz_sr(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="padding_mode"):
        SRConv2d(2, 2, 3, padding=1, padding_mode="replicate")
    with pytest.raises(ValueError, match=r"circular padding .*must be at most"):
        SRConv2d(2, 2, 1, padding=1, padding_mode="circular")
    with pytest.raises(ValueError, match="SR constrains"):
        SRConstraint()(torch.randn(2, 2, 3))


def test_bf16_autocast_runs_and_constraint_math_is_float32():
    torch.manual_seed(0)
    layers = [SRLinear(6, 4), SRConv2d(3, 2, 3, padding=1, padding_mode="circular")]
    inputs = [torch.randn(2, 6), torch.randn(2, 3, 5, 5)]
    for layer, x in zip(layers, inputs, strict=True):
        reference = layer.constrained_weight()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            inside = layer.constrained_weight()
        assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())
        assert inside.dtype == torch.float32
        torch.testing.assert_close(inside, reference, rtol=0, atol=0)
        y.float().sum().backward()
        assert bool(torch.isfinite(layer.weight.grad).all())
    plain = lipschitz_sr(nn.Conv2d(3, 2, 3).to(torch.bfloat16))
    expected = SRConstraint().constrain(plain.parametrizations.weight.original.float()).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain.weight.dtype == torch.bfloat16
        torch.testing.assert_close(plain.weight, expected, rtol=0, atol=0)


def test_conv_one_by_one_matches_the_linear_layer():
    torch.manual_seed(2)
    conv, linear = SRConv2d(4, 3, 1, n_iter=3).double(), SRLinear(4, 3, n_iter=3).double()
    with torch.no_grad():
        linear.weight.copy_(conv.weight[:, :, 0, 0])
    torch.testing.assert_close(conv.constrained_weight()[:, :, 0, 0], linear.constrained_weight())
    kernel = conv.constrained_weight().detach()
    assert float(torch.linalg.matrix_norm(conv_operator_matrix(kernel, 3, padding="zeros"), 2)) <= 1 + 1e-12
