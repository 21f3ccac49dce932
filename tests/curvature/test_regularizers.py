"""Curvature regularisers against independent computations: explicit Hessians, finite differences, SVDs (float64)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector

from stablenet.curvature.regularizers import (
    REGULARIZERS,
    ActivationDecay,
    FunctionRegularizer,
    GradientNorm,
    HessianTrace,
    InputCurvature,
    LipschitzPenalty,
    Regularizer,
    create_regularizer,
    penalty_terms,
    register_regularizer,
    regularizers_from_config,
    total_penalty,
)
from stablenet.spectral.conv import conv_spectral_norm

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread avoids the thread overhead that dominates each autograd call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def val(t):
    """A 0-dim tensor as a float, detached from its graph."""
    return t.detach().item()


def tiny_mlp(seed=0, d=4, width=5, k=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, k)).to(DT)


def batch(seed=1, b=3, d=4, k=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, dtype=DT, generator=g), torch.randint(0, k, (b,), generator=g)


def per_example_input_grad_fd(model, x, y, eps=1e-6):
    """Central finite differences of each example's own loss with respect to its input."""
    grad = torch.zeros_like(x)
    with torch.no_grad():
        for i in range(x.shape[0]):
            for j in range(x[i].numel()):
                e = torch.zeros_like(x[i]).view(-1)
                e[j] = eps
                e = e.view_as(x[i])
                plus = F.cross_entropy(model((x[i] + e)[None]), y[i : i + 1])
                minus = F.cross_entropy(model((x[i] - e)[None]), y[i : i + 1])
                grad[i].view(-1)[j] = (plus - minus) / (2 * eps)
    return grad


def flat_loss(model, x, y):
    """The batch loss as a function of the flattened parameter vector (for finite differences and Hessians)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def loss(flat):
        chunks = torch.split(flat, [math.prod(s) for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    return loss, parameters_to_vector(model.parameters()).detach().clone()


# ----------------------------------------------------------------------------------------- activation decay
@pytest.mark.parametrize(("k", "d", "scale", "seed"), [(2, 1, 1.0, 0), (3, 4, 0.1, 1), (5, 3, 3.0, 2), (10, 7, 1.0, 3)])
def test_cross_entropy_hessian_trace_in_last_layer_weight(k, d, scale, seed):
    """tr of the explicit Hessian of CE in W equals ||h||^2 (1 - ||p||^2) and is <= ||h||^2."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(d, dtype=DT, generator=g) * 2
    w = torch.randn(k, d, dtype=DT, generator=g) * scale
    b = torch.randn(k, dtype=DT, generator=g)
    y = torch.randint(0, k, (1,), generator=g)

    hess = torch.autograd.functional.hessian(lambda w_: F.cross_entropy((w_ @ h + b)[None], y), w)
    trace = hess.reshape(k * d, k * d).trace()
    p = torch.softmax(w @ h + b, dim=0)
    assert trace == pytest.approx(val(h.pow(2).sum() * (1 - p.pow(2).sum())), rel=1e-10)
    assert trace <= h.pow(2).sum()
    assert trace <= h.pow(2).sum() * (1 - 1 / k) + 1e-12


def test_cross_entropy_trace_bound_is_tight_at_uniform_predictions():
    """With W = 0 and b = 0 the softmax is uniform: trace = ||h||^2 (1 - 1/K), so the ratio tends to 1."""
    k, d = 50, 3
    h = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    hess = torch.autograd.functional.hessian(
        lambda w: F.cross_entropy((w @ h)[None], torch.tensor([0])), torch.zeros(k, d, dtype=DT)
    )
    assert hess.reshape(k * d, k * d).trace() == pytest.approx(val(h.pow(2).sum()) * (1 - 1 / k), rel=1e-12)


def test_activation_decay_equals_mean_squared_penultimate_norm():
    model = tiny_mlp()
    x, y = batch(b=4)
    h = torch.tanh(model[0](x))
    expected = h.pow(2).sum(1).mean()
    reg = ActivationDecay(0.3)
    assert val(reg(model, x, y, model(x), F.cross_entropy)) == pytest.approx(val(expected), rel=1e-12)
    assert val(total_penalty([reg], model, x, y, model(x), F.cross_entropy)) == pytest.approx(0.3 * val(expected))
    # from features; explicit layer: the input of model[0] is x itself
    features = torch.full((4, 5), 2.0, dtype=DT)
    assert val(reg(model, x, y, None, F.cross_entropy, features=features)) == pytest.approx(20.0)
    first = ActivationDecay(1.0, layer="0")
    assert val(first(model, x, y, None, F.cross_entropy)) == pytest.approx(val(x.pow(2).sum(1).mean()), rel=1e-12)


