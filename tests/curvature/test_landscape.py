"""Loss-landscape slices, ε-sharpness and the ``landscape`` / ``hessian`` commands.

Closed forms use a linear least-squares model in float64, whose loss is exactly quadratic in the weights:
:math:`L(w) = \\frac{1}{2N} \\lVert X w - y \\rVert^2`, Hessian :math:`A = X^\\top X / N`.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from stablenet.cli import main
from stablenet.curvature.landscape import (
    NORMALIZATIONS,
    epsilon_sharpness,
    landscape_1d,
    landscape_2d,
    load_landscape,
    loss_and_accuracy,
    normalize_direction,
    plot_landscape_1d,
    plot_landscape_contour,
    plot_landscape_surface,
    random_directions,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread avoids the stalls of two OpenMP threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _conv_bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    )


def _images(n: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def _trained_bn_net() -> nn.Sequential:
    """Running statistics away from their initial values, so eval and train mode differ."""
    net = _conv_bn_net()
    x, _ = _images(64, seed=5)
    with torch.no_grad():
        net.train()
        for _ in range(3):
            net(3 * x + 1)
    return net


class LeastSquares(nn.Module):
    def __init__(self, n: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


def half_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out - y).square().mean()


def _least_squares(n: int = 5, rows: int = 30):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, n, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    y = torch.randn(rows, generator=g, dtype=torch.float64)
    return LeastSquares(n), x, y, x.T @ x / rows


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bitwise_equal(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


# ---------------------------------------------------------------- directions


def test_filter_normalisation_matches_weight_filters_and_zeroes_1d_parameters():
    net = _conv_bn_net()
    (d,) = random_directions(net, 1, torch.Generator().manual_seed(0))
    params = list(net.parameters())
    assert [t.shape for t in d] == [p.shape for p in params]
    for t, p in zip(d, params, strict=True):
        if p.dim() >= 2:
            dims = tuple(range(1, p.dim()))
            norm = torch.linalg.vector_norm
            torch.testing.assert_close(norm(t, dim=dims), norm(p.detach(), dim=dims), rtol=1e-5, atol=0)
            assert not torch.allclose(t, p)  # random, not a copy of the weights
        else:  # conv bias, BatchNorm weight and bias, linear bias
            assert torch.count_nonzero(t) == 0
    assert sum(p.dim() <= 1 for p in params) == 4


def test_layer_and_none_normalisation():
    net = _conv_bn_net()
    params = list(net.parameters())
    raw = [torch.randn_like(p) for p in params]
    layer = normalize_direction(raw, params, "layer")
    none = normalize_direction(raw, params, "none")
    for t, r, p in zip(layer, raw, params, strict=True):
        if p.dim() >= 2:
            assert float(t.norm()) == pytest.approx(float(p.detach().norm()), rel=1e-5)
            torch.testing.assert_close(t / t.norm(), r / r.norm())  # same direction, rescaled
        else:
            assert torch.count_nonzero(t) == 0
    assert all(torch.equal(t, r) for t, r in zip(none, raw, strict=True))
    with pytest.raises(ValueError, match="'filter', 'layer', 'none'; got 'row'"):
        normalize_direction(raw, params, "row")
    assert NORMALIZATIONS == ("filter", "layer", "none")


def test_directions_are_seeded():
    net = _conv_bn_net()
    a = random_directions(net, 2, torch.Generator().manual_seed(7))
    b = random_directions(net, 2, torch.Generator().manual_seed(7))
    c = random_directions(net, 2, torch.Generator().manual_seed(8))
    assert all(torch.equal(s, t) for s, t in zip(a[0] + a[1], b[0] + b[1], strict=True))
    assert not torch.equal(a[0][0], c[0][0])
    assert not torch.equal(a[0][0], a[1][0])  # the two directions differ


# ---------------------------------------------------------------- slices


def test_origin_equals_the_models_loss_exactly_and_bn_is_in_eval_mode():
    net = _trained_bn_net()
    x, y = _images()
    loss_fn = nn.CrossEntropyLoss()
    net.eval()
    with torch.no_grad():
        expected = float(loss_fn(net(x), y))
        train_mode = float(loss_fn(copy.deepcopy(net).train()(x), y))  # a copy: train mode updates BN stats
    net.train()
    assert expected != train_mode  # so the check below tells the modes apart
    grid = landscape_2d(net, loss_fn, (x, y), resolution=5, batch_size=len(x))
    assert grid.loss[2, 2] == expected
    line = landscape_1d(net, loss_fn, (x, y), steps=7, span=0.5, batch_size=len(x))
    assert line.alphas[3] == 0.0 and line.loss[3] == expected
    # Several batches: the batch means are weighted by size into the same mean.
    batched = landscape_2d(net, loss_fn, (x, y), resolution=3, batch_size=16)
    assert batched.loss[1, 1] == pytest.approx(expected, rel=1e-6)
    assert batched.accuracy[1, 1] == loss_and_accuracy(net, loss_fn, (x, y))[1]
    assert grid.loss.shape == (5, 5) and np.isfinite(grid.loss).all() and grid.computed == 25
    assert grid.loss.min() < grid.loss.max()


def test_weights_buffers_and_modes_restored_bit_for_bit():
    net = _trained_bn_net()
    net.train()
    net[2].eval()  # a module left in eval mode on purpose stays so
    before = _state(net)
    x, y = _images()
    landscape_2d(net, nn.CrossEntropyLoss(), (x, y), resolution=3, span=2.0)
    epsilon_sharpness(net, nn.CrossEntropyLoss(), (x, y), 0.5, steps=3)
    _assert_bitwise_equal(net, before)
    assert [m.training for m in net.modules()] == [True, True, True, False, True, True]

    def stop(done, total):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        landscape_1d(net, nn.CrossEntropyLoss(), (x, y), steps=5, callback=stop)
    _assert_bitwise_equal(net, before)


def test_1d_slice_of_a_quadratic_matches_the_closed_form():
    model, x, y, hessian = _least_squares()
    w = model.w.detach().clone()
    g = torch.Generator().manual_seed(4)
    d = torch.randn(5, generator=g, dtype=torch.float64)
    line = landscape_1d(model, half_mse, (x, y), steps=9, span=(-2.0, 3.0), direction=[d], batch_size=7)
    base = 0.5 * float((x @ w - y).square().mean())
    grad = x.T @ (x @ w - y) / len(x)
    alphas = np.linspace(-2.0, 3.0, 9)
    expected = base + alphas * float(grad @ d) + 0.5 * alphas**2 * float(d @ hessian @ d)
    np.testing.assert_allclose(line.alphas, alphas, rtol=0, atol=1e-15)
    np.testing.assert_allclose(line.loss, expected, rtol=1e-12)
    assert np.isnan(line.accuracy).all()  # regression targets: no accuracy
    assert line.betas is None


def test_2d_slice_of_a_quadratic_matches_the_closed_form():
    model, x, y, hessian = _least_squares()
    w = model.w.detach().clone()
    d1, d2 = torch.eye(5, dtype=torch.float64)[:2]
    grid = landscape_2d(model, half_mse, (x, y), resolution=4, span=(-1.0, 2.0), directions=[[d1], [d2]])
    r = w - torch.linalg.lstsq(x, y).solution  # L(w) = L* + r^T A r / 2 around the minimiser
    base = 0.5 * float((x @ w - y).square().mean())
    for i, a in enumerate(grid.alphas):
        for j, b in enumerate(grid.betas):
            step = a * d1 + b * d2
            expected = base + float(step @ hessian @ r) + 0.5 * float(step @ hessian @ step)
            assert grid.loss[i, j] == pytest.approx(expected, rel=1e-12)


def test_resumes_after_an_interruption_and_equals_an_uninterrupted_run(tmp_path):
    net = _trained_bn_net()
    x, y = _images()
    loss_fn = nn.CrossEntropyLoss()
    full = landscape_2d(net, loss_fn, (x, y), resolution=5, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "grid.npz"
    seen = []

    def killed_at_7(done, total):
        if done == 7:
            with np.load(path) as f:  # saved every 3 points: 6 are on disk when the 7th finishes
                seen.append(int(f["done"].sum()))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        landscape_2d(
            net,
            loss_fn,
            (x, y),
            resolution=5,
            generator=torch.Generator().manual_seed(3),
            checkpoint=path,
            save_every=3,
            callback=killed_at_7,
        )
    assert seen == [6]
    with np.load(path) as f:
        assert int(f["done"].sum()) == 7  # the points done are also saved when an exception stops the scan
    calls = []
    resumed = landscape_2d(
        net,
        loss_fn,
        (x, y),
        resolution=5,
        generator=torch.Generator().manual_seed(3),
        checkpoint=path,
        save_every=3,
        callback=lambda done, total: calls.append(total),
    )
    assert resumed.computed == 18 and calls[0] == 18
    np.testing.assert_array_equal(resumed.loss, full.loss)
    np.testing.assert_array_equal(resumed.accuracy, full.accuracy)
    stored = load_landscape(path)
    np.testing.assert_array_equal(stored.loss, full.loss)
    np.testing.assert_array_equal(stored.betas, full.betas)
    # A finished file is not recomputed; other directions or another grid are refused.
    again = landscape_2d(
        net, loss_fn, (x, y), resolution=5, generator=torch.Generator().manual_seed(3), checkpoint=path
    )
    assert again.computed == 0
    with pytest.raises(ValueError, match="other weights, directions"):
        landscape_2d(net, loss_fn, (x, y), resolution=5, generator=torch.Generator().manual_seed(4), checkpoint=path)
    with pytest.raises(ValueError, match="another grid"):
        landscape_2d(net, loss_fn, (x, y), resolution=7, generator=torch.Generator().manual_seed(3), checkpoint=path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"resolution": 1}, "resolution must be >= 2; got 1"),
        ({"span": (1.0, -1.0)}, "span must be a positive number"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"save_every": 0}, "save_every must be >= 1"),
        ({"normalize": "unit"}, "normalize must be one of"),
    ],
)
def test_bad_arguments_name_what_is_accepted(kwargs, match):
    net = _conv_bn_net()
    with pytest.raises(ValueError, match=match):
        landscape_2d(net, nn.CrossEntropyLoss(), _images(), **kwargs)


def test_bad_data_and_directions():
    net = _conv_bn_net()
    x, y = _images()
    with pytest.raises(ValueError, match="same length"):
        landscape_1d(net, nn.CrossEntropyLoss(), (x, y[:-1]))
    with pytest.raises(ValueError, match="data must be an"):
        landscape_1d(net, nn.CrossEntropyLoss(), 3)
    with pytest.raises(ValueError, match="2 direction"):
        landscape_2d(net, nn.CrossEntropyLoss(), (x, y), directions=[[p.detach() for p in net.parameters()]])
    with pytest.raises(ValueError, match="one tensor per parameter"):
        landscape_1d(net, nn.CrossEntropyLoss(), (x, y), direction=[torch.zeros(1)])


# ---------------------------------------------------------------- sharpness


def test_epsilon_sharpness_of_a_quadratic_at_its_minimum_is_half_eps2_lambda_max():
    model, x, y, hessian = _least_squares()
    with torch.no_grad():
        model.w.copy_(torch.linalg.lstsq(x, y).solution)
    lam = float(torch.linalg.eigvalsh(hessian)[-1])
    for eps in (0.1, 1.0):
        value = epsilon_sharpness(model, half_mse, (x, y), eps, steps=40)
        assert value == pytest.approx(0.5 * eps**2 * lam, rel=1e-4)
    norm = float(model.w.detach().norm())
    relative = epsilon_sharpness(model, half_mse, (x, y), 0.2, steps=40, relative=True)
    assert relative == pytest.approx(0.5 * (0.2 * norm) ** 2 * lam, rel=1e-4)
    assert epsilon_sharpness(model, half_mse, (x, y), 0.0) == 0.0
    with torch.no_grad():  # it enables gradients itself
        assert epsilon_sharpness(model, half_mse, (x, y), 1.0, steps=40) == value
    with pytest.raises(ValueError, match="step_size must be None or a finite number > 0; got 0"):
        epsilon_sharpness(model, half_mse, (x, y), 1.0, step_size=0)


def test_epsilon_sharpness_away_from_the_minimum_lies_between_its_bounds():
    # Trust region: eps |g| <= max_{|d|<=eps} g.d + d.A.d/2 <= eps |g| + eps^2 lambda_max / 2.
    model, x, y, hessian = _least_squares()
    w = model.w.detach()
    grad = float((x.T @ (x @ w - y) / len(x)).norm())
    lam = float(torch.linalg.eigvalsh(hessian)[-1])
    eps = 0.3
    value = epsilon_sharpness(model, half_mse, (x, y), eps, steps=30, batch_size=8)
    assert eps * grad <= value <= eps * grad + 0.5 * eps**2 * lam + 1e-12
    assert value > eps * grad + 0.5 * eps**2 * float(torch.linalg.eigvalsh(hessian)[0])


def test_epsilon_sharpness_on_a_network_is_nonnegative_and_grows_with_epsilon():
    net = _trained_bn_net()
    x, y = _images()
    small = epsilon_sharpness(net, nn.CrossEntropyLoss(), (x, y), 0.05, steps=5, relative=True)
    large = epsilon_sharpness(net, nn.CrossEntropyLoss(), (x, y), 0.2, steps=5, relative=True)
    assert 0.0 < small < large
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0"):
        epsilon_sharpness(net, nn.CrossEntropyLoss(), (x, y), -1.0)


# ---------------------------------------------------------------- plots


def test_plots_are_written_as_png(tmp_path):
    net = _conv_bn_net()
    x, y = _images()
    line = landscape_1d(net, nn.CrossEntropyLoss(), (x, y), steps=5)
    grid = landscape_2d(net, nn.CrossEntropyLoss(), (x, y), resolution=3)
    paths = [
        plot_landscape_1d(line, tmp_path / "line.png"),
        plot_landscape_contour(grid, tmp_path / "contour.png"),
        plot_landscape_surface(grid, tmp_path / "surface.png"),
    ]
    for path in paths:
        assert path.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="needs a 2-D landscape"):
        plot_landscape_contour(line, tmp_path / "x.png")
    with pytest.raises(ValueError, match="needs a 1-D landscape"):
        plot_landscape_1d(grid, tmp_path / "x.png")


# ---------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from stablenet.train import TrainConfig, train

    out = tmp_path_factory.mktemp("curvature_run") / "run"
    config = TrainConfig(
        dataset="digits", model="sll_mlp", model_args={"width": 64, "depth": 1}, epochs=1, device="cpu", out=str(out)
    )
    torch.manual_seed(0)
    return train(config, progress=False).run_dir


def test_cli_landscape_2d_writes_grid_and_plots(tiny_run, tmp_path, capsys):
    out = tmp_path / "land"
    argv = ["landscape", "--run", str(tiny_run), "--resolution", "5", "--num-examples", "100", "--out", str(out)]
    assert main([*argv, "--quiet"]) == 0
    printed = capsys.readouterr().out
    for name in ("landscape.npz", "landscape_2d_contour.png", "landscape_2d_surface.png"):
        assert (out / name).is_file() and name in printed
    grid = load_landscape(out / "landscape.npz")
    assert grid.loss.shape == (5, 5) and np.isfinite(grid.loss).all()
    assert 0.0 <= np.nanmin(grid.accuracy) and np.nanmax(grid.accuracy) <= 1.0
    # The origin is the trained model's cross-entropy on the first 100 test images.
    from stablenet.data import load_dataset
    from stablenet.models import load_model

    data = load_dataset("digits", "test")
    model = load_model(tiny_run)
    loss, _ = loss_and_accuracy(model, nn.CrossEntropyLoss(), (data.images[:100], data.labels[:100]))
    assert grid.loss[2, 2] == pytest.approx(loss, rel=1e-6)
    # A rerun resumes from the complete file and computes nothing.
    assert main([*argv, "--quiet"]) == 0
    assert "0 new points" in capsys.readouterr().out


def test_cli_landscape_1d(tiny_run, tmp_path):
    out = tmp_path / "line"
    argv = ["landscape", "--run", str(tiny_run), "--dims", "1", "--resolution", "5", "--span", "0.5"]
    assert main([*argv, "--num-examples", "50", "--out", str(out), "--quiet"]) == 0
    assert (out / "landscape_1d.png").read_bytes().startswith(PNG_MAGIC)
    line = load_landscape(out / "landscape.npz")
    assert line.betas is None and line.alphas[0] == -0.5 and line.loss.shape == (5,)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dims", "3"], "dims must be 1 or 2; got 3"),
        (["--resolution", "1"], "resolution must be >= 2; got 1"),
        (["--span", "0"], "span must be > 0"),
        (["--num-examples", "0"], "num_examples must be >= 1; got 0"),
    ],
)
def test_cli_landscape_bad_input_exits_2_with_one_line(tiny_run, tmp_path, capsys, args, message):
    assert main(["landscape", "--run", str(tiny_run), "--out", str(tmp_path / "x"), *args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("stablenet: error:") and message in err


def test_cli_landscape_missing_run_exits_2(tmp_path, capsys):
    assert main(["landscape", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no checkpoint" in err


def test_cli_hessian_writes_json(tiny_run, tmp_path, capsys):
    hessian_module = pytest.importorskip("stablenet.curvature.hessian")
    path = tmp_path / "h.json"
    argv = ["hessian", "--run", str(tiny_run), "--top-k", "2", "--num-examples", "64", "--seed", "1"]
    argv += ["--trace", "--trace-samples", "4", "--density", "--density-runs", "2", "--density-steps", "8"]
    assert main([*argv, "--json", str(path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    record = json.loads(path.read_text())
    values = record["top_eigenvalues"]
    assert len(values) == 2 and values[0] >= values[1]
    assert f"{values[0]:.6g}" in printed and str(path) in printed
    assert record["num_examples"] == 64 and record["dataset"] == "digits" and record["eigen_num_hvp"] > 0
    assert record["start"] == "gradient"
    # The same operator built by hand (cross-entropy, first 64 test images, eval mode, same seed) gives the
    # same eigenvalues: the command wires model, data and loss as documented.
    from stablenet.data import load_dataset
    from stablenet.models import load_model

    data = load_dataset("digits", "test")
    direct = hessian_module.Hessian(
        load_model(tiny_run), nn.functional.cross_entropy, (data.images[:64], data.labels[:64])
    )
    expected, _ = direct.eigenvalues(k=2, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(values, expected.tolist(), rtol=1e-6)
    trace = record["trace"]
    assert np.isfinite(trace["estimate"]) and trace["standard_error"] > 0 and trace["num_samples"] == 4
    grid, density = np.array(record["density"]["grid"]), np.array(record["density"]["density"])
    assert grid.shape == density.shape and (density >= 0).all()
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=0.05)  # a probability density


def test_cli_hessian_bad_input_exits_2(tiny_run, tmp_path, capsys):
    pytest.importorskip("stablenet.curvature.hessian")
    base = ["hessian", "--run", str(tiny_run), "--json", str(tmp_path / "h.json")]
    cases = [
        (["--top-k", "0"], "top_k must be >= 1; got 0"),
        (["--start", "ones"], "start must be one of gradient, random; got 'ones'"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err
