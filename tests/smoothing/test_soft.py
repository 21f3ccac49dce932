"""The smoothed soft classifier's ``predict``: against exact expectations, its abstention rule, and its level."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from stablenet.certify.records import ABSTAIN
from stablenet.smoothing.soft import HARD_VOTES, simplex_scores, soft_predict, soft_vote_decision
from stablenet.smoothing.stats import empirical_bernstein_lower, empirical_bernstein_upper

SIGMA = 1.0


def asymmetric_model() -> nn.Module:
    """Logits ``(0, 0.1 relu(y) - 20 relu(-y))`` of a scalar input: class 1 wins on ``y > 0``, but only barely.

    Hard votes follow the sign of :math:`y`; a soft score of class 1 is about 1/2 for :math:`y > 0` and about 0
    for :math:`y < 0`, so the smoothed hard and soft classifiers disagree just right of 0.
    """
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        model[3].weight.copy_(torch.tensor([[0.0, 0.0], [0.1, -20.0]]))
    return model.double()


def linear_model() -> nn.Module:
    """Three classes, logits ``(3y, 1, -3y)`` of a scalar input."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[3.0], [0.0], [-3.0]]))
        model[1].bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    return model.double()


def exact_scores(model: nn.Module, x: float, simplex_map: str, s: float) -> np.ndarray:
    """:math:`\\mathbb E[h(s f(x + \\sigma t))]`, :math:`t \\sim N(0, 1)`, by the trapezoid rule in float64.

    The integrand is piecewise smooth and bounded; on [-12, 12] with step 5e-4 the error is far below 1e-6.
    """
    t = np.linspace(-12.0, 12.0, 48_001)
    with torch.no_grad():
        logits = model(torch.as_tensor(x + SIGMA * t, dtype=torch.float64).view(-1, 1, 1))
    values = simplex_scores(logits, simplex_map, s).numpy()
    return np.trapezoid(values * stats.norm.pdf(t)[:, None], t, axis=0)


def exact_hard_votes(model: nn.Module, x: float) -> np.ndarray:
    t = np.linspace(-12.0, 12.0, 48_001)
    with torch.no_grad():
        logits = model(torch.as_tensor(x + SIGMA * t, dtype=torch.float64).view(-1, 1, 1))
    one_hot = np.eye(logits.shape[1])[logits.argmax(1).numpy()]
    return np.trapezoid(one_hot * stats.norm.pdf(t)[:, None], t, axis=0)


@pytest.mark.parametrize(
    ("make", "simplex_map", "s"),
    [(asymmetric_model, "softmax", 1.0), (asymmetric_model, "sparsemax", 1.0), (linear_model, "softmax", 0.5)],
)
def test_soft_predict_agrees_with_the_exact_smoothed_soft_classifier(make, simplex_map, s):
    model = make()
    xs = np.linspace(-1.0, 1.5, 11)
    exact = np.stack([exact_scores(model, x, simplex_map, s) for x in xs])
    assert np.allclose(exact.sum(axis=1), 1.0, atol=1e-9)
    points = torch.as_tensor(xs, dtype=torch.float64).view(-1, 1, 1)
    got = soft_predict(
        model, points, SIGMA, 4000, 0.001, 50_000, simplex_map=simplex_map, inverse_temperature=s, generator=0
    ).numpy()
    top = exact.argmax(axis=1)
    ranked = np.sort(exact, axis=1)
    clear = ranked[:, -1] - ranked[:, -2] > 0.1
    assert clear.sum() >= 5
    assert np.all((got == top) | (got == ABSTAIN)), (got, top)
    assert np.all(got[clear] == top[clear]), (got, top)
    if make is asymmetric_model:
        # The check discriminates: where the hard and soft smoothed classifiers disagree, the soft one is returned.
        hard = np.stack([exact_hard_votes(model, x) for x in xs]).argmax(axis=1)
        disagree = clear & (hard != top)
        assert disagree.sum() >= 3 and np.all(got[disagree] != hard[disagree])


