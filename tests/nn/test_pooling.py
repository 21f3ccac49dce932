"""LipAvgPool2d and L2NormPool2d: exact operator norms, 1-Lipschitz on random pairs, export, errors."""

import io

import pytest
import torch
from lipschitz_checks import is_plain_torch, measured_lipschitz
from torch import nn

from stablenet.nn.base import LAYER_ROUNDING_SLACK
from stablenet.nn.pooling import L2NormPool2d, LipAvgPool2d
from stablenet.spectral import lipschitz_upper_bound


def operator_matrix(module: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """The explicit matrix of a linear module on inputs of ``shape`` (one example), float64: its columns are
    the images of the unit vectors."""
    n = torch.Size(shape).numel()
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        return module(basis).reshape(n, -1).T


@pytest.mark.parametrize(("k", "n", "channels"), [(2, 4, 1), (2, 6, 3), (4, 8, 2), (3, 7, 1), (4, 32, 1), (1, 5, 2)])
def test_avg_pool_non_overlapping_has_norm_exactly_one(k, n, channels):
    a = operator_matrix(LipAvgPool2d(k), (channels, n, n))
    assert torch.linalg.matrix_norm(a, 2).item() == pytest.approx(1.0, abs=1e-12)
    # plain average pooling wastes a factor k
    plain = operator_matrix(nn.AvgPool2d(k), (channels, n, n))
    assert torch.linalg.matrix_norm(plain, 2).item() == pytest.approx(1.0 / k, abs=1e-12)


@pytest.mark.parametrize(("k", "s", "n"), [(2, 1, 5), (3, 1, 6), (3, 2, 9), (4, 2, 8), (4, 3, 10), (2, 3, 8)])
def test_avg_pool_overlapping_or_strided_is_at_most_one(k, s, n):
    pool = LipAvgPool2d(k, s)
    assert pool.divisor == k * -(-k // s)
    norm = torch.linalg.matrix_norm(operator_matrix(pool, (1, n, n)), 2).item()
    assert norm <= 1.0 + 1e-12
    assert norm > 0.5  # rescaled, not the 1/k of plain average pooling


def test_avg_pool_overlapping_bound_is_tight_on_periodic_inputs():
    # On a large input the Schur bound k * ceil(k/s) is approached (interior rows/columns are full).
    norm = torch.linalg.matrix_norm(operator_matrix(LipAvgPool2d(2, 1), (1, 24, 24)), 2).item()
    assert 0.97 < norm <= 1.0


@pytest.mark.parametrize(("k", "s"), [(2, None), (3, 1), (2, 3)])
def test_avg_pool_export_and_bounds(k, s):
    pool = LipAvgPool2d(k, s)
    x = torch.randn(2, 3, 9, 9)
    exported = pool.export()
    assert isinstance(exported, nn.AvgPool2d) and is_plain_torch(exported)
    torch.testing.assert_close(exported(x), pool(x), rtol=0, atol=0)
    assert pool.lipschitz_bound() == 1.0 + LAYER_ROUNDING_SLACK
    assert lipschitz_upper_bound(pool, (3, 9, 9)) == pytest.approx(1.0 + LAYER_ROUNDING_SLACK)
    # the walker's own rule for the exported module agrees that it is 1-Lipschitz
    assert lipschitz_upper_bound(exported, (3, 9, 9)) <= 1.0 + 1e-9
    assert lipschitz_upper_bound(exported) <= 1.0 + 1e-9


def test_avg_pool_matches_sll_pooling():
    x = torch.randn(2, 4, 32, 32)
    torch.testing.assert_close(LipAvgPool2d(4)(x), nn.AvgPool2d(4, divisor_override=4)(x))


def test_l2_pool_closed_form_and_export():
    x = torch.tensor([[[[3.0, 0.0, 1.0, 1.0], [0.0, 4.0, 1.0, 1.0]]]])
    pool = L2NormPool2d(2)
    torch.testing.assert_close(pool(x), torch.tensor([[[[5.0, 2.0]]]]))
    y = torch.randn(3, 2, 8, 8)
    exported = pool.export()
    assert isinstance(exported, nn.LPPool2d) and is_plain_torch(exported)
    torch.testing.assert_close(exported(y), pool(y), rtol=1e-6, atol=1e-6)
    assert L2NormPool2d(2, 3)(y).shape == exported.__class__(2, 2, 3)(y).shape


@pytest.mark.parametrize(("k", "s", "n"), [(2, None, 6), (3, None, 7), (2, 3, 8)])
def test_l2_pool_is_one_lipschitz(k, s, n):
    pool = L2NormPool2d(k, s)
    assert measured_lipschitz(pool, (2, n, n), n_points=4) <= 1.0 + 1e-12
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(200, 2, n, n, generator=g, dtype=torch.float64) for _ in range(2))
    y = x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64) * (torch.rand(200, 1, 1, 1, generator=g) > 0.5)
    ratio = (pool(x) - pool(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1).clamp_min(1e-300)
    assert ratio.max().item() <= 1.0 + 1e-12
    # the constant 1 is attained along rays when the windows cover the input
    z = torch.randn(1, 2, n, n, dtype=torch.float64)
    gap = (pool(2 * z) - pool(z)).norm().item()
    assert gap <= z.norm().item() * (1 + 1e-12)
    if n % k == 0 and s is None:
        assert gap == pytest.approx(z.norm().item(), rel=1e-12)
    assert lipschitz_upper_bound(pool, (2, n, n)) == pytest.approx(1.0 + LAYER_ROUNDING_SLACK)


def test_l2_pool_gradient_at_zero_is_finite():
    x = torch.zeros(1, 1, 4, 4, requires_grad=True)
    with torch.no_grad():
        x[0, 0, 0, 0] = 1.0  # one non-zero window, three zero windows
    L2NormPool2d(2)(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[0, 0, 0, 0] == 1.0 and x.grad[0, 0, 2:, 2:].abs().sum() == 0


def test_pools_in_train_eval_and_state_dict():
    for pool in (LipAvgPool2d(2), L2NormPool2d(2)):
        x = torch.randn(2, 3, 6, 6)
        out = pool(x)
        pool.eval()
        torch.testing.assert_close(pool(x), out, rtol=0, atol=0)
        assert not pool.export().training
        buf = io.BytesIO()
        torch.save(pool.state_dict(), buf)
        assert pool.state_dict() == {}
        assert pool.to(torch.float64)(x.double()).dtype == torch.float64


def test_errors():
    with pytest.raises(ValueError, match="kernel_size, a positive int"):
        LipAvgPool2d(0)
    with pytest.raises(ValueError, match="kernel_size, a positive int"):
        LipAvgPool2d((2, 2))
    with pytest.raises(ValueError, match="stride, a positive int or None"):
        LipAvgPool2d(2, 0)
    with pytest.raises(ValueError, match=r"stride >= kernel_size \(3\); got stride 1, .* 3-Lipschitz"):
        L2NormPool2d(3, 1)
    with pytest.raises(ValueError, match=r"expects inputs \(N, C, H, W\) with H, W >= 4; got \(1, 1, 3, 8\)"):
        LipAvgPool2d(4)(torch.randn(1, 1, 3, 8))
    with pytest.raises(ValueError, match="L2NormPool2d"):
        L2NormPool2d(2)(torch.randn(4, 4))
