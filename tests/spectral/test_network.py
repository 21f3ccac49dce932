"""Network bounds against exact values: explicit float64 Jacobians and their SVD."""

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from stablenet.nn import GroupSort, LinearNormalized, Residual, SLLLinear
from stablenet.spectral import (
    layer_lipschitz_bounds,
    lipschitz_lower_bound,
    lipschitz_upper_bound,
    register_lipschitz_rule,
    spectral_norm_exact,
)
from stablenet.spectral import network as network_module


def jacobian_norm(net: nn.Module, x: torch.Tensor) -> float:
    """Largest singular value of the Jacobian of ``net`` at one input ``x`` (no batch dim), in float64."""
    x = x.double()
    jac = torch.func.jacrev(lambda v: net(v[None])[0])(x)
    return float(spectral_norm_exact(jac.detach().reshape(-1, x.numel())))


def linear_operator_norm(net: nn.Module, shape: tuple[int, ...]) -> float:
    """Exact norm of a linear (or affine) module: its Jacobian is the same everywhere."""
    return jacobian_norm(net.double(), torch.randn(shape, dtype=torch.float64))


@pytest.fixture
def private_rules(monkeypatch):
    """Rules registered in a test do not leak into the others."""
    monkeypatch.setattr(network_module, "_RULES", dict(network_module._RULES))


# --------------------------------------------------------------------------------------- composition
def test_sequential_of_linear_bounds_jacobian():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    bound = lipschitz_upper_bound(net)
    product = 1.0
    for m in net:
        if isinstance(m, nn.Linear):
            product *= float(spectral_norm_exact(m.weight.detach()))
    assert bound >= product
    for _ in range(20):
        assert jacobian_norm(net, torch.randn(6, dtype=torch.float64)) <= bound


def test_stablenet_layers_use_their_own_bound():
    net = nn.Sequential(nn.Flatten(), SLLLinear(8), GroupSort(2), LinearNormalized(8, 3))
    names = [name for name, _ in layer_lipschitz_bounds(net)]
    assert names == ["0", "1", "2", "3"]
    assert lipschitz_upper_bound(net) >= float(spectral_norm_exact(net[3].normalized_weight().detach().double()))


def test_reused_module_counts_every_time():
    torch.manual_seed(0)
    lin = nn.Linear(5, 5, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(3 * torch.eye(5, dtype=torch.float64) + 0.1 * torch.randn(5, 5, dtype=torch.float64))
    net = nn.Sequential(lin, nn.ReLU(), lin)  # named_children() would list lin once
    assert [name for name, _ in layer_lipschitz_bounds(net)] == ["0", "1", "2"]
    x = torch.rand(5, dtype=torch.float64) + 1  # positive region: the Jacobian is W @ W
    assert lipschitz_upper_bound(net) >= jacobian_norm(net, x) > 8


def test_product_rounds_up_over_many_layers(private_rules):
    class Scale(nn.Module):
        def __init__(self, factor):
            super().__init__()
            self.factor = factor

        def forward(self, x):
            return self.factor * x

    register_lipschitz_rule(Scale, lambda module: module.factor)
    g = torch.Generator().manual_seed(0)
    factors = [float(f) for f in torch.rand(300, generator=g, dtype=torch.float64) * 1.5 + 0.5]
    bound = lipschitz_upper_bound(nn.Sequential(*(Scale(f) for f in factors)))
    assert Fraction(bound) >= math.prod(Fraction(f) for f in factors)
    assert bound <= math.prod(factors) * (1 + 1e-12)


def test_unknown_module_raises_never_skips():
    net = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.ReLU(), nn.Softmax(dim=1)))
    with pytest.raises(TypeError, match=r"cannot bound the Lipschitz constant of module '1\.1' of type Softmax"):
        lipschitz_upper_bound(net)
    with pytest.raises(TypeError, match=r"supported: nn.Sequential, .*Conv2d"):
        lipschitz_upper_bound(nn.ConvTranspose1d(1, 1, 3), input_shape=(1, 5))