def test_simplex_scores_match_the_lvm_candidates_and_keep_gradients():
    from stablenet.smoothing.lvm import LVMSmooth

    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    smooth = LVMSmooth(nn.Identity(), 4, 0.5, temperatures=(0.5, 3.0))
    every = smooth.simplex_values(logits.detach())  # (B, maps * temperatures, K): softmax then sparsemax
    for j, (name, s) in enumerate([("softmax", 0.5), ("softmax", 3.0), ("sparsemax", 0.5), ("sparsemax", 3.0)]):
        assert torch.equal(simplex_scores(logits, name, s).detach(), every[:, j])
    simplex_scores(logits, "softmax", 2.0)[:, 0].sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_decision_is_the_documented_bonferroni_rule():
    rng = np.random.default_rng(0)
    mean = rng.dirichlet(np.ones(4), size=200)
    var = rng.uniform(0.0, 0.25, size=(200, 4))
    n, alpha = 500, 0.01
    got = soft_vote_decision(mean, var, n, alpha)
    slack = 4.0 * n * 2.0**-53
    lower = empirical_bernstein_lower(np.clip(mean - slack, 0, 1), var + slack, n, alpha / 8)
    upper = empirical_bernstein_upper(np.clip(mean + slack, 0, 1), var + slack, n, alpha / 8)
    top = mean.argmax(axis=1)
    rows = np.arange(200)
    runner_up = np.where(np.arange(4) == top[:, None], -np.inf, upper).max(axis=1)
    expected = np.where(lower[rows, top] > runner_up, top, ABSTAIN)
    assert np.array_equal(got, expected)
    assert 0 < (got == ABSTAIN).sum() < 200  # both branches are exercised
    # Zero variance: only the 7 ln(2/level) / (3 (n - 1)) term of the width is left.
    width = 7 * np.log(2 / (0.01 / 4)) / (3 * (n - 1))
    close = np.array([[0.5 + 0.99 * width, 0.5 - 0.99 * width], [0.5 + 1.01 * width, 0.5 - 1.01 * width]])
    assert soft_vote_decision(close, np.zeros((2, 2)), n, 0.01).tolist() == [ABSTAIN, 0]
    assert soft_vote_decision(np.array([[np.nan, 0.0]]), np.zeros((1, 2)), n, 0.01).tolist() == [ABSTAIN]


@pytest.mark.parametrize("g", [(0.4, 0.4, 0.2), (0.45, 0.35, 0.2), (0.6, 0.25, 0.15)])
def test_decision_is_wrong_at_most_alpha_of_the_time(g):
    # One-hot votes with probabilities g (the largest variance a [0, 1] variable with mean g_c can have):
    # with a tied top (first case) any class is wrong, otherwise any class but 0.
    rng = np.random.default_rng(1)
    trials, n, alpha = 2000, 400, 0.2
    votes = rng.multinomial(1, g, size=(trials, n)).astype(np.float64)
    got = soft_vote_decision(votes.mean(axis=1), votes.var(axis=1, ddof=1), n, alpha)
    wrong = (got != ABSTAIN) if g[0] == g[1] else (got != ABSTAIN) & (got != 0)
    assert wrong.mean() <= alpha
    if g[0] - g[1] > 0.3:
        assert (got == 0).mean() > 0.9  # not a rule that always abstains


