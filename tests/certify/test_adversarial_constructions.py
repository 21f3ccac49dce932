"""Hand-built hostile models: every certified point is attacked, and no prediction may change inside its ball.

Each construction targets one way a Lipschitz certificate can go wrong in floating point or through the API.
The models are tiny (mostly 1-D inputs), so the balls are searched densely instead of by gradient attacks, in
the arithmetic the certificate describes (Note [certified arithmetic] in ``stablenet.certify.lipschitz``).
Add a construction here whenever a new way to break a certificate is found.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import stablenet
import stablenet.nn as snn
from stablenet.certify.attack import pgd_l2
from stablenet.certify.lipschitz import LipschitzCertifier, certified_network, certify_lipschitz
from stablenet.precision import sound_arithmetic


def _linear(weight, bias) -> nn.Linear:
    weight = torch.as_tensor(weight, dtype=torch.float32)
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return layer


def _flips_on_segments(model: nn.Module, arithmetic: str, x: torch.Tensor, pred, radius, points: int = 801) -> int:
    """How many certified 1-D inputs have a point of a different prediction in ``[x - r, x + r]`` (a dense grid,
    both ends included, shrunk by one part in 1e6), evaluated as the certificate describes."""
    network = certified_network(model, arithmetic)
    dtype = next(network.parameters()).dtype
    flips = 0
    t = torch.linspace(-1.0, 1.0, points, dtype=torch.float64)
    with torch.no_grad(), sound_arithmetic():
        for i in torch.nonzero(radius > 0).flatten().tolist():
            r = float(radius[i]) * (1 - 1e-6)
            grid = (float(x[i, 0]) + r * t)[:, None].to(dtype)
            if (network(grid).argmax(dim=1) != pred[i]).any():
                flips += 1
    return flips


def _hidden_bias_net(big: float = 2.0**19) -> nn.Sequential:
    """The issue's example: hidden biases of 2**19, exact logits (2x, 1), Lipschitz bound 2."""
    return nn.Sequential(
        _linear([[1.0], [0.0]], [big, 0.0]), _linear([[2.0, 0.0], [0.0, 0.0]], [-2.0 * big, 1.0])
    ).eval()


@pytest.mark.parametrize("arithmetic", ["native", "float64"])
def test_large_hidden_biases(arithmetic):
    """In float32 the hidden unit x + 2**19 is quantised to 1/16: the old tolerance (relative to the logits)
    certified 389 points of 3688 with a flip inside their ball."""
    model = _hidden_bias_net()
    x = torch.linspace(-3, 3, 1201)[:, None]
    pred, radius = certify_lipschitz(model, x, arithmetic=arithmetic)
    assert (radius > 0).sum() > 600
    assert _flips_on_segments(model, arithmetic, x, pred, radius) == 0


def test_native_certificates_shrink_by_the_rounding_of_the_hidden_biases():
    """The native radius pays about u * 2**19 * (2 + ...) per logit pair: the gap to the exact radius is there,
    and it is what keeps the float32 forward from flipping (float64 radii are those of exact arithmetic)."""
    model = _hidden_bias_net()
    x = torch.tensor([[3.0]])
    _, native = certify_lipschitz(model, x, arithmetic="native")
    _, exact = certify_lipschitz(model, x, arithmetic="float64")
    assert exact.item() == pytest.approx(5.0 / (math.sqrt(2) * 2.0), rel=1e-8)  # (2x - 1) / (sqrt2 * 2)
    assert 0.0 < native.item() < exact.item() - 0.01


@pytest.mark.parametrize("arithmetic", ["native", "float64"])
def test_large_weights_that_cancel(arithmetic):
    """h = (1e4 x, 1e4 x), logit = h1 - h2 (1 - 1e-4): float32 rounds each hidden unit at 1e4 scale."""
    model = nn.Sequential(
        _linear([[1e4], [1e4]], [0.0, 0.0]), _linear([[1.0, -(1.0 - 1e-4)], [0.0, 0.0]], [0.0, 0.3])
    ).eval()
    x = torch.linspace(-8, 8, 801)[:, None]
    pred, radius = certify_lipschitz(model, x, arithmetic=arithmetic)
    assert (radius > 0).sum() > 100
    assert _flips_on_segments(model, arithmetic, x, pred, radius) == 0


def test_overflow_inside_the_ball_is_excluded():
    """Exact logits (1e38 x - 1e37, 1e38 x): class 1 everywhere, margin 1e37 against a Lipschitz bound of
    sqrt(2) 1e38. In float32, at x = 3.41 both logits overflow to inf and argmax says class 0, inside the ball
    of radius 0.05 that the margin alone would certify at x = 3.38. The rules' overflow ranges exclude it."""
    model = nn.Sequential(_linear([[1e38]], [0.0]), _linear([[1.0], [1.0]], [-1e37, 0.0])).eval()
    x = torch.tensor([[0.3], [3.38]])
    pred, radius = certify_lipschitz(model, x, arithmetic="native")
    assert radius[0] > 0.04  # far from overflow: certified
    assert radius[1] < 0.02
    with torch.no_grad():
        assert model(torch.tensor([[3.41]])).argmax().item() == 0  # the flip the guard prevents
    assert _flips_on_segments(model, "native", x, pred, radius) == 0


