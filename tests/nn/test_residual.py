"""Residual(h): forward x + h(x), bounded by 1 + L(h) through the network walker."""

import io

import pytest
import torch
from torch import nn

from stablenet.nn import GroupSort, Residual, SLLLinear
from stablenet.spectral import layer_lipschitz_bounds, lipschitz_upper_bound, spectral_norm_exact


def jacobian_norm(net: nn.Module, x: torch.Tensor) -> float:
    jac = torch.func.jacrev(lambda v: net(v[None])[0])(x)
    return float(spectral_norm_exact(jac.reshape(-1, x.numel())))


def test_forward_is_input_plus_branch():
    torch.manual_seed(0)
    branch = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    block = Residual(branch)
    x = torch.randn(3, 4)
    assert torch.equal(block(x), x + branch(x))
    assert block.residual_branch() is branch
    assert list(block.state_dict()) == ["branch.0.weight", "branch.0.bias"]


def test_identity_branch_has_jacobian_two():
    block = Residual(nn.Identity())
    assert jacobian_norm(block, torch.randn(5)) == pytest.approx(2.0)
    assert lipschitz_upper_bound(block) >= 2.0


@pytest.mark.parametrize(
    "branch",
    [
        nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6)),
        nn.Sequential(SLLLinear(6), GroupSort(2), nn.Linear(6, 6)),
        Residual(nn.Sequential(nn.Linear(6, 6), nn.Sigmoid())),  # nested residuals
    ],
)
def test_bound_is_one_plus_branch_bound_and_holds(branch):
    torch.manual_seed(0)
    block = Residual(branch).double().eval()
    [(name, bound)] = layer_lipschitz_bounds(block)
    assert name == "Residual" and lipschitz_upper_bound(block) >= bound
    assert 1 + lipschitz_upper_bound(branch) <= bound <= (1 + lipschitz_upper_bound(branch)) * (1 + 1e-15)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = 2 * torch.randn(6, generator=g, dtype=torch.float64)
        assert jacobian_norm(block, x) <= bound


def test_follows_torch_conventions():
    block = Residual(nn.Linear(3, 3)).to(torch.float64)
    assert block.branch.weight.dtype == torch.float64
    assert block(torch.randn(2, 3, dtype=torch.float64)).dtype == torch.float64
    block.eval()
    assert not block.branch.training
    buffer = io.BytesIO()
    torch.save(block.state_dict(), buffer)
    buffer.seek(0)
    copy = Residual(nn.Linear(3, 3)).double()
    copy.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(copy(x), block(x))


def test_errors():
    with pytest.raises(TypeError, match=r"branch must be an nn\.Module; got function"):
        Residual(lambda x: x)
    with pytest.raises(ValueError, match=r"branch that keeps the input shape \(2, 4\); got \(2, 1\)"):
        Residual(nn.Linear(4, 1))(torch.randn(2, 4))
