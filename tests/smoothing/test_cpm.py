"""Tests for stablenet.smoothing.cpm, the certifier: statistical soundness of its certificates and of its bounds on
a multi-class model, hard votes and Cohen, grid noise, and input validation (the radius and the bounds alone are
tested in test_cpm_radii.py)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps
from torch import nn

from stablenet.certify.records import ABSTAIN
from stablenet.smoothing import stats
from stablenet.smoothing.cohen import Smooth
from stablenet.smoothing.cpm import CPM_TEMPERATURES, CPMSmooth
from stablenet.smoothing.cpm_radii import cpm_radius, softmax_score_lipschitz
from stablenet.spectral import lipschitz_upper_bound


def allowed_failures(trials: int, alpha: float) -> float:
    """99.9% quantile of Binomial(trials, alpha): a sound procedure exceeds it with probability <= 0.1%."""
    return float(sps.binom.ppf(0.999, trials, alpha))


# ------------------------------------------------------------------------------------------- binary model
class LinearLogits(nn.Module):
    """Logits (t, -t), t = <w, x> + b: the logit map is sqrt(2) ||w||-Lipschitz and softmax_A = sigmoid(2t)."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.linear = nn.Linear(len(w), 1, dtype=w.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(w[None])
            self.linear.bias.fill_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.linear(x)
        return torch.cat([t, -t], dim=1)


def binary_problem(num_points: int, d: int, seed: int):
    """Points at signed distances s, |s| in [0.02, 0.8], from the hyperplane <w, x> + b = 0 (||w|| = 1).

    Either way the smoothed classifier is [t > 0]: hard votes give P(A) = Phi(t / sigma); soft votes give
    E sigmoid(2(t + sigma Z)), which is > 1/2 iff t > 0 (sigmoid(2u) - 1/2 is odd, Z symmetric). So g is constant
    on exactly the ball of radius |s|, and the class scores sigmoid(+-2t) are ||w|| / 2 = 1/2-Lipschitz.
    """
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    w /= w.norm()
    b = 0.2
    s = (0.02 + 0.78 * torch.rand(num_points, generator=gen, dtype=torch.float64)) * torch.where(
        torch.rand(num_points, generator=gen) < 0.5, -1.0, 1.0
    ).double()
    x0 = torch.randn(num_points, d, generator=gen, dtype=torch.float64)
    x = x0 - (x0 @ w + b)[:, None] * w + s[:, None] * w
    return LinearLogits(w, b), x, s


def wrong_certificates(prediction, radius, s) -> int:
    truth = torch.where(s > 0, 0, 1)
    answered = prediction != ABSTAIN
    return int((answered & ((prediction != truth) | (radius > s.abs()))).sum())


def test_binary_certificates_are_wrong_at_most_alpha_of_the_time():
    sigma, alpha, num_points, inverse_temperature = 0.5, 0.05, 400, 2.0
    model, x, s = binary_problem(num_points, d=4, seed=11)
    lipschitz = math.sqrt(2)  # of x -> (t, -t), ||w|| = 1 (a custom module: lipschitz_upper_bound cannot bound it)
    smooth = CPMSmooth(model, 2, sigma, lipschitz=lipschitz, input_range=None, inverse_temperature=inverse_temperature)
    assert smooth.soft_votes
    assert smooth.score_lipschitz == pytest.approx(inverse_temperature / 2, rel=1e-6)  # slope of sigmoid(2 s t)
    result = smooth.certify_detailed(x, n0=32, n=300, alpha=alpha, batch_size=8192, generator=5)
    allowed = allowed_failures(num_points, alpha)
    assert wrong_certificates(result.prediction, result.radius, s) <= allowed
    answered = result.prediction != ABSTAIN
    assert float(answered.double().mean()) >= 0.75
    assert torch.all(result.radius[~answered] == 0)
    # the Lipschitz refinement is worth something: larger than Cohen's radius from the very same bounds ...
    cohen = torch.as_tensor(stats.two_class_radius(result.p_lower.numpy(), result.p_upper.numpy(), sigma))
    assert torch.all(result.radius[answered] >= cohen[answered])
    assert float((result.radius[answered] / cohen[answered]).mean()) > 1.1
    # ... and close to the truth: radii 30% larger would be wrong far more often than alpha allows
    assert wrong_certificates(result.prediction, 1.3 * result.radius, s) > 2 * allowed


