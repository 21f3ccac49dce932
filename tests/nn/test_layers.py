"""Every layer: measured Lipschitz constant <= 1 (float64 Jacobians), train/eval, state_dict round trip."""

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from stablenet.nn import (
    LAYER_ROUNDING_SLACK,
    ChannelPad,
    GroupSort,
    InputNormalization,
    LinearNormalized,
    MaxMin,
    SLLLinear,
)
from stablenet.spectral import spectral_norm_exact

TOL = 1e-6


def measured_lipschitz(layer: nn.Module, in_features: int, n_points: int = 40, seed: int = 0) -> float:
    """Largest singular value of the Jacobian over random inputs (float64), a lower estimate of L."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for _ in range(n_points):
        x = torch.randn(in_features, dtype=torch.float64, generator=g) * 3
        jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0], x)
        worst = max(worst, float(spectral_norm_exact(jac)))
    return worst


def train_steps(layer: nn.Module, in_features: int, steps: int = 3) -> None:
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(steps):
        loss = layer(torch.randn(16, in_features, dtype=torch.float64)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("features,inner", [(1, 1), (1, 5), (5, 1), (8, 8), (8, 20), (20, 8)])
def test_sll_linear_is_one_lipschitz_everywhere(features, inner):
    torch.manual_seed(features * 31 + inner)
    layer = SLLLinear(features, inner).double()
    with torch.no_grad():
        layer.q_log.normal_(0, 2)  # a non-trivial q
    for mode in ("train", "after_steps", "eval", "roundtrip"):
        if mode == "after_steps":
            train_steps(layer, features)
        if mode == "eval":
            layer.eval()
        if mode == "roundtrip":
            buf = io.BytesIO()
            torch.save(layer.state_dict(), buf)
            fresh = SLLLinear(features, inner).double().eval()
            fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
            layer = fresh
        assert measured_lipschitz(layer, features) <= 1 + TOL, mode


def test_sll_worst_case_jacobian_is_contractive():
    """Exact check: the Jacobian I - 2 W^T diag(t d) W over activation patterns d in [0,1]^k."""
    torch.manual_seed(0)
    layer = SLLLinear(12, 30).double()
    with torch.no_grad():
        layer.q_log.normal_(0, 1)
    w, t = layer.weight.detach(), layer.rescaling().detach()
    patterns = [torch.ones(30), torch.zeros(30)] + [torch.rand(30) for _ in range(50)]
    patterns += [(torch.rand(30) > 0.5).double() for _ in range(50)]
    for d in patterns:
        jac = torch.eye(12, dtype=torch.float64) - 2 * w.T @ torch.diag(t * d.double()) @ w
        assert spectral_norm_exact(jac) <= 1 + 1e-12


def test_sll_q_has_an_effect_and_zero_rows_are_safe():
    torch.manual_seed(0)
    layer = SLLLinear(6, 6).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    before = layer(x)
    with torch.no_grad():
        layer.q_log[0] = 3.0
    assert not torch.allclose(before, layer(x)), "q cancelled out (the published-code pitfall)"
    with torch.no_grad():
        layer.weight[2] = 0
        layer.q_log[3] = -200.0  # exp underflows relative to the others
    out = layer(x)
    assert torch.isfinite(out).all()
    assert measured_lipschitz(layer, 6) <= 1 + TOL


def test_sll_float32_measured_constant_within_rounding_slack():
    torch.manual_seed(1)
    layer = SLLLinear(32, 64)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(20):
        x = torch.randn(32, generator=g)
        jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0], x)
        worst = max(worst, float(spectral_norm_exact(jac.double())))
    # Note [rounding slack]: the documented slack is 100x what we see.
    assert worst <= 1 + LAYER_ROUNDING_SLACK / 100


def test_sll_eval_cache_matches_train_and_invalidates():
    torch.manual_seed(0)
    layer = SLLLinear(5, 7)
    x = torch.randn(3, 5)
    train_out = layer(x)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), train_out, rtol=0, atol=0)
        first = layer._cache._value
        layer(x)
        assert layer._cache._value is first  # cached
        other = SLLLinear(5, 7)
        layer.load_state_dict(other.state_dict())  # in-place copy bumps the version
        torch.testing.assert_close(layer(x), other.eval()(x))
    layer.train()
    train_steps(layer.double(), 5)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer._cache.get(layer, [layer.weight, layer.q_log], layer.rescaling), layer.rescaling())


def test_lln_rows_unit_norm_bound_and_distances():
    torch.manual_seed(0)
    head = LinearNormalized(9, 4).double()
    w = head.normalized_weight()
    torch.testing.assert_close(w.norm(dim=1), torch.ones(4, dtype=torch.float64))
    assert head.lipschitz_bound() >= float(spectral_norm_exact(w.detach()))
    dist = head.pairwise_distance_bounds()
    exact = torch.cdist(w[None], w[None])[0]
    assert torch.all(dist >= exact) and torch.allclose(dist, exact, atol=1e-9)
    train_steps(head, 9)
    head.eval()
    assert measured_lipschitz(head, 9) <= head.lipschitz_bound() * (1 + TOL)


def test_lln_zero_row_stays_zero():
    head = LinearNormalized(3, 2, bias=False)
    with torch.no_grad():
        head.weight[1] = 0
    assert torch.isfinite(head(torch.randn(2, 3))).all()


def test_groupsort_maxmin_values_and_lipschitz():
    x = torch.tensor([[1.0, 3.0, -2.0, -5.0, 0.0, 4.0]])
    assert torch.equal(MaxMin()(x), torch.tensor([[3.0, 1.0, -2.0, -5.0, 4.0, 0.0]]))
    assert torch.equal(GroupSort(3)(x), torch.tensor([[3.0, 1.0, -2.0, 4.0, 0.0, -5.0]]))
    assert measured_lipschitz(GroupSort(3), 12) <= 1 + TOL
    assert measured_lipschitz(MaxMin(), 8) <= 1 + TOL
    with pytest.raises(ValueError, match="divisible by 4"):
        GroupSort(4)(torch.randn(2, 6))


def test_channel_pad_and_input_normalization():
    pad = ChannelPad(3, 5)
    x = torch.randn(2, 3, 4, 4)
    y = pad(x)
    assert y.shape == (2, 5, 4, 4) and torch.equal(y[:, :3], x) and not y[:, 3:].any()
    assert torch.equal(ChannelPad(2, 4)(torch.ones(1, 2)), torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    norm = InputNormalization((0.5, 0.2), (0.25, 2.0))
    assert norm.lipschitz_bound() >= 4.0
    with pytest.raises(ValueError, match="std values must be > 0"):
        InputNormalization((0.0,), (0.0,))
    with pytest.raises(ValueError, match=r"expected inputs of shape \(N, 2, ...\)"):
        norm(torch.rand(1, 3, 2, 2))


@settings(max_examples=15, deadline=None)
@given(features=st.integers(1, 10), inner=st.integers(1, 10), seed=st.integers(0, 1000))
def test_sll_lipschitz_hypothesis(features, inner, seed):
    torch.manual_seed(seed)
    layer = SLLLinear(features, inner).double()
    with torch.no_grad():
        layer.weight.mul_(torch.rand(()) * 10)
    assert measured_lipschitz(layer, features, n_points=10, seed=seed) <= 1 + TOL


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="features must be >= 1"):
        SLLLinear(0)
    with pytest.raises(ValueError, match="last dimension 4"):
        SLLLinear(4)(torch.randn(2, 3))


@pytest.mark.parametrize("shape,dim", [((4, 6, 3, 3), 1), ((5, 8), 1), ((5, 8), -1), ((2, 3, 4), 2)])
def test_maxmin_fast_path_equals_the_pairwise_sort(shape, dim):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    x[..., 0] = x[..., 1]  # ties
    d = dim % x.dim()
    expected = x.unflatten(d, (x.shape[d] // 2, 2)).sort(dim=d + 1, descending=True).values.flatten(d, d + 1)
    assert torch.equal(MaxMin(dim=dim)(x), expected)
    assert torch.equal(GroupSort(2, dim=dim)(x), expected)
