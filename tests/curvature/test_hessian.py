"""Hessian operator against the explicit float64 Hessian of tiny models (torch.autograd.functional.hessian)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from stablenet.curvature.hessian import Hessian

# torch scripts its forward-AD decompositions on first use (backend="forward_over_reverse") and warns about it.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),  # tiny models (tests/conftest.py)
]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def mlp(act=nn.Tanh, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), act(), nn.Linear(8, 3)).double()


def bn_convnet(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Softplus(), nn.Flatten(), nn.Dropout(0.0), nn.Linear(48, 2)
    ).double()
    # Running statistics unlike the batch statistics, so that eval and train mode differ.
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    return net


def classification(n, d=5, classes=3, seed=0):
    g = gen(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def images(n, seed=0):
    g = gen(seed)
    return torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,), generator=g)


def explicit_hessian(model, loss_fn, batches, params=None, train=False):
    """Hessian of the example-weighted mean loss as a function of the flattened ``params``."""
    params = list(model.parameters()) if params is None else params
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    total = sum(x.shape[0] for x, _ in batches)
    modes = [(m, m.training) for m in model.modules()]
    model.train(train)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:  # batch statistics without touching the running buffers
        m.track_running_stats = not train

    def mean_loss(theta):
        pieces = torch.split(theta, [p.numel() for p in params])
        tensors = {k: t.view_as(p) for k, t, p in zip(keys, pieces, params, strict=True)}
        return sum(
            x.shape[0] / total * loss_fn(torch.func.functional_call(model, tensors, (x,)), y) for x, y in batches
        )

    try:
        return torch.autograd.functional.hessian(mean_loss, flat)
    finally:
        for m, training in modes:
            m.training = training
        for m in bns:
            m.track_running_stats = True


def explicit_input_hessian(model, loss_fn, x, y):
    model.eval()
    flat = x.reshape(-1)
    return torch.autograd.functional.hessian(lambda z: loss_fn(model(z.view_as(x)), y), flat)


CASES = {
    "mlp_tanh": (lambda: mlp(nn.Tanh), lambda: classification(20)),
    "mlp_relu": (lambda: mlp(nn.ReLU), lambda: classification(20)),
    "convnet_bn": (bn_convnet, lambda: images(10)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    make_model, make_data = CASES[request.param]
    model, (x, y) = make_model(), make_data()
    return model, (x, y), explicit_hessian(model, F.cross_entropy, [(x, y)])


@pytest.mark.parametrize("backend", ["double_backward", "forward_over_reverse"])
def test_hvp_matches_explicit_hessian(case, backend, monkeypatch):
    model, batch, h_exact = case
    h = Hessian(model, F.cross_entropy, batch, backend=backend)
    jvp_calls = []
    jvp = torch.func.jvp
    monkeypatch.setattr(torch.func, "jvp", lambda *a, **k: jvp_calls.append(1) or jvp(*a, **k))
    assert h.dim == h_exact.shape[0]
    v = torch.randn(h.dim, generator=gen(1), dtype=torch.float64)
    torch.testing.assert_close(h.hvp(v), h_exact @ v, rtol=0, atol=1e-8)
    params = list(model.parameters())
    as_list = h.hvp([t.view_as(p) for t, p in zip(torch.split(v, [p.numel() for p in params]), params, strict=True)])
    assert [t.shape for t in as_list] == [p.shape for p in params]
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in as_list]), h_exact @ v, rtol=0, atol=1e-8)
    assert h.last_num_hvp == 1
    assert len(jvp_calls) == (2 if backend == "forward_over_reverse" else 0)


@pytest.mark.parametrize("k", [1, 3])
def test_lanczos_top_eigenvalues_match_explicit(case, k):
    model, batch, h_exact = case
    h = Hessian(model, F.cross_entropy, batch)
    values, vectors = h.eigenvalues(k=k, max_iter=h.dim, tol=1e-12, generator=gen(0))
    expected = torch.linalg.eigvalsh(h_exact).flip(0)[:k]
    torch.testing.assert_close(values, expected, rtol=1e-6, atol=1e-10)
    assert 0 < h.last_num_hvp == h.last_result.num_matvec <= h.dim
    assert len(vectors) == k
    for value, vector in zip(values, vectors, strict=True):
        assert [t.shape for t in vector] == [p.shape for p in model.parameters()]
        x = torch.cat([t.reshape(-1) for t in vector])
        assert abs(x.norm() - 1) < 1e-10
        assert (h_exact @ x - value * x).norm() < 1e-5 * max(1.0, abs(value.item()))


def linear_regression():
    """MSE of a linear model: H = (2/N) [X 1]^T [X 1], with well-separated eigenvalues by construction."""
    g = gen(0)
    # Orthonormal columns orthogonal to the bias column: the spectrum is {16, 4, 1, 1/4} and 2 (bias).
    basis = torch.cat([torch.ones(40, 1, dtype=torch.float64), torch.randn(40, 4, generator=g, dtype=torch.float64)], 1)
    q, _ = torch.linalg.qr(basis)
    x = q[:, 1:] * torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64) * math.sqrt(40 / 2)
    y = torch.randn(40, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    return nn.Linear(4, 1).double(), (x, y)


def test_power_iteration_with_deflation_on_separated_spectrum():
    model, (x, y) = linear_regression()
    design = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], dim=1)
    expected = torch.linalg.eigvalsh(2 / 40 * design.T @ design).flip(0)[:3]
    torch.testing.assert_close(expected, torch.tensor([16.0, 4.0, 2.0], dtype=torch.float64))  # by construction
    h = Hessian(model, F.mse_loss, (x, y))
    values, _ = h.eigenvalues(k=3, method="power", max_iter=500, tol=1e-10, generator=gen(0))
    torch.testing.assert_close(values, expected, rtol=1e-4, atol=0)
    assert h.last_num_hvp == h.last_result.num_matvec > 3
    lanczos_values, _ = h.eigenvalues(k=3, max_iter=h.dim, tol=1e-12, generator=gen(0))
    torch.testing.assert_close(lanczos_values, expected, rtol=1e-10, atol=0)


def test_hutchinson_trace_within_three_standard_errors():
    model, batch = mlp(nn.Tanh), classification(20)
    h_exact = explicit_hessian(model, F.cross_entropy, [batch])
    exact = h_exact.trace().item()
    h = Hessian(model, F.cross_entropy, batch)
    # Hutchinson's variance with Rademacher vectors: 2 (||H||_F^2 - sum_i H_ii^2) per sample.
    sd = math.sqrt(2 * ((h_exact**2).sum() - (h_exact.diagonal() ** 2).sum()).item())
    errors = []
    for seed in range(5):
        estimate, se = h.trace(num_samples=30, generator=gen(seed))
        assert abs(estimate - exact) <= 3 * se, seed
        assert 0.5 * sd / math.sqrt(30) < se < 2 * sd / math.sqrt(30)
        errors.append(se)
    assert h.last_num_hvp == 30
    _, se_many = h.trace(num_samples=300, generator=gen(0))
    assert se_many < 0.5 * min(errors)  # ~ sqrt(10) times smaller
    assert h.trace(num_samples=30, generator=gen(7)) == h.trace(num_samples=30, generator=gen(7))


def test_slq_density_integrates_to_one_with_mean_trace_over_dim():
    model, batch = mlp(nn.Tanh), classification(20)
    h_exact = explicit_hessian(model, F.cross_entropy, [batch])
    lam = torch.linalg.eigvalsh(h_exact)
    h = Hessian(model, F.cross_entropy, batch)
    runs = 20
    grid, density = h.density(num_runs=runs, num_steps=20, generator=gen(0))
    assert grid.shape == density.shape and density.min() >= 0
    assert h.last_num_hvp == runs * 20
    assert abs(torch.trapezoid(density, grid).item() - 1) < 1e-3
    mean = torch.trapezoid(density * grid, grid).item()
    nodes, weights = h.last_quadrature
    per_run = (weights * nodes).sum(dim=1)
    assert abs(mean - per_run.mean().item()) < 1e-6  # the smoothing keeps the mean
    se = per_run.std().item() / math.sqrt(runs)
    assert abs(mean - lam.mean().item()) <= 4 * se
    # With the full dimension, the Ritz values are the eigenvalues: the extreme nodes are exact.
    h.density(num_runs=1, num_steps=h.dim, generator=gen(1))
    nodes, weights = h.last_quadrature
    assert abs(nodes[weights > 1e-30].max() - lam.max()) < 1e-8
    # A user grid is used as given.
    user_grid = torch.linspace(-1.0, 1.0, 11, dtype=torch.float64)
    grid2, density2 = h.density(num_runs=2, num_steps=5, grid=user_grid, sigma=0.1, generator=gen(2))
    assert torch.equal(grid2, user_grid) and density2.shape == (11,)


def test_batches_of_different_sizes_equal_one_concatenated_batch():
    model = mlp(nn.Tanh)
    x, y = classification(20)
    batches = [(x[:3], y[:3]), (x[3:10], y[3:10]), (x[10:], y[10:])]
    h_exact = explicit_hessian(model, F.cross_entropy, [(x, y)])
    torch.testing.assert_close(explicit_hessian(model, F.cross_entropy, batches), h_exact, rtol=0, atol=1e-12)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    v = torch.randn(h_exact.shape[0], generator=gen(0), dtype=torch.float64)
    whole = Hessian(model, F.cross_entropy, (x, y))
    for data in (batches, loader):
        split = Hessian(model, F.cross_entropy, data)
        torch.testing.assert_close(split.hvp(v), h_exact @ v, rtol=0, atol=1e-10)
        for a, b in zip(split.gradient(), whole.gradient(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # An unweighted mean of the batch Hessians would differ: the weighting matters.
    unweighted = sum(explicit_hessian(model, F.cross_entropy, [b]) for b in batches) / 3
    assert (unweighted @ v - h_exact @ v).abs().max() > 1e-4


@pytest.mark.parametrize("backend", ["double_backward", "forward_over_reverse"])
def test_hessian_with_respect_to_inputs(backend):
    model = mlp(nn.Softplus)
    x, y = classification(4)
    h_exact = explicit_input_hessian(model, F.cross_entropy, x, y)
    h = Hessian(model, F.cross_entropy, (x, y), wrt="inputs", backend=backend)
    assert h.dim == x.numel()
    v = torch.randn(4, 5, generator=gen(0), dtype=torch.float64)
    hv = h.hvp(v)
    assert hv.shape == x.shape
    torch.testing.assert_close(hv.reshape(-1), h_exact @ v.reshape(-1), rtol=0, atol=1e-8)
    torch.testing.assert_close(h.hvp(v.reshape(-1)), h_exact @ v.reshape(-1), rtol=0, atol=1e-8)
    values, vectors = h.eigenvalues(k=3, max_iter=h.dim, tol=1e-12, generator=gen(0))
    torch.testing.assert_close(values, torch.linalg.eigvalsh(h_exact).flip(0)[:3], rtol=1e-6, atol=1e-12)
    assert vectors[0].shape == x.shape
    grad = h.gradient()
    expected = torch.func.grad(lambda z: F.cross_entropy(model(z), y))(x)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)
    assert not x.requires_grad


def test_per_group_results_are_the_diagonal_blocks():
    model = mlp(nn.Tanh)
    batch = classification(20)
    groups = {"hidden": [model[0].weight, model[0].bias], "head": [model[2].weight, model[2].bias]}
    h = Hessian(model, F.cross_entropy, batch, params=groups)
    h_exact = explicit_hessian(model, F.cross_entropy, [batch])
    blocks = {"hidden": h_exact[:48, :48], "head": h_exact[48:, 48:]}
    eig = h.eigenvalues(k=2, max_iter=48, tol=1e-12, generator=gen(0), per_group=True)
    assert list(eig) == ["hidden", "head"]
    for name, (values, vectors) in eig.items():
        torch.testing.assert_close(values, torch.linalg.eigvalsh(blocks[name]).flip(0)[:2], rtol=1e-6, atol=1e-12)
        assert [t.shape for t in vectors[0]] == [p.shape for p in groups[name]]
    # The blocks' top eigenvalues differ from the full Hessian's (the test can fail).
    full = torch.linalg.eigvalsh(h_exact).max()
    assert all(abs(values[0] - full) > 1e-3 for values, _ in eig.values())
    traces = h.trace(num_samples=40, generator=gen(0), per_group=True)
    assert h.last_num_hvp == 80
    for name, (estimate, se) in traces.items():
        assert abs(estimate - blocks[name].trace().item()) <= 3 * se
    # params=None groups by layer.
    assert list(Hessian(model, F.cross_entropy, batch).groups) == ["0", "2"]


def test_batchnorm_eval_by_default_train_mode_differs_and_modes_are_restored():
    model = bn_convnet()
    x, y = images(10)
    model.train()
    model[5].eval()  # mixed modes, to check that each module gets its own back
    modes = {name: m.training for name, m in model.named_modules()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=gen(0), dtype=torch.float64)

    h_eval = Hessian(model, F.cross_entropy, (x, y))
    h_train = Hessian(model, F.cross_entropy, (x, y), train_mode=True)
    eval_exact = explicit_hessian(model, F.cross_entropy, [(x, y)], train=False)
    train_exact = explicit_hessian(model, F.cross_entropy, [(x, y)], train=True)
    torch.testing.assert_close(h_eval.hvp(v), eval_exact @ v, rtol=0, atol=1e-8)
    torch.testing.assert_close(h_train.hvp(v), train_exact @ v, rtol=0, atol=1e-8)
    assert (eval_exact @ v - train_exact @ v).abs().max() > 1e-3
    h_train.eigenvalues(k=1, max_iter=10)
    h_train.trace(num_samples=2)

    assert {name: m.training for name, m in model.named_modules()} == modes
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k]), k
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_train_mode_dropout_is_a_fixed_symmetric_operator():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    x, y = classification(20)
    h = Hessian(model, F.cross_entropy, [(x[:8], y[:8]), (x[8:], y[8:])], train_mode=True)
    u = torch.randn(h.dim, generator=gen(0), dtype=torch.float64)
    v = torch.randn(h.dim, generator=gen(1), dtype=torch.float64)
    state = torch.get_rng_state()
    hv = h.hvp(v)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    torch.rand(3)  # the caller's stream moves on (as Lanczos draws do): the masks must not
    torch.testing.assert_close(h.hvp(v), hv, rtol=0, atol=0)
    torch.testing.assert_close(u @ hv, v @ h.hvp(u), rtol=1e-10, atol=1e-12)
    # Dropout is active: the train-mode operator differs from the eval-mode one.
    assert (Hessian(model, F.cross_entropy, (x, y)).hvp(v) - hv).abs().max() > 1e-3


def test_parameters_outside_the_model_and_frozen_ones():
    model = mlp(nn.Tanh)
    scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    x, y = classification(20)

    def loss_fn(out, target):
        return F.cross_entropy(scale * out, target)

    h = Hessian(model, loss_fn, (x, y), params=[scale])
    exact = torch.autograd.functional.hessian(lambda s: F.cross_entropy(s * model(x), y), scale.detach())
    torch.testing.assert_close(h.hvp(torch.ones(1, dtype=torch.float64)), exact.reshape(1), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="backend='forward_over_reverse' needs every parameter to belong to model"):
        Hessian(model, loss_fn, (x, y), params=[scale], backend="forward_over_reverse")
    model[0].requires_grad_(False)
    assert Hessian(model, F.cross_entropy, (x, y)).dim == 8 * 3 + 3


@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize("start", ["gradient", "random"])
def test_eigenvalues_from_either_start_match_the_explicit_hessian(method, start):
    model = mlp(nn.Tanh)
    x, y = classification(16)
    expected = torch.linalg.eigvalsh(explicit_hessian(model, F.cross_entropy, [(x, y)])).flip(0)
    h = Hessian(model, F.cross_entropy, (x, y))
    values, _ = h.eigenvalues(k=1, method=method, tol=1e-10, max_iter=500, start=start, generator=gen(0))
    torch.testing.assert_close(values, expected[:1], rtol=1e-6, atol=0)


def test_gradient_start_needs_fewer_products_on_a_network():
    """Note [gradient start]: summed over seeds, a tiny conv net's top eigenvalue at tol 1e-3 takes fewer
    products from the gradient (plus a random vector) than from a random vector alone."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 2))
    net = net.double()
    x, y = images(64)
    counts = {}
    for start in ("gradient", "random"):
        h = Hessian(net, F.cross_entropy, (x, y))
        counts[start] = 0
        for seed in range(4):
            h.eigenvalues(k=1, tol=1e-3, start=start, generator=gen(seed))
            counts[start] += h.last_num_hvp
    assert counts["gradient"] < counts["random"]


