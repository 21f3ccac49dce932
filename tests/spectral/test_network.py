import pytest
import torch
from torch import nn

from stablenet.nn import GroupSort, LinearNormalized, SLLLinear
from stablenet.spectral import layer_lipschitz_bounds, lipschitz_upper_bound, spectral_norm_exact


def test_sequential_of_linear_bounds_jacobian():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    bound = lipschitz_upper_bound(net)
    product = 1.0
    for m in net:
        if isinstance(m, nn.Linear):
            product *= float(spectral_norm_exact(m.weight))
    assert bound >= product
    for _ in range(20):
        x = torch.randn(6, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(net, x)
        assert spectral_norm_exact(jac) <= bound


def test_stablenet_layers_use_their_own_bound():
    net = nn.Sequential(nn.Flatten(), SLLLinear(8), GroupSort(2), LinearNormalized(8, 3))
    names = [name for name, _ in layer_lipschitz_bounds(net)]
    assert names == ["0", "1", "2", "3"]
    assert lipschitz_upper_bound(net) >= float(spectral_norm_exact(net[3].normalized_weight().double()))


def test_unknown_module_raises_never_skips():
    net = nn.Sequential(nn.Linear(3, 3), nn.Conv1d(1, 1, 3))
    with pytest.raises(TypeError, match="cannot bound the Lipschitz constant of module '1' of type Conv1d"):
        lipschitz_upper_bound(net)