def test_lipschitz_radius_with_hard_votes_would_be_unsound():
    # Why CPMSmooth smooths soft votes when L is finite: the hard vote [t > 0] of a linear model is Cohen's
    # worst case whatever ||w|| is, so plugging a score Lipschitz constant into the radius of *hard* votes
    # over-certifies. (This is the same check as above, run on the mistake it must catch.)
    sigma, alpha, num_points = 0.5, 0.05, 400
    model, x, s = binary_problem(num_points, d=4, seed=11)
    hard = CPMSmooth(model, 2, sigma, lipschitz=math.inf, input_range=None)
    assert not hard.soft_votes
    result = hard.certify_detailed(x, n0=32, n=300, alpha=alpha, batch_size=8192, generator=5)
    answered = result.prediction != ABSTAIN
    assert wrong_certificates(result.prediction, result.radius, s) <= allowed_failures(num_points, alpha)
    naive = torch.as_tensor(cpm_radius(result.p_lower.numpy(), result.p_upper.numpy(), sigma, 0.5))
    naive = torch.where(answered, naive, torch.zeros_like(naive))
    assert wrong_certificates(result.prediction, naive, s) > allowed_failures(num_points, alpha)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
def test_temperature_selection_is_sound_at_any_logit_scale(scale):
    # The same exact boundary as above, with the votes chosen per point among the soft votes at each candidate s
    # and the hard votes, on logits scaled by odd magnitudes (L from lipschitz_upper_bound of a plain Linear).
    sigma, alpha, num_points = 0.5, 0.05, 400
    _, x, s = binary_problem(num_points, d=4, seed=11)
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(4, generator=gen, dtype=torch.float64)
    w /= w.norm()
    linear = nn.Linear(4, 2, dtype=torch.float64)
    with torch.no_grad():  # logits scale * (t, -t), t = <w, x> + 0.2, as binary_problem's model
        linear.weight.copy_(scale * torch.stack([w, -w]))
        linear.bias.copy_(scale * torch.tensor([0.2, -0.2]))
    smooth = CPMSmooth(linear, 2, sigma, input_range=None, input_shape=(4,), temperatures=CPM_TEMPERATURES)
    assert smooth.lipschitz == pytest.approx(scale * math.sqrt(2), rel=1e-6)
    result = smooth.certify_detailed(x, n0=32, n=300, alpha=alpha, batch_size=8192, generator=5)
    assert wrong_certificates(result.prediction, result.radius, s) <= allowed_failures(num_points, alpha)
    chosen = result.inverse_temperature
    assert set(chosen.tolist()) <= {math.inf, *CPM_TEMPERATURES}
    # every radius is the one of its own classifier: score constant s L sqrt(2) / 4, inf for hard votes
    answered = (result.prediction != ABSTAIN).numpy()
    for i in np.flatnonzero(answered):
        s_i = float(chosen[i])
        ell = softmax_score_lipschitz(smooth.lipschitz, s_i) if math.isfinite(s_i) else math.inf
        expected = cpm_radius(float(result.p_lower[i]), float(result.p_upper[i]), sigma, ell)
        assert float(result.radius[i]) == float(expected)
    # At logits of 1e-3 the soft votes are coin flips whose noise-level leads among 32 selection draws still win
    # the choice now and then (the point then abstains on the fresh draws): fewer answers, never wrong ones.
    assert answered.mean() >= (0.75 if scale >= 1 else 0.4)


