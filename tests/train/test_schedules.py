"""Learning-rate schedules: values at chosen steps by hand, warm-up endpoints, torch's OneCycleLR and StepLR bit for
bit, the trainer's original cosine bit for bit, the registry and user callables, batch-size scaling, one-line
errors."""

import itertools
import math

import pytest
import torch

from stablenet.train import schedules as registry
from stablenet.train.schedules import (
    constant_lr,
    cosine_lr,
    create_schedule,
    list_schedules,
    onecycle_lr,
    register_schedule,
    scaled_lr,
    step_lr,
)


@pytest.fixture
def restore_registry(monkeypatch):
    monkeypatch.setattr(registry, "_SCHEDULES", dict(registry._SCHEDULES))


def _trainer_cosine(lr: float, step: int, total: int) -> float:
    """The trainer's cosine before schedules existed (``_lr_at`` in trainer.py at d04dab1), verbatim."""
    return 0.5 * lr * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def test_cosine_without_warmup_is_the_trainers_cosine_bit_for_bit():
    checked = 0
    for lr in (1e-3, 0.003, 0.1, 0.7071, 1.0):
        for total in (1, 2, 7, 23, 100, 391, 3910, 117300):
            steps = {0, 1, total // 3, total // 2, total - 1, total, total + 5, *range(0, total, max(total // 97, 1))}
            for step in steps:
                assert cosine_lr(step, total, lr=lr) == _trainer_cosine(lr, step, total), (lr, total, step)
                assert create_schedule("cosine", lr=lr)(step, total) == _trainer_cosine(lr, step, total)
                checked += 1
    assert checked > 1000


def test_cosine_by_hand():
    lr, w, total = 0.1, 4, 12
    sched = create_schedule("cosine", lr=lr, warmup_steps=w)
    assert sched(0, total) == 0.0  # warm-up starts at 0 ...
    assert sched(1, total) == pytest.approx(0.025, rel=1e-15)
    assert sched(2, total) == pytest.approx(0.05, rel=1e-15)
    assert sched(3, total) == pytest.approx(0.075, rel=1e-15)  # the last warm-up step
    assert sched(4, total) == lr  # ... and ends at the peak, where the cosine starts
    assert sched(8, total) == pytest.approx(0.05, rel=1e-15)  # half-way through the cosine: cos(pi/2) = 0
    assert sched(6, total) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)), rel=1e-15)
    assert sched(11, total) == pytest.approx(0.05 * (1 + math.cos(7 * math.pi / 8)), rel=1e-15)
    assert sched(12, total) == 0.0 and sched(50, total) == 0.0  # at and past the end


@pytest.mark.parametrize(("w", "total"), [(1, 2), (1, 10), (5, 6), (10, 100), (390, 3910)])
def test_cosine_warmup_is_linear_and_continuous(w, total):
    lr = 0.3
    values = [cosine_lr(s, total, lr=lr, warmup_steps=w) for s in range(total + 1)]
    assert values[0] == 0.0 and values[w] == lr and values[total] == pytest.approx(0.0, abs=1e-17)
    assert all(v == pytest.approx(lr * s / w, rel=1e-15) for s, v in enumerate(values[:w]))
    assert all(a <= b for a, b in itertools.pairwise(values[: w + 1]))  # rises ...
    assert all(a >= b for a, b in itertools.pairwise(values[w:]))  # ... then falls
    # Continuity at w: the warm-up's slope lr / w bounds the jump on either side.
    assert abs(values[w] - values[w - 1]) <= lr / w * (1 + 1e-12)


@pytest.mark.parametrize(
    ("total", "pct_start", "div_factor", "final_div_factor"),
    [
        (1, 0.3, 25.0, 1e4),
        (2, 0.3, 25.0, 1e4),
        (10, 0.3, 25.0, 1e4),
        (17, 0.25, 10.0, 100.0),
        (100, 0.3, 25.0, 1e4),
        (391, 0.15, 25.0, 1e4),
        (1000, 0.5, 4.0, 1e3),
        (5, 0.1, 25.0, 1e4),  # pct_start * T < 1: torch starts in the annealing phase
        (40, 1.0, 25.0, 1e4),  # warm-up only
    ],
)
@pytest.mark.parametrize("lr", [0.003, 0.4])
def test_onecycle_equals_torch_onecycle_bit_for_bit(total, pct_start, div_factor, final_div_factor, lr):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    torch_schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=lr,
        total_steps=total,
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        anneal_strategy="cos",
        cycle_momentum=False,
    )
    ours = create_schedule(
        "onecycle", lr=lr, pct_start=pct_start, div_factor=div_factor, final_div_factor=final_div_factor
    )
    for step in range(total):
        assert ours(step, total) == optimizer.param_groups[0]["lr"], step
        if step < total - 1:  # torch divides by zero one step past the end of a warm-up-only cycle
            optimizer.step()
            torch_schedule.step()


def test_onecycle_by_hand():
    # T = 10, p = 0.3: the warm-up ends at a = 2; start 1/25, end 1/25/1e4.
    values = [onecycle_lr(s, 10, lr=1.0) for s in range(12)]
    assert values[0] == pytest.approx(0.04, rel=1e-15)
    assert values[1] == pytest.approx((1.0 + 0.04) / 2, rel=1e-15)  # half-way up: the cosine's midpoint
    assert values[2] == 1.0
    assert values[5] == pytest.approx(4e-6 + (1 - 4e-6) / 2 * (1 + math.cos(3 * math.pi / 7)), rel=1e-15)  # (5-2)/7
    assert values[9] == pytest.approx(4e-6, rel=1e-12)
    assert values[10] == values[11] == values[9]  # past the end: the final rate (torch raises)