def test_module_list_is_not_callable():
    with pytest.raises(TypeError, match="module '0' of type ModuleList: a container without forward"):
        lipschitz_upper_bound(nn.Sequential(nn.ModuleList([nn.ReLU()])))


def test_subclass_overriding_forward_is_not_bounded_by_the_base_rule():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Reversed(nn.Sequential):
        def forward(self, x):
            for m in reversed(self):
                x = m(x)
            return x

    with pytest.raises(TypeError, match="overrides the forward of Linear"):
        lipschitz_upper_bound(nn.Sequential(Doubled(3, 3)))
    with pytest.raises(TypeError, match="overrides the forward of Sequential"):
        lipschitz_upper_bound(Reversed(nn.ReLU()))
    # a subclass that keeps forward (ReLU6 is a Hardtanh) is covered
    assert lipschitz_upper_bound(nn.ReLU6()) == math.nextafter(1.0, 2.0)


def test_rules_with_one_or_two_arguments(private_rules):
    class Probe(nn.Module):
        def forward(self, x):
            return x

    seen = []

    def rule(module, input_shape):
        seen.append(input_shape)
        return 1.0

    register_lipschitz_rule(Probe, rule)
    net = nn.Sequential(nn.Flatten(), Probe())
    lipschitz_upper_bound(net, input_shape=(2, 3, 4))
    lipschitz_upper_bound(net)
    assert seen == [(24,), None]
    register_lipschitz_rule(Probe, lambda module: 2.0)
    assert layer_lipschitz_bounds(net, (2, 3))[1] == ("1", 2.0)
    with pytest.raises(TypeError, match=r"module_type must be an nn.Module subclass"):
        register_lipschitz_rule(int, lambda m: 1.0)


def test_lipschitz_bound_method_receives_input_shape_and_must_be_finite():
    class Shaped(nn.Module):
        def forward(self, x):
            return x

        def lipschitz_bound(self, input_shape=None):
            return float(math.prod(input_shape)) if input_shape else 1.0

    class Broken(nn.Module):
        def forward(self, x):
            return x

        def lipschitz_bound(self):
            return float("nan")

    assert layer_lipschitz_bounds(nn.Sequential(nn.Flatten(), Shaped()), (2, 3))[1] == ("1", 6.0)
    with pytest.raises(ValueError, match="module '0' returned Lipschitz bound nan"):
        lipschitz_upper_bound(nn.Sequential(Broken()))


@pytest.mark.parametrize("bad", [(), (3, 0), (3, -1), (2.5, 4), "abc", 5])
def test_bad_input_shape(bad):
    with pytest.raises(ValueError, match="input_shape must be the shape of one input"):
        lipschitz_upper_bound(nn.ReLU(), input_shape=bad)


# -------------------------------------------------------------------------------------- convolutions
def test_convolution_needs_input_shape():
    net = nn.Sequential(nn.Linear(3, 3), nn.Conv1d(1, 1, 3))
    with pytest.raises(ValueError, match=r"module '1' of type Conv1d: .*pass input_shape"):
        lipschitz_upper_bound(net)


@pytest.mark.parametrize(
    "conv,shape",
    [
        (nn.Conv2d(2, 3, 3, padding=1), (2, 6, 5)),
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (2, 6, 5)),
        (nn.Conv2d(2, 4, 3, stride=2, padding="valid"), (2, 7, 6)),
        (nn.Conv2d(4, 4, (3, 2), padding="same", dilation=(1, 2), groups=2), (4, 5, 6)),
        (nn.Conv2d(2, 2, 3, stride=2, padding=1, padding_mode="circular"), (2, 6, 6)),
        (nn.Conv2d(2, 2, (2, 4), padding="same"), (2, 5, 6)),  # even kernel: asymmetric padding
        (nn.Conv1d(2, 3, 5, padding=2), (2, 9)),
        (nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"), (2, 8)),
    ],
)
def test_convolution_bound_vs_exact(conv, shape):
    torch.manual_seed(0)
    net = nn.Sequential(conv.double())
    bound = lipschitz_upper_bound(net, input_shape=shape)
    exact = linear_operator_norm(net, shape)
    assert exact <= bound <= 2 * exact  # sound, and not absurdly loose


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
def test_reflect_and_replicate_padding_are_refused(mode):
    with pytest.raises(TypeError, match=r"padding_mode must be one of 'circular', 'zeros'; got '" + mode):
        lipschitz_upper_bound(nn.Conv2d(1, 1, 3, padding=1, padding_mode=mode), input_shape=(1, 5, 5))