def ten_class_points(num_points: int, lead: tuple[float, float], k: int = 10):
    """Points in [0, 1]^k whose true class leads the runner-up by a uniform amount in ``lead``: under logits = x
    (or any positive multiple), the smoothed classifier (soft votes at any s, or hard votes) is argmax x by
    symmetry, constant exactly on the ball of radius (x_A - x_B) / sqrt(2), the returned ``distance``."""
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(num_points, k, generator=gen, dtype=torch.float64)
    label = torch.randint(k, (num_points,), generator=gen)
    runner_up = x.scatter(1, label[:, None], -1.0).max(dim=1).values
    gap = lead[0] + (lead[1] - lead[0]) * torch.rand(num_points, generator=gen).double()
    x[torch.arange(num_points), label] = runner_up + gap
    return x, label, (x[torch.arange(num_points), label] - runner_up) / math.sqrt(2)


def test_temperature_selection_beats_the_fixed_default_on_a_1_lipschitz_model():
    # Ten classes, logits = x (a 1-Lipschitz map), the true class ahead of the runner-up by 0.1 to 1. By symmetry
    # the smoothed classifier (soft votes at any s, or hard votes) is argmax x, constant exactly on the ball of
    # radius (x_A - x_B) / sqrt(2). CPM's fixed default s = 1 gives nearly uniform votes (softmax of logits that
    # differ by < 1): it abstains on most points. Choosing the votes per point must certify far more.
    sigma, alpha, num_points, k = 0.25, 0.001, 200, 10
    x, label, distance = ten_class_points(num_points, lead=(0.1, 1.0))
    identity = nn.Identity()
    fixed = CPMSmooth(identity, k, sigma, lipschitz=1.0, input_range=None)
    chosen = CPMSmooth(identity, k, sigma, lipschitz=1.0, input_range=None, temperatures=CPM_TEMPERATURES)
    a = fixed.certify_detailed(x, n0=100, n=5000, alpha=alpha, batch_size=100_000, generator=1)
    b = chosen.certify_detailed(x, n0=100, n=5000, alpha=alpha, batch_size=100_000, generator=1)
    for result in (a, b):
        answered = result.prediction != ABSTAIN
        wrong = answered & ((result.prediction != label) | (result.radius >= distance))
        assert int(wrong.sum()) <= allowed_failures(num_points, alpha)
    assert torch.all(a.inverse_temperature == 1.0)
    assert len(set(b.inverse_temperature.tolist())) > 1  # the choice depends on the point
    assert int((b.prediction != ABSTAIN).sum()) > 2 * int((a.prediction != ABSTAIN).sum())
    assert float(b.radius.mean()) > 2 * float(a.radius.mean())


def test_temperature_selection_matches_or_beats_cohen_where_the_votes_saturate():
    # Ten classes, logits = scale * x (scale-Lipschitz), points up to 3 / sqrt(2) from the boundary at sigma = 0.5:
    # far points give 100/100 selection votes for soft and hard votes alike, while with n = 100 000 estimation
    # draws the hard votes certify more there. A selection on the vote counts chose the soft votes by their finite
    # l and fell below Cohen's mean radius; the selection on the scores (Note [selection scores]) must not.
    sigma, alpha, num_points, k = 0.5, 0.001, 200, 10
    x, label, distance = ten_class_points(num_points, lead=(0.0, 3.0))
    images = x.view(num_points, 1, 1, k)
    for scale in (1.0, 10.0):
        model = Scaled(scale)
        chosen = CPMSmooth(model, k, sigma, lipschitz=scale, input_range=None, temperatures=CPM_TEMPERATURES)
        b = chosen.certify_detailed(images, n0=100, n=100_000, alpha=alpha, batch_size=100_000, generator=1)
        answered = b.prediction != ABSTAIN
        assert int((answered & ((b.prediction != label) | (b.radius >= distance))).sum()) == 0
        _, cohen = Smooth(model, k, sigma, input_range=None).certify(
            images, n0=100, n=100_000, alpha=alpha, batch_size=100_000, generator=1
        )
        assert float(b.radius.mean()) >= float(cohen.double().mean())


