"""Spectral normalisation by upper bounds: SpectralLinear, SpectralConv2d and the lipschitz_spectral parametrization."""

import pytest
import torch
from constraint_cases import DENSE_SHAPES
from lipschitz_checks import check_layer
from torch import nn

from stablenet.nn.base import LAYER_ROUNDING_SLACK
from stablenet.nn.constrained import ConvGeometry
from stablenet.nn.spectral_norm import (
    ConvSpectralConstraint,
    DenseSpectralConstraint,
    SpectralConv2d,
    SpectralLinear,
    lipschitz_spectral,
    remove_lipschitz_spectral,
)
from stablenet.spectral import conv_operator_matrix
from stablenet.spectral.dense import operator_matrix


@pytest.mark.parametrize("in_features,out_features", DENSE_SHAPES)
def test_spectral_linear_protocol(in_features, out_features):
    measured = check_layer(lambda: SpectralLinear(in_features, out_features), (in_features,))
    assert measured["train"] > 0.999  # normalised to norm 1, not merely below it


# (c_in, c_out, kernel, padding, padding_mode, input shape, extra conv args, give input_size)
CONV_CASES = [
    (1, 1, 1, 0, "zeros", (1, 5, 5), {}, False),
    (2, 3, 3, 1, "zeros", (2, 5, 5), {}, True),
    (3, 2, 3, "same", "zeros", (3, 4, 6), {}, False),
    (3, 2, 5, 2, "zeros", (3, 5, 5), {}, True),
    (2, 3, 3, 0, "zeros", (2, 4, 6), {}, True),
    (2, 3, 3, 1, "zeros", (2, 1, 7), {}, True),  # input smaller than the kernel: size-independent bound
    (1, 1, 3, 1, "circular", (1, 5, 5), {}, True),
    (2, 3, 5, "same", "circular", (2, 4, 6), {}, True),
    (3, 2, 3, 1, "circular", (3, 1, 7), {}, False),
    (3, 2, 3, 0, "circular", (3, 5, 5), {}, False),
    (2, 3, 3, 1, "zeros", (2, 5, 5), {"stride": 2}, True),
    (4, 2, 3, 1, "circular", (4, 5, 5), {"groups": 2}, True),
    (2, 2, 3, 2, "zeros", (2, 5, 5), {"dilation": 2}, True),
]


@pytest.mark.parametrize("c_in,c_out,k,padding,mode,shape,extra,sized", CONV_CASES)
def test_spectral_conv_protocol(c_in, c_out, k, padding, mode, shape, extra, sized):
    size = shape[1:] if sized else None

    def factory():
        return SpectralConv2d(c_in, c_out, k, padding=padding, padding_mode=mode, input_size=size, **extra)

    check_layer(factory, shape, n_points=2)


def _explicit_norm(conv: nn.Conv2d, shape) -> float:
    matrix = operator_matrix(lambda x: conv(x[None])[0], tuple(shape), dtype=torch.float64)
    return float(torch.linalg.matrix_norm(matrix.detach(), 2))


@pytest.mark.parametrize("c_in,c_out,k,padding,mode,shape,extra,sized", CONV_CASES)
def test_conv_bound_is_above_the_exact_norm(c_in, c_out, k, padding, mode, shape, extra, sized):
    torch.manual_seed(3)
    conv = nn.Conv2d(c_in, c_out, k, padding=padding, padding_mode=mode, bias=False, **extra).double()
    constraint = ConvSpectralConstraint(ConvGeometry.of(conv, shape[1:] if sized else None))
    exact = _explicit_norm(conv, shape)
    assert float(constraint.bound(conv.weight.detach())) >= exact
    with torch.no_grad():
        conv.weight.copy_(constraint(conv.weight))
    assert _explicit_norm(conv, shape) <= 1 + 1e-12


def test_size_specific_bounds_are_tight():
    torch.manual_seed(0)
    kernel = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    for mode in ("zeros", "circular"):
        conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode, bias=False).double()
        with torch.no_grad():
            conv.weight.copy_(kernel)
        exact = float(torch.linalg.matrix_norm(conv_operator_matrix(kernel, 12, padding=mode, padding_size=1), 2))
        sized = float(ConvSpectralConstraint(ConvGeometry.of(conv, 12)).bound(kernel))
        free = float(ConvSpectralConstraint(ConvGeometry.of(conv)).bound(kernel))
        assert exact <= sized <= free
        if mode == "circular":  # the circular Gram bound at the size is exact up to the Gram gap
            assert sized <= exact * (1 + 1e-4)