# -------------------------------------------------------------------------------------- batch norm
@pytest.mark.parametrize(
    "bn,shape",
    [
        (nn.BatchNorm2d(3), (3, 4, 2)),
        (nn.BatchNorm2d(3, affine=False), (3, 2, 2)),
        (nn.BatchNorm1d(4), (4,)),
        (nn.BatchNorm1d(4), (4, 3)),
    ],
)
def test_batch_norm_eval_is_exact(bn, shape):
    torch.manual_seed(0)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.01, 3.0)
        if bn.affine:
            bn.weight.normal_(0, 2)  # negative scales too
    bn = bn.double().eval()
    exact = linear_operator_norm(bn, shape)
    for input_shape in (None, shape):
        bound = lipschitz_upper_bound(bn, input_shape)
        assert exact <= bound <= exact * (1 + 1e-9)


def test_batch_norm_in_training_mode_raises_and_changes_nothing():
    bn = nn.BatchNorm1d(3).train()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    for input_shape in (None, (3,), (3, 5)):
        with pytest.raises(TypeError, match="BatchNorm is supported only in eval mode"):
            lipschitz_upper_bound(nn.Sequential(nn.Identity(), bn), input_shape)
    after = bn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    bn_no_stats = nn.BatchNorm2d(3, track_running_stats=False).eval()
    with pytest.raises(TypeError, match="with running statistics"):
        lipschitz_upper_bound(bn_no_stats)


# ---------------------------------------------------------------------------------------- pooling
AVG_POOLS = [
    nn.AvgPool2d(2),
    nn.AvgPool2d((2, 3)),
    nn.AvgPool2d(3, stride=1, padding=1),
    nn.AvgPool2d(3, stride=2, padding=1),
    nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
    nn.AvgPool2d(2, ceil_mode=True),
    nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
    nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True),
    nn.AvgPool2d((3, 2), stride=(1, 2), divisor_override=2),
    nn.AvgPool2d(3, stride=2, ceil_mode=True, divisor_override=5),
    nn.AvgPool1d(3, stride=2, padding=1),
    nn.AvgPool1d(4, stride=3, ceil_mode=True, count_include_pad=False),
]


@pytest.mark.parametrize("pool", AVG_POOLS)
@pytest.mark.parametrize("size", [(7, 6), (8, 9)])
def test_avg_pool_bound_vs_exact(pool, size):
    shape = (2, *size) if isinstance(pool, nn.AvgPool2d) else (2, size[0])
    exact = linear_operator_norm(pool, shape)
    with_shape = lipschitz_upper_bound(pool, input_shape=shape)
    assert exact <= with_shape <= 1.02 * exact
    assert lipschitz_upper_bound(pool) >= exact  # the closed form, valid for every input size


@pytest.mark.parametrize(
    "pool,shape,expected",
    [
        (nn.AvgPool2d(2), (1, 8, 6), 0.5),
        (nn.AvgPool2d(3), (2, 9, 6), 1 / 3),
        (nn.AvgPool2d((2, 3)), (1, 4, 6), 1 / math.sqrt(6)),
        (nn.AvgPool1d(4), (2, 12), 0.5),
        (nn.AdaptiveAvgPool2d((4, 3)), (1, 8, 6), 0.5),
        (nn.AdaptiveAvgPool2d(1), (3, 4, 4), 0.25),
        (nn.AdaptiveAvgPool1d(3), (2, 12), 0.5),
    ],
)
def test_non_overlapping_average_pooling_is_exact(pool, shape, expected):
    assert linear_operator_norm(pool, shape) == pytest.approx(expected, rel=1e-12)
    assert expected <= lipschitz_upper_bound(pool, input_shape=shape) <= expected * (1 + 1e-9)
    if not isinstance(pool, nn.AdaptiveAvgPool1d | nn.AdaptiveAvgPool2d):
        assert expected <= lipschitz_upper_bound(pool) <= expected * (1 + 1e-9)


