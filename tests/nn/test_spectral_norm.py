"""Spectral normalisation by upper bounds: SpectralLinear, SpectralConv2d and the lipschitz_spectral parametrization."""

import copy
import math

import pytest
import torch
from constraint_cases import DENSE_SHAPES
from lipschitz_checks import check_layer
from torch import nn

from stablenet.nn.base import LAYER_ROUNDING_SLACK
from stablenet.nn.constrained import ConvGeometry
from stablenet.nn.spectral_norm import (
    ConvSpectralConstraint,
    DenseSpectralConstraint,
    SpectralConv2d,
    SpectralLinear,
    lipschitz_spectral,
    remove_lipschitz_spectral,
)
from stablenet.spectral import conv_operator_matrix
from stablenet.spectral.dense import operator_matrix


@pytest.mark.parametrize("in_features,out_features", DENSE_SHAPES)
def test_spectral_linear_protocol(in_features, out_features):
    measured = check_layer(lambda: SpectralLinear(in_features, out_features), (in_features,))
    assert measured["train"] > 0.999  # normalised to norm 1, not merely below it


# (c_in, c_out, kernel, padding, padding_mode, input shape, extra conv args, give input_size)
CONV_CASES = [
    (1, 1, 1, 0, "zeros", (1, 5, 5), {}, False),
    (2, 3, 3, 1, "zeros", (2, 5, 5), {}, True),
    (3, 2, 3, "same", "zeros", (3, 4, 6), {}, False),
    (3, 2, 5, 2, "zeros", (3, 5, 5), {}, True),
    (2, 3, 3, 0, "zeros", (2, 4, 6), {}, True),
    (2, 3, 3, 1, "zeros", (2, 1, 7), {}, True),  # input smaller than the kernel: size-independent bound
    (1, 1, 3, 1, "circular", (1, 5, 5), {}, True),
    (2, 3, 5, "same", "circular", (2, 4, 6), {}, True),
    (3, 2, 3, 1, "circular", (3, 1, 7), {}, False),
    (3, 2, 3, 0, "circular", (3, 5, 5), {}, False),
    (2, 3, 3, 1, "zeros", (2, 5, 5), {"stride": 2}, True),
    (4, 2, 3, 1, "circular", (4, 5, 5), {"groups": 2}, True),
    (2, 2, 3, 2, "zeros", (2, 5, 5), {"dilation": 2}, True),
]


@pytest.mark.parametrize("c_in,c_out,k,padding,mode,shape,extra,sized", CONV_CASES)
def test_spectral_conv_protocol(c_in, c_out, k, padding, mode, shape, extra, sized):
    size = shape[1:] if sized else None

    def factory():
        return SpectralConv2d(c_in, c_out, k, padding=padding, padding_mode=mode, input_size=size, **extra)

    check_layer(factory, shape, n_points=2)


def _explicit_norm(conv: nn.Conv2d, shape) -> float:
    matrix = operator_matrix(lambda x: conv(x[None])[0], tuple(shape), dtype=torch.float64)
    return float(torch.linalg.matrix_norm(matrix.detach(), 2))


@pytest.mark.parametrize("c_in,c_out,k,padding,mode,shape,extra,sized", CONV_CASES)
def test_conv_bound_is_above_the_exact_norm(c_in, c_out, k, padding, mode, shape, extra, sized):
    torch.manual_seed(3)
    conv = nn.Conv2d(c_in, c_out, k, padding=padding, padding_mode=mode, bias=False, **extra).double()
    constraint = ConvSpectralConstraint(ConvGeometry.of(conv, shape[1:] if sized else None))
    exact = _explicit_norm(conv, shape)
    assert float(constraint.bound(conv.weight.detach())) >= exact
    with torch.no_grad():
        conv.weight.copy_(constraint(conv.weight))
    assert _explicit_norm(conv, shape) <= 1 + 1e-12


def test_size_specific_bounds_are_tight():
    torch.manual_seed(0)
    kernel = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    for mode in ("zeros", "circular"):
        conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode, bias=False).double()
        with torch.no_grad():
            conv.weight.copy_(kernel)
        exact = float(torch.linalg.matrix_norm(conv_operator_matrix(kernel, 12, padding=mode, padding_size=1), 2))
        sized = float(ConvSpectralConstraint(ConvGeometry.of(conv, 12)).bound(kernel))
        free = float(ConvSpectralConstraint(ConvGeometry.of(conv)).bound(kernel))
        assert exact <= sized <= free
        if mode == "circular":  # the circular Gram bound at the size is exact up to the Gram gap
            assert sized <= exact * (1 + 1e-4)