def test_circular_padding_wider_than_same_is_rejected():
    """A 1x1 kernel with circular padding 1 duplicates border rows (norm 2 for the identity): not bounded here."""
    conv = nn.Conv2d(1, 1, 1, padding=1, padding_mode="circular", bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(1.0)
    assert _explicit_norm(conv, (1, 4, 4)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="wraps"):
        SpectralConv2d(1, 1, 1, padding=1, padding_mode="circular")
    with pytest.raises(ValueError, match="wraps"):
        lipschitz_spectral(conv)


def test_dense_bound_against_svd():
    torch.manual_seed(0)
    matrices = [torch.randn(7, 4, dtype=torch.float64), torch.randn(3, 11, dtype=torch.float64)]
    matrices.append(torch.randn(8, 1, dtype=torch.float64) @ torch.randn(1, 6, dtype=torch.float64))  # rank one
    matrices.append(torch.diag(torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64)))  # repeated top value
    for n_iter in (None, 2, 8):
        constraint = DenseSpectralConstraint(n_iter)
        for w in matrices:
            exact = float(torch.linalg.matrix_norm(w, 2))
            bound = float(constraint.bound(w))
            assert bound >= exact
            assert float(torch.linalg.matrix_norm(constraint(w), 2)) <= 1 + 1e-12
            if n_iter is None:
                assert bound <= exact * (1 + 1e-3)


def test_float32_normalisation_stays_below_one():
    """Note [bound precision]: the float64 bound keeps float32 weights at norm <= 1 up to division rounding."""
    torch.manual_seed(0)
    rank_one = torch.randn(512, 1) @ torch.randn(1, 512)
    for w in (rank_one, torch.randn(300, 200), torch.linalg.qr(torch.randn(64, 64))[0]):
        normalised = DenseSpectralConstraint()(w)
        assert normalised.dtype == torch.float32
        assert float(torch.linalg.matrix_norm(normalised.double(), 2)) <= 1 + 1e-6


def test_eval_equals_train_in_float32_with_adaptive_stopping():
    torch.manual_seed(0)
    layer = SpectralLinear(30, 20)
    conv = SpectralConv2d(3, 4, 3, padding=1, padding_mode="circular", input_size=6)
    for module, x in ((layer, torch.randn(5, 30)), (conv, torch.randn(2, 3, 6, 6))):
        train_out = module.train()(x)
        module.eval()
        with torch.no_grad():
            assert torch.equal(module(x), train_out.detach())
            assert torch.equal(module(x), train_out.detach())  # cached


def test_gradient_flows_through_the_bound():
    torch.manual_seed(0)
    layer = SpectralLinear(4, 3).double()
    layer(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    # the normalised weight is scale-invariant, so the gradient is orthogonal to the weight
    assert abs(float((layer.weight.grad * layer.weight.detach()).sum())) < 1e-10


def test_zero_weight_gives_zero_not_nan():
    layer = SpectralLinear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
    assert torch.equal(layer(torch.ones(1, 3)), torch.zeros(1, 2))


@pytest.mark.parametrize("mode", ["zeros", "circular"])
def test_parametrization_register_and_remove(mode):
    torch.manual_seed(0)
    for module, x in (
        (nn.Linear(5, 4).double(), torch.randn(2, 5, dtype=torch.float64)),
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode).double(), torch.randn(2, 2, 5, 5, dtype=torch.float64)),
    ):
        raw = module.weight.detach().clone()
        size = 5 if isinstance(module, nn.Conv2d) else None
        lipschitz_spectral(module, input_size=size)
        expected = raw / module.parametrizations.weight[0].bound(raw)
        torch.testing.assert_close(module.weight, expected, rtol=1e-14, atol=0)
        out = module(x)
        remove_lipschitz_spectral(module)
        assert isinstance(module.weight, nn.Parameter)
        torch.testing.assert_close(module.weight, expected, rtol=1e-14, atol=0)
        torch.testing.assert_close(module(x), out)
        if isinstance(module, nn.Conv2d):  # the input-size hook went with the parametrization
            module(torch.randn(1, 2, 7, 7, dtype=torch.float64))
        with pytest.raises(ValueError, match="no spectral"):
            remove_lipschitz_spectral(module)