@pytest.mark.parametrize(
    "pool,shape",
    [
        (nn.AdaptiveAvgPool2d((3, 2)), (2, 7, 5)),
        (nn.AdaptiveAvgPool2d((None, 4)), (1, 5, 7)),
        (nn.AdaptiveAvgPool2d((6, 5)), (1, 4, 3)),  # upsampling
        (nn.AdaptiveAvgPool1d(4), (2, 11)),
    ],
)
def test_adaptive_avg_pool_bound_vs_exact(pool, shape):
    exact = linear_operator_norm(pool, shape)
    assert exact <= lipschitz_upper_bound(pool, input_shape=shape) <= 1.02 * exact
    with pytest.raises(ValueError, match=r"AdaptiveAvgPool.d needs the input size: pass input_shape"):
        lipschitz_upper_bound(pool)


def spike_inputs(shape, g):
    """Negative random backgrounds with one large entry at each position: the max hits its most windows."""
    for flat in range(math.prod(shape)):
        x = -torch.rand(shape, generator=g, dtype=torch.float64)
        x.view(-1)[flat] = 10.0
        yield x


MAX_POOLS = [
    (nn.MaxPool2d(2), (1, 6, 6)),
    (nn.MaxPool2d(3, stride=1, padding=1), (1, 7, 7)),
    (nn.MaxPool2d(3, stride=2, padding=1), (1, 8, 7)),
    (nn.MaxPool2d((3, 2), stride=(2, 1), ceil_mode=True), (1, 8, 7)),
    (nn.MaxPool2d(3, stride=2, dilation=2, padding=1), (1, 11, 11)),
    (nn.MaxPool2d(2, stride=2, dilation=3), (1, 10, 10)),
    (nn.MaxPool1d(4, stride=1, padding=2), (2, 12)),
    (nn.MaxPool1d(5, stride=2, dilation=2), (1, 20)),
    (nn.AdaptiveMaxPool2d((4, 3)), (1, 9, 7)),
    (nn.AdaptiveMaxPool1d(4), (1, 7)),
]


@pytest.mark.parametrize("pool,shape", MAX_POOLS)
def test_max_pool_bound_is_the_largest_jacobian_norm(pool, shape):
    g = torch.Generator().manual_seed(0)
    bound = lipschitz_upper_bound(pool, input_shape=shape)
    worst = max(jacobian_norm(pool, x) for x in spike_inputs(shape, g))
    assert worst <= bound <= worst * (1 + 1e-12)  # tight: some input is the max of that many windows
    for _ in range(10):
        assert jacobian_norm(pool, torch.randn(shape, generator=g, dtype=torch.float64)) <= bound


def test_max_pool_special_cases():
    assert lipschitz_upper_bound(nn.MaxPool2d(2)) == math.nextafter(1.0, 2.0)  # stride >= kernel: 1
    assert lipschitz_upper_bound(nn.MaxPool2d(3, stride=1)) >= 3.0  # 9 windows per input
    with pytest.raises(TypeError, match="return_indices=False is supported"):
        lipschitz_upper_bound(nn.MaxPool2d(2, return_indices=True))
    with pytest.raises(ValueError, match="AdaptiveMaxPool2d needs the input size"):
        lipschitz_upper_bound(nn.AdaptiveMaxPool2d(2))