def test_gradient_start_falls_back_to_random_where_the_gradient_vanishes():
    """At a stationary point the gradient is zero; the start is then the random vector alone."""
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    x = torch.randn(10, 3, generator=gen(0), dtype=torch.float64)

    def loss_fn(out, target):  # mean (w.x)^2 / 2 has zero gradient at w = 0 and Hessian X^T X / n
        return 0.5 * (out.squeeze(1) ** 2).mean()

    h = Hessian(model, loss_fn, (x, torch.zeros(10)))
    values, _ = h.eigenvalues(k=1, tol=1e-12, start="gradient", generator=gen(1))
    expected = torch.linalg.eigvalsh(x.T @ x / 10)[-1]
    torch.testing.assert_close(values[0], expected, rtol=1e-10, atol=0)


def one_line(call, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        call()
    assert "\n" not in str(info.value)


def test_bad_inputs_raise_one_line_errors():
    model = mlp(nn.Tanh)
    x, y = classification(6)
    loss = F.cross_entropy
    h = Hessian(model, loss, (x, y))
    frozen = nn.Sequential(nn.Linear(5, 3)).double().requires_grad_(False)
    cases = [
        (lambda: Hessian(model, loss, []), r"data must hold at least one \(inputs, targets\) batch; got an empty"),
        (lambda: Hessian(model, loss, iter([(x, y)])), r"data must be re-iterable .*; got a one-shot iterator"),
        (lambda: Hessian(model, loss, x), r"data must be an \(inputs, targets\) batch or a re-iterable"),
        (lambda: Hessian(nn.ReLU(), loss, (x, y)), r"model has no trainable parameters"),
        (lambda: Hessian(frozen, loss, (x, y)), r"model has no trainable parameters"),
        (lambda: Hessian(model, loss, (x, y), wrt="weights"), r"wrt must be one of 'params', 'inputs'; got 'weights'"),
        (lambda: Hessian(model, loss, (x, y), backend="fd"), r"backend must be one of 'double_backward', "),
        (lambda: Hessian(model, loss, [(x, y)] * 2, wrt="inputs"), r"wrt='inputs' needs a single .* got 2 batches"),
        (lambda: Hessian(model, loss, (x, y), params={"a": []}), r"parameter group 'a' is empty"),
        (lambda: Hessian(model, loss, (x, y), params=[model[0].weight] * 2), r"a parameter appears twice"),
        (lambda: h.eigenvalues(method="arnoldi"), r"method must be one of 'lanczos', 'power'; got 'arnoldi'"),
        (lambda: h.eigenvalues(k=0), r"k must be between 1 and the dimension 75; got 0"),
        (lambda: h.eigenvalues(start="ones"), r"start must be one of 'gradient', 'random'; got 'ones'"),
        (lambda: h.trace(num_samples=1), r"num_samples must be >= 2 to give a standard error; got 1"),
        (lambda: h.hvp(torch.ones(3)), r"v must be a flat vector of 75 entries or tensors shaped"),
        (lambda: Hessian(model, loss, (x, y), wrt="inputs").eigenvalues(per_group=True), r"per-group .* wrt='params'"),
        (lambda: Hessian(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), (x, y)).hvp(torch.ones(75)),
         r"loss_fn must return a scalar tensor \(the batch mean\)"),
        (lambda: Hessian(model, loss, [(x, y, y)]).trace(), r"each batch must be an \(inputs, targets\) pair"),
    ]  # fmt: skip
    for call, pattern in cases:
        one_line(call, pattern)


