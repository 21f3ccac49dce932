import copy
import math

import pytest
import torch
from torch import nn

from stablenet.certify.attack import pgd_l2
from stablenet.certify.lipschitz import (
    LipschitzCertifier,
    LogitErrorBound,
    certify_lipschitz,
    generic_margin_radius,
    lln_margin_radius,
)
from stablenet.certify.records import ABSTAIN
from stablenet.data import load_dataset
from stablenet.nn import LinearNormalized


def _exact(logits):
    return LogitErrorBound.exact(*logits.shape)


def test_generic_radius_closed_form():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    pred, radius = generic_margin_radius(logits, 2.0, _exact(logits))
    assert pred.tolist() == [0, 2, 0]
    expected = torch.tensor([2.0, 5.0, 0.0], dtype=torch.float64) / (math.sqrt(2) * 2.0)
    assert torch.all(radius <= expected) and torch.allclose(radius, expected, rtol=1e-11)
    assert radius[2] == 0  # a tie certifies nothing


def test_generic_radius_pays_for_the_error_at_x_and_on_the_ball():
    """r = (m - 2 sqrt2 e0) / (sqrt2 (L + e1)): the error counts at x and again, growing with r, at x'."""
    logits = torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    error = LogitErrorBound.exact(1, 2)
    error = LogitErrorBound(
        torch.tensor([0.1], dtype=torch.float64),
        torch.tensor([0.5], dtype=torch.float64),
        error.head_offset,
        error.head_slope,
        error.radius_limit,
    )
    _, radius = generic_margin_radius(logits, 2.0, error)
    expected = (2.0 - 2 * math.sqrt(2) * 0.1) / (math.sqrt(2) * (2.0 + 0.5))
    assert radius.item() <= expected and radius.item() == pytest.approx(expected, rel=1e-11)
    limited = LogitErrorBound(
        *[getattr(error, f) for f in ("body_offset", "body_slope", "head_offset", "head_slope")],
        torch.tensor([0.25], dtype=torch.float64),
    )
    assert generic_margin_radius(logits, 2.0, limited)[1].item() <= 0.25


def test_lln_radius_closed_form_and_tighter_than_generic():
    logits = torch.tensor([[2.0, 1.0, -1.0]], dtype=torch.float64)
    dist = torch.tensor([[0.0, 0.5, 2.0], [0.5, 0.0, 1.0], [2.0, 1.0, 0.0]], dtype=torch.float64)
    pred, radius = lln_margin_radius(logits, dist, 1.0, _exact(logits))
    # min over j of (f_0 - f_j) / d_0j = min(1 / 0.5, 3 / 2) = 1.5
    assert pred.item() == 0 and radius.item() == pytest.approx(1.5, rel=1e-9) and radius.item() <= 1.5


def test_lln_radius_with_head_rounding_closed_form():
    logits = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    dist = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    error = LogitErrorBound(
        torch.tensor([0.01], dtype=torch.float64),  # body error 0.01 + 0.02 r
        torch.tensor([0.02], dtype=torch.float64),
        torch.tensor([[0.03, 0.04]], dtype=torch.float64),  # per-logit head error h0 + h1 r
        torch.tensor([[0.05, 0.06]], dtype=torch.float64),
        torch.tensor([math.inf], dtype=torch.float64),
    )
    _, radius = lln_margin_radius(logits, dist, 1.5, error)
    alpha, beta = 1.0 * 0.01 + 0.03 + 0.04, 1.0 * 0.02 + 0.05 + 0.06
    expected = (1.0 - 2 * alpha) / (1.0 * 1.5 + beta)
    assert radius.item() <= expected and radius.item() == pytest.approx(expected, rel=1e-11)