def test_parametrized_conv_rejects_inputs_the_bound_does_not_cover():
    circ = lipschitz_spectral(nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular"), input_size=(5, 5))
    with pytest.raises(ValueError, match="only"):
        circ(torch.randn(1, 1, 6, 6))
    zeros = lipschitz_spectral(nn.Conv2d(1, 1, 3, padding=1), input_size=(5, 5))
    zeros(torch.randn(1, 1, 4, 3))  # a smaller input is a submatrix: covered
    with pytest.raises(ValueError, match="up to"):
        zeros(torch.randn(1, 1, 6, 5))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="circular"):
        SpectralConv2d(1, 1, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="circular"):
        lipschitz_spectral(nn.Conv2d(1, 1, 3, padding_mode="reflect"))
    with pytest.raises(ValueError, match=r"nn\.Linear and nn\.Conv2d"):
        lipschitz_spectral(nn.Conv1d(1, 1, 3))
    with pytest.raises(ValueError, match="input_size"):
        lipschitz_spectral(nn.Linear(2, 2), input_size=4)
    with pytest.raises(ValueError, match="2 dimensions"):
        lipschitz_spectral(nn.Linear(2, 2), name="bias")
    with pytest.raises(ValueError, match="n_iter"):
        SpectralLinear(2, 2, n_iter=0)
    layer = SpectralConv2d(1, 1, 3, padding=1, padding_mode="circular", input_size=(5, 5))
    with pytest.raises(ValueError, match="only"):
        layer(torch.randn(1, 1, 4, 4))
    with pytest.raises(ValueError, match="only"):
        layer.lipschitz_bound((1, 6, 6))
    assert layer.lipschitz_bound((1, 5, 5)) == 1 + LAYER_ROUNDING_SLACK


def test_bf16_autocast_keeps_constraint_math_in_float32():
    torch.manual_seed(0)
    for layer, x in (
        (SpectralLinear(16, 8), torch.randn(4, 16)),
        (SpectralConv2d(3, 4, 3, padding=1, input_size=6), torch.randn(2, 3, 6, 6)),
        (SpectralConv2d(3, 4, 3, padding=1), torch.randn(2, 3, 6, 6)),
    ):
        reference = layer.constrained_weight()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            weight = layer.constrained_weight()
            out = layer(x)
        assert weight.dtype == torch.float32
        torch.testing.assert_close(weight, reference, rtol=0, atol=0)
        assert torch.isfinite(out).all()
    bf16 = SpectralLinear(8, 8).to(torch.bfloat16)  # bf16 weights: the bound still runs in float32 or more
    assert float(torch.linalg.matrix_norm(bf16.constrained_weight().detach().double(), 2)) <= 1 + 1e-6


@pytest.mark.parametrize("mode", ["zeros", "circular"])
def test_bound_methods_agree_and_normalise_below_one(mode):
    """Note [circular bound method]: "cholesky" (the CPU default) and "gram" are both above the exact norm, within
    1e-4 of each other, and the normalised layer's exact norm is at most 1."""
    torch.manual_seed(6)
    kernel = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(kernel)
    exact = _explicit_norm(conv, (3, 7, 7))
    values = {}
    for method in ("auto", "cholesky", "gram"):
        layer = SpectralConv2d(3, 4, 3, padding=1, padding_mode=mode, input_size=7, method=method).double()
        with torch.no_grad():
            layer.weight.copy_(kernel)
        values[method] = float(layer.constraint.bound(kernel))
        assert values[method] >= exact
        with torch.no_grad():
            conv.weight.copy_(layer.constrained_weight())
        assert _explicit_norm(conv, (3, 7, 7)) <= 1 + 1e-12
    assert values["auto"] == values["cholesky"]
    assert values["gram"] <= values["cholesky"] <= values["gram"] * (1 + 2e-4)


def test_bound_method_bad_input():
    with pytest.raises(ValueError, match="method must be one of auto, cholesky, gram"):
        SpectralConv2d(2, 2, 3, padding=1, input_size=5, method="svd")
    with pytest.raises(ValueError, match="needs input_size and no n_iter"):
        SpectralConv2d(2, 2, 3, padding=1, method="cholesky")
    with pytest.raises(ValueError, match="needs input_size and no n_iter"):
        SpectralConv2d(2, 2, 3, padding=1, input_size=5, n_iter=3, method="cholesky")
    with pytest.raises(ValueError, match=r"method applies to nn\.Conv2d only"):
        lipschitz_spectral(nn.Linear(2, 3), method="gram")