def test_activation_decay_bounds_the_last_layer_hessian_trace_of_the_batch_loss():
    """lambda * mean ||h||^2 bounds (sigma^2/2) tr Hess_W L for the batch-mean CE (lambda = sigma^2/2)."""
    model = tiny_mlp(seed=4)
    x, y = batch(seed=5, b=6)
    h = torch.tanh(model[0](x)).detach()
    b = model[2].bias.detach()
    w0 = model[2].weight.detach()
    hess = torch.autograd.functional.hessian(lambda w: F.cross_entropy(h @ w.T + b, y), w0)
    trace = hess.reshape(w0.numel(), w0.numel()).trace()
    value = ActivationDecay(1.0)(model, x, y, model(x), F.cross_entropy)
    p = torch.softmax(h @ w0.T + b, dim=1)
    assert trace == pytest.approx(val((h.pow(2).sum(1) * (1 - p.pow(2).sum(1))).mean()), rel=1e-10)
    assert trace < val(value)


def test_activation_decay_attach_reuses_the_training_forward():
    model = tiny_mlp()
    x, y = batch()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    reg = ActivationDecay(1.0)
    handle = reg.attach(model)
    out = model(x)
    assert len(calls) == 1
    value = reg(model, x, y, out, F.cross_entropy)
    assert len(calls) == 1  # no second forward
    assert val(value) == pytest.approx(val(torch.tanh(model[0](x)).pow(2).sum(1).mean()), rel=1e-12)
    # the captured activations are used once; then the penalty re-runs the model
    reg(model, x, y, out, F.cross_entropy)
    assert len(calls) == 2
    reg.detach()
    assert handle.id not in model[2]._forward_pre_hooks
    model(x)
    assert reg._captured is None


# ----------------------------------------------------------------------------- input curvature, gradient norm
@pytest.mark.parametrize("h", [1.5, 0.3])
@pytest.mark.parametrize("b", [1, 3])
def test_input_curvature_against_finite_differences(h, b):
    model = tiny_mlp(seed=2)
    x, y = batch(seed=3, b=b)
    g0 = per_example_input_grad_fd(model, x, y)
    sign = torch.sign(g0)
    z = sign / sign.norm(dim=1, keepdim=True)
    g1 = per_example_input_grad_fd(model, x + h * z, y)
    expected = (g1 - g0).pow(2).sum(1).mean()
    value = InputCurvature(1.0, h=h)(model, x, y, model(x), F.cross_entropy)
    assert val(value) == pytest.approx(val(expected), rel=1e-6)
    assert val(value) > 0


@pytest.mark.parametrize("b", [1, 3])
def test_gradient_norm_inputs_against_finite_differences(b):
    model = tiny_mlp(seed=6)
    x, y = batch(seed=7, b=b)
    expected = per_example_input_grad_fd(model, x, y).pow(2).sum(1).mean()
    value = GradientNorm(1.0)(model, x, y, model(x), F.cross_entropy)
    assert val(value) == pytest.approx(val(expected), rel=1e-7)


@pytest.mark.parametrize("b", [1, 3])
def test_gradient_norm_params_against_finite_differences(b):
    model = tiny_mlp(seed=8)
    x, y = batch(seed=9, b=b)
    loss, flat = flat_loss(model, x, y)
    eps = 1e-6
    grad = torch.stack(
        [(loss(flat + eps * e) - loss(flat - eps * e)) / (2 * eps) for e in torch.eye(flat.numel(), dtype=DT)]
    ).detach()
    value = GradientNorm(1.0, wrt="params")(model, x, y, model(x), F.cross_entropy)
    assert val(value) == pytest.approx(val(grad.pow(2).sum()), rel=1e-7)


def test_input_penalties_reuse_a_forward_with_input_gradients():
    """With inputs.requires_grad set before the forward, no extra forward is run and the value is the same."""
    model = tiny_mlp()
    x, y = batch()
    rerun = GradientNorm(1.0)(model, x, y, model(x), F.cross_entropy)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    xr = x.clone().requires_grad_()
    out = model(xr)
    reused = GradientNorm(1.0)(model, xr, y, out, F.cross_entropy)
    assert len(calls) == 1
    assert val(reused) == pytest.approx(val(rerun), rel=1e-12)