def test_circular_padding_wider_than_same_is_rejected():
    """A 1x1 kernel with circular padding 1 duplicates border rows (norm 2 for the identity): not bounded here."""
    conv = nn.Conv2d(1, 1, 1, padding=1, padding_mode="circular", bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(1.0)
    assert _explicit_norm(conv, (1, 4, 4)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="wraps"):
        SpectralConv2d(1, 1, 1, padding=1, padding_mode="circular")
    with pytest.raises(ValueError, match="wraps"):
        lipschitz_spectral(conv)


def test_dense_bound_against_svd():
    torch.manual_seed(0)
    matrices = [torch.randn(7, 4, dtype=torch.float64), torch.randn(3, 11, dtype=torch.float64)]
    matrices.append(torch.randn(8, 1, dtype=torch.float64) @ torch.randn(1, 6, dtype=torch.float64))  # rank one
    matrices.append(torch.diag(torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64)))  # repeated top value
    for n_iter in (None, 2, 8):
        constraint = DenseSpectralConstraint(n_iter)
        for w in matrices:
            exact = float(torch.linalg.matrix_norm(w, 2))
            bound = float(constraint.bound(w))
            assert bound >= exact
            assert float(torch.linalg.matrix_norm(constraint(w), 2)) <= 1 + 1e-12
            if n_iter is None:
                assert bound <= exact * (1 + 1e-3)


def test_float32_normalisation_stays_below_one():
    """Note [bound precision]: the float64 bound keeps float32 weights at norm <= 1 up to division rounding."""
    torch.manual_seed(0)
    rank_one = torch.randn(512, 1) @ torch.randn(1, 512)
    for w in (rank_one, torch.randn(300, 200), torch.linalg.qr(torch.randn(64, 64))[0]):
        normalised = DenseSpectralConstraint()(w)
        assert normalised.dtype == torch.float32
        assert float(torch.linalg.matrix_norm(normalised.double(), 2)) <= 1 + 1e-6


def test_eval_equals_train_in_float32_with_adaptive_stopping():
    torch.manual_seed(0)
    # The guaranteed bound in training too (the training estimate is a different map by design).
    layer = SpectralLinear(30, 20, train_estimate=False)
    conv = SpectralConv2d(3, 4, 3, padding=1, padding_mode="circular", input_size=6, train_estimate=False)
    for module, x in ((layer, torch.randn(5, 30)), (conv, torch.randn(2, 3, 6, 6))):
        train_out = module.train()(x)
        module.eval()
        with torch.no_grad():
            assert torch.equal(module(x), train_out.detach())
            assert torch.equal(module(x), train_out.detach())  # cached


def test_gradient_flows_through_the_bound():
    torch.manual_seed(0)
    layer = SpectralLinear(4, 3).double()
    layer(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    # the normalised weight is scale-invariant, so the gradient is orthogonal to the weight
    assert abs(float((layer.weight.grad * layer.weight.detach()).sum())) < 1e-10


def test_zero_weight_gives_zero_not_nan():
    layer = SpectralLinear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
    assert torch.equal(layer(torch.ones(1, 3)), torch.zeros(1, 2))


@pytest.mark.parametrize("mode", ["zeros", "circular"])
def test_parametrization_register_and_remove(mode):
    torch.manual_seed(0)
    for module, x in (
        (nn.Linear(5, 4).double(), torch.randn(2, 5, dtype=torch.float64)),
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode).double(), torch.randn(2, 2, 5, 5, dtype=torch.float64)),
    ):
        raw = module.weight.detach().clone()
        size = 5 if isinstance(module, nn.Conv2d) else None
        lipschitz_spectral(module, input_size=size)
        expected = raw / module.parametrizations.weight[0].bound(raw)
        torch.testing.assert_close(module.weight, expected, rtol=1e-14, atol=0)
        out = module(x)
        remove_lipschitz_spectral(module)
        assert isinstance(module.weight, nn.Parameter)
        torch.testing.assert_close(module.weight, expected, rtol=1e-14, atol=0)
        torch.testing.assert_close(module(x), out)
        if isinstance(module, nn.Conv2d):  # the input-size hook went with the parametrization
            module(torch.randn(1, 2, 7, 7, dtype=torch.float64))
        with pytest.raises(ValueError, match="no spectral"):
            remove_lipschitz_spectral(module)


