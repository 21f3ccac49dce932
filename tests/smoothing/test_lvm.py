"""LVM-RS, the certifier: simplex values, selection/estimation separation, statistical soundness, grid noise.

The bounds and radii are tested in test_lvm_radii.py, sparsemax in test_simplex.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import stablenet.smoothing.lvm as lvm
import stablenet.smoothing.lvm_radii as lvm_radii
from stablenet.certify.records import ABSTAIN
from stablenet.smoothing.lvm import LVMSmooth
from stablenet.smoothing.lvm_radii import lvm_radius
from stablenet.smoothing.stats import empirical_bernstein_lower, empirical_bernstein_upper


@pytest.mark.parametrize("name", ["softmax", "sparsemax"])
def test_maps_approach_one_hot_at_large_inverse_temperature_and_uniform_at_small(name):
    smooth = LVMSmooth(nn.Identity(), 4, 0.5, maps=(name,), temperatures=(1e-6, 1.0, 1e4))
    logits = torch.tensor([[0.3, 1.2, -0.5, 1.0], [2.0, -1.0, 0.0, 0.5]])
    values = smooth.simplex_values(logits)  # (B, temperatures, K)
    assert values.shape == (2, 3, 4) and values.dtype == torch.float64
    torch.testing.assert_close(values.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    torch.testing.assert_close(values[:, 0], torch.full((2, 4), 0.25, dtype=torch.float64), atol=1e-5, rtol=0)
    one_hot = nn.functional.one_hot(logits.argmax(1), 4).to(torch.float64)
    torch.testing.assert_close(values[:, 2], one_hot, atol=1e-12, rtol=0)
    assert not torch.allclose(values[:, 1], one_hot, atol=1e-2)  # the middle temperature is genuinely soft


def test_callable_map_is_accepted_and_clamped_to_the_unit_interval():
    def loud(z):
        return 1.5 * torch.softmax(z, dim=-1) - 0.1

    smooth = LVMSmooth(nn.Identity(), 3, 0.5, maps=(loud, "softmax"), temperatures=(1.0, 2.0))
    logits = torch.tensor([[4.0, 0.0, -1.0]])
    values = smooth.simplex_values(logits)
    assert smooth.num_candidates == 4 and values.shape == (1, 4, 3)
    torch.testing.assert_close(values[:, 0], (loud(logits.double()).clamp(0, 1)))
    torch.testing.assert_close(values[:, 3], torch.softmax(2 * logits.double(), -1))
    assert values.min() >= 0 and values.max() <= 1 and values[0, 0, 0] == 1


# ----------------------------------------------------------------------------------------- certification


def _constant_model(bias, dim=3):
    model = nn.Linear(dim, len(bias))
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor(bias))
    return model


def test_confident_model_is_certified_with_the_formula_radius_and_ties_abstain():
    x = torch.rand(4, 3, generator=torch.Generator().manual_seed(0))
    smooth = LVMSmooth(_constant_model([6.0, 0.0, 0.0]), 3, sigma=0.5)
    res = smooth.certify_detailed(x, 16, 500, 0.001, 256, generator=0)
    assert res.prediction.dtype == torch.long and res.radius.dtype == torch.float64
    assert res.prediction.shape == res.radius.shape == (4,)
    assert res.prediction.tolist() == [0] * 4
    p_lower, p_upper = res.p_lower.numpy(), res.p_upper.numpy()
    torch.testing.assert_close(res.radius, torch.from_numpy(lvm_radius(p_lower, p_upper, 0.5)))
    assert np.all(res.radius.numpy() < 0.25 * (stats.norm.ppf(p_lower) - stats.norm.ppf(p_upper)) * 2)
    # Zero variance everywhere, so the selection picks a candidate whose map is one-hot (the widest margin):
    # the bounds are those of mean 1 (class A) and mean 0 (the others) with no variance.
    best_lower = empirical_bernstein_lower(1.0, 0.0, 500, 0.001 / 2)
    best_upper = empirical_bernstein_upper(0.0, 0.0, 500, 0.001 / 4)
    np.testing.assert_allclose(p_lower, best_lower, atol=1e-6)
    np.testing.assert_allclose(p_upper, best_upper, atol=1e-6)  # variance slack
    assert torch.all(res.temperature >= 8)

    # All logits equal: every map is uniform, g_A = g_B, so no bound can separate them.
    pred, radius = LVMSmooth(_constant_model([1.0, 1.0, 1.0]), 3, sigma=0.5).certify(x, 16, 500, 0.001, 256, 0)
    assert pred.tolist() == [ABSTAIN] * 4 and radius.tolist() == [0.0] * 4


def test_non_finite_logits_abstain_eval_mode_and_empty_batch():
    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.modes = []

        def forward(self, x):
            self.modes.append(self.training)
            out = self.lin(x)
            return torch.where(x[:, :1] > 0.5, torch.full_like(out, float("nan")), out)

    model = Probe().train()
    x = torch.tensor([[0.2, 0.3], [0.99, 0.1]])
    smooth = LVMSmooth(model, 2, sigma=1e-3, maps="softmax", temperatures=(1.0,))
    pred, radius = smooth.certify(x, 4, 50, 0.01, 64, 0)
    assert pred[1] == ABSTAIN and radius[1] == 0
    assert model.modes and not any(model.modes) and model.training  # eval while certifying, restored after
    pred, radius = smooth.certify(torch.zeros(0, 2), 4, 50, 0.01, 64, 0)
    assert pred.shape == radius.shape == (0,)


def test_same_seed_same_result_and_model_dtype_followed():
    model = nn.Linear(3, 2).double()
    x = torch.rand(5, 3)  # float32 input, float64 model
    smooth = LVMSmooth(model, 2, sigma=0.3)
    a = smooth.certify(x, 8, 64, 0.01, 32, 7)
    b = smooth.certify(x, 8, 64, 0.01, 32, 7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


class _Recorder(nn.Module):
    """Records every noisy input; its logits favour class 0 for the first ``switch`` rows, class 1 after."""

    def __init__(self, switch: int):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.switch = switch
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        start = sum(len(s) for s in self.seen)
        self.seen.append(x.detach().clone())
        row = torch.arange(start, start + len(x))
        first = (row < self.switch).to(x.dtype)
        return 5.0 * torch.stack([first, 1 - first], dim=1) + 0 * self.anchor


def test_estimation_uses_fresh_samples_not_the_selection_samples(monkeypatch):
    calls = []
    real = lvm.mean_and_variance

    def spy(model, x, num, *args, **kwargs):
        calls.append(num)
        return real(model, x, num, *args, **kwargs)

    monkeypatch.setattr(lvm, "mean_and_variance", spy)
    n_img, n0, n = 3, 20, 300
    # Distinct images: images in one batch share noise draws (Note [noise layout]), so identical images would give
    # identical rows; per image, every noisy copy must still be a new draw.
    x = torch.full((n_img, 4), 0.5) + 0.1 * torch.arange(n_img)[:, None]
    model = _Recorder(switch=n_img * n0)
    res = LVMSmooth(model, 2, sigma=0.25).certify_detailed(x, n0, n, 0.01, 64, 0)
    assert calls == [n0, n]
    rows = torch.cat(model.seen)
    assert len(rows) == n_img * (n0 + n)  # n0 + n model evaluations per image, nothing reused or extra
    assert len(torch.unique(rows, dim=0)) == len(rows)  # every noisy copy is a new draw
    # The selection draws say "class 0, very confidently"; the fresh draws all say class 1. Reusing the
    # selection draws for the bound would certify class 0 here; fresh draws refute it, so we abstain.
    assert res.prediction.tolist() == [ABSTAIN] * n_img and torch.all(res.radius == 0)
    assert torch.all(res.p_lower < 0.05)

    # Control: without the switch the same data is certified, so the abstention above is due to the fresh draws.
    pred, radius = LVMSmooth(_Recorder(switch=10**9), 2, sigma=0.25).certify(x, n0, n, 0.01, 64, 0)
    assert pred.tolist() == [0] * n_img and torch.all(radius > 0)


# --------------------------------------------------------------------------------- statistical soundness

_D, _SIGMA, _SCALE, _TRIALS, _ALPHA = 4, 0.25, 4.0, 400, 0.05


def _hyperplane_problem():
    """Logits (k t, -k t) with t = w.x + b, ||w|| = 1, and points at distances 0 .. 0.75 from {t = 0}."""
    w = torch.ones(_D, dtype=torch.float64) / math.sqrt(_D)
    b = -0.5 * w.sum()
    model = nn.Linear(_D, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.stack([_SCALE * w, -_SCALE * w]))
        model.bias.copy_(torch.stack([_SCALE * b, -_SCALE * b]))
    gen = torch.Generator().manual_seed(1234)
    r = 0.75 * torch.rand(_TRIALS, generator=gen, dtype=torch.float64)
    side = torch.where(torch.rand(_TRIALS, generator=gen) < 0.5, -1.0, 1.0).double()
    ortho = 0.05 * torch.randn(_TRIALS, _D, generator=gen, dtype=torch.float64)
    ortho -= (ortho @ w)[:, None] * w
    x = 0.5 + side[:, None] * r[:, None] * w + ortho
    t = x @ w + b
    return model, x, (t < 0).long(), t.abs()


def _wrong_certificates(pred, radius, true_class, true_radius):
    certified = pred != ABSTAIN
    return certified & ((pred != true_class) | (radius > true_radius)), certified


def test_false_certification_rate_below_alpha_on_a_hyperplane_with_known_radius():
    """Every candidate smoothed map has the hyperplane t = 0 as its exact decision boundary.

    For logits (k t, -k t), swapping the two logits swaps the two outputs of softmax and of sparsemax, so
    h_0 = phi(t) with phi(-t) = 1 - phi(t), phi nondecreasing and strictly increasing near 0. Under noise,
    t(x + delta) = t(x) + N(0, sigma^2) (||w|| = 1), so g_0(x) = E phi(t(x) + sigma Z) is odd about 1/2 in
    t(x) and strictly increasing: g_0 > g_1 exactly where t > 0. The smoothed soft classifier's true class is
    sign(t(x)) and its true robust radius is the distance |t(x)| to the hyperplane, whichever map and
    temperature the selection picks.
    """
    model, x, true_class, true_radius = _hyperplane_problem()
    pred, radius = LVMSmooth(model, 2, sigma=_SIGMA).certify(x, 64, 300, _ALPHA, 8192, generator=0)
    wrong, certified = _wrong_certificates(pred, radius, true_class, true_radius)
    tolerance = stats.binom.ppf(0.999, _TRIALS, _ALPHA) / _TRIALS
    assert wrong.double().mean() <= tolerance
    assert certified.double().mean() > 0.8  # teeth: most points get a positive radius ...
    assert (radius[certified] / true_radius[certified]).median() > 0.5  # ... of a useful size
    assert torch.all(radius >= 0) and torch.all(radius[~certified] == 0)


def test_soundness_check_catches_plug_in_bounds(monkeypatch):
    """The same check fails when the bounds are replaced by the sample means: it can detect unsoundness."""
    monkeypatch.setattr(lvm_radii, "empirical_bernstein_lower", lambda mean, var, n, alpha: mean)
    monkeypatch.setattr(lvm_radii, "empirical_bernstein_upper", lambda mean, var, n, alpha: mean)
    model, x, true_class, true_radius = _hyperplane_problem()
    pred, radius = LVMSmooth(model, 2, sigma=_SIGMA).certify(x, 64, 300, _ALPHA, 8192, generator=0)
    wrong, _ = _wrong_certificates(pred, radius, true_class, true_radius)
    assert wrong.double().mean() > stats.binom.ppf(0.999, _TRIALS, _ALPHA) / _TRIALS


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma": 0.0}, "sigma must be a finite number > 0"),
        ({"sigma": -1.0}, "sigma must be a finite number > 0"),
        ({"num_classes": 1}, "num_classes must be an int >= 2"),
        ({"maps": ("softmax", "argmax")}, "map must be a callable or one of 'softmax', 'sparsemax'; got 'argmax'"),
        ({"maps": ()}, "maps must name at least one of"),
        ({"temperatures": (1.0, 0.0)}, "temperatures must be finite numbers > 0"),
        ({"temperatures": (-2.0,)}, "temperatures must be finite numbers > 0"),
        ({"temperatures": ()}, "temperatures must be finite numbers > 0"),
        ({"input_range": (1.0, 0.0)}, "input_range must be"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    args = {"num_classes": 2, "sigma": 0.5, **kwargs}
    num_classes, sigma = args.pop("num_classes"), args.pop("sigma")
    with pytest.raises(ValueError, match=match):
        LVMSmooth(nn.Linear(2, 2), num_classes, sigma, **args)


@pytest.mark.parametrize(
    ("x", "kwargs", "match"),
    [
        (torch.full((1, 2), 0.5), {"alpha": 0.0}, r"alpha must be in \(0, 1\)"),
        (torch.full((1, 2), 0.5), {"alpha": 1.0}, r"alpha must be in \(0, 1\)"),
        (torch.full((1, 2), 0.5), {"n0": 0}, "n0 must be an int >= 1"),
        (torch.full((1, 2), 0.5), {"n": 1}, "n must be an int >= 2"),
        (torch.full((1, 2), 0.5), {"batch_size": 0}, "batch_size must be an int >= 1"),
        (torch.tensor([[0.5, float("nan")]]), {}, "x contains NaN"),
        (torch.tensor([[0.5, 1.5]]), {}, r"x must lie in input_range \[0.0, 1.0\]"),
        (torch.tensor([[-0.1, 0.5]]), {}, r"x must lie in input_range"),
        (torch.ones(1, 2, dtype=torch.long), {}, "x must be a floating-point tensor"),
    ],
)
def test_certify_rejects_bad_arguments(x, kwargs, match):
    args = {"n0": 4, "n": 16, "alpha": 0.01, "batch_size": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        LVMSmooth(nn.Linear(2, 2), 2, 0.5).certify(x, **args)


def test_wrong_number_of_logits_is_an_error():
    with pytest.raises(ValueError, match=r"logits of shape \(B, 3\)"):
        LVMSmooth(nn.Linear(2, 2), 3, 0.5).certify(torch.full((1, 2), 0.5), 4, 16, 0.01, 8)


def test_select_makes_the_choice_of_certify_detailed():
    # certify_detailed draws its selection samples first, so the same seed gives select the same draws.
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x = torch.rand(6, 3)
    smooth = LVMSmooth(model, 4, sigma=0.5)
    full = smooth.certify_detailed(x, 16, 64, 0.01, 40, generator=5)
    map_index, temperature = smooth.select(x, 16, 64, 0.01, 40, generator=5)
    assert torch.equal(map_index, full.map_index) and torch.equal(temperature, full.temperature)
    assert map_index.dtype == torch.long and temperature.dtype == torch.float64
    assert smooth.select(x[:0], 16, 64, 0.01, 40)[0].shape == (0,)
    with pytest.raises(ValueError, match="n0 must be an int >= 1"):
        smooth.select(x, 0, 64, 0.01, 40)


# ----------------------------------------------------------------------------------------------- grid noise
def test_grid_constant_model_is_certified_with_bounds_widened_by_the_total_variation_bound():
    # A constant model gives the same scores under any noise, so float and grid noise see the same means and
    # variances; grid noise must then differ exactly by the widening of Note [grid noise] in lvm.
    x = torch.randint(0, 256, (4, 3), generator=torch.Generator().manual_seed(0)).float() / 255
    model = _constant_model([6.0, 0.0, 0.0])
    plain = LVMSmooth(model, 3, sigma=0.5).certify_detailed(x, 16, 500, 0.001, 256, generator=0)
    smooth = LVMSmooth(model, 3, sigma=0.5, noise="grid", levels=255)
    res = smooth.certify_detailed(x, 16, 500, 0.001, 256, generator=0)
    tv = smooth.grid.tv_bound(3)
    assert 0 < tv < 1e-14
    assert res.prediction.tolist() == [0] * 4
    assert torch.equal(res.map_index, plain.map_index) and torch.equal(res.temperature, plain.temperature)
    p_lower, p_upper = plain.p_lower.numpy(), plain.p_upper.numpy()
    np.testing.assert_array_equal(res.p_lower.numpy(), np.maximum(np.nextafter(p_lower - tv, -np.inf), 0.0))
    np.testing.assert_array_equal(res.p_upper.numpy(), np.minimum(np.nextafter(p_upper + tv, np.inf), 1.0))
    assert np.all(res.p_lower.numpy() < p_lower) and np.all(res.p_upper.numpy() > p_upper)
    torch.testing.assert_close(res.radius, torch.from_numpy(lvm_radius(res.p_lower.numpy(), res.p_upper.numpy(), 0.5)))
    assert torch.all(res.radius <= plain.radius) and torch.all(res.radius > 0)
    # select draws the same grid noise as certify_detailed's selection step
    map_index, temperature = smooth.select(x, 16, 500, 0.001, 256, generator=0)
    assert torch.equal(map_index, res.map_index) and torch.equal(temperature, res.temperature)


class _OnGrid(nn.Module):
    """Class 1 iff the first input value is (within 1e-3 steps) a point k / 255 of the grid, plus a tiny slope.

    Under grid noise every noisy copy is a grid point (class 1); under float noise almost none is (class 0).
    """

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        first = z.flatten(1)[:, :1].double()
        on = ((first * 255 - (first * 255).round()).abs() < 1e-3).double()
        return torch.cat([torch.zeros_like(on), 10 * on - 5 + 1e-3 * first], dim=1)


def test_grid_noise_certifies_the_grid_classifier_and_refuses_off_grid_inputs():
    x = torch.tensor([[100 / 255, 0.0], [1.0, 3 / 255]])
    grid = LVMSmooth(_OnGrid(), 2, sigma=0.5, maps="softmax", temperatures=(1.0,), noise="grid")
    prediction, radius = grid.certify(x, 16, 200, 0.01, 400, generator=1)
    assert prediction.tolist() == [1, 1] and torch.all(radius > 0)
    prediction, _ = LVMSmooth(_OnGrid(), 2, sigma=0.5, maps="softmax", temperatures=(1.0,)).certify(
        x, 16, 200, 0.01, 400, generator=1
    )
    assert prediction.tolist() == [0, 0]  # float noise smooths another classifier
    with pytest.raises(ValueError, match=r"noise='grid' needs inputs on the grid k / 255") as excinfo:
        grid.certify(torch.full((1, 2), 0.3), 16, 200, 0.01, 400)
    assert "\n" not in str(excinfo.value)
    with pytest.raises(ValueError, match="noise must be one of 'float', 'grid'; got 'gauss'"):
        LVMSmooth(_OnGrid(), 2, sigma=0.5, noise="gauss")
    with pytest.raises(ValueError, match="levels must be an int >= 1"):
        LVMSmooth(_OnGrid(), 2, sigma=0.5, noise="grid", levels=0)
    assert LVMSmooth(_OnGrid(), 2, sigma=0.5).grid is None


def test_the_math_and_the_maps_keep_their_old_import_path():
    import stablenet.smoothing.lvm_radii as lvm_radii
    import stablenet.smoothing.simplex as simplex

    for module in (lvm_radii, simplex):
        assert all(getattr(lvm, name) is getattr(module, name) for name in module.__all__)
        assert set(module.__all__) <= set(lvm.__all__)
