"""SRLinear / SRConv2d and lipschitz_sr: the property protocol, the iteration count, parametrizations, errors."""

from functools import partial

import pytest
import torch
from constraint_cases import (
    CONV,
    DENSE_SHAPES,
    check_bf16_constraint_math,
    check_conv_parametrization,
    check_linear_parametrization,
    conv_kwargs,
    explicit_norm,
)
from lipschitz_checks import check_layer
from torch import nn

from stablenet.nn.aol import AOLConstraint
from stablenet.nn.sr import SRConstraint, SRConv2d, SRLinear, lipschitz_sr, remove_lipschitz_sr
from stablenet.spectral.conv import conv_operator_matrix


@pytest.mark.parametrize("n_iter", [1, 3, 5])
@pytest.mark.parametrize("features", DENSE_SHAPES)
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
    check_linear_parametrization(
        partial(lipschitz_sr, n_iter=4), remove_lipschitz_sr, partial(SRLinear, n_iter=4), "SRConstraint"
    )


def test_parametrized_modules_pass_the_protocol():
    check_layer(lambda: lipschitz_sr(nn.Linear(4, 6), n_iter=2), (4,), check_export=False)
    case = CONV[9]  # groups 2, circular
    check_layer(lambda: lipschitz_sr(nn.Conv2d(4, 2, 3, **conv_kwargs(case))), (4, 4, 6), check_export=False)


def test_parametrization_on_conv_matches_the_layer():
    check_conv_parametrization(partial(lipschitz_sr, n_iter=2), remove_lipschitz_sr, partial(SRConv2d, n_iter=2))


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
    plain = lipschitz_sr(nn.Conv2d(3, 2, 3).to(torch.bfloat16))
    check_bf16_constraint_math(layers, inputs, plain, SRConstraint())


def test_conv_one_by_one_matches_the_linear_layer():
    torch.manual_seed(2)
    conv, linear = SRConv2d(4, 3, 1, n_iter=3).double(), SRLinear(4, 3, n_iter=3).double()
    with torch.no_grad():
        linear.weight.copy_(conv.weight[:, :, 0, 0])
    torch.testing.assert_close(conv.constrained_weight()[:, :, 0, 0], linear.constrained_weight())
    kernel = conv.constrained_weight().detach()
    assert float(torch.linalg.matrix_norm(conv_operator_matrix(kernel, 3, padding="zeros"), 2)) <= 1 + 1e-12
