"""The loss registry: each loss against a value worked out by hand, finite gradients, margins from a target radius
equal to what the certificate needs (generic and LLN, on hand-built models, and against the certifier itself), a
user's loss by name and as a callable, the legacy ``create_loss``, KR under DDP (2 gloo processes), and one-line
errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from stablenet.certify.lipschitz import LipschitzCertifier
from stablenet.nn import LinearNormalized, SLLLinear
from stablenet.spectral import lipschitz_upper_bound
from stablenet.train import losses as package
from stablenet.train.losses import (
    LOSSES,
    TargetMargin,
    build_loss,
    create_loss,
    hkr_loss,
    kr_loss,
    list_losses,
    multiclass_hinge,
    offset_cross_entropy,
    register_loss,
)
from stablenet.train.losses import registry as registry_module

SQRT2 = math.sqrt(2.0)


@pytest.fixture
def restore_registry(monkeypatch):
    monkeypatch.setattr(registry_module, "_LOSSES", dict(registry_module._LOSSES))


def _approx(value, expected):
    assert float(value) == pytest.approx(float(expected), rel=1e-6, abs=1e-7)


def _lse(*values):
    return math.log(sum(math.exp(v) for v in values))


# ------------------------------------------------------------------------------------------- hand-computed values
Z = torch.tensor([[2.0, 0.0, 1.5], [0.0, 1.0, 3.0]])
Y = torch.tensor([0, 1])


def test_ce_by_hand():
    # CE = mean_i (log sum_j e^{z_ij} - z_{i y_i})
    expected = ((_lse(2.0, 0.0, 1.5) - 2.0) + (_lse(0.0, 1.0, 3.0) - 1.0)) / 2
    _approx(build_loss("ce")(Z, Y), expected)


def test_offset_ce_by_hand():
    # tau * CE((z - u e_y) / tau), u = 1, tau = 0.5:
    # example 0: (2 - 1, 0, 1.5) / 0.5 = (2, 0, 3), true 2; example 1: (0, 1 - 1, 3) / 0.5 = (0, 0, 6), true 0
    expected = 0.5 * ((_lse(2.0, 0.0, 3.0) - 2.0) + (_lse(0.0, 0.0, 6.0) - 0.0)) / 2
    _approx(build_loss("offset_ce", {"offset": 1.0, "temperature": 0.5})(Z, Y), expected)
    _approx(offset_cross_entropy(Z, Y, 1.0, 0.5), expected)
    # Pairwise margins M (zero at the true class): z + M_y, tau = 1.
    # example 0: m = (0, 1, 2) -> (2, 1, 3.5), true 2; example 1: m = (0.5, 0, 0) -> (0.5, 1, 3), true 1
    margins = torch.tensor([[0.0, 1.0, 2.0], [0.5, 0.0, 0.0]])
    expected = ((_lse(2.0, 1.0, 3.5) - 2.0) + (_lse(0.5, 1.0, 3.0) - 1.0)) / 2
    _approx(offset_cross_entropy(Z, Y, margins), expected)


def test_hinge_by_hand():
    # sum_{j != y} max(0, u - (z_y - z_j)), u = 1:
    # example 0 (z_y = 2): j=1: 1 - 2 -> 0; j=2: 1 - 0.5 = 0.5.  example 1 (z_y = 1): j=0: 1 - 1 = 0; j=2: 1 + 2 = 3
    _approx(build_loss("hinge", {"offset": 1.0})(Z, Y), (0.5 + 3.0) / 2)
    # pairwise: example 0 margins (0, 3, 0.25): j=1: 3 - 2 = 1; j=2: 0.25 - 0.5 -> 0.
    #           example 1 margins (1, 0, 0): j=0: 1 - 1 = 0; j=2: 0 + 2 = 2
    margins = torch.tensor([[0.0, 3.0, 0.25], [1.0, 0.0, 0.0]])
    _approx(multiclass_hinge(Z, Y, margins), (1.0 + 2.0) / 2)
    # a margin given on the true class is ignored (it is zero by definition)
    _approx(multiclass_hinge(Z, Y, margins + torch.eye(3)[Y] * 7), (1.0 + 2.0) / 2)


ZK = torch.tensor([[1.0, -1.0], [0.0, 2.0], [3.0, 0.0]])
YK = torch.tensor([0, 1, 0])
# KR estimate, mean over classes of (mean over the class - mean over the rest):
# class 0: (1 + 3)/2 - 0 = 2; class 1: 2 - (-1 + 0)/2 = 2.5  ->  W = 2.25, loss -2.25
KR_BY_HAND = -2.25


def test_kr_by_hand():
    _approx(build_loss("kr")(ZK, YK), KR_BY_HAND)
    # A class absent from the batch: its "class" mean counts as 0, its "rest" mean is over the whole batch.
    z3 = torch.tensor([[1.0, -1.0, 4.0], [0.0, 2.0, 2.0]])
    # class 0: 1 - 0 = 1; class 1: 2 - (-1) = 3; class 2 (absent): 0 - (4 + 2)/2 = -3  ->  W = 1/3
    _approx(kr_loss(z3, torch.tensor([0, 1])), -1.0 / 3.0)


def test_hkr_by_hand():
    # H = mean_i (1/K) sum_{j != y} [max(0, m/2 - z_y) + max(0, m/2 + z_j)], m = 1, K = 2:
    # example 0: max(0, 0.5 - 1) + max(0, 0.5 - 1) = 0; example 1: 0 + max(0, 0.5 + 0) = 0.5; example 2: 0 + 0.5
    hinge = (0.0 + 0.5 / 2 + 0.5 / 2) / 3
    _approx(build_loss("hkr", {"offset": 1.0, "alpha": 0.5})(ZK, YK), 0.5 * hinge + 0.5 * KR_BY_HAND)
    _approx(hkr_loss(ZK, YK, 1.0, alpha=1.0), hinge)
    _approx(hkr_loss(ZK, YK, 1.0, alpha=0.0), KR_BY_HAND)
    # With a constant margin, H is deel-lip's one-vs-rest hinge
    # (1/K) [(K-1) max(0, m/2 - z_y) + sum_{j!=y} max(0, m/2 + z_j)]
    z, y, m = torch.tensor([[0.2, 0.4, -1.0]]), torch.tensor([0]), 1.0
    ovr = (2 * max(0.0, m / 2 - 0.2) + max(0.0, m / 2 + 0.4) + max(0.0, m / 2 - 1.0)) / 3
    _approx(hkr_loss(z, y, m, alpha=1.0), ovr)
    # pairwise margins (0, 2, 0.4): j=1: max(0, 1 - 0.2) + max(0, 1 + 0.4); j=2: max(0, 0.2 - 0.2) + max(0, 0.2 - 1)
    pairwise = ((0.8 + 1.4) + (0.0 + 0.0)) / 3
    _approx(hkr_loss(z, y, torch.tensor([[0.0, 2.0, 0.4]]), alpha=1.0), pairwise)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("ce", {}),
        ("offset_ce", {"offset": 1.5, "temperature": 0.25}),
        ("hinge", {"offset": 1.0}),
        ("kr", {}),
        ("hkr", {"offset": 1.0, "alpha": 0.9}),
    ],
)
def test_gradients_are_finite_and_half_precision_logits_are_taken_in_float32(name, options):
    torch.manual_seed(0)
    logits = (3 * torch.randn(16, 5)).requires_grad_(True)
    target = torch.arange(16) % 5
    value = build_loss(name, options)(logits, target)
    assert value.dim() == 0 and torch.isfinite(value)
    (grad,) = torch.autograd.grad(value, logits)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    half = build_loss(name, options)(logits.detach().bfloat16(), target)
    assert half.dtype == torch.float32
    assert float(half) == pytest.approx(float(value.detach()), rel=0.05, abs=0.05)


# ------------------------------------------------------------------------------------------ margins from a radius
def _linear(weight, bias=None):
    weight = torch.as_tensor(weight, dtype=torch.float32)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return layer


def _lln_model():
    """Body: diag(2, 0.5) (L = 2; distinct singular values, on which the Gram bound is tight). Head: rows (5, 0),
    (0, 0.5), (-2, 0), used as e1, e2, -e1."""
    head = LinearNormalized(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[5.0, 0.0], [0.0, 0.5], [-2.0, 0.0]]))
        head.bias.zero_()
    return nn.Sequential(_linear([[2.0, 0.0], [0.0, 0.5]], [0.0, 0.0]), head)


def test_generic_margin_is_sqrt2_L_eps():
    model = _linear([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]], [0.1, 0.2, 0.3])  # singular values 3, 1: L = 3
    eps = 0.25
    margin = TargetMargin(eps, model)
    assert margin.form == "generic"
    _approx(margin(torch.tensor([0, 2])), SQRT2 * 3.0 * eps)
    assert margin(torch.tensor([1])) == SQRT2 * lipschitz_upper_bound(model) * eps
    # The loss uses it: hinge with target_radius equals hinge with the offset sqrt(2) L eps.
    z, y = torch.randn(6, 3), torch.arange(6) % 3
    _approx(build_loss("hinge", {"target_radius": eps}, model=model)(z, y), multiclass_hinge(z, y, SQRT2 * 3.0 * eps))
    # The generic form of an LLN model: L = 2 (body) x sqrt(2) (the head's rows e1, e2, -e1), margin sqrt2 L eps = 4 eps
    _approx(TargetMargin(eps, _lln_model(), form="generic")(torch.tensor([0])), 4.0 * eps)
    # Without a model, a given bound.
    _approx(TargetMargin(eps, lipschitz=1.5)(torch.tensor([0])), SQRT2 * 1.5 * eps)


def test_lln_margin_is_L_eps_row_distance_and_follows_the_head():
    model, eps = _lln_model(), 0.25
    margin = TargetMargin(eps, model)
    assert margin.form == "lln"
    _approx(margin.lipschitz, 2.0)
    # ||e1 - e2|| = sqrt 2, ||e1 + e1|| = 2, ||e2 + e1|| = sqrt 2;
    # margins L_body eps ||w_y - w_j|| with L_body eps = 2 * 0.25 = 0.5
    expected = torch.tensor([[0.0, 0.5 * SQRT2, 1.0], [1.0, 0.5 * SQRT2, 0.0]])
    got = margin(torch.tensor([0, 2]))
    assert got.shape == (2, 3) and not got.requires_grad
    torch.testing.assert_close(got, expected)
    assert float(got[0, 0]) == 0.0 and float(got[1, 2]) == 0.0
    z, y = torch.tensor([[1.0, 0.5, 0.2], [0.0, 0.1, 0.3]]), torch.tensor([0, 2])
    # hinge: example 0: j=1: 0.707 - 0.5 = 0.207; j=2: 1 - 0.8 = 0.2. example 1: j=0: 1 - 0.3 = 0.7; j=1: 0.707 - 0.2
    by_hand = ((0.5 * SQRT2 - 0.5) + 0.2 + 0.7 + (0.5 * SQRT2 - 0.2)) / 2
    _approx(build_loss("hinge", {"target_radius": eps}, model=model)(z, y), by_hand)
    # The rows are read at every call, in training and in eval mode: turn row 2 into e2 (distance 0 to row 1).
    loss = build_loss("hinge", {"target_radius": eps}, model=model)
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            model[1].weight.copy_(torch.tensor([[5.0, 0.0], [0.0, 0.5], [-2.0, 0.0]]))
        torch.testing.assert_close(loss.margin(torch.tensor([2])), torch.tensor([[1.0, 0.5 * SQRT2, 0.0]]))
        with torch.no_grad():
            model[1].weight[2] = torch.tensor([0.0, 3.0])
        torch.testing.assert_close(loss.margin(torch.tensor([2])), torch.tensor([[0.5 * SQRT2, 0.0, 0.0]]))


@pytest.mark.parametrize("form", ["generic", "lln"])
def test_zero_hinge_at_target_radius_is_exactly_what_the_certificate_certifies(form):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), SLLLinear(8), nn.ReLU(), SLLLinear(8), LinearNormalized(8, 4)).eval()
    x = torch.randn(64, 8)
    pred, radius = LipschitzCertifier(model, form=form)(x)
    with torch.no_grad():
        z = model(x)

    def hinge_at(eps, rows):
        loss = build_loss("hinge", {"target_radius": eps, "margin_form": form}, model=model)
        return torch.stack([loss(z[i : i + 1], pred[i : i + 1]) for i in rows])

    # Over the batch: zero above the target radius, positive below it.
    eps = float(radius.median())
    above, below = radius > eps * (1 + 1e-5), radius < eps * (1 - 1e-5)
    assert above.sum() > 10 and below.sum() > 10
    per_example = hinge_at(eps, range(len(x)))
    assert (per_example[above] == 0).all() and (per_example[below] > 0).all()
    # Tightly, for single examples: zero just below their certified radius, positive just above it.
    for i in radius.argsort()[8::8].tolist():
        r = float(radius[i])
        assert float(hinge_at(r * (1 - 1e-4), [i])) == 0 and float(hinge_at(r * (1 + 1e-4), [i])) > 0


def test_constrained_bounds_are_constants_unconstrained_ones_are_refreshed():
    constrained = nn.Sequential(SLLLinear(4), nn.ReLU(), SLLLinear(4))
    margin = TargetMargin(0.5, constrained)
    assert margin.weight_dependent == ()
    before = margin.lipschitz
    with torch.no_grad():
        for p in constrained.parameters():
            p.mul_(3.0)
    assert margin.refresh() == before  # a constrained layer's bound does not depend on its weights

    plain = _linear([[3.0, 0.0], [0.0, 1.0]])
    loss = build_loss("hinge", {"target_radius": 0.5}, model=plain)
    assert loss.margin.weight_dependent == ("Linear",)
    stale = loss.margin(torch.tensor([0]))
    with torch.no_grad():
        plain.weight.mul_(2.0)
    assert loss.margin(torch.tensor([0])) == stale  # built once: stale until refreshed
    loss.refresh()
    _approx(loss.margin(torch.tensor([0])), 2 * stale)
    # The bound travels with a checkpoint, so a resumed run uses the same margin.
    state = loss.state_dict()
    other = build_loss("hinge", {"target_radius": 0.5}, model=_linear([[1.0, 0.0], [0.0, 1.0]]))
    other.load_state_dict(state)
    assert other.margin(torch.tensor([0])) == loss.margin(torch.tensor([0]))
    assert build_loss("ce").state_dict() == {}


def test_the_bound_is_taken_in_eval_mode_and_every_mode_is_restored():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model.train()
    model[2].eval()
    margin = TargetMargin(0.1, model)  # BatchNorm in training mode has no fixed function; eval mode has one
    assert margin.weight_dependent == ("0", "1", "2")
    assert [m.training for m in model.modules()] == [True, True, True, False]


# ------------------------------------------------------------------------------------------------------ registry
def test_builtins_and_legacy_create_loss():
    assert LOSSES == ("ce", "hinge", "hkr", "kr", "offset_ce") and set(LOSSES) <= set(list_losses())
    # create_loss(name, offset, temperature) as the trainer calls it today, against the formulas written out.
    z, y = torch.randn(8, 4), torch.arange(8) % 4
    onehot = F.one_hot(y, 4).float()
    _approx(create_loss("offset_ce", 0.7, 0.25)(z, y), 0.25 * F.cross_entropy((z - 0.7 * onehot) / 0.25, y))
    true = (z * onehot).sum(1, keepdim=True)
    _approx(create_loss("hinge", 0.7, 0.25)(z, y), ((0.7 - (true - z)).clamp_min(0) * (1 - onehot)).sum(1).mean())
    _approx(create_loss("ce", 0.7, 0.25)(z, y), F.cross_entropy(z, y))
    _approx(create_loss("kr")(z, y), kr_loss(z, y))


def test_a_registered_loss_by_name_and_a_callable(restore_registry):
    seen = []

    @register_loss("scaled_hinge")
    def scaled_hinge(logits, target, margin=0.0, scale=1.0):
        seen.append(margin)
        return scale * multiclass_hinge(logits, target, margin)

    register_loss("scaled_hinge", scaled_hinge)  # the same function again: a no-op
    assert "scaled_hinge" in list_losses()
    z, y = torch.randn(6, 3), torch.arange(6) % 3
    _approx(build_loss("scaled_hinge", {"offset": 0.5, "scale": 3.0})(z, y), 3 * multiclass_hinge(z, y, 0.5))
    model = _lln_model()
    build_loss("scaled_hinge", {"target_radius": 0.25}, model=model)(z, y)
    assert seen[0] == 0.5 and seen[1].shape == (6, 3)  # a float from offset, per-pair margins from the LLN head
    # A callable directly, with its own keyword options; an nn loss module too.
    _approx(build_loss(F.cross_entropy, {"label_smoothing": 0.1})(z, y), F.cross_entropy(z, y, label_smoothing=0.1))
    _approx(build_loss(nn.MultiMarginLoss(margin=2.0))(z, y), F.multi_margin_loss(z, y, margin=2.0))
    _approx(build_loss(lambda logits, target: logits.sum())(z, y), z.sum())


def _kr_rank(rank, world, path, logits, target, sizes, queue):
    torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    start = sum(sizes[:rank])
    mine = logits[start : start + sizes[rank]].clone().requires_grad_(True)
    y = target[start : start + sizes[rank]]
    out = []
    for name, options in (("kr", {}), ("hkr", {"offset": 1.0, "alpha": 0.3})):
        value = build_loss(name, options, distributed=True)(mine, y)
        weight = world * sizes[rank] / sum(sizes)  # the trainer's per-rank mean weighting
        (grad,) = torch.autograd.grad(value * weight, mine)
        out.append((float(value.detach()), (grad / world).tolist()))  # DDP averages the ranks' gradients
    queue.put((rank, out))
    torch.distributed.destroy_process_group()


def test_kr_under_ddp_equals_the_global_batch(tmp_path):
    torch.manual_seed(2)
    logits, target, sizes = torch.randn(8, 3), torch.tensor([0, 1, 1, 2, 0, 0, 1, 2]), [5, 3]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.spawn(_kr_rank, args=(2, tmp_path / "store", logits, target, sizes, queue), nprocs=2)
    results = dict(queue.get() for _ in range(2))
    for k, (name, options) in enumerate((("kr", {}), ("hkr", {"offset": 1.0, "alpha": 0.3}))):
        whole = logits.clone().requires_grad_(True)
        value = build_loss(name, options)(whole, target)
        (grad,) = torch.autograd.grad(value, whole)
        averaged = sum(results[r][k][0] * sizes[r] for r in range(2)) / sum(sizes)
        assert averaged == pytest.approx(float(value.detach()), rel=1e-6)
        torch.testing.assert_close(torch.tensor(results[0][k][1] + results[1][k][1]), grad)


# -------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: build_loss("nope"), "loss must be one of ce, hinge, hkr, kr, offset_ce or a callable; got 'nope'"),
        (lambda: build_loss("offset_ce", {"temperature": 0}), "temperature must be a finite number > 0; got 0"),
        (lambda: build_loss("hkr", {"alpha": 1.5}), "alpha must be a number in [0, 1]; got 1.5"),
        (lambda: build_loss("hinge", {"offset": -1.0}), "offset must be a finite number >= 0; got -1.0"),
        (lambda: build_loss("hinge", {"offset": "1"}), "offset must be a finite number >= 0; got '1'"),
        (lambda: build_loss("hinge", {"target_radius": 0.0}), "target_radius must be a finite number > 0; got 0.0"),
        (
            lambda: build_loss("hinge", {"temprature": 1.0}),
            "loss 'hinge' has no option 'temprature'; its options are offset, target_radius, margin_form, lipschitz",
        ),
        (lambda: build_loss("kr", {"alpha": 0.5}), "loss 'kr' has no option 'alpha'; its options are none"),
        (
            lambda: build_loss("ce", {"target_radius": 0.5}),
            "loss 'ce' takes no margin, so 'target_radius' does not apply; margin losses: hinge, hkr, offset_ce",
        ),
        (
            lambda: build_loss("hinge", {"offset": 1.0, "target_radius": 0.5}),
            "give offset (a raw margin) or target_radius (a certified radius), not both",
        ),
        (lambda: build_loss("hinge", {"margin_form": "lln"}), "margin_form applies only with target_radius"),
        (lambda: build_loss("hinge", {"margin": 1.0}), "option 'margin' cannot be given"),
        (lambda: build_loss("hinge", {"target_radius": 0.5}), "target_radius needs the model (or its lipschitz bound)"),
        (
            lambda: build_loss("hinge", {"target_radius": 0.5, "margin_form": "lln"}, model=nn.Linear(2, 3)),
            "margin_form 'lln' needs an nn.Sequential model ending in a LinearNormalized head",
        ),
        (
            lambda: build_loss("hinge", {"target_radius": 0.5, "margin_form": "pairwise"}, model=nn.Linear(2, 3)),
            "margin_form must be one of auto, generic, lln; got 'pairwise'",
        ),
        (lambda: build_loss("hinge", [("offset", 1.0)]), "options must be a mapping of option names to values"),
        (lambda: build_loss(lambda z: z), "loss '<lambda>' must accept (logits, target)"),
        (lambda: register_loss("ce", lambda z, y: z.sum()), "loss name 'ce' is already registered"),
        (lambda: build_loss("ce").load_state_dict({"lipschitz": 1.0}), "loss 'ce' has no target margin"),
        (lambda: kr_loss(torch.zeros(3), torch.zeros(3).long()), "logits must have shape (N, num_classes >= 2)"),
        (lambda: multiclass_hinge(torch.zeros(2, 3), torch.zeros(2)), "target must hold integer class indices"),
        (lambda: multiclass_hinge(torch.zeros(2, 3), torch.zeros(2).long(), torch.zeros(3)), "margin must be a float"),
    ],
)
def test_errors_are_one_line_and_name_what_is_allowed(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_package_exports_the_registry():
    assert package.build_loss is build_loss and package.TargetMargin is TargetMargin
