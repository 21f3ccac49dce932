"""Time budgets: the predicted run time by hand, the plan is the largest number of epochs that fits (checked over a grid
of synthetic timings, no sleeping), the margin and the time already spent count, a budget too short for one epoch is a
one-line error, and the pilot times a fake clock exactly and leaves model, optimizer and random generators untouched."""

import itertools
import math

import pytest
import torch
import yaml
from torch import nn

from stablenet.train.budget import SAFETY_MARGIN, pilot_timing, plan_epochs, run_seconds
from stablenet.train.schedules import create_schedule


def test_run_seconds_by_hand():
    # 100 steps of 0.1 s and one 1 s checkpoint per epoch; a 5 s evaluation after epochs 3, 6 and 7 (the last).
    timings = {"steps_per_epoch": 100, "step_s": 0.1, "eval_s": 5.0, "checkpoint_s": 1.0, "eval_every": 3}
    assert run_seconds(7, **timings) == pytest.approx(7 * 11 + 3 * 5)
    assert run_seconds(6, **timings) == pytest.approx(6 * 11 + 2 * 5)
    # In-epoch checkpoints every 4 s of training: 10 s per epoch gives 2 more per epoch.
    assert run_seconds(7, **timings, checkpoint_interval_s=4.0) == pytest.approx(7 * 13 + 3 * 5)
    # ... but never more than steps_per_epoch - 1 of them.
    assert run_seconds(1, steps_per_epoch=2, step_s=10.0, checkpoint_s=1.0, checkpoint_interval_s=0.5) == 22.0


def test_plan_by_hand():
    plan = plan_epochs(budget_s=600, step_s=0.1, steps_per_epoch=100, eval_s=5, checkpoint_s=1)
    # 16 s per epoch, 570 s available after the 5% margin: 35 epochs (560 s), not 36 (576 s).
    assert plan.epochs == 35 and plan.total_steps == 3500
    assert plan.planned_s == pytest.approx(560.0)
    assert plan.margin == SAFETY_MARGIN == 0.05
    # Without the margin 37 epochs fit (592 s); 60 s already spent leave (540) * 0.95 = 513 s: 32 epochs.
    assert plan_epochs(budget_s=600, step_s=0.1, steps_per_epoch=100, eval_s=5, checkpoint_s=1, margin=0).epochs == 37
    spent = plan_epochs(budget_s=600, step_s=0.1, steps_per_epoch=100, eval_s=5, checkpoint_s=1, elapsed_s=60)
    assert spent.epochs == 32 and spent.planned_s == pytest.approx(60 + 32 * 16)
    # Evaluating every 10 epochs (and at the end) frees time: 11 s per epoch plus 5 s per evaluation.
    sparse = plan_epochs(budget_s=600, step_s=0.1, steps_per_epoch=100, eval_s=5, checkpoint_s=1, eval_every=10)
    assert sparse.epochs == 49  # 49 * 11 + 5 * 5 = 564 <= 570; 50 * 11 + 5 * 5 = 575
    assert plan_epochs(budget_s=600, step_s=0.1, steps_per_epoch=100, max_epochs=8).epochs == 8


GRID = list(
    itertools.product(
        [30.0, 95.5, 600.0, 7200.0],  # budget
        [0.003, 0.05, 0.4],  # step
        [1, 7, 391],  # steps per epoch
        [0.0, 2.0, 40.0],  # evaluation
        [0.0, 0.7],  # checkpoint
        [1, 3],  # eval_every
        [0.0, 12.0],  # elapsed
        [0.0, 5.0],  # in-epoch checkpoint interval
    )
)