def test_ddp_averages_products_over_ranks_by_example_count(tmp_path):
    """Two gloo ranks with 7 and 13 examples give the Hessian of all 20."""
    mp = pytest.importorskip("torch.multiprocessing")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    model, (x, y) = mlp(nn.Tanh), classification(20)
    expected = explicit_hessian(model, F.cross_entropy, [(x, y)]) @ torch.ones(75, dtype=torch.float64)
    for rank in range(2):
        hv, value = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(hv, expected, rtol=0, atol=1e-10)
        assert value == torch.load(tmp_path / "rank0.pt")[1]  # both ranks draw the same starting vectors


def _ddp_worker(rank, world_size, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world_size)
    try:
        model, (x, y) = mlp(nn.Tanh), classification(20)
        part = slice(0, 7) if rank == 0 else slice(7, 20)
        h = Hessian(model, F.cross_entropy, (x[part], y[part]))
        hv = h.hvp(torch.ones(h.dim, dtype=torch.float64))
        torch.manual_seed(rank)  # different random streams: only the broadcast seed keeps the ranks in step
        values, _ = h.eigenvalues(k=1, max_iter=5, tol=0.0)
        torch.save((hv, values), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrt", ["params", "inputs"])
def test_graph_reuse_gives_the_same_results_with_one_forward_per_solve(wrt):
    """Note [graph reuse]: a single batch's gradient graph is built once per eigensolve / trace / density."""
    model = mlp().double()
    x, y = classification(12)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    cached = Hessian(model, F.cross_entropy, (x, y), wrt=wrt)
    plain = Hessian(model, F.cross_entropy, (x, y), wrt=wrt, cache_graph=False)
    forwards.clear()
    ev_cached, _ = cached.eigenvalues(k=2, tol=1e-10, generator=torch.Generator().manual_seed(0))
    assert len(forwards) == 1 and cached.last_num_hvp > 2
    ev_plain, _ = plain.eigenvalues(k=2, tol=1e-10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ev_cached, ev_plain, rtol=1e-10, atol=1e-12)
    tr_cached = cached.trace(num_samples=5, generator=torch.Generator().manual_seed(1))
    tr_plain = plain.trace(num_samples=5, generator=torch.Generator().manual_seed(1))
    assert tr_cached == pytest.approx(tr_plain, rel=1e-10, abs=1e-12)
    forwards.clear()
    cached.hvp(torch.ones(cached.dim, dtype=torch.float64))
    cached.hvp(torch.ones(cached.dim, dtype=torch.float64))
    assert len(forwards) == 2  # single products outside a solve do not keep graphs alive