def test_parametrized_conv_rejects_inputs_the_bound_does_not_cover():
    circ = lipschitz_spectral(nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular"), input_size=(5, 5))
    with pytest.raises(ValueError, match="only"):
        circ(torch.randn(1, 1, 6, 6))
    zeros = lipschitz_spectral(nn.Conv2d(1, 1, 3, padding=1), input_size=(5, 5))
    zeros(torch.randn(1, 1, 4, 3))  # a smaller input is a submatrix: covered
    with pytest.raises(ValueError, match="up to"):
        zeros(torch.randn(1, 1, 6, 5))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="circular"):
        SpectralConv2d(1, 1, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="circular"):
        lipschitz_spectral(nn.Conv2d(1, 1, 3, padding_mode="reflect"))
    with pytest.raises(ValueError, match=r"nn\.Linear and nn\.Conv2d"):
        lipschitz_spectral(nn.Conv1d(1, 1, 3))
    with pytest.raises(ValueError, match="input_size"):
        lipschitz_spectral(nn.Linear(2, 2), input_size=4)
    with pytest.raises(ValueError, match="2 dimensions"):
        lipschitz_spectral(nn.Linear(2, 2), name="bias")
    with pytest.raises(ValueError, match="n_iter"):
        SpectralLinear(2, 2, n_iter=0)
    layer = SpectralConv2d(1, 1, 3, padding=1, padding_mode="circular", input_size=(5, 5))
    with pytest.raises(ValueError, match="only"):
        layer(torch.randn(1, 1, 4, 4))
    with pytest.raises(ValueError, match="only"):
        layer.lipschitz_bound((1, 6, 6))
    assert layer.eval().lipschitz_bound((1, 5, 5)) == 1 + LAYER_ROUNDING_SLACK
    assert layer.train().lipschitz_bound((1, 5, 5)) >= 1 + LAYER_ROUNDING_SLACK  # over the training estimate
    with pytest.raises(ValueError, match="needs input_shape"):
        layer.lipschitz_bound()
    with pytest.raises(ValueError, match="input_size must be an int, \\(h, w\\), None"):
        SpectralConv2d(1, 1, 3, input_size="lazy")


def test_bf16_autocast_keeps_constraint_math_in_float32():
    torch.manual_seed(0)
    for layer, x in (
        (SpectralLinear(16, 8), torch.randn(4, 16)),
        (SpectralConv2d(3, 4, 3, padding=1, input_size=6), torch.randn(2, 3, 6, 6)),
        (SpectralConv2d(3, 4, 3, padding=1), torch.randn(2, 3, 6, 6)),
    ):
        reference = layer.constrained_weight()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            weight = layer.constrained_weight()
            out = layer(x)
        assert weight.dtype == torch.float32
        torch.testing.assert_close(weight, reference, rtol=0, atol=0)
        assert torch.isfinite(out).all()
    bf16 = SpectralLinear(8, 8).to(torch.bfloat16)  # bf16 weights: the bound still runs in float32 or more
    assert float(torch.linalg.matrix_norm(bf16.constrained_weight().detach().double(), 2)) <= 1 + 1e-6


@pytest.mark.parametrize("mode", ["zeros", "circular"])
def test_bound_methods_agree_and_normalise_below_one(mode):
    """Note [circular bound method]: "cholesky" (the CPU default) and "gram" are both above the exact norm, within
    1e-4 of each other, and the normalised layer's exact norm is at most 1."""
    torch.manual_seed(6)
    kernel = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(kernel)
    exact = _explicit_norm(conv, (3, 7, 7))
    values = {}
    for method in ("auto", "cholesky", "gram"):
        layer = SpectralConv2d(3, 4, 3, padding=1, padding_mode=mode, input_size=7, method=method).double()
        with torch.no_grad():
            layer.weight.copy_(kernel)
        values[method] = float(layer.constraint.bound(kernel))
        assert values[method] >= exact
        with torch.no_grad():
            conv.weight.copy_(layer.constrained_weight())
        assert _explicit_norm(conv, (3, 7, 7)) <= 1 + 1e-12
    assert values["auto"] == values["cholesky"]
    assert values["gram"] <= values["cholesky"] <= values["gram"] * (1 + 2e-4)