# ------------------------------------------------------------------------------------- activations
def max_abs_derivative(act: nn.Module) -> float:
    x = torch.linspace(-12, 12, 480_001, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(act(x).sum(), x)
    return float(grad.abs().max())


@pytest.mark.parametrize(
    "act,expected",
    [
        (nn.ReLU(), 1.0),
        (nn.LeakyReLU(0.1), 1.0),
        (nn.LeakyReLU(-3.0), 3.0),
        (nn.ELU(2.5), 2.5),
        (nn.ELU(0.5), 1.0),
        (nn.Tanh(), 1.0),
        (nn.Sigmoid(), 0.25),
        (nn.Hardtanh(-2, 3), 1.0),
        (nn.GELU(), 1.13),
        (nn.GELU(approximate="tanh"), 1.13),
        (nn.SiLU(), 1.1),
    ],
    ids=repr,
)
def test_activation_constants(act, expected):
    bound = layer_lipschitz_bounds(act)[0][1]
    assert bound == expected
    true_max = max_abs_derivative(act)
    assert true_max <= bound
    if isinstance(act, nn.GELU | nn.SiLU):
        assert bound - true_max < 2e-3  # a constant slightly above the true maximum
    else:
        assert true_max == pytest.approx(bound, rel=1e-6)


def test_dropout_and_reshapes():
    net = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Unflatten(1, (2, 3)), nn.Identity(), nn.Dropout2d())
    with pytest.raises(TypeError, match="module '1' of type Dropout: dropout is supported only in eval mode"):
        lipschitz_upper_bound(net)
    assert [b for _, b in layer_lipschitz_bounds(net.eval())] == [1.0] * 5


# --------------------------------------------------------------------------------------- residual
def test_residual_bound_is_one_plus_branch():
    torch.manual_seed(0)
    branch = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 5))
    block = Residual(branch).double()
    net = nn.Sequential(nn.Linear(5, 5), block).double()
    inner = lipschitz_upper_bound(branch)
    _, (name, bound) = layer_lipschitz_bounds(net)
    assert name == "1" and bound >= 1 + inner and bound == pytest.approx(1 + inner, rel=1e-15)
    for _ in range(20):
        x = torch.randn(5, dtype=torch.float64) * 2
        assert jacobian_norm(block, x) <= bound
        assert jacobian_norm(net, x) <= lipschitz_upper_bound(net)


def test_residual_with_convolutions_uses_recorded_shapes():
    torch.manual_seed(0)
    block = Residual(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1)))
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), block, nn.AvgPool2d(2)).double()
    shape = (1, 6, 6)
    bound = lipschitz_upper_bound(net, input_shape=shape)
    for _ in range(10):
        assert jacobian_norm(net, torch.randn(shape, dtype=torch.float64)) <= bound
    with pytest.raises(ValueError, match=r"module '1\.branch\.0' of type Conv2d: .*pass input_shape"):
        lipschitz_upper_bound(nn.Sequential(nn.ReLU(), block))


def test_residual_errors():
    with pytest.raises(TypeError, match=r"module '0\.branch\.1' of type Softmax"):
        lipschitz_upper_bound(nn.Sequential(Residual(nn.Sequential(nn.ReLU(), nn.Softmax(-1)))))
    with pytest.raises(ValueError, match="Residual needs a branch that keeps the input shape"):
        Residual(nn.Linear(4, 1))(torch.randn(2, 4))  # broadcasting would break the 1 + L(h) bound


# -------------------------------------------------------------------------------------- whole nets
def test_convolutional_network_brackets_the_truth():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(-1.5, 1.5)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        bn,
        nn.GELU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(16, 3),
    ).double()
    net.eval()
    shape = (1, 8, 8)
    upper = lipschitz_upper_bound(net, input_shape=shape)
    inputs = torch.randn(6, *shape, dtype=torch.float64)
    lower = lipschitz_lower_bound(net, inputs, generator=torch.Generator().manual_seed(0))
    worst = max(jacobian_norm(net, x) for x in inputs)
    assert worst <= upper
    assert 0.9 * worst <= lower <= upper