def test_step_by_hand_and_equal_to_torch_steplr_per_epoch():
    assert [step_lr(s, 100, lr=1.0, step_size=3, gamma=0.5) for s in range(8)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]
    # Note [schedule units]: step_size in epochs times steps per epoch equals StepLR stepped once per epoch.
    lr, gamma, epochs_per_decay, steps_per_epoch, epochs = 0.1, 0.3, 4, 7, 30
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    torch_schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=epochs_per_decay, gamma=gamma)
    ours = create_schedule("step", lr=lr, step_size=epochs_per_decay * steps_per_epoch, gamma=gamma)
    for epoch in range(epochs):
        for i in range(steps_per_epoch):
            assert ours(epoch * steps_per_epoch + i, epochs * steps_per_epoch) == optimizer.param_groups[0]["lr"]
        optimizer.step()
        torch_schedule.step()


@pytest.mark.parametrize("name", ["constant", "cosine", "onecycle", "step"])
def test_every_schedule_stays_within_zero_and_the_peak(name):
    lr, total = 0.05, 257
    sched = create_schedule(name, lr=lr, warmup_steps=20, step_size=50)
    values = [sched(s, total) for s in range(total + 3)]
    assert all(math.isfinite(v) and 0.0 <= v <= lr for v in values)
    assert max(values) == pytest.approx(lr, rel=1e-4)  # one-cycle's peak falls between two steps here
    # A function of the step alone: the same values in any order of calls (what exact resume relies on).
    assert [sched(s, total) for s in reversed(range(total + 3))] == values[::-1]


def test_registry_names_and_options_go_where_they_are_taken(restore_registry):
    assert set(list_schedules()) >= {"constant", "cosine", "onecycle", "step"}
    options = {"warmup_steps": 3, "step_size": 5, "gamma": 0.5, "pct_start": 0.4}
    assert create_schedule("constant", lr=0.2, **options)(7, 10) == 0.2
    assert create_schedule("cosine", lr=0.2, **options)(7, 10) == cosine_lr(7, 10, lr=0.2, warmup_steps=3)
    assert create_schedule("step", lr=0.2, **options)(7, 10) == step_lr(7, 10, lr=0.2, step_size=5, gamma=0.5)
    assert create_schedule("onecycle", lr=0.2, **options)(7, 10) == onecycle_lr(7, 10, lr=0.2, pct_start=0.4)

    @register_schedule("halving")
    def halving(step, total_steps, *, lr, every=2):
        return lr * 0.5 ** (step // every)

    assert "halving" in list_schedules()
    assert create_schedule("halving", lr=1.0, every=3, warmup_steps=9)(6, 10) == 0.25  # its own option, not cosine's
    register_schedule("halving", halving)  # the same function again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        register_schedule("halving", constant_lr)


def test_a_users_callable_is_accepted_wherever_a_name_is():
    def mine(step, total_steps):
        return 1.0 / (1 + step)

    assert create_schedule(mine, lr=0.5, warmup_steps=4)(3, 10) == 0.25  # used as it is: takes neither
    assert create_schedule(lambda s, t, lr: lr * (t - s) / t, lr=0.5)(5, 10) == 0.25  # takes the peak rate


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: create_schedule("cosinus", lr=0.1), "schedule must be one of constant, cosine, onecycle, step"),
        (lambda: create_schedule(3, lr=0.1), "schedule must be one of"),
        (lambda: create_schedule("cosine", lr=-1.0), "lr must be a finite number >= 0"),
        (lambda: create_schedule("cosine", lr=float("nan")), "lr must be a finite number >= 0"),
        (lambda: cosine_lr(0, 10, lr=0.1, warmup_steps=10), r"warmup_steps must be in \[0, total_steps = 10\)"),
        (lambda: cosine_lr(-1, 10, lr=0.1), "step >= 0 and total_steps >= 1"),
        (lambda: constant_lr(0, 0, lr=0.1), "step >= 0 and total_steps >= 1"),
        (lambda: onecycle_lr(0, 10, lr=0.1, pct_start=1.5), r"pct_start must be in \[0, 1\]"),
        (lambda: onecycle_lr(0, 10, lr=0.1, div_factor=0), "div_factor and final_div_factor must be > 0"),
        (lambda: step_lr(0, 10, lr=0.1, step_size=0), "step_size must be >= 1"),
        (lambda: register_schedule("", constant_lr), "non-empty string"),
        (lambda: scaled_lr(0.1, 0, 128, "linear"), "batch_size and reference_batch_size must be >= 1"),
        (lambda: scaled_lr(0.1, 256, 128, "square"), "lr scaling rule must be one of none, linear, sqrt"),
    ],
)
def test_bad_input_is_a_one_line_error(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert "\n" not in str(error.value)


def test_scaled_lr():
    assert scaled_lr(0.1, 512, 128, "linear") == pytest.approx(0.4, rel=1e-15)
    assert scaled_lr(0.1, 512, 128, "sqrt") == pytest.approx(0.2, rel=1e-15)
    assert scaled_lr(0.1, 64, 256, "sqrt") == pytest.approx(0.05, rel=1e-15)
    assert scaled_lr(0.1, 512, 128, "none") == 0.1  # the same float: unscaled runs do not change
    assert scaled_lr(0.003, 512, 128) == 0.003
    assert scaled_lr(0.1, 512, 128, lambda ratio: ratio**0.25) == pytest.approx(0.1 * 2**0.5, rel=1e-15)