def test_bound_method_bad_input():
    with pytest.raises(ValueError, match="method must be one of auto, cholesky, gram"):
        SpectralConv2d(2, 2, 3, padding=1, input_size=5, method="svd")
    with pytest.raises(ValueError, match="needs input_size and no n_iter"):
        SpectralConv2d(2, 2, 3, padding=1, input_size="any", method="cholesky")
    with pytest.raises(ValueError, match="needs input_size and no n_iter"):
        SpectralConv2d(2, 2, 3, padding=1, input_size=5, n_iter=3, method="cholesky")
    lazy = SpectralConv2d(2, 2, 3, padding=1, method="cholesky")  # the size comes with the first input
    lazy(torch.randn(1, 2, 5, 5))
    assert lazy.constraint.geometry.input_size == (5, 5)
    with pytest.raises(ValueError, match=r"method applies to nn\.Conv2d only"):
        lipschitz_spectral(nn.Linear(2, 3), method="gram")


# ------------------------------------------------------------------ Note [training estimate]
def _operator(layer: nn.Module, weight: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The explicit matrix of ``layer``'s linear part with weight ``weight`` on inputs of shape ``shape``."""
    n = math.prod(shape)
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    if isinstance(layer, nn.Linear):
        return eye @ weight.T
    return layer._conv_forward(eye, weight, None).reshape(n, -1).T


def _norm(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix, 2))


ESTIMATE_CASES = {
    "dense": (lambda: SpectralLinear(12, 9), (12,)),
    "conv-zeros-lazy": (lambda: SpectralConv2d(3, 4, 3, padding=1), (3, 6, 6)),
    "conv-zeros-sized": (lambda: SpectralConv2d(3, 4, 3, padding=1, input_size=6), (3, 6, 6)),
    "conv-circular-lazy": (lambda: SpectralConv2d(2, 3, 3, padding=1, padding_mode="circular"), (2, 5, 5)),
    "conv-strided-lazy": (lambda: SpectralConv2d(2, 4, 3, stride=2, padding=1), (2, 6, 6)),
}


@pytest.mark.parametrize("name", sorted(ESTIMATE_CASES))
def test_training_with_the_estimate_leaves_an_eval_layer_of_norm_at_most_one(name):
    factory, shape = ESTIMATE_CASES[name]
    torch.manual_seed(0)
    layer = factory().double().train()
    # hostile magnitudes: a large weight, then Adam steps that grow it further
    with torch.no_grad():
        layer.weight.mul_(40.0)
    optimiser = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(15):
        loss = layer(torch.randn(4, *shape, dtype=torch.float64)).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    exact_train = _norm(_operator(layer, layer.weight.detach(), shape))  # of the free weight
    with torch.no_grad():
        w_est, sigma = layer._estimated(shape, update=False) if name != "dense" else layer._estimated(update=False)
    # the estimate is a lower estimate of the true norm, close to it after a few steps
    assert float(sigma) <= exact_train * (1 + 1e-9)
    assert float(sigma) >= exact_train * (1 - 1e-2)
    # the training-mode bound covers the training-mode map exactly
    train_norm = _norm(_operator(layer, w_est, shape))
    bound = layer.lipschitz_bound(shape) if name != "dense" else layer.lipschitz_bound()
    assert train_norm <= bound
    # eval mode: the guaranteed bound, exact norm <= 1 + 1e-5 (float64 operator and SVD), also after export
    layer.eval()
    with torch.no_grad():
        w_eval = layer._cache.get(layer, [layer.weight], layer.constrained_weight)
        assert _norm(_operator(layer, w_eval, shape)) <= 1 + 1e-5
        x = torch.randn(3, *shape, dtype=torch.float64)
        torch.testing.assert_close(layer(x), layer.export()(x), rtol=1e-12, atol=1e-12)
    assert _norm(_operator(layer, layer.export().weight.detach(), shape)) <= 1 + 1e-5
    assert (layer.lipschitz_bound(shape) if name != "dense" else layer.lipschitz_bound()) == 1 + LAYER_ROUNDING_SLACK


def test_a_no_grad_training_forward_does_not_move_the_estimate():
    layer = SpectralLinear(6, 5).double()
    x = torch.randn(2, 6, dtype=torch.float64)
    layer(x)  # starts the iteration
    u = layer.estimate.u.clone()
    with torch.no_grad():
        first = layer(x)
        second = layer(x)
    assert torch.equal(layer.estimate.u, u) and torch.equal(first, second)
    layer(x)  # a forward with gradients takes one step
    assert not torch.equal(layer.estimate.u, u)