class Scaled(nn.Module):
    """Logits ``scale * x.flatten(1)``."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x.flatten(1)


def test_selection_frequencies_of_hard_votes_follow_the_gaussian_margin():
    # Binary linear logits (t, -t) at signed distances up to 4 sigma: the hard vote for class 0 has probability
    # Phi(t / sigma) exactly. The Gaussian margin model recovers it from 400 draws, also where every draw votes the
    # same way (the counts alone would say 1); pessimistic by about one standard error, so below the exact value
    # on average. The soft frequencies are mean scores: rows sum to 1.
    sigma, num, points = 0.5, 400, 40
    model, x, _ = binary_problem(points, d=4, seed=2)
    w, b = model.linear.weight[0].detach(), float(model.linear.bias.detach())
    s = torch.linspace(0.05, 2.0, points, dtype=torch.float64) * torch.tensor([1.0, -1.0]).repeat(points // 2)
    x = x - (x @ w + b)[:, None] * w + s[:, None] * w
    smooth = CPMSmooth(model, 2, sigma, lipschitz=math.sqrt(2), input_range=None, temperatures=(1.0,))
    counts, freq = smooth._candidate_counts(x, num, (math.inf, 1.0), 100_000, torch.Generator().manual_seed(0))
    exact = sps.norm.cdf(s.abs().numpy() / sigma)
    top = counts[:, 0].argmax(axis=1)
    assert np.all(top == np.where(s.numpy() > 0, 0, 1))
    p_top = freq[np.arange(points), 0, top]
    np.testing.assert_allclose(p_top, exact, atol=0.03)
    assert float(np.mean(p_top - exact)) < 0
    saturated = counts[np.arange(points), 0, top] == num
    assert saturated.sum() >= 10
    assert np.all(p_top[saturated] < 1) and np.all(1 - p_top[saturated] < 20 * (1 - exact[saturated]) + 1e-4)
    np.testing.assert_allclose(freq.sum(axis=2), 1.0, atol=1e-12)
    assert np.all(counts.sum(axis=2) == num)


def test_temperature_selection_without_a_bound_is_the_hard_vote_certifier():
    model, x, _ = binary_problem(30, d=4, seed=3)
    plain = CPMSmooth(model, 2, 0.5, lipschitz=math.inf, input_range=None)
    chosen = CPMSmooth(model, 2, 0.5, lipschitz=math.inf, input_range=None, temperatures=(1.0, 4.0))
    a = plain.certify_detailed(x, n0=10, n=200, alpha=0.01, batch_size=1000, generator=9)
    b = chosen.certify_detailed(x, n0=10, n=200, alpha=0.01, batch_size=1000, generator=9)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    assert torch.all(b.inverse_temperature == math.inf)


def test_hard_votes_with_one_bucket_reproduce_cohen():
    model, x, _ = binary_problem(50, d=4, seed=3)
    x = x.view(50, 1, 1, 4)  # Smooth wants image batches
    flat = nn.Sequential(nn.Flatten(), model)
    cpm = CPMSmooth(flat, 2, 0.5, lipschitz=math.inf, num_buckets=1, input_range=None)
    prediction, radius = cpm.certify(x, n0=10, n=200, alpha=0.01, batch_size=1000, generator=9)
    ref_prediction, ref_radius = Smooth(flat, 2, 0.5, input_range=None).certify(
        x, n0=10, n=200, alpha=0.01, batch_size=1000, generator=9
    )
    assert torch.equal(prediction, ref_prediction)
    assert torch.all(radius <= ref_radius)
    torch.testing.assert_close(radius, ref_radius, rtol=0, atol=1e-9)


def test_multiclass_bounds_cover_the_smoothed_probabilities():
    # 5-class linear model with soft votes: p_c(x) = E softmax(s (W (x + sigma Z) + b))_c, computed with 10^6
    # draws of W Z ~ N(0, W W^T) in logit space. Each point is certified many times with fresh noise.
    gen = torch.Generator().manual_seed(4)
    k, d, sigma, s, alpha = 5, 6, 0.5, 2.0, 0.05
    weight = torch.randn(k, d, generator=gen, dtype=torch.float64)
    bias = 0.3 * torch.randn(k, generator=gen, dtype=torch.float64)
    model = nn.Linear(d, k, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(weight)
        model.bias.copy_(bias)
    points, repeats = 8, 30
    x = torch.randn(points, d, generator=gen, dtype=torch.float64)
    smooth = CPMSmooth(model, k, sigma, input_range=None, inverse_temperature=s, num_buckets=3)
    assert smooth.soft_votes and smooth.lipschitz >= float(torch.linalg.matrix_norm(weight, 2))  # bounded
    batch = x.repeat(repeats, 1)
    result = smooth.certify_detailed(batch, n0=16, n=200, alpha=alpha, batch_size=8192, generator=21)

    noise = torch.randn(10**6, d, generator=gen, dtype=torch.float64) @ weight.T * sigma
    truth = np.stack([torch.softmax(s * (model(xi[None]) + noise), -1).mean(0).detach().numpy() for xi in x])
    truth = np.tile(truth, (repeats, 1))
    bounds = (result.prediction.numpy(), result.p_lower.numpy(), result.p_upper.numpy())
    top = np.where(bounds[0] == ABSTAIN, 0, bounds[0])
    p_top = truth[np.arange(len(top)), top]
    others = np.where(np.arange(k) == top[:, None], -1.0, truth).max(axis=1)
    answered = bounds[0] != ABSTAIN
    failures = answered & ((bounds[1] > p_top) | (bounds[2] < others))
    assert int(failures.sum()) <= allowed_failures(points * repeats, alpha)
    assert float(answered.mean()) >= 0.5
    assert set(np.unique(result.num_buckets.numpy())) <= {1, 2, 3}


# ------------------------------------------------------------------------------------------- API
def test_lipschitz_constant_falls_back_to_inf_for_unsupported_models(caplog):
    class Odd(nn.Module):
        def forward(self, x):
            return torch.stack([x.sum(1), -x.sum(1)], 1)

    with caplog.at_level(logging.INFO, logger="stablenet.smoothing.cpm"):
        smooth = CPMSmooth(Odd(), 2, 0.5)
    assert smooth.lipschitz == math.inf and not smooth.soft_votes and smooth.score_lipschitz == math.inf
    assert "cannot be bounded" in caplog.text

    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))
    with caplog.at_level(logging.INFO, logger="stablenet.smoothing.cpm"):
        smooth = CPMSmooth(model, 4, 0.5)
    assert smooth.lipschitz == lipschitz_upper_bound(model) and smooth.soft_votes
    assert "lipschitz_upper_bound" in caplog.text
    assert CPMSmooth(model, 4, 0.5, lipschitz=3.0).lipschitz == 3.0


def test_certify_shapes_dtypes_determinism_and_mode():
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    model.train()
    smooth = CPMSmooth(model, 4, 0.25, input_shape=(3,))
    x = torch.rand(5, 3)
    first = smooth.certify(x, n0=8, n=64, alpha=0.01, batch_size=100, generator=2)
    second = smooth.certify(x, n0=8, n=64, alpha=0.01, batch_size=100, generator=2)
    assert model.training and model[1].training  # eval mode only while certifying
    assert first[0].dtype == torch.long and first[1].dtype == torch.float64
    assert first[0].shape == first[1].shape == (5,)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    one = smooth.certify(x[0], n0=8, n=64, alpha=0.01, batch_size=100, generator=2)  # a single input
    assert one[0].shape == (1,)
    empty = smooth.certify(torch.rand(0, 3), n0=8, n=64, alpha=0.01, batch_size=100, generator=2)
    assert empty[0].shape == empty[1].shape == (0,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -1.0}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"lipschitz": 0.0}, "lipschitz"),
        ({"lipschitz": -2.0}, "lipschitz"),
        ({"lipschitz": float("nan")}, "lipschitz"),
        ({"num_buckets": 0}, "num_buckets"),
        ({"num_buckets": 1.5}, "num_buckets"),
        ({"num_classes": 1}, "num_classes"),
        ({"inverse_temperature": 0.0}, "inverse_temperature"),
        ({"temperatures": ()}, "temperatures must be None or finite numbers > 0"),
        ({"temperatures": (1.0, float("inf"))}, "temperatures must be None or finite numbers > 0"),
        ({"temperatures": ("hot",)}, "temperatures must be None or finite numbers > 0"),
        ({"input_range": (1.0, 0.0)}, "input_range"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    args = {"num_classes": 2, "sigma": 0.5, "lipschitz": 1.0} | kwargs
    with pytest.raises(ValueError, match=match):
        CPMSmooth(nn.Linear(3, 2), **args)


@pytest.mark.parametrize(
    ("x", "kwargs", "match"),
    [
        (torch.full((2, 3), float("nan")), {}, "finite"),
        (torch.full((2, 3), 1.5), {}, "input_range"),
        (torch.full((2, 3), -0.1), {}, "input_range"),
        (torch.rand(2, 3), {"alpha": 0.0}, "alpha"),
        (torch.rand(2, 3), {"alpha": 1.0}, "alpha"),
        (torch.rand(2, 3), {"n0": 0}, "n0"),
        (torch.rand(2, 3), {"n": 0}, "n "),
        (torch.rand(2, 3), {"batch_size": 0}, "batch_size"),
        (torch.rand(2, 3), {"generator": 1.5}, "generator"),
        (torch.rand(3), {}, "batch"),
        (torch.rand(2, 3, dtype=torch.float64).long(), {}, "floating"),
    ],
)
def test_certify_rejects_bad_arguments(x, kwargs, match):
    smooth = CPMSmooth(nn.Linear(3, 2), 2, 0.5, lipschitz=1.0)
    args = {"n0": 4, "n": 16, "alpha": 0.01, "batch_size": 8} | kwargs
    with pytest.raises(ValueError, match=match):
        smooth.certify(x, **args)


def test_grid_noise_needs_hard_votes_and_matches_cohen_with_one_bucket():
    # Note [floating-point noise] in stablenet.smoothing.sampling: the grid classifier is piecewise constant.
    with pytest.raises(ValueError, match="lipschitz must be None or inf") as excinfo:
        CPMSmooth(nn.Linear(3, 2), 2, 0.5, lipschitz=1.0, noise="grid")
    assert "\n" not in str(excinfo.value)
    with pytest.raises(ValueError, match="noise must be one of 'float', 'grid'"):
        CPMSmooth(nn.Linear(3, 2), 2, 0.5, lipschitz=math.inf, noise="half")
    torch.manual_seed(0)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.randint(0, 256, (6, 3, 2, 2), generator=torch.Generator().manual_seed(1)).float() / 255
    cpm = CPMSmooth(flat, 3, 0.5, num_buckets=1, noise="grid")  # lipschitz=None: inf, nothing computed
    assert not cpm.soft_votes and cpm.grid is not None
    prediction, radius = cpm.certify(x, n0=10, n=300, alpha=0.01, batch_size=1000, generator=4)
    reference = Smooth(flat, 3, 0.5, noise="grid").certify(x, n0=10, n=300, alpha=0.01, batch_size=1000, generator=4)
    assert torch.equal(prediction, reference[0]) and (prediction != ABSTAIN).any()
    assert torch.all(radius <= reference[1])
    torch.testing.assert_close(radius, reference[1], rtol=0, atol=1e-9)


def test_the_math_keeps_its_old_import_path():
    import stablenet.smoothing.cpm as cpm
    import stablenet.smoothing.cpm_radii as cpm_radii

    assert all(getattr(cpm, name) is getattr(cpm_radii, name) for name in cpm_radii.__all__)
    assert set(cpm_radii.__all__) <= set(cpm.__all__)
