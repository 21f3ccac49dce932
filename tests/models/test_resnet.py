"""The CIFAR ResNet (Cohen et al.'s smoothing base model): shapes, size, and a sound Lipschitz bound."""

import pytest
import torch

from stablenet.models import create_model
from stablenet.spectral import lipschitz_lower_bound, lipschitz_upper_bound


def test_resnet110_has_cohens_size():
    net = create_model("cifar_resnet", num_classes=10, in_channels=3, input_size=32)
    n_params = sum(p.numel() for p in net.parameters())
    assert 1.6e6 < n_params < 1.8e6  # He et al. report 1.7 M
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("depth", [7, 9, 0])
def test_bad_depth_is_rejected(depth):
    with pytest.raises(ValueError, match="6n \\+ 2"):
        create_model("cifar_resnet", num_classes=10, in_channels=3, input_size=32, depth=depth)


def test_block_bound_is_above_the_measured_constant():
    torch.manual_seed(0)
    net = create_model("cifar_resnet", num_classes=4, in_channels=1, input_size=16, depth=8, width=2).double()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(-2, 2)
    net.eval()
    upper = lipschitz_upper_bound(net, (1, 16, 16))
    lower = lipschitz_lower_bound(net, torch.rand(4, 1, 16, 16, dtype=torch.float64))
    assert 0 < lower <= upper