def test_non_finite_logits_abstain_and_bad_input():
    logits = torch.tensor([[float("nan"), 1.0], [2.0, 1.0]])
    pred, radius = generic_margin_radius(logits, 1.0, _exact(logits))
    assert pred[0] == ABSTAIN and radius[0] == 0 and radius[1] > 0
    with pytest.raises(ValueError, match="lipschitz must be a finite number > 0"):
        generic_margin_radius(logits, -1.0, _exact(logits))
    with pytest.raises(ValueError, match=r"logits must have shape \(N, num_classes >= 2\)"):
        generic_margin_radius(torch.ones(3), 1.0, _exact(logits))
    with pytest.raises(ValueError, match="distances must have shape"):
        lln_margin_radius(torch.ones(2, 3), torch.ones(2, 2), 1.0, _exact(logits))
    with pytest.raises(TypeError, match="error must be a LogitErrorBound"):
        generic_margin_radius(logits, 1.0, None)
    with pytest.raises(ValueError, match="error must have body terms of shape"):
        generic_margin_radius(logits, 1.0, LogitErrorBound.exact(3, 2))
    with pytest.raises(ValueError, match="form must be one of"):
        LipschitzCertifier(nn.Linear(2, 2), form="tight")
    with pytest.raises(ValueError, match="arithmetic must be one of"):
        LipschitzCertifier(nn.Linear(2, 2), arithmetic="float32")


def test_linear_lln_model_radius_never_exceeds_exact_distance_to_boundary():
    """For f(x) = Wn x + b the true minimal adversarial l2 distance is min_j margin_j / ||w_c - w_j||."""
    torch.manual_seed(0)
    head = LinearNormalized(5, 4).double()
    model = nn.Sequential(nn.Identity(), head)
    x = torch.randn(200, 5, dtype=torch.float64)
    pred, radius = certify_lipschitz(model, x)
    w = head.normalized_weight().detach()
    logits = model(x).detach()
    for i in range(len(x)):
        c = pred[i]
        exact = min((logits[i, c] - logits[i, j]) / (w[c] - w[j]).norm() for j in range(4) if j != c)
        assert radius[i] <= exact
        assert radius[i] >= exact * (1 - 1e-6) - 1e-9  # and it is tight
    # the generic form is valid but looser
    _, generic = certify_lipschitz(model, x, form="generic")
    assert torch.all(generic <= radius + 1e-12)


def test_native_error_bound_covers_the_float32_forward(trained_digits_run):
    """The native (float32) bound at r = 0 is above the distance between float32 and float64 logits."""
    model32 = trained_digits_run.model.eval()
    model64 = copy.deepcopy(model32).double()
    x, _ = load_dataset("digits", "test")
    with torch.no_grad():
        z32, z64 = model32(x), model64(x.double())
    certifier = LipschitzCertifier(model32, "generic", tuple(x.shape[1:]), arithmetic="native")
    with certifier._walk.record():
        certifier.body(x)
    state, _ = certifier._walk.body_error(len(x), x.device)
    gap = (z32.double() - z64).norm(dim=1)
    assert torch.all(gap <= state.e0) and torch.all(state.e0 < 0.1)


@pytest.mark.parametrize("form", ["lln", "generic"])
@pytest.mark.parametrize("arithmetic", ["float64", "native"])
def test_pgd_never_breaks_a_certified_prediction(trained_digits_run, form, arithmetic):
    model = trained_digits_run.model.eval()
    network = copy.deepcopy(model).double() if arithmetic == "float64" else model
    x, _ = load_dataset("digits", "test")
    pred, radius = certify_lipschitz(model, x, form=form, arithmetic=arithmetic)
    certified = radius > 0
    assert certified.sum() > 100, "the trained model should certify most points"
    # Attack right at the edge of each certified ball, in the certified arithmetic.
    xs = x.to(next(network.parameters()).dtype)
    _, flipped = pgd_l2(
        network,
        xs[certified],
        pred[certified],
        0.99 * radius[certified].to(xs.dtype),
        steps=40,
        restarts=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert not flipped.any()


def test_pgd_is_strong_enough_to_find_counterexamples(trained_digits_run):
    """The attack flips many predictions at a few times the certified radius (so the check above has teeth)."""
    model = trained_digits_run.model.eval()
    x, _ = load_dataset("digits", "test")
    pred, radius = certify_lipschitz(model, x[:100])
    _, flipped = pgd_l2(
        model,
        x[:100],
        pred,
        4.0 * radius.float() + 0.3,
        steps=40,
        restarts=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert flipped.float().mean() > 0.5
