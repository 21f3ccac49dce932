"""Tests for stablenet.smoothing.cohen: statistical soundness on a model with a known answer, exact values,
rounding, determinism and input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps
from torch import nn

from stablenet.certify.records import ABSTAIN as RECORDS_ABSTAIN
from stablenet.smoothing import sampling
from stablenet.smoothing.cohen import ABSTAIN, Smooth


def allowed_failures(trials: int, alpha: float) -> float:
    """99.9% quantile of Binomial(trials, alpha): a sound certifier exceeds it with probability <= 0.1%."""
    return float(sps.binom.ppf(0.999, trials, alpha))


class LinearBinary(nn.Module):
    """f(x) = [w . x + b > 0] on (1, 1, d) inputs, as two logits (0, w . x + b)."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.linear = nn.Linear(len(w), 1, dtype=w.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(w[None])
            self.linear.bias.fill_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.linear(x.flatten(1))
        return torch.cat([torch.zeros_like(score), score], dim=1)


class Constant(nn.Module):
    """Always class ``label``; no parameters, so the device comes from the input."""

    def __init__(self, num_classes: int, label: int) -> None:
        super().__init__()
        self.num_classes, self.label = num_classes, label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), self.num_classes, dtype=x.dtype, device=x.device)
        logits[:, self.label] = 1.0
        return logits


