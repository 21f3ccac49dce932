"""AOLLinear / AOLConv2d and lipschitz_aol: the property protocol, parametrizations, errors, autocast."""

import pytest
import torch
import torch.nn.functional as F
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

from stablenet.nn.aol import AOLConstraint, AOLConv2d, AOLLinear, lipschitz_aol, remove_lipschitz_aol
from stablenet.spectral.conv import conv_operator_matrix


@pytest.mark.parametrize("features", DENSE_SHAPES)
def test_aol_linear_protocol(features):
    check_layer(lambda: AOLLinear(*features), (features[0],))


@pytest.mark.parametrize("case", CONV)
def test_aol_conv_protocol(case):
    c_in, c_out, kernel, *_, size = case
    check_layer(lambda: AOLConv2d(c_in, c_out, kernel, **conv_kwargs(case)), (c_in, *size), n_points=2)


@pytest.mark.parametrize("case", CONV[::3])
def test_aol_conv_explicit_operator_norm(case):
    c_in, c_out, kernel, *_, size = case
    torch.manual_seed(3)
    conv = AOLConv2d(c_in, c_out, kernel, **conv_kwargs(case)).double()
    assert explicit_norm(conv, size) <= 1 + 1e-12
    assert explicit_norm(conv.export(), size) <= 1 + 1e-12


def test_parametrization_on_linear_registers_and_removes():
    check_linear_parametrization(lipschitz_aol, remove_lipschitz_aol, AOLLinear, "AOLConstraint")


def test_parametrized_modules_pass_the_protocol():
    check_layer(lambda: lipschitz_aol(nn.Linear(4, 6)), (4,), check_export=False)
    case = CONV[9]  # groups 2, circular
    check_layer(lambda: lipschitz_aol(nn.Conv2d(4, 2, 3, **conv_kwargs(case))), (4, 4, 6), check_export=False)


def test_parametrization_on_conv_matches_the_layer():
    check_conv_parametrization(lipschitz_aol, remove_lipschitz_aol, AOLConv2d)


def test_dense_closed_form():
    layer = AOLLinear(3, 3, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.diag(torch.tensor([2.0, -0.5, 0.0], dtype=torch.float64)))
    torch.testing.assert_close(layer.constrained_weight(), torch.diag(torch.tensor([1.0, -1.0, 0.0])).double())


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"nn\.Linear and nn\.Conv2d"):
        lipschitz_aol(nn.Conv1d(2, 2, 3))
    with pytest.raises(ValueError, match="padding_mode"):
        lipschitz_aol(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="padding_mode"):
        AOLConv2d(2, 2, 3, padding=1, padding_mode="replicate")
    with pytest.raises(ValueError, match=r"circular padding .*must be at most"):
        AOLConv2d(2, 2, 3, padding=2, padding_mode="circular")
    with pytest.raises(ValueError, match=r"circular padding .*must be at most"):
        lipschitz_aol(nn.Conv2d(2, 2, (3, 1), padding=(1, 1), padding_mode="circular"))
    with pytest.raises(ValueError, match="no tensor named"):
        lipschitz_aol(nn.Linear(2, 2), name="scale")
    with pytest.raises(ValueError, match="AOL constrains"):
        AOLConstraint()(torch.randn(2, 2, 3))


def test_circular_over_padding_really_breaks_the_bound():
    """Why over-padded circular convolutions are refused: torch repeats rows of the circulant."""
    torch.manual_seed(0)
    kernel = AOLConstraint()(torch.randn(2, 2, 3, 3, dtype=torch.float64))

    def torch_operator(p):  # what nn.Conv2d(padding=p, padding_mode="circular") computes, as a matrix
        eye = torch.eye(2 * 5 * 5, dtype=torch.float64).reshape(-1, 2, 5, 5)
        return F.conv2d(F.pad(eye, (p, p, p, p), mode="circular"), kernel).reshape(eye.shape[0], -1).T

    norms = {p: float(torch.linalg.matrix_norm(torch_operator(p), 2)) for p in (1, 2)}
    assert norms[1] <= 1 + 1e-12 < norms[2]
    with pytest.raises(ValueError, match="circular padding"):
        conv_operator_matrix(kernel, 5, padding="circular", padding_size=2)  # the engine refuses it too


def test_bf16_autocast_runs_and_constraint_math_is_float32():
    torch.manual_seed(0)
    layers = [AOLLinear(6, 4), AOLConv2d(3, 2, 3, padding=1, padding_mode="circular")]
    inputs = [torch.randn(2, 6), torch.randn(2, 3, 5, 5)]
    plain = lipschitz_aol(nn.Linear(6, 4).to(torch.bfloat16))
    check_bf16_constraint_math(layers, inputs, plain, AOLConstraint())