def test_subnormal_weights():
    """A hidden weight of 1e-44 (subnormal in float32) makes the hidden unit a staircase with steps of 1.4e-45,
    0.14 apart in x, which the next layer scales by 1e38 against a threshold of 2e-6: only the underflow terms of
    the rounding model see it."""
    model = nn.Sequential(_linear([[1e-44]], [0.0]), _linear([[1e38], [0.0]], [0.0, 2e-6])).eval()
    x = torch.linspace(-3, 3, 601)[:, None]
    for arithmetic in ("native", "float64"):
        pred, radius = certify_lipschitz(model, x, arithmetic=arithmetic)
        assert _flips_on_segments(model, arithmetic, x, pred, radius) == 0
    assert (certify_lipschitz(model, x, arithmetic="float64")[1] > 0).sum() > 300


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deep_stack_with_offsets(dtype):
    """40 residual SLL layers with large biases, then an LLN head, in float32 and bfloat16."""
    torch.manual_seed(0)
    layers = [snn.SLLLinear(8, 8) for _ in range(40)]
    with torch.no_grad():
        for layer in layers:
            layer.bias.uniform_(-50.0, 50.0)
    model = nn.Sequential(nn.Linear(1, 8), *layers, snn.LinearNormalized(8, 3)).eval().to(dtype)
    x = torch.linspace(-2, 2, 121)[:, None].to(dtype)
    for arithmetic in ("native", "float64"):
        pred, radius = certify_lipschitz(model, x, arithmetic=arithmetic)
        assert _flips_on_segments(model, arithmetic, x, pred, radius, points=201) == 0
        if arithmetic == "float64" or dtype == torch.float32:
            assert (radius > 0).sum() > 60
    if dtype == torch.bfloat16:  # 40 layers of bf16 rounding leave no certified radius in its own arithmetic
        assert (certify_lipschitz(model, x, arithmetic="native")[1] > 0).sum() == 0


def test_lln_rows_written_through_data_after_caching():
    """The issue's stale cache: LLN rows (1,0),(-1,0) cached, then set through .data to (1,0),(1,1e-3). The old
    code certified radius 599 with a flip 0.31 away."""
    head = snn.LinearNormalized(2, 2, bias=False)
    model = nn.Sequential(nn.Identity(), head).eval()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        model(torch.zeros(1, 2))  # caches the normalised rows
    head.weight.data.copy_(torch.tensor([[1.0, 0.0], [1.0, 1e-3]]))
    x = torch.tensor([[0.3, 0.0], [0.3, 0.3]])
    for arithmetic in ("native", "float64"):
        pred, radius = certify_lipschitz(model, x, arithmetic=arithmetic)
        with torch.no_grad():
            w = certified_network(model, arithmetic)[1].used_weight().double()  # the rows the forward uses
        for i in range(2):
            c = int(pred[i])
            # the exact distance from x to the boundary of the linear classifier with these rows
            exact = min((w[c] - w[j]) @ x[i].double() / (w[c] - w[j]).norm() for j in range(2) if j != c)
            assert radius[i] <= exact * (1 + 1e-9)
            if arithmetic == "float64":
                assert radius[i] > 0.5 * exact


def test_a_certifier_refuses_weights_changed_after_its_bounds():
    torch.manual_seed(0)
    model = nn.Sequential(snn.SLLLinear(4, 4), snn.LinearNormalized(4, 3)).eval()
    x = torch.randn(5, 4)
    certifier = LipschitzCertifier(model, input_shape=(4,))
    certifier(x)
    model[1].weight.data[0] *= -1.0  # a .data write: no version counter sees it
    with pytest.raises(RuntimeError, match=r"changed after the certifier computed its bounds"):
        certifier(x)
    certifier = LipschitzCertifier(model, input_shape=(4,))
    pred, _ = certifier(x)  # a new certifier certifies the new weights
    assert torch.equal(pred, model(x).argmax(dim=1))


def test_ema_weights_are_certified_as_evaluated(trained_digits_run):
    """An EMA-style update through .data after a cached eval forward: the certificate describes the new weights
    (PGD at 0.99 of every radius changes no prediction)."""
    model = copy.deepcopy(trained_digits_run.model).eval()
    x, _ = stablenet.load_dataset("digits", "test")
    x = x[:150]
    with torch.no_grad():
        model(x)  # cache every constrained weight
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.data.mul_(0.9).add_(0.1 * torch.randn(p.shape, generator=gen))
    pred, radius = certify_lipschitz(model, x)
    certified = radius > 0
    assert certified.sum() > 20
    network = certified_network(model, "float64")
    with sound_arithmetic():
        _, flipped = pgd_l2(
            network,
            x[certified].double(),
            pred[certified],
            0.99 * radius[certified],
            steps=30,
            restarts=2,
            generator=torch.Generator().manual_seed(1),
        )
    assert not flipped.any()
