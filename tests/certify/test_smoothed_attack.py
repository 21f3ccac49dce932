"""The smoothed-classifier attack tools: the EOT surrogate and moving a point onto an input grid."""

import torch
from torch import nn

from stablenet.certify.smoothed_attack import ExpectedScores, onto_grid


def test_expected_scores_is_the_log_mean_of_the_simplex_map_and_differentiable():
    torch.manual_seed(0)
    base = nn.Linear(3, 4).double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    surrogate = ExpectedScores(base, sigma=1e-12, draws=3, generator=gen, simplex_map="softmax", s=1.0)
    out = surrogate(x)
    torch.testing.assert_close(out, base(x).log_softmax(dim=1), rtol=1e-9, atol=1e-9)
    out[:, 0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_onto_grid_stays_on_the_grid_in_the_box_and_within_the_radius():
    gen = torch.Generator().manual_seed(0)
    levels = 16
    steps = torch.randint(0, levels + 1, (50, 1, 4, 4), generator=gen)
    x = steps.double() / levels
    x_adv = x + 0.3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    eps = (x_adv - x).flatten(1).norm(dim=1)
    moved, how = onto_grid(x, x_adv, steps, levels, eps)
    k = moved * levels
    assert torch.equal(k, k.round()) and moved.min() >= 0 and moved.max() <= 1
    assert torch.all((moved - x).flatten(1).norm(dim=1) <= eps + 1e-12)
    assert set(how) <= {"nearest", "toward input"}