def test_extra_forward_passes_leave_batch_norm_statistics_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(DT).train()
    x, y = batch(b=5)
    out = model(x)
    bn = model[1]
    mean, var, count = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    regs = [InputCurvature(1.0), GradientNorm(1.0), HessianTrace(1.0, wrt="inputs"), ActivationDecay(1.0)]
    total = F.cross_entropy(out, y) + total_penalty(regs, model, x, y, out, F.cross_entropy)
    total.backward()
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert int(bn.num_batches_tracked) == count
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model(x)  # the training forward itself still updates them
    assert not torch.equal(bn.running_mean, mean)


# ------------------------------------------------------------------------------------------- Hessian trace
def _hutchinson_matches(reg, model, x, y, exact, n=2000, seed=1234):
    torch.manual_seed(seed)
    values = torch.stack([reg(model, x, y, model(x), F.cross_entropy).detach() for _ in range(n)])
    se = val(values.std() / math.sqrt(n))
    assert se > 0  # a random estimate, not the exact trace
    assert se < 0.1 * abs(exact)  # the test can tell a wrong scale from the truth
    assert abs(val(values.mean()) - exact) <= 3 * se


def test_hessian_trace_params_is_unbiased_against_the_explicit_hessian():
    model = tiny_mlp(seed=10)
    x, y = batch(seed=11, b=4)
    loss, flat = flat_loss(model, x, y)
    exact = val(torch.autograd.functional.hessian(loss, flat).trace())
    _hutchinson_matches(HessianTrace(1.0), model, x, y, exact)
    _hutchinson_matches(HessianTrace(1.0, num_samples=4), model, x, y, exact, n=500, seed=99)


@pytest.mark.parametrize("b", [1, 3])
def test_hessian_trace_inputs_is_unbiased_against_the_explicit_hessian(b):
    model = tiny_mlp(seed=12)
    x, y = batch(seed=13, b=b)
    traces = [
        torch.autograd.functional.hessian(lambda xi, i=i: F.cross_entropy(model(xi[None]), y[i : i + 1]), x[i]).trace()
        for i in range(b)
    ]
    exact = val(torch.stack(traces).mean())
    _hutchinson_matches(HessianTrace(1.0, wrt="inputs"), model, x, y, exact)


@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("b", [1, 3])
def test_hessian_trace_is_exact_for_diagonal_hessians(num_samples, b):
    """Rademacher vectors have v_a^2 = 1, so v^T H v = tr H for every draw when H is diagonal."""
    c = torch.tensor([0.5, 2.0, -1.0], dtype=DT)

    def loss_fn(outputs, targets):  # per example sum_j c_j out_j^2, averaged over the batch
        return (c * outputs.pow(2)).sum(1).mean()

    model = nn.Linear(3, 3, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3, dtype=DT))
    x = torch.randn(b, 3, dtype=DT)
    # inputs: Hess_x l_i = W^T diag(2c) W = diag(2c)
    inputs_reg = HessianTrace(1.0, num_samples=num_samples, wrt="inputs")
    assert val(inputs_reg(model, x, None, model(x), loss_fn)) == pytest.approx(val(2 * c.sum()), rel=1e-12)
    # params, with one example x = e_1: the loss is c_j W_j1^2 summed, a diagonal Hessian of trace 2 sum c
    e1 = torch.tensor([[1.0, 0.0, 0.0]], dtype=DT)
    params_reg = HessianTrace(1.0, num_samples=num_samples)
    assert val(params_reg(model, e1, None, model(e1), loss_fn)) == pytest.approx(val(2 * c.sum()), rel=1e-12)


# --------------------------------------------------------------------------------------- Lipschitz penalty
def _lipschitz_model(padding_mode="circular"):
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, padding_mode=padding_mode),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 6 * 6, 4),
    ).to(DT)