class CoinFlip(nn.Module):
    """Class 1 iff the first pixel is positive: at a zero first pixel, each class has probability exactly 1/2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = x.flatten(1)[:, :1]
        return torch.cat([-first, first], dim=1)


def linear_problem(num_points: int, d: int, sigma: float, seed: int):
    """Points at signed distances s in +-[0.3, 2] sigma from the hyperplane w . x + b = 0.

    The smoothed classifier of a linear classifier is the same linear classifier:
    P(f(x + delta) = 1) = Phi((w . x + b) / (sigma ||w||)), so g(x) = [s > 0] and g is constant on exactly the
    ball of radius |s| (the distance to the hyperplane), and no larger ball. Cohen's bound is tight here.
    """
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    b = 0.3
    norm = w.norm()
    magnitude = sigma * (0.3 + 1.7 * torch.rand(num_points, generator=gen, dtype=torch.float64))
    sign = torch.where(torch.rand(num_points, generator=gen) < 0.5, -1.0, 1.0).double()
    s = sign * magnitude
    x0 = torch.randn(num_points, d, generator=gen, dtype=torch.float64)
    x = x0 - ((x0 @ w + b) / norm**2)[:, None] * w + (s / norm)[:, None] * w
    assert torch.allclose((x @ w + b) / norm, s, atol=1e-12)
    return LinearBinary(w, b), x.view(num_points, 1, 1, d), s


@pytest.mark.parametrize(("alpha", "n"), [(0.05, 200), (0.2, 100)])
def test_certificates_are_wrong_at_most_alpha_of_the_time(alpha, n):
    sigma, num_points = 0.5, 3000
    model, x, s = linear_problem(num_points, d=8, sigma=sigma, seed=2024)
    smooth = Smooth(model, 2, sigma, input_range=None)
    prediction, radius = smooth.certify(x, n0=20, n=n, alpha=alpha, batch_size=10_000, generator=17)
    truth = (s > 0).long()
    distance = s.abs()
    answered = prediction != ABSTAIN
    wrong = answered & ((prediction != truth) | (radius > distance))
    assert int(wrong.sum()) <= allowed_failures(num_points, alpha)
    # not vacuous: most points get a positive radius, and the radii are a good part of the true distance
    assert float((radius > 0).double().mean()) >= 0.8
    assert float((radius[answered] / distance[answered]).mean()) >= 0.5
    assert torch.all(radius[~answered] == 0)


def test_predict_is_wrong_at_most_alpha_of_the_time_on_the_linear_model():
    sigma, alpha, num_points = 0.5, 0.05, 1000
    model, x, s = linear_problem(num_points, d=8, sigma=sigma, seed=7)
    prediction = Smooth(model, 2, sigma, input_range=None).predict(x, n=100, alpha=alpha, batch_size=8192, generator=3)
    wrong = (prediction != ABSTAIN) & (prediction != (s > 0).long())
    assert int(wrong.sum()) <= allowed_failures(num_points, alpha)
    assert float((prediction != ABSTAIN).double().mean()) >= 0.8


def test_constant_model_hand_computed():
    sigma, n, alpha = 0.25, 100, 0.001
    smooth = Smooth(Constant(4, 2), 4, sigma)
    x = torch.rand(3, 1, 5, 5)
    prediction, radius = smooth.certify(x, n0=10, n=n, alpha=alpha, batch_size=32, generator=0)
    expected = sigma * sps.norm.ppf(alpha ** (1.0 / n))  # p_A lower bound with n_A = n is alpha^(1/n)
    assert prediction.dtype == torch.long and torch.equal(prediction, torch.full((3,), 2))
    assert radius.dtype == torch.float64 and radius.shape == (3,)
    assert torch.all(radius <= expected) and torch.all(radius >= expected * (1 - 1e-9))
    assert torch.equal(smooth.predict(x, n=n, alpha=alpha, batch_size=32, generator=0), torch.full((3,), 2))


@pytest.mark.parametrize("batch_size", [1, 7, 100, 1000])
def test_batch_size_does_not_change_the_counts(batch_size):
    # with n_A = n exactly for the constant model, any lost or doubled noisy copy would change the radius
    sigma, n, alpha = 0.5, 50, 0.01
    _, radius = Smooth(Constant(3, 1), 3, sigma).certify(
        torch.rand(4, 2, 3, 3), n0=5, n=n, alpha=alpha, batch_size=batch_size, generator=1
    )
    expected = float(sps.norm.ppf(alpha ** (1.0 / n))) * sigma
    torch.testing.assert_close(radius, torch.full((4,), expected, dtype=torch.float64), rtol=1e-9, atol=0)


def test_coin_flip_model_abstains():
    trials, alpha = 400, 0.05
    x = torch.zeros(trials, 1, 2, 2)  # every noisy copy is a fair coin
    smooth = Smooth(CoinFlip(), 2, 0.5)
    prediction = smooth.predict(x, n=100, alpha=alpha, batch_size=4096, generator=5)
    assert int((prediction != ABSTAIN).sum()) <= allowed_failures(trials, alpha)
    certified, radius = smooth.certify(x, n0=10, n=100, alpha=alpha, batch_size=4096, generator=6)
    # p_A = 1/2 exactly, so any answer other than ABSTAIN is a false certificate
    assert int((certified != ABSTAIN).sum()) <= allowed_failures(trials, alpha)
    assert torch.all(radius[certified == ABSTAIN] == 0)
    assert float((prediction == ABSTAIN).double().mean()) >= 0.9


def test_certify_matches_the_reference_algorithm_and_rounds_down():
    # Cohen's CERTIFY spelled out with the same generator stream: selection counts, then fresh estimation counts.
    torch.manual_seed(0)
    num_classes, sigma, n0, n, alpha, batch_size = 3, 0.4, 30, 400, 0.01, 256
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, num_classes))
    x = torch.rand(10, 3, 2, 2)
    prediction, radius = Smooth(model, num_classes, sigma).certify(x, n0, n, alpha, batch_size, generator=123)

    gen = sampling.make_generator(123, torch.device("cpu"))
    c_hat = sampling.class_counts(model, x, n0, sigma, num_classes, batch_size, gen).argmax(dim=1)
    counts = sampling.class_counts(model, x, n, sigma, num_classes, batch_size, gen)
    n_a = counts.gather(1, c_hat[:, None]).squeeze(1).numpy()
    p_lower = np.where(n_a > 0, sps.beta.ppf(alpha, np.maximum(n_a, 1), n - n_a + 1), 0.0)
    certified = p_lower > 0.5
    assert 0 < certified.sum() < len(x)  # the case mixes certified images and abstentions
    exact = sigma * sps.norm.ppf(p_lower[certified])  # the float64 formula, not rounded
    assert torch.equal(prediction, torch.where(torch.from_numpy(certified), c_hat, ABSTAIN))
    got = radius.numpy()[certified]
    # the confidence bound's safety margin (Note [rounding down] in stats) lowers a radius by at most ~3e-10 sigma
    assert np.all(got < exact) and np.allclose(got, exact, rtol=1e-9, atol=1e-9 * sigma)
    assert np.all(radius.numpy()[~certified] == 0)


def test_same_seed_same_answer_and_generator_state_advances():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    smooth = Smooth(model, 3, 0.5)
    x = torch.rand(6, 3, 2, 2)
    a = smooth.certify(x, 10, 300, 0.05, 128, generator=9)
    b = smooth.certify(x, 10, 300, 0.05, 128, generator=9)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    gen = torch.Generator().manual_seed(9)
    first = smooth.certify(x, 10, 300, 0.05, 128, generator=gen)
    assert torch.equal(first[1], a[1])  # a torch.Generator seeded alike gives the int seed's stream
    second = smooth.certify(x, 10, 300, 0.05, 128, generator=gen)
    assert not torch.equal(first[1], second[1])  # ... and it advances
    assert torch.equal(smooth.predict(x, 300, 0.05, 128, generator=4), smooth.predict(x, 300, 0.05, 128, generator=4))


def test_single_image_and_empty_batch():
    smooth = Smooth(Constant(3, 0), 3, 0.5)
    prediction, radius = smooth.certify(torch.rand(1, 4, 4), 5, 20, 0.05, 8, generator=0)
    assert prediction.shape == radius.shape == (1,) and int(prediction[0]) == 0
    assert smooth.predict(torch.rand(1, 4, 4), 20, 0.05, 8, generator=0).shape == (1,)
    prediction, radius = smooth.certify(torch.rand(0, 1, 4, 4), 5, 20, 0.05, 8, generator=0)
    assert prediction.shape == radius.shape == (0,)


def test_abstain_is_the_records_constant():
    assert ABSTAIN == RECORDS_ABSTAIN == -1


class ModeRecorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.dropout = nn.Dropout(0.5)
        self.modes: set[bool] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.add(self.training)
        return self.dropout(self.linear(x.flatten(1)))


def test_runs_the_model_in_eval_mode_and_restores_each_flag():
    model = ModeRecorder()
    model.train()
    model.dropout.eval()  # a mixed state must come back as it was
    smooth = Smooth(model, 2, 0.5)
    smooth.certify(torch.rand(2, 1, 2, 2), 5, 20, 0.05, 16, generator=0)
    smooth.predict(torch.rand(2, 1, 2, 2), 20, 0.05, 16, generator=0)
    assert model.modes == {False}
    assert model.training and model.linear.training and not model.dropout.training


def test_results_live_on_the_model_device():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    prediction, radius = Smooth(model, 2, 0.5).certify(torch.rand(2, 1, 2, 2), 5, 20, 0.05, 16, generator=0)
    assert prediction.device == radius.device == next(model.parameters()).device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_input_moves_to_a_cuda_model():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).cuda()
    prediction, radius = Smooth(model, 2, 0.5).certify(torch.rand(2, 1, 2, 2), 5, 20, 0.05, 16, generator=0)
    assert prediction.device.type == radius.device.type == "cuda"


# ---------------------------------------------------------------------------------------------- validation


def one_line_error(call, match: str) -> None:
    with pytest.raises(ValueError, match=match) as excinfo:
        call()
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma": 0.0}, "sigma must be a finite float > 0"),
        ({"sigma": -0.5}, "sigma must be a finite float > 0"),
        ({"sigma": float("nan")}, "sigma must be a finite float > 0"),
        ({"num_classes": 1}, "num_classes must be an int >= 2"),
        ({"num_classes": 2.5}, "num_classes must be an int >= 2"),
        ({"input_range": (1.0, 0.0)}, "input_range must be None or a pair"),
        ({"input_range": "abc"}, "input_range must be None or a pair"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    args = {"base_model": Constant(3, 0), "num_classes": 3, "sigma": 0.5, **kwargs}
    input_range = args.pop("input_range", (0.0, 1.0))
    one_line_error(lambda: Smooth(**args, input_range=input_range), match)


GOOD = {"n0": 5, "n": 20, "alpha": 0.05, "batch_size": 8}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 0.0}, r"alpha must be a number in the open interval \(0, 1\)"),
        ({"alpha": 1.0}, r"alpha must be a number in the open interval \(0, 1\)"),
        ({"alpha": float("nan")}, r"alpha must be a number in the open interval \(0, 1\)"),
        ({"n0": 0}, "n0 must be an int >= 1"),
        ({"n": 0}, "n must be an int >= 1"),
        ({"n": 10.0}, "n must be an int >= 1"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
        ({"generator": "seed"}, "generator must be None, an int seed or a torch.Generator"),
    ],
)
def test_bad_certify_arguments(kwargs, match):
    smooth = Smooth(Constant(3, 0), 3, 0.5)
    one_line_error(lambda: smooth.certify(torch.rand(2, 1, 2, 2), **{**GOOD, **kwargs}), match)
    predict_kwargs = {k: v for k, v in {**GOOD, **kwargs}.items() if k != "n0"}
    if "n0" not in kwargs:
        one_line_error(lambda: smooth.predict(torch.rand(2, 1, 2, 2), **predict_kwargs), match)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.rand(2, 4), r"x must have shape \(N, C, H, W\) or \(C, H, W\); got shape \(2, 4\)"),
        (torch.rand(1, 2, 1, 2, 2), r"x must have shape \(N, C, H, W\)"),
        (torch.full((1, 1, 2, 2), float("nan")), "x must be finite"),
        (torch.tensor([[[[0.5, float("inf")]]]]), "x must be finite"),
        (torch.full((1, 1, 2, 2), 1.5), r"x must lie in input_range \[0.0, 1.0\]; got values in \[1.5, 1.5\]"),
        (-torch.rand(1, 1, 2, 2) - 0.1, r"x must lie in input_range \[0.0, 1.0\]"),
        (torch.ones(1, 1, 2, 2, dtype=torch.long), "x must be a floating-point tensor"),
        (np.zeros((1, 1, 2, 2)), "x must be a torch.Tensor"),
    ],
)
def test_bad_inputs(x, match):
    smooth = Smooth(Constant(3, 0), 3, 0.5)
    one_line_error(lambda: smooth.certify(x, **GOOD), match)
    one_line_error(lambda: smooth.predict(x, 20, 0.05, 8), match)


def test_input_range_none_and_custom_ranges():
    x = torch.full((1, 1, 2, 2), -3.0)
    assert Smooth(Constant(3, 0), 3, 0.5, input_range=None).predict(x, 20, 0.05, 8, generator=0).tolist() == [0]
    assert Smooth(Constant(3, 0), 3, 0.5, input_range=(-3.0, 3.0)).predict(x, 20, 0.05, 8, generator=0).tolist() == [0]
    one_line_error(
        lambda: Smooth(Constant(3, 0), 3, 0.5, input_range=(-1.0, 1.0)).predict(x, 20, 0.05, 8),
        r"x must lie in input_range \[-1.0, 1.0\]",
    )


def test_base_model_with_the_wrong_number_of_outputs():
    smooth = Smooth(Constant(4, 0), 3, 0.5)
    match = r"the base model must return logits of shape \(batch, num_classes\) = \(\d+, 3\); got \(\d+, 4\)"
    one_line_error(lambda: smooth.certify(torch.rand(2, 1, 2, 2), **GOOD), match)
    one_line_error(lambda: smooth.predict(torch.rand(2, 1, 2, 2), 20, 0.05, 8), match)


# ---------------------------------------------------------------------------------------------- grid noise
def grid_threshold_problem(num_points: int, sigma: float, seed: int):
    """1-pixel images x = k/255 and f(z) = [z > t], t = (127.5 + 0.3) / 255 (off the grid).

    With grid noise the model sees (k + V)/255, so the certified classifier is F(y) = f(round(255 y)/255) =
    [y >= 0.5] (almost everywhere), a half-space: g_F(x) = [x > 0.5] and g_F is constant on exactly the ball of
    radius |x - 0.5| (Note [floating-point noise] in stablenet.smoothing.sampling).
    """
    gen = torch.Generator().manual_seed(seed)
    distance = sigma * (0.3 + 1.7 * torch.rand(num_points, generator=gen, dtype=torch.float64))
    sign = torch.where(torch.rand(num_points, generator=gen) < 0.5, -1.0, 1.0).double()
    k = (127.5 + sign * (distance * 255).round() + 0.5 * sign).long()  # grid points on both sides of 0.5
    x = (k.double() / 255).view(num_points, 1, 1, 1)
    model = LinearBinary(torch.ones(1, dtype=torch.float64), -(127.5 + 0.3) / 255)
    return model, x, k >= 128, (k.double() - 127.5).abs() / 255


@pytest.mark.parametrize(("alpha", "n"), [(0.05, 200), (0.2, 100)])
def test_grid_certificates_are_wrong_at_most_alpha_of_the_time(alpha, n):
    sigma, num_points = 0.5, 3000
    model, x, truth, distance = grid_threshold_problem(num_points, sigma, seed=5)
    smooth = Smooth(model, 2, sigma, input_range=None, noise="grid", levels=255)
    prediction, radius = smooth.certify(x, n0=20, n=n, alpha=alpha, batch_size=10_000, generator=8)
    answered = prediction != ABSTAIN
    wrong = answered & ((prediction != truth.long()) | (radius > distance))
    assert int(wrong.sum()) <= allowed_failures(num_points, alpha)
    assert float((radius > 0).double().mean()) >= 0.8
    assert float((radius[answered] / distance[answered]).mean()) >= 0.5
    predicted = smooth.predict(x, n=n, alpha=alpha, batch_size=10_000, generator=9)
    assert int(((predicted != ABSTAIN) & (predicted != truth.long())).sum()) <= allowed_failures(num_points, alpha)


def test_grid_constant_model_pays_the_total_variation_bound():
    sigma, n, alpha = 0.25, 100, 0.001
    x = torch.randint(0, 256, (3, 1, 5, 5), generator=torch.Generator().manual_seed(0)).float() / 255
    smooth = Smooth(Constant(4, 2), 4, sigma, noise="grid")
    prediction, radius = smooth.certify(x, n0=10, n=n, alpha=alpha, batch_size=32, generator=0)
    eta = smooth.grid.tv_bound(25)
    assert 0 < eta < 1e-13
    expected = sigma * sps.norm.ppf(alpha ** (1.0 / n) - eta)
    assert torch.equal(prediction, torch.full((3,), 2))
    assert torch.all(radius <= expected) and torch.all(radius >= expected * (1 - 1e-9))
    assert torch.equal(smooth.predict(x, n=n, alpha=alpha, batch_size=32, generator=0), torch.full((3,), 2))


def test_grid_noise_options_are_checked():
    one_line_error(lambda: Smooth(Constant(3, 0), 3, 0.5, noise="gauss"), "noise must be one of 'float', 'grid'")
    one_line_error(lambda: Smooth(Constant(3, 0), 3, 0.5, noise="grid", levels=0), "levels must be an int >= 1")
    smooth = Smooth(Constant(3, 0), 3, 0.5, noise="grid")
    off_grid = torch.full((1, 1, 2, 2), 0.3)
    one_line_error(lambda: smooth.certify(off_grid, **GOOD), "noise='grid' needs inputs on the grid k / 255")
    one_line_error(lambda: smooth.predict(off_grid, 20, 0.05, 8), "noise='grid' needs inputs on the grid k / 255")
    assert Smooth(Constant(3, 0), 3, 0.5).grid is None  # the default draws float noise
    prediction, radius = smooth.certify(torch.rand(0, 1, 2, 2), **GOOD)
    assert prediction.shape == radius.shape == (0,)


class LowBits(nn.Module):
    """Class 1 iff the (first) input value is a whole multiple of 2^-24: it reads the last mantissa bits.

    Under a real Gaussian this event has probability 0, so the smoothed classifier is class 0 everywhere.
    """

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        on = ((z.flatten(1)[:, :1].double() * 2.0**24) % 1 == 0).double()
        return torch.cat([1 - on, on], dim=1)


@pytest.mark.parametrize("seed", [0, 1])
def test_float_noise_certificates_can_be_false_and_grid_noise_stays_consistent(seed):
    # Note [floating-point noise] (Voráček & Hein 2023): in float32, every rounded copy of 1 + 0.25 n is a
    # multiple of 2^-24 (if it falls below 0.5 the sum was exact), while most copies of 0.1 + 0.25 n are not.
    sigma, near, far = 0.25, torch.full((1, 1, 1, 1), 1.0), torch.full((1, 1, 1, 1), 0.1)
    smooth = Smooth(LowBits(), 2, sigma, input_range=None)
    label, radius = smooth.certify(near, n0=100, n=100_000, alpha=0.001, batch_size=100_000, generator=seed)
    assert int(label) == 1 and float(radius) > 0.95  # sigma * Phi^-1(0.001 ** 1e-5): every draw voted 1
    # ... yet 0.1, at distance 0.9 < radius, is class 0 by the same procedure, with overwhelming evidence
    # (about 35% of votes for 1): the two guarantees contradict each other for every seed, not 0.1% of them.
    assert int(smooth.predict(far, n=10_000, alpha=0.001, batch_size=100_000, generator=seed + 10)) == 0
    # Grid noise certifies the grid classifier f(round(255 y) / 255), and its answers agree with each other.
    grid = Smooth(LowBits(), 2, sigma, input_range=None, noise="grid")
    label, radius = grid.certify(near, n0=100, n=100_000, alpha=0.001, batch_size=100_000, generator=seed)
    far = torch.full((1, 1, 1, 1), 26 / 255)
    other = grid.predict(far, n=10_000, alpha=0.001, batch_size=100_000, generator=seed + 10)
    assert int(label) == 1 and int(other) == 0 and float(radius) < 1 - 26 / 255
