import copy
import math

import pytest
import torch
from torch import nn

from stablenet.certify.attack import pgd_l2
from stablenet.certify.lipschitz import (
    FORWARD_ROUNDING_TOLERANCE,
    LipschitzCertifier,
    certify_lipschitz,
    forward_rounding_tolerance,
    generic_margin_radius,
    lln_margin_radius,
)
from stablenet.certify.records import ABSTAIN
from stablenet.data import load_dataset
from stablenet.nn import LinearNormalized


def test_generic_radius_closed_form():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    pred, radius = generic_margin_radius(logits, lipschitz=2.0)
    assert pred.tolist() == [0, 2, 0]
    tol = forward_rounding_tolerance(logits)
    expected = torch.tensor([2.0, 5.0, 0.0], dtype=torch.float64) - 4 * tol
    expected = expected.clamp_min(0) / (math.sqrt(2) * 2.0)
    assert torch.all(radius <= expected) and torch.allclose(radius, expected, rtol=1e-12)
    assert radius[2] == 0  # a tie certifies nothing


def test_lln_radius_closed_form_and_tighter_than_generic():
    logits = torch.tensor([[2.0, 1.0, -1.0]], dtype=torch.float64)
    dist = torch.tensor([[0.0, 0.5, 2.0], [0.5, 0.0, 1.0], [2.0, 1.0, 0.0]], dtype=torch.float64)
    pred, radius = lln_margin_radius(logits, dist, body_lipschitz=1.0)
    # min over j of (f_0 - f_j) / d_0j = min(1 / 0.5, 3 / 2) = 1.5
    assert pred.item() == 0 and radius.item() == pytest.approx(1.5, rel=1e-9) and radius.item() <= 1.5


def test_non_finite_logits_abstain_and_bad_input():
    logits = torch.tensor([[float("nan"), 1.0], [2.0, 1.0]])
    pred, radius = generic_margin_radius(logits, 1.0)
    assert pred[0] == ABSTAIN and radius[0] == 0 and radius[1] > 0
    with pytest.raises(ValueError, match="lipschitz must be a finite number > 0"):
        generic_margin_radius(logits, -1.0)
    with pytest.raises(ValueError, match=r"logits must have shape \(N, num_classes >= 2\)"):
        generic_margin_radius(torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="distances must have shape"):
        lln_margin_radius(torch.ones(2, 3), torch.ones(2, 2), 1.0)
    with pytest.raises(ValueError, match="form must be one of"):
        LipschitzCertifier(nn.Linear(2, 2), form="tight")


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


def test_forward_tolerance_covers_float32_rounding(trained_digits_run):
    """Calibration of Note [sound rounding]: float32 logits stay within 1/10 of the tolerance of float64 ones."""
    model32 = trained_digits_run.model
    model64 = copy.deepcopy(model32).double()
    x, _ = load_dataset("digits", "test")
    with torch.no_grad():
        z32, z64 = model32(x), model64(x.double())
    tol = forward_rounding_tolerance(z32)
    assert torch.all((z32.double() - z64).abs().amax(dim=1) <= tol / 10)
    assert FORWARD_ROUNDING_TOLERANCE[torch.float32] > 0


@pytest.mark.parametrize("form", ["lln", "generic"])
def test_pgd_never_breaks_a_certified_prediction(trained_digits_run, form):
    model = trained_digits_run.model.eval()
    x, _ = load_dataset("digits", "test")
    pred, radius = certify_lipschitz(model, x, form=form)
    certified = radius > 0
    assert certified.sum() > 100, "the trained model should certify most points"
    # Attack right at the edge of each certified ball.
    _, flipped = pgd_l2(
        model,
        x[certified],
        pred[certified],
        0.99 * radius[certified].float(),
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