def test_lipschitz_penalty_against_exact_norms_and_tau():
    model = _lipschitz_model("circular")
    x = torch.randn(2, 2, 6, 6, dtype=DT)
    conv_exact = val(conv_spectral_norm(model[0].weight, 6, "circular", method="exact"))
    linear_exact = val(torch.linalg.matrix_norm(model[3].weight, 2))
    low, high = sorted([conv_exact, linear_exact])
    reg = LipschitzPenalty(1.0, n_iter=10)
    bounds = reg.layer_bounds(model, x)
    assert set(bounds) == {"0", "3"}
    # upper bounds (to float64 rounding: the penalty is a training signal, not a certificate), tight at T = 10
    assert conv_exact * (1 - 1e-12) <= val(bounds["0"]) <= conv_exact * (1 + 1e-3)
    assert linear_exact * (1 - 1e-12) <= val(bounds["3"]) <= linear_exact * (1 + 1e-3)
    for tau, expected in [(0.0, low + high), ((low + high) / 2, high - (low + high) / 2), (high + 1, 0.0)]:
        value = LipschitzPenalty(1.0, tau=tau, n_iter=10)(model, x, None, None, F.cross_entropy)
        assert val(value) == pytest.approx(expected, rel=2e-3, abs=1e-12)
        if expected == 0:
            assert val(value) == 0.0


def test_lipschitz_penalty_records_the_input_size():
    """The circular bound follows the size the model is run on, and is re-recorded when it changes."""
    model = _lipschitz_model("circular")
    model[3] = nn.Identity()  # keep the conv only, so any input size works
    model[2] = nn.Identity()
    reg = LipschitzPenalty(1.0, tau=0.0, n_iter=10)
    for n in (6, 4, 9):
        exact = val(conv_spectral_norm(model[0].weight, n, "circular", method="exact"))
        value = val(reg(model, torch.randn(1, 2, n, n, dtype=DT), None, None, F.cross_entropy))
        assert exact * (1 - 1e-12) <= value <= exact * (1 + 1e-3)


@pytest.mark.parametrize("conv_bound", ["input_size", "spatial"])
def test_lipschitz_penalty_zero_padding_bounds(conv_bound):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv1d(2, 2, 3, padding=1), nn.Conv1d(2, 1, 2), nn.Flatten()).to(DT)
    model2d = _lipschitz_model("zeros")
    reg = LipschitzPenalty(1.0, conv_bound=conv_bound)
    b1 = reg.layer_bounds(model, torch.randn(1, 2, 7, dtype=DT))
    b2 = reg.layer_bounds(model2d, torch.randn(1, 2, 6, 6, dtype=DT))
    cases = [
        (b1["0"], model[0].weight, 7, 1),
        (b1["1"], model[1].weight, 7, 0),
        (b2["0"], model2d[0].weight, 6, 1),
    ]
    for bound, weight, n, pad in cases:
        exact = val(conv_spectral_norm(weight, n, "zeros", method="exact", padding_size=pad))
        assert exact * (1 - 1e-12) <= val(bound) <= 1.25 * exact
    if conv_bound == "spatial":  # independent of the input size
        again = reg.layer_bounds(model2d, torch.randn(1, 2, 9, 9, dtype=DT))
        assert val(again["0"]) == val(b2["0"])
        exact9 = val(conv_spectral_norm(model2d[0].weight, 9, "zeros", method="exact", padding_size=1))
        assert val(again["0"]) >= exact9


def test_lipschitz_penalty_on_maps_smaller_than_the_kernel_uses_the_spatial_bound():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1)).to(DT)
    bound = LipschitzPenalty(1.0).layer_bounds(model, torch.randn(1, 2, 2, 2, dtype=DT))["0"]
    assert val(bound) == val(LipschitzPenalty(1.0, conv_bound="spatial").layer_bounds(model)["0"])
    eye = torch.eye(8, dtype=DT).reshape(8, 2, 2, 2)
    matrix = F.conv2d(eye, model[0].weight.detach(), padding=1).reshape(8, -1)
    assert val(bound) >= val(torch.linalg.matrix_norm(matrix, 2))


def test_lipschitz_penalty_skips_layers_with_their_own_forward_and_rejects_other_paddings():
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) / 10

    model = nn.Sequential(nn.Linear(3, 3), Scaled(3, 3)).to(DT)
    assert set(LipschitzPenalty(1.0).layer_bounds(model)) == {"0"}
    with pytest.raises(ValueError, match="'zeros' or 'circular'"):
        LipschitzPenalty(1.0)(nn.Conv2d(1, 1, 3, padding_mode="reflect"), torch.ones(1, 1, 4, 4), None, None, None)
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        LipschitzPenalty(1.0)(nn.Sequential(nn.BatchNorm1d(3)), torch.ones(2, 3), None, None, None)


