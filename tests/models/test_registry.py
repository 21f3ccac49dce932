import pytest
import torch

from stablenet.models import create_model, list_models, model_options, register_model
from stablenet.nn import LinearNormalized
from stablenet.spectral import lipschitz_upper_bound


def test_sll_mlp_by_name_on_digits_and_mnist_shapes():
    assert "sll_mlp" in list_models()
    for shape in [(1, 8, 8), (1, 28, 28)]:
        net = create_model("sll_mlp", 10, shape[0], shape[1:], depth=2)
        assert net(torch.rand(3, *shape)).shape == (3, 10)
        assert isinstance(net[-1], LinearNormalized)
        assert lipschitz_upper_bound(net[:-1]) <= 1.0001  # 1-Lipschitz body
    assert model_options("sll_mlp") == {"width": None, "depth": 4, "inner_width": None}


def test_callable_accepted_where_a_name_is():
    def tiny(num_classes, in_channels, input_size, *, mean, std, hidden=4):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * 64, num_classes))

    assert create_model(tiny, 3, 1, 8, hidden=2)(torch.rand(1, 1, 8, 8)).shape == (1, 3)
    with pytest.raises(ValueError, match="unknown option"):
        create_model(tiny, 3, 1, 8, depth=2)


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown model 'nope'; available: .*lenet.*sll_mlp"):
        create_model("nope", 10)
    with pytest.raises(ValueError, match="width must be >= the flattened input size 64"):
        create_model("sll_mlp", 10, 1, 8, width=32)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        create_model("sll_mlp", 1, 1, 8)
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        create_model("sll_mlp", 10, 3, 8, mean=[0.5])
    with pytest.raises(ValueError, match="already registered"):
        register_model("sll_mlp")(lambda *a, **k: None)
