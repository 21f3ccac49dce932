"""AOLLinear / AOLConv2d and lipschitz_aol: the property protocol, parametrizations, errors, autocast."""

import pytest
import torch
import torch.nn.functional as F
from lipschitz_checks import check_layer
from torch import nn

from stablenet.nn.aol import AOLConstraint, AOLConv2d, AOLLinear, lipschitz_aol, remove_lipschitz_aol
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


@pytest.mark.parametrize("features", DENSE)
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
    torch.manual_seed(0)
    plain = nn.Linear(5, 7).double()
    free = plain.weight.detach().clone()
    lipschitz_aol(plain)
    reference = AOLLinear(5, 7).double()
    with torch.no_grad():
        reference.weight.copy_(free)
    torch.testing.assert_close(plain.weight, reference.constrained_weight())
    assert float(torch.linalg.matrix_norm(plain.weight.detach(), 2)) <= 1 + 1e-12
    value = plain.weight.detach().clone()
    remove_lipschitz_aol(plain)
    assert type(plain.weight) is nn.Parameter
    torch.testing.assert_close(plain.weight.detach(), value)
    with pytest.raises(ValueError, match="no AOLConstraint"):
        remove_lipschitz_aol(plain)


def test_parametrized_modules_pass_the_protocol():
    check_layer(lambda: lipschitz_aol(nn.Linear(4, 6)), (4,), check_export=False)
    case = CONV[9]  # groups 2, circular
    check_layer(lambda: lipschitz_aol(nn.Conv2d(4, 2, 3, **conv_kwargs(case))), (4, 4, 6), check_export=False)


def test_parametrization_on_conv_matches_the_layer():
    torch.manual_seed(1)
    kwargs = conv_kwargs(CONV[10])  # dilation 2, circular
    conv = nn.Conv2d(2, 3, 3, **kwargs).double()
    layer = AOLConv2d(2, 3, 3, **kwargs).double()
    with torch.no_grad():
        layer.weight.copy_(conv.weight)
    lipschitz_aol(conv)
    torch.testing.assert_close(conv.weight, layer.constrained_weight())
    assert explicit_norm(conv, (5, 5)) <= 1 + 1e-12
    remove_lipschitz_aol(conv)
    assert explicit_norm(conv, (5, 5)) <= 1 + 1e-12


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
    plain = lipschitz_aol(nn.Linear(6, 4).to(torch.bfloat16))
    expected = AOLConstraint().constrain(plain.parametrizations.weight.original.float()).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain.weight.dtype == torch.bfloat16
        torch.testing.assert_close(plain.weight, expected, rtol=0, atol=0)