# ------------------------------------------------------------------------------------ every regulariser
def _grad_model():
    torch.manual_seed(7)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 5), nn.Tanh(), nn.Linear(5, 3)
    ).to(DT)


OPTIONS = {"lipschitz_penalty": {"tau": 0.0}, "hessian_trace": {"num_samples": 2}}


@pytest.mark.parametrize("name", sorted(REGULARIZERS))
@pytest.mark.parametrize("b", [1, 3])
def test_gradients_reach_the_parameters(name, b):
    model = _grad_model()
    x = torch.randn(b, 1, 4, 4, dtype=DT)
    y = torch.randint(0, 3, (b,))
    reg = create_regularizer(name, 1.0, **OPTIONS.get(name, {}))
    value = reg(model, x, y, model(x), F.cross_entropy)
    assert value.dim() == 0 and torch.isfinite(value)
    named = dict(model.named_parameters())
    grads = dict(zip(named, torch.autograd.grad(value, list(named.values()), allow_unused=True), strict=True))
    if name == "activation_decay":  # h is the input of the last layer, which therefore gets no gradient
        expected = [n for n in named if not n.startswith("5.")]
    elif name == "lipschitz_penalty":  # biases do not change the Lipschitz constant
        expected = [n for n in named if n.endswith("weight")]
    else:
        expected = list(named)
    for n in expected:
        assert grads[n] is not None, n
        assert torch.isfinite(grads[n]).all(), n
    assert any(grads[n].abs().sum() > 0 for n in expected)


@pytest.mark.parametrize("name", sorted(REGULARIZERS))
def test_a_model_without_trainable_parameters_is_rejected(name):
    model = _grad_model().requires_grad_(False)
    x = torch.randn(2, 1, 4, 4, dtype=DT)
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_regularizer(name, 1.0)(model, x, torch.tensor([0, 1]), model(x), F.cross_entropy)


# ------------------------------------------------------------------------------------------------ registry
def test_create_by_name_subclass_and_callable():
    reg = create_regularizer("input_curvature", 0.5, h=0.25)
    assert isinstance(reg, InputCurvature) and reg.weight == 0.5 and reg.h == 0.25
    assert isinstance(create_regularizer(HessianTrace, 2, wrt="inputs"), HessianTrace)

    def output_energy(model, inputs, targets, outputs, loss_fn, features=None, scale=1.0):
        return scale * outputs.pow(2).mean()

    model = tiny_mlp()
    x, y = batch()
    out = model(x)
    fn_reg = create_regularizer(output_energy, 0.5, scale=3.0)
    assert isinstance(fn_reg, FunctionRegularizer) and fn_reg.name == "output_energy"
    assert val(fn_reg(model, x, y, out, F.cross_entropy)) == pytest.approx(3 * val(out.pow(2).mean()))
    assert val(total_penalty([fn_reg], model, x, y, out, F.cross_entropy)) == pytest.approx(
        1.5 * val(out.pow(2).mean())
    )
    with pytest.raises(ValueError, match="accepted: scale"):
        create_regularizer(output_energy, 1.0, sclae=2.0)
    with pytest.raises(ValueError, match="must accept"):
        create_regularizer(lambda model: model, 1.0)