def test_device_dtype_eval_mode_empty_batch_and_determinism():
    model = nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.5))
    model.train()
    x = torch.rand(4, 2)
    a = soft_predict(model, x, 0.25, 200, 0.01, 100, generator=3)
    b = soft_predict(model, x, 0.25, 200, 0.01, 100, generator=3)
    assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (4,)
    assert model.training and model[1].training  # restored after eval mode
    assert soft_predict(model, x[:0], 0.25, 200, 0.01, 100).shape == (0,)
    nan_model = nn.Linear(2, 3)
    with torch.no_grad():
        nan_model.bias.fill_(float("nan"))
    assert soft_predict(nan_model, x, 0.25, 50, 0.01, 100).tolist() == [ABSTAIN] * 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(simplex_map=HARD_VOTES), "simplex_map must be one of 'softmax', 'sparsemax'; got 'argmax'"),
        (dict(inverse_temperature=0.0), "inverse_temperature must be a finite number > 0; got 0.0"),
        (dict(inverse_temperature=float("inf")), "inverse_temperature must be a finite number > 0"),
        (dict(n=1), "n must be an int >= 2"),
        (dict(alpha=1.0), "alpha must be a number in the open interval"),
        (dict(sigma=0.0), "sigma must be a finite number > 0; got 0.0"),
        (dict(batch_size=0), "batch_size must be an int >= 1"),
        (dict(x=torch.zeros(3, dtype=torch.long)), "x must be a floating-point tensor of shape"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(base_model=nn.Linear(2, 3), x=torch.rand(2, 2), sigma=0.5, n=10, alpha=0.01, batch_size=10)
    args.update(kwargs)
    positional = [args.pop(k) for k in ("base_model", "x", "sigma", "n", "alpha", "batch_size")]
    with pytest.raises(ValueError, match=match):
        soft_predict(*positional, **args)


# ----------------------------------------------------------------------------------------------- grid noise
def test_decision_with_a_total_variation_bound_widens_every_bound():
    mean = np.array([[0.7, 0.3], [0.52, 0.48]])
    var = np.full((2, 2), 0.01)
    n, alpha, tv = 10_000, 0.001, 0.02
    slack = 4.0 * n * 2.0**-53
    lower = empirical_bernstein_lower(np.clip(mean - slack, 0, 1), var + slack, n, alpha / 4)
    upper = empirical_bernstein_upper(np.clip(mean + slack, 0, 1), var + slack, n, alpha / 4)
    # row 1 separates without the widening but not with it: its margin is below 2 tv
    assert lower[1, 0] > upper[1, 1] and lower[1, 0] - tv <= upper[1, 1] + tv
    assert soft_vote_decision(mean, var, n, alpha).tolist() == [0, 0]
    assert soft_vote_decision(mean, var, n, alpha, tv=tv).tolist() == [0, ABSTAIN]
    assert soft_vote_decision(mean, var, n, alpha, tv=0.0).tolist() == [0, 0]
    with pytest.raises(ValueError, match=r"tv must be a number in \[0, 1\]; got -0.1"):
        soft_vote_decision(mean, var, n, alpha, tv=-0.1)


class _OnGrid(nn.Module):
    """Class 1 iff the input is (within 1e-3 steps) a grid point k / 16: always under grid noise, almost never
    under float noise."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        first = z.flatten(1)[:, :1].double()
        on = ((first * 16 - (first * 16).round()).abs() < 1e-3).double()
        return torch.cat([torch.zeros_like(on), 10 * on - 5], dim=1)


def test_grid_noise_predicts_the_grid_classifier_with_widened_bounds(monkeypatch):
    import stablenet.smoothing.soft as soft

    x = torch.tensor([[[[3 / 16]]], [[[1.0]]]])
    grid = soft_predict(_OnGrid(), x, 0.5, 200, 0.01, 400, generator=0, noise="grid", levels=16)
    plain = soft_predict(_OnGrid(), x, 0.5, 200, 0.01, 400, generator=0)
    assert grid.tolist() == [1, 1] and plain.tolist() == [0, 0]
    seen = []
    decide = soft.soft_vote_decision
    monkeypatch.setattr(soft, "soft_vote_decision", lambda *a, **k: seen.append(k["tv"]) or decide(*a, **k))
    soft_predict(_OnGrid(), x, 0.5, 200, 0.01, 400, noise="grid", levels=16)
    soft_predict(_OnGrid(), x, 0.5, 200, 0.01, 400)
    from stablenet.smoothing.grid_noise import GridNoise

    assert seen == [GridNoise(0.5, 16).tv_bound(1), 0.0] and seen[0] > 0
    with pytest.raises(ValueError, match="noise='grid' needs inputs on the grid k / 16") as excinfo:
        soft_predict(_OnGrid(), torch.full((1, 1, 1, 1), 0.1), 0.5, 200, 0.01, 400, noise="grid", levels=16)
    assert "\n" not in str(excinfo.value)
    with pytest.raises(ValueError, match="noise must be one of 'float', 'grid'; got 'exact'"):
        soft_predict(_OnGrid(), x, 0.5, 200, 0.01, 400, noise="exact")
