"""Residual(h): forward x + h(x), bounded by 1 + L(h) through the network walker."""

import io

import pytest
import torch
from lipschitz_checks import check_layer
from torch import nn

from stablenet.nn import GroupSort, Residual, SLLLinear
from stablenet.nn.export import export_branch
from stablenet.nn.skip import LipResidual
from stablenet.spectral import layer_lipschitz_bounds, lipschitz_upper_bound, spectral_norm_exact


def jacobian_norm(net: nn.Module, x: torch.Tensor) -> float:
    jac = torch.func.jacrev(lambda v: net(v[None])[0])(x)
    return float(spectral_norm_exact(jac.detach().reshape(-1, x.numel())))


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


# ------------------------------------------------------------------------------------------ LipResidual
def test_lip_residual_is_a_convex_combination():
    torch.manual_seed(0)
    branch = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    block = LipResidual(branch, alpha_init=0.25)
    assert block.alpha().item() == pytest.approx(0.25)
    assert block.residual_branch() is branch
    a, b = block.residual_weights()
    assert a == pytest.approx(0.25) and a + b == 1.0
    x = torch.randn(3, 4)
    torch.testing.assert_close(block(x), 0.25 * x + 0.75 * branch(x))
    assert sorted(block.state_dict()) == ["alpha_logit", "branch.0.bias", "branch.0.weight"]


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_lip_residual_bound_is_alpha_plus_rest_times_branch_bound(alpha):
    torch.manual_seed(0)
    branch = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    block = LipResidual(branch, alpha_init=alpha).double().eval()
    [(name, bound)] = layer_lipschitz_bounds(block)
    a = block.alpha().item()
    expected = a + (1 - a) * lipschitz_upper_bound(branch)
    assert name == "LipResidual" and expected <= bound <= expected * (1 + 1e-11)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        x = 2 * torch.randn(6, generator=g, dtype=torch.float64)
        assert jacobian_norm(block, x) <= bound


def test_lip_residual_of_a_one_lipschitz_branch_is_one_lipschitz():
    block = LipResidual(nn.Sequential(SLLLinear(6), GroupSort(2)), alpha_init=0.3)
    assert lipschitz_upper_bound(block) <= 1 + 2e-5
    # the plain Residual doubles the constant of the same branch
    assert lipschitz_upper_bound(Residual(block.branch)) >= 2.0


def test_lip_residual_conv_branch_uses_recorded_shapes():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 3, padding=1)
    block = LipResidual(nn.Sequential(conv, nn.ReLU()), alpha_init=0.5)
    net = nn.Sequential(block, nn.Flatten())
    bound = lipschitz_upper_bound(net, (2, 5, 5))
    branch_bound = lipschitz_upper_bound(conv, (2, 5, 5))
    assert bound == pytest.approx(0.5 + 0.5 * branch_bound, rel=1e-9)
    with pytest.raises(ValueError, match="needs the input size"):
        lipschitz_upper_bound(net)


def test_lip_residual_check_layer_protocol():
    has_export = callable(getattr(SLLLinear, "export", None))
    check_layer(lambda: LipResidual(nn.Sequential(SLLLinear(6, 8), nn.ReLU())), (6,), check_export=has_export)


def test_lip_residual_export_keeps_outputs_and_alpha():
    torch.manual_seed(0)
    block = LipResidual(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Residual(nn.Linear(4, 4))), alpha_init=0.7)
    block.eval()
    exported = block.export()
    assert isinstance(exported, LipResidual) and not exported.training
    assert exported.branch is not block.branch and exported.branch[0].weight is not block.branch[0].weight
    x = torch.randn(5, 4)
    torch.testing.assert_close(exported(x), block(x), rtol=0, atol=0)
    torch.testing.assert_close(exported.alpha(), block.alpha())

    class Doubling(nn.Module):  # a layer with its own export(), replaced in the copy
        def forward(self, x):
            return 2 * x

        def export(self):
            return nn.Sequential(nn.Identity(), nn.Hardtanh(-1e9, 1e9))

    nested = LipResidual(nn.Sequential(nn.Linear(4, 4), Doubling()))
    out = nested.export()
    assert isinstance(out.branch[1], nn.Sequential) and isinstance(nested.branch[1], Doubling)
    assert isinstance(export_branch(Doubling()), nn.Sequential)


def test_lip_residual_dtype_and_state_dict():
    block = LipResidual(nn.Linear(3, 3)).to(torch.float64)
    assert block.alpha_logit.dtype == torch.float64
    assert block(torch.randn(2, 3, dtype=torch.float64)).dtype == torch.float64
    buffer = io.BytesIO()
    torch.save(block.state_dict(), buffer)
    buffer.seek(0)
    copy = LipResidual(nn.Linear(3, 3), alpha_init=0.9).double()
    copy.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(copy(x), block(x))


def test_lip_residual_errors():
    with pytest.raises(TypeError, match=r"branch must be an nn\.Module; got function"):
        LipResidual(lambda x: x)
    for bad in (0.0, 1.0, -0.5, 2.0):
        with pytest.raises(ValueError, match=r"alpha_init must be in the open interval \(0, 1\)"):
            LipResidual(nn.Identity(), alpha_init=bad)
    with pytest.raises(ValueError, match=r"LipResidual needs a branch that keeps the input shape \(2, 4\)"):
        LipResidual(nn.Linear(4, 1))(torch.randn(2, 4))