def test_from_config_and_round_trip():
    config = [
        {"name": "activation_decay", "weight": 0.01},
        {"name": "gradient_norm", "weight": 0.1, "wrt": "params"},
        {"name": "lipschitz_penalty", "weight": 1.0, "tau": 0.5, "conv_bound": "spatial"},
    ]
    regs = regularizers_from_config(config)
    assert [type(r) for r in regs] == [ActivationDecay, GradientNorm, LipschitzPenalty]
    assert [r.weight for r in regs] == [0.01, 0.1, 1.0]
    assert regs[1].wrt == "params" and regs[2].tau == 0.5 and regs[2].conv_bound == "spatial"
    again = regularizers_from_config([r.config() for r in regs])
    assert [repr(r) for r in again] == [repr(r) for r in regs]
    assert regularizers_from_config(None) == [] and regularizers_from_config([]) == []
    assert regularizers_from_config([regs[0]])[0] is regs[0]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: create_regularizer("curvature", 1.0), "accepted: activation_decay, gradient_norm"),
        (lambda: create_regularizer(3, 1.0), "must be a name"),
        (lambda: create_regularizer("activation_decay", -0.1), "weight must be a finite number >= 0"),
        (lambda: create_regularizer("activation_decay", float("nan")), "weight must be"),
        (lambda: create_regularizer("activation_decay", True), "weight must be"),
        (lambda: create_regularizer("input_curvature", 1.0, step=1.0), "accepted: h"),
        (lambda: create_regularizer("hessian_trace", 1.0, samples=3), "accepted: num_samples, wrt"),
        (lambda: create_regularizer("input_curvature", 1.0, h=0), "h must be"),
        (lambda: create_regularizer("gradient_norm", 1.0, wrt="weights"), "'inputs', 'params'"),
        (lambda: create_regularizer("hessian_trace", 1.0, num_samples=0), "num_samples must be"),
        (lambda: create_regularizer("lipschitz_penalty", 1.0, tau=-1), "tau must be"),
        (lambda: create_regularizer("lipschitz_penalty", 1.0, conv_bound="fft"), "'input_size', 'spatial'"),
        (lambda: create_regularizer("lipschitz_penalty", 1.0, n_iter=0), "n_iter must be"),
        (lambda: create_regularizer("activation_decay", 1.0, layer=3), "layer must be"),
        (lambda: regularizers_from_config([{"name": "activation_decay"}]), "missing weight"),
        (lambda: regularizers_from_config([{"weight": 1.0}]), "missing name"),
        (lambda: regularizers_from_config({"name": "activation_decay", "weight": 1.0}), "must be a list"),
        (lambda: regularizers_from_config(["activation_decay"]), "must be a mapping"),
    ],
)
def test_invalid_arguments_raise_naming_what_is_accepted(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_unknown_layer_name_lists_candidates():
    model = tiny_mlp()
    x, y = batch()
    with pytest.raises(ValueError, match="'0', '2'"):
        ActivationDecay(1.0, layer="head")(model, x, y, None, F.cross_entropy)


def test_register_a_new_regularizer():
    @register_regularizer("output_l1")
    class OutputL1(Regularizer):
        name = "output_l1"

        def __init__(self, weight, *, scale=1.0):
            super().__init__(weight, scale=scale)
            self.scale = scale

        def penalty(self, model, inputs, targets, outputs, loss_fn, features=None):
            return self.scale * outputs.abs().mean()

    try:
        reg = regularizers_from_config([{"name": "output_l1", "weight": 2.0, "scale": 0.5}])[0]
        assert isinstance(reg, OutputL1) and reg.scale == 0.5
        with pytest.raises(ValueError, match="already registered"):
            register_regularizer("output_l1")(GradientNorm)
        register_regularizer("output_l1")(OutputL1)  # registering the same object again is harmless
    finally:
        REGULARIZERS.pop("output_l1", None)


def test_total_penalty_sums_weighted_terms_and_skips_zero_weights():
    model = tiny_mlp()
    x, y = batch()
    out = model(x)

    def boom(model, inputs, targets, outputs, loss_fn, features=None):
        raise AssertionError("a weight-0 regulariser must not be computed")

    regs = [ActivationDecay(0.5), ActivationDecay(2.0), GradientNorm(1.0), create_regularizer(boom, 0.0)]
    terms = penalty_terms(regs, model, x, y, out, F.cross_entropy)
    assert list(terms) == ["activation_decay", "activation_decay#2", "gradient_norm"]
    decay = ActivationDecay(1.0)(model, x, y, out, F.cross_entropy)
    grad_norm = GradientNorm(1.0)(model, x, y, out, F.cross_entropy)
    total = total_penalty(regs, model, x, y, out, F.cross_entropy)
    assert val(total) == pytest.approx(val(2.5 * decay + grad_norm), rel=1e-12)
    empty = total_penalty([], model, x, y, out, F.cross_entropy)
    assert empty.dim() == 0 and val(empty) == 0.0 and empty.dtype == DT and empty.device == x.device

    def not_scalar(model, inputs, targets, outputs, loss_fn, features=None):
        return outputs

    with pytest.raises(ValueError, match="0-dim tensor"):
        total_penalty([create_regularizer(not_scalar, 1.0)], model, x, y, out, F.cross_entropy)