# ------------------------------------------------------------------------------------- lower bound
@pytest.mark.parametrize("shape", [(4, 6), (6, 4), (1, 5)])
def test_lower_bound_of_linear_model_is_exact(shape):
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0]).double()
    exact = float(spectral_norm_exact(lin.weight.detach()))
    lower = lipschitz_lower_bound(lin, torch.randn(3, shape[1], dtype=torch.float64))
    assert lower == pytest.approx(exact, rel=1e-6)
    assert lower <= lipschitz_upper_bound(lin)


@pytest.mark.parametrize("seed", range(4))
def test_lower_bound_of_random_mlp_brackets(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    inputs = torch.randn(8, 5, dtype=torch.float64)
    lower = lipschitz_lower_bound(net, inputs, generator=torch.Generator().manual_seed(seed))
    worst = max(jacobian_norm(net, x) for x in inputs)
    assert 0.9 * worst <= lower <= lipschitz_upper_bound(net)
    assert all(p.grad is None for p in net.parameters())  # parameters are left alone


def test_lower_bound_is_reproducible_and_checks_its_input():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(5, 4)
    runs = [lipschitz_lower_bound(net, x, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match="inputs must be a non-empty batch"):
        lipschitz_lower_bound(net, torch.empty(0, 4))
    with pytest.raises(ValueError, match="n_iter and restarts must be >= 1"):
        lipschitz_lower_bound(net, x, n_iter=0)


def test_lower_bound_of_stablenet_mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), SLLLinear(12), GroupSort(2), SLLLinear(12)).eval()
    lower = lipschitz_lower_bound(net, torch.randn(4, 3, 4))
    assert 0.1 < lower <= lipschitz_upper_bound(net, input_shape=(3, 4))


def test_conv_with_zero_padding_tuple_is_bounded():
    net = nn.Sequential(nn.Conv2d(2, 3, 1, padding=0), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=(1, 0))).double()
    bound = lipschitz_upper_bound(net, input_shape=(2, 6, 6))
    x = torch.randn(2, 6, 6, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: net(v[None])[0], x)
    assert spectral_norm_exact(jac.reshape(-1, x.numel())) <= bound


def test_convolutions_are_bounded_in_one_call_with_the_same_values(monkeypatch):
    import stablenet.spectral.network as network
    from stablenet.spectral.conv import conv_spectral_norm_upper_bound

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1, stride=2),
        nn.Flatten(),
    )
    calls = []
    real = network.conv_spectral_norm_upper_bounds

    def counting(problems, **kwargs):
        calls.append(len(problems))
        return real(problems, **kwargs)

    monkeypatch.setattr(network, "conv_spectral_norm_upper_bounds", counting)
    bounds = dict(layer_lipschitz_bounds(net, (3, 10, 10)))
    assert calls == [3]  # one call for the whole network, none during the walk
    expected = {
        "0": conv_spectral_norm_upper_bound(net[0].weight, 10),
        "2": conv_spectral_norm_upper_bound(net[2].weight, 10, padding="circular"),
        "4": conv_spectral_norm_upper_bound(net[4].weight, 10, padding_size=0, stride=2),
    }
    for name, value in expected.items():
        assert bounds[name] == value


def test_unbounded_modules_lists_every_module_the_walker_cannot_bound():
    from stablenet.spectral import unbounded_modules

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)

        def forward(self, x):
            return x + self.bn(self.conv(x))

    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), Block(), nn.Sequential(Block(), nn.LayerNorm([2, 4, 4])))
    assert unbounded_modules(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU()), (1, 4, 4)) == []
    found = unbounded_modules(net.eval(), (1, 4, 4))
    assert [(m["name"], m["type"], m["reason"]) for m in found] == [
        ("1", "Block", "no rule for this type"),
        ("2.0", "Block", "no rule for this type"),
        ("2.1", "LayerNorm", "no rule for this type"),
    ]
    in_training = unbounded_modules(net.train(), (1, 4, 4))  # a BatchNorm in training mode has no fixed map
    assert ("1.bn", "BatchNorm2d") in [(m["name"], m["type"]) for m in in_training]
    with pytest.raises(TypeError):  # the walker itself stops at the first of them
        lipschitz_upper_bound(net.eval(), (1, 4, 4))