def test_the_estimate_is_saved_and_a_resumed_run_is_bit_identical():
    def run(steps: int, layer: nn.Module) -> nn.Module:
        optimiser = torch.optim.SGD(layer.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(steps)
        for _ in range(steps):
            optimiser.zero_grad()
            layer(torch.randn(2, 2, 5, 5, dtype=torch.float64, generator=gen)).square().sum().backward()
            optimiser.step()
        return layer

    torch.manual_seed(0)
    make = lambda: SpectralConv2d(2, 3, 3, padding=1).double()  # noqa: E731
    start = make()
    state = run(3, copy.deepcopy(start)).state_dict()
    assert any(k.endswith("estimate.u") for k in state)
    resumed = make()
    resumed.load_state_dict(state)
    straight = copy.deepcopy(start)
    straight.load_state_dict(state)
    for a, b in zip(run(2, resumed).parameters(), run(2, straight).parameters(), strict=True):
        assert torch.equal(a, b)
    # a checkpoint without the estimate (made before it existed, or before any training forward) loads too
    old = {k: v for k, v in state.items() if not k.endswith("estimate.u")}
    fresh = make()
    fresh.load_state_dict(old)
    assert fresh.estimate.u is None
    run(1, fresh)  # and starts a fresh iteration
    assert fresh.estimate.u is not None


def test_a_lazy_conv_takes_the_size_of_its_first_input():
    zeros = SpectralConv2d(2, 2, 3, padding=1)
    assert zeros.constraint.geometry.input_size is None
    zeros(torch.randn(1, 2, 7, 5))
    assert zeros.constraint.geometry.input_size == (7, 5)
    zeros(torch.randn(1, 2, 4, 4))  # smaller inputs: the zero-padding bound covers them
    with pytest.raises(ValueError, match="up to size"):
        zeros(torch.randn(1, 2, 8, 5))
    circular = SpectralConv2d(2, 2, 3, padding=1, padding_mode="circular").eval()
    assert circular.lipschitz_bound((2, 6, 6)) == 1 + LAYER_ROUNDING_SLACK  # a bound request sets it too
    with pytest.raises(ValueError, match="only"):
        circular(torch.randn(1, 2, 5, 5))
    anywhere = SpectralConv2d(2, 2, 3, padding=1, input_size="any")
    for size in (4, 9):
        anywhere(torch.randn(1, 2, size, size))
    assert anywhere.constraint.geometry.input_size is None


def test_the_estimate_trains_under_torch_compile():
    torch.manual_seed(0)
    layer = SpectralConv2d(3, 4, 3, padding=1)
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(2, 3, 6, 6)
    loss = compiled(x).square().sum()
    loss.backward()
    assert torch.isfinite(layer.weight.grad).all()
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_certificates_of_a_model_trained_with_the_estimate_hold_in_either_mode(mode):
    """A hostile use: certify an affine spectral network in training mode (where it divides by the estimate, so its
    layers may exceed norm 1) or in eval mode; for an affine classifier the exact robust radius is known."""
    from stablenet.certify.lipschitz import LipschitzCertifier

    torch.manual_seed(3)
    model = nn.Sequential(SpectralConv2d(1, 2, 3, padding=1), nn.Flatten(), SpectralLinear(2 * 5 * 5, 3)).double()
    with torch.no_grad():
        model[0].weight.mul_(25.0)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(5):
        optimiser.zero_grad()
        model(torch.rand(8, 1, 5, 5, dtype=torch.float64)).logsumexp(1).mean().backward()
        optimiser.step()
    model.train(mode == "train")
    certifier = LipschitzCertifier(model, "generic", (1, 5, 5))
    x = torch.rand(64, 1, 5, 5, dtype=torch.float64)
    prediction, radius = certifier(x)
    with torch.no_grad():  # the exact affine map of this mode (a no-grad forward does not move the estimate)
        basis = torch.cat([torch.zeros(1, 25, dtype=torch.float64), torch.eye(25, dtype=torch.float64)])
        values = model(basis.reshape(26, 1, 5, 5))
        a, b = (values[1:] - values[0]).T, values[0]
        logits = x.flatten(1) @ a.T + b
    assert float(torch.linalg.matrix_norm(a, 2)) <= certifier.lipschitz
    assert int((radius > 0).sum()) >= 32  # the check below has certificates to check
    for i in range(len(x)):
        y = int(logits[i].argmax())
        others = [j for j in range(3) if j != y]
        exact = min(float((logits[i, y] - logits[i, j]) / (a[y] - a[j]).norm()) for j in others)
        if int(prediction[i]) >= 0:
            assert int(prediction[i]) == y and float(radius[i]) <= exact