def test_the_plan_is_the_largest_number_of_epochs_that_fits():
    planned = refused = 0
    for budget, step, n, evaluation, ckpt, every, elapsed, interval in GRID:
        timings = {
            "steps_per_epoch": n,
            "step_s": step,
            "eval_s": evaluation,
            "checkpoint_s": ckpt,
            "eval_every": every,
            "checkpoint_interval_s": interval,
        }
        available = (budget - elapsed) * (1 - SAFETY_MARGIN)
        try:
            plan = plan_epochs(budget_s=budget, elapsed_s=elapsed, **timings)
        except ValueError as error:
            assert run_seconds(1, **timings) > available
            assert str(error).startswith(f"time budget of {budget / 60:.4g} min is shorter than one measured epoch")
            refused += 1
            continue
        # The plan fits and one more epoch does not; for short plans, also by counting up from one.
        assert run_seconds(plan.epochs, **timings) <= available < run_seconds(plan.epochs + 1, **timings)
        if plan.epochs <= 100:
            assert plan.epochs == max(e for e in range(1, 102) if run_seconds(e, **timings) <= available)
        assert elapsed + run_seconds(plan.epochs, **timings) / (1 - SAFETY_MARGIN) <= budget * (1 + 1e-12)
        assert plan.planned_s == pytest.approx(elapsed + run_seconds(plan.epochs, **timings))
        assert plan.planned_elapsed(plan.epochs) == pytest.approx(plan.planned_s)
        assert plan.planned_elapsed(0) == elapsed
        assert plan.total_steps == plan.epochs * n
        planned += 1
    assert planned > 500 and refused > 50


def test_a_budget_shorter_than_one_epoch_is_a_one_line_error():
    # One epoch: 391 * 0.2 = 78.2 s + 2 s checkpoint + 20 s evaluation = 100.2 s; with 30 s spent and the margin,
    # the run needs 30 + 100.2 / 0.95 = 135.47 s = 2.258 min.
    with pytest.raises(ValueError) as error:
        plan_epochs(budget_s=120, step_s=0.2, steps_per_epoch=391, eval_s=20, checkpoint_s=2, elapsed_s=30)
    message = str(error.value)
    assert message.startswith("time budget of 2 min is shorter than one measured epoch (2.258 min")
    assert "\n" not in message
    # The shortest budget that fits one epoch plans exactly one.
    needed = 30 + 100.2 / 0.95
    one = plan_epochs(
        budget_s=needed * 1.0001, step_s=0.2, steps_per_epoch=391, eval_s=20, checkpoint_s=2, elapsed_s=30
    )
    assert one.epochs == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget_s": 0}, "budget_s must be a finite number > 0"),
        ({"step_s": float("nan")}, "step_s must be a finite number > 0"),
        ({"steps_per_epoch": 0}, "steps_per_epoch must be an integer >= 1"),
        ({"eval_s": -1.0}, "eval_s must be a finite number >= 0"),
        ({"eval_every": 0}, "eval_every must be an integer >= 1"),
        ({"margin": 1.0}, r"margin must be in \[0, 1\)"),
        ({"max_epochs": 0}, "max_epochs must be None or an integer >= 1"),
    ],
)
def test_bad_input_is_a_one_line_error(kwargs, message):
    args = {"budget_s": 600.0, "step_s": 0.1, "steps_per_epoch": 10, **kwargs}
    with pytest.raises(ValueError, match=message) as error:
        plan_epochs(**args)
    assert "\n" not in str(error.value)


def test_the_plan_is_recorded_as_plain_values_and_fixes_the_schedule():
    plan = plan_epochs(budget_s=3600, step_s=0.05, steps_per_epoch=391, eval_s=12, checkpoint_s=0.5, eval_every=5)
    record = plan.to_dict()
    assert yaml.safe_load(yaml.safe_dump(record)) == record  # config.yaml can hold it
    assert record["epochs"] == plan.epochs and record["planned_s"] == plan.planned_s
    # Note [budgeted schedule]: total_steps is the schedule's length, so the cosine reaches 0 after the last step.
    cosine = create_schedule("cosine", lr=0.1, warmup_steps=391)
    last = plan.total_steps - 1
    assert 0 < cosine(last, plan.total_steps) < 1e-6 and cosine(plan.total_steps, plan.total_steps) == 0.0
    ends = [plan.planned_elapsed(e) for e in range(plan.epochs + 1)]
    assert all(a < b for a, b in itertools.pairwise(ends))


