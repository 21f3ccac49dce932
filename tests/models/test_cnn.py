"""The plain classifiers of stablenet.models.cnn: shapes, options, bad input, and bounds the spectral walker finds."""

import pytest
import torch

from stablenet.models import create_model
from stablenet.spectral import lipschitz_upper_bound


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_mlp_shapes_and_layer_count(depth):
    model = create_model("mlp", 10, 1, (8, 8), mean=[0.5], std=[0.25], hidden=16, depth=depth)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert len(linears) == depth + 1
    assert linears[0].in_features == 64 and linears[-1].out_features == 10
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 10)


def test_mlp_normalises_its_input():
    model = create_model("mlp", 3, 1, (2, 2), mean=[0.5], std=[0.25], hidden=4, depth=0).double()
    x = torch.rand(2, 1, 2, 2, dtype=torch.float64)
    head = model[-1]
    expected = ((x - 0.5) / 0.25).flatten(1) @ head.weight.T + head.bias
    torch.testing.assert_close(model(x), expected)


def test_mlp_bound_is_the_product_of_the_layers_norms():
    torch.manual_seed(0)
    model = create_model("mlp", 4, 1, (3, 3), mean=[0.0], std=[0.5], hidden=6, depth=2).double()
    norms = [torch.linalg.matrix_norm(m.weight, 2).item() for m in model if isinstance(m, torch.nn.Linear)]
    product = 2.0 * norms[0] * norms[1] * norms[2]  # 1 / std = 2
    bound = lipschitz_upper_bound(model, input_shape=(1, 3, 3))
    assert product <= bound <= product * (1 + 1e-6)


@pytest.mark.parametrize("options", [{"hidden": 0}, {"depth": -1}])
def test_mlp_rejects_bad_sizes(options):
    with pytest.raises(ValueError, match="hidden must be >= 1 and depth >= 0"):
        create_model("mlp", 10, 1, (4, 4), mean=[0.0], std=[1.0], **options)
