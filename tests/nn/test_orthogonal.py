"""Orthogonal dense layers: Björck–Bowie and Cayley, ready layer and parametrization."""

import pytest
import torch
from constraint_cases import DENSE_SHAPES
from lipschitz_checks import check_layer
from torch import nn

from stablenet.nn.orthogonal import (
    OrthogonalConstraint,
    OrthogonalLinear,
    bjorck,
    cayley,
    lipschitz_orthogonal,
    remove_lipschitz_orthogonal,
)


@pytest.mark.parametrize("method", ["bjorck", "cayley"])
@pytest.mark.parametrize("in_features,out_features", DENSE_SHAPES)
def test_orthogonal_linear_protocol(in_features, out_features, method):
    measured = check_layer(lambda: OrthogonalLinear(in_features, out_features, method=method), (in_features,))
    assert min(measured.values()) > 1 - 1e-9  # orthogonal: the norm is 1, not below


def _singular_values(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.detach().double())


@pytest.mark.parametrize("method", ["bjorck", "cayley"])
@pytest.mark.parametrize("in_features,out_features", DENSE_SHAPES)
def test_all_singular_values_are_one(in_features, out_features, method):
    torch.manual_seed(0)
    layer = OrthogonalLinear(in_features, out_features, method=method).double()
    with torch.no_grad():  # move far from the orthogonal initialisation
        layer.weight.add_(torch.randn_like(layer.weight))
    s = _singular_values(layer.constrained_weight())
    assert s.numel() == min(in_features, out_features)
    torch.testing.assert_close(s, torch.ones_like(s), rtol=0, atol=1e-10)


def test_cayley_free_weight_is_square():
    layer = OrthogonalLinear(3, 7, method="cayley")
    assert layer.weight.shape == (7, 7)
    assert layer.constrained_weight().shape == (7, 3)
    assert layer.export().weight.shape == (7, 3)


def test_bjorck_steps_raise_singular_values_monotonically_to_one():
    """Each step maps s -> 1.5 s - 0.5 s^3: monotone on [0, 1], fixing 1, so values rise and never pass 1."""
    torch.manual_seed(0)
    w = torch.randn(7, 5, dtype=torch.float64)
    previous = None
    for n_iter in range(0, 12):
        s = _singular_values(bjorck(w, n_iter))
        assert float(s.max()) <= 1 + 1e-12
        if previous is not None:
            assert bool((s >= previous - 1e-12).all())
        previous = s
    torch.testing.assert_close(_singular_values(bjorck(w, 40)), torch.ones(5, dtype=torch.float64))


def test_cayley_is_the_cayley_transform():
    torch.manual_seed(0)
    w = torch.randn(4, 4, dtype=torch.float64)
    a = w - w.T
    eye = torch.eye(4, dtype=torch.float64)
    expected = (eye - a) @ torch.linalg.inv(eye + a)  # reference only: the layer never forms an inverse
    torch.testing.assert_close(cayley(w), expected)
    torch.testing.assert_close(cayley(torch.zeros(3, 3)), torch.eye(3))


@pytest.mark.parametrize("method", ["bjorck", "cayley"])
def test_float32_rounding_stays_small(method):
    """Björck's polish (Note [Björck polish]) keeps float32 results within 1e-6 of orthogonal."""
    torch.manual_seed(0)
    w = torch.randn(256, 256) * (10 if method == "cayley" else 1)  # an ill-conditioned I + A for Cayley
    constraint = OrthogonalConstraint(method, n_iter=30)
    s = _singular_values(constraint(w))
    assert float(s.max()) <= 1 + 1e-6
    assert float(s.min()) >= 1 - 1e-4


@pytest.mark.parametrize("method", ["bjorck", "cayley"])
@pytest.mark.parametrize("shape", [(5, 5), (3, 6), (6, 3)])
def test_parametrization_register_and_remove(shape, method):
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0]).double()
    lipschitz_orthogonal(lin, method=method, n_iter=40)
    w = lin.weight.detach().clone()
    s = _singular_values(w)
    torch.testing.assert_close(s, torch.ones_like(s), rtol=0, atol=1e-10)
    x = torch.randn(2, shape[1], dtype=torch.float64)
    out = lin(x)
    remove_lipschitz_orthogonal(lin)
    assert isinstance(lin.weight, nn.Parameter)
    torch.testing.assert_close(lin.weight, w, rtol=0, atol=0)
    torch.testing.assert_close(lin(x), out)
    with pytest.raises(ValueError, match="OrthogonalConstraint"):
        remove_lipschitz_orthogonal(lin)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="'bjorck', 'cayley'"):
        OrthogonalLinear(3, 3, method="svd")
    with pytest.raises(ValueError, match="'bjorck', 'cayley'"):
        lipschitz_orthogonal(nn.Linear(3, 3), method="qr")
    with pytest.raises(ValueError, match=r"nn\.Linear"):
        lipschitz_orthogonal(nn.Conv2d(3, 3, 3))
    for n_iter in (0, -1, 2.5):
        with pytest.raises(ValueError, match="n_iter"):
            OrthogonalLinear(3, 3, n_iter=n_iter)
    with pytest.raises(ValueError, match="2-D"):
        lipschitz_orthogonal(nn.Linear(3, 3), name="bias")


@pytest.mark.parametrize("method", ["bjorck", "cayley"])
def test_bf16_autocast_keeps_constraint_math_in_float32(method):
    torch.manual_seed(0)
    layer = OrthogonalLinear(16, 8, method=method)
    reference = layer.constrained_weight()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weight = layer.constrained_weight()
        out = layer(torch.randn(4, 16))
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, reference, rtol=0, atol=0)
    assert torch.isfinite(out).all()