class _FakeClock:
    """A clock that advances only when the pilot's callbacks say so."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loss = model(torch.randn(8, 6)).square().mean()  # one real step, so the optimizer has state
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def _batches(count):
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(count)]


def test_pilot_leaves_model_optimizer_and_generators_untouched():
    model, optimizer = _tiny()
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    saved = optimizer.state_dict()
    optimizer_before = {
        "state": {k: {n: t.clone() for n, t in s.items()} for k, s in saved["state"].items()},
        "param_groups": [dict(g) for g in saved["param_groups"]],
    }
    rng_before = torch.get_rng_state()
    seen = []

    def step(m, opt, batch):
        seen.append((m, opt))
        x, y = batch
        m.train()
        loss = nn.functional.cross_entropy(m(x), y)  # dropout draws from the global generator
        opt.zero_grad()
        loss.backward()
        opt.step()

    timing = pilot_timing(step, model, optimizer, _batches(7), steps=5, warmup_steps=2, evaluate=lambda m: m.eval())
    assert timing.step_s > 0 and timing.steps == 5 and timing.warmup_steps == 2 and timing.eval_s >= 0
    assert len(seen) == 7
    trial, trial_optimizer = seen[0]
    assert trial is not model and trial_optimizer is not optimizer
    # The copied optimizer stepped the copied model, which therefore moved away from the original.
    assert trial_optimizer.param_groups[0]["params"][0] is next(trial.parameters())
    assert not torch.equal(next(trial.parameters()), next(model.parameters()))
    assert trial_optimizer.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"] + 7
    # The originals: bit for bit as before, and the global generator too.
    for k, v in model.state_dict().items():
        assert torch.equal(v, model_before[k])
    after = optimizer.state_dict()
    assert after["param_groups"] == optimizer_before["param_groups"]
    for k, s in optimizer_before["state"].items():
        for n, t in s.items():
            assert torch.equal(after["state"][k][n], t)
    assert model.training  # eval() was called on the copy only
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_pilot_times_steps_evaluation_and_checkpoint_by_the_clock():
    model, optimizer = _tiny()
    clock = _FakeClock()
    wrapped = []

    calls = []

    def step(m, opt, batch):
        calls.append(batch)
        clock.now += 10.0 if len(calls) <= 3 else 0.25  # slow first steps (compilation): the untimed warm-up

    def evaluate(m):
        clock.now += 3.5

    def checkpoint(m, opt):
        clock.now += 0.75

    def wrap(m):
        wrapped.append(m)
        return m

    batches = _batches(9)
    timing = pilot_timing(
        step, model, optimizer, batches, steps=5, warmup_steps=3, evaluate=evaluate, checkpoint=checkpoint, wrap=wrap,
        clock=clock,
    )  # fmt: skip
    assert len(wrapped) == 1 and wrapped[0] is not model
    assert len(calls) == 8 and all(a is b for a, b in zip(calls, batches, strict=False))  # in order, no more
    assert timing.step_s == 0.25 and timing.eval_s == 3.5 and timing.checkpoint_s == 0.75
    timings = {"step_s": timing.step_s, "eval_s": timing.eval_s, "checkpoint_s": timing.checkpoint_s}
    plan = plan_epochs(budget_s=60, steps_per_epoch=4, **timings)
    assert plan.epochs == math.floor(57 / (4 * 0.25 + 0.75 + 3.5))


def test_pilot_errors():
    model, optimizer = _tiny()
    with pytest.raises(ValueError, match="the pilot needs 7 batches; got fewer"):
        pilot_timing(lambda m, o, b: None, model, optimizer, _batches(6), steps=5, warmup_steps=2)
    with pytest.raises(ValueError, match="steps >= 1 and warmup_steps >= 0"):
        pilot_timing(lambda m, o, b: None, model, optimizer, _batches(6), steps=0)
