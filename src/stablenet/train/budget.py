r"""Planning a run under a wall-clock budget (``--time-budget MINUTES``), for comparisons at equal compute.

Prach et al. ("1-Lipschitz Layers Compared", CVPR 2024) give every method the same training time on the same
GPU and set the schedule to finish within it. Here a short pilot (:func:`pilot_timing`) measures the seconds
per training step, per evaluation and per checkpoint on copies of the model and optimizer, and
:func:`plan_epochs` returns the largest number of whole epochs :math:`E` whose predicted time fits:

.. math::
    T(E) = E\,\bigl(n\,t_{\text{step}} + (1 + k)\,t_{\text{ckpt}}\bigr) + \lceil E / e \rceil\, t_{\text{eval}},
    \qquad t_0 + T(E) / (1 - m) \le B,

with :math:`n` steps per epoch, :math:`k = \min(\lfloor n\,t_{\text{step}} / I \rfloor, n - 1)` checkpoints
within an epoch when they are written every :math:`I` seconds, one checkpoint after each epoch, an evaluation
every :math:`e` epochs and always after the last (:math:`\lceil E/e \rceil` of them), :math:`t_0` the seconds
already spent (setup, data loading, the pilot), :math:`B` the budget and :math:`m` the safety margin
(:data:`SAFETY_MARGIN`, 5% of the remaining time: for step times that drift from the pilot's, a data loader
that stalls, the final export). At least one epoch: a budget too short for one raises a one-line error.

# Note [budgeted schedule]
The plan fixes the run's length before its first step: ``total_steps = plan.epochs * steps_per_epoch`` is the
``total_steps`` every call of the schedule receives (``stablenet.train.schedules``), so the cosine or one-cycle
schedule ends exactly with the last planned step. The plan is made once: it is saved with the run (the config's
``plan``, the training state), and a resumed run reuses it, never re-plans, because a new ``total_steps`` would
change the learning rate of every later step and break the exact resume (Note [exact resume] in
``stablenet.train.trainer``). Nothing stops the run when it overruns the plan: the schedule must complete. The
record shows how well the plan held: :meth:`BudgetPlan.to_dict` (with the measured timings and the predicted
wall time ``planned_s``) plus the actual wall time ``actual_s`` at the end; each metrics row has the wall time so
far beside :meth:`BudgetPlan.planned_elapsed` for that epoch. Under DDP every rank must plan the same epochs:
reduce the pilot's timings with ``MAX`` over the ranks before planning (the plan is a pure function of them).
``checkpoint_s`` must be everything an epoch costs besides its steps (the trainer times a new loader's first batch
and the model, state and metrics writes): on short epochs that fixed cost is a large part of the run.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from stablenet.train.ema import unwrap_model

__all__ = ["SAFETY_MARGIN", "BudgetPlan", "PilotTiming", "pilot_timing", "plan_epochs", "run_seconds"]

#: Fraction of the remaining budget kept free (see the module docstring).
SAFETY_MARGIN = 0.05


def _in_epoch_checkpoints(steps_per_epoch: int, step_s: float, checkpoint_interval_s: float) -> int:
    if checkpoint_interval_s <= 0:
        return 0
    return min(math.floor(steps_per_epoch * step_s / checkpoint_interval_s), steps_per_epoch - 1)


def run_seconds(
    epochs: int,
    *,
    steps_per_epoch: int,
    step_s: float,
    eval_s: float = 0.0,
    checkpoint_s: float = 0.0,
    eval_every: int = 1,
    checkpoint_interval_s: float = 0.0,
) -> float:
    r"""Predicted seconds of ``epochs`` epochs of training, evaluation and checkpoints: :math:`T(E)` above."""
    evaluations = -(-epochs // eval_every)  # every eval_every epochs, and always after the last
    per_epoch = steps_per_epoch * step_s
    per_epoch += (1 + _in_epoch_checkpoints(steps_per_epoch, step_s, checkpoint_interval_s)) * checkpoint_s
    return epochs * per_epoch + evaluations * eval_s


@dataclass(frozen=True)
class BudgetPlan:
    """A time budget's plan: how many epochs, from which timings, and the wall time it predicts (seconds)."""

    epochs: int
    steps_per_epoch: int
    total_steps: int
    budget_s: float
    elapsed_s: float
    margin: float
    step_s: float
    eval_s: float
    checkpoint_s: float
    eval_every: int
    checkpoint_interval_s: float
    #: predicted wall time of the whole run, ``elapsed_s`` included
    planned_s: float

    def planned_elapsed(self, epochs_done: int) -> float:
        """Predicted wall time since the start when ``epochs_done`` epochs are done (for the metrics rows)."""
        done = run_seconds(
            epochs_done,
            steps_per_epoch=self.steps_per_epoch,
            step_s=self.step_s,
            eval_s=0.0,
            checkpoint_s=self.checkpoint_s,
            checkpoint_interval_s=self.checkpoint_interval_s,
        )
        evaluations = epochs_done // self.eval_every + (
            epochs_done == self.epochs and epochs_done % self.eval_every > 0
        )
        return self.elapsed_s + done + evaluations * self.eval_s

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``config.yaml`` and the training state; the trainer adds ``actual_s`` at the end."""
        return asdict(self)


def _check(name: str, value: float, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


def plan_epochs(
    *,
    budget_s: float,
    step_s: float,
    steps_per_epoch: int,
    eval_s: float = 0.0,
    checkpoint_s: float = 0.0,
    eval_every: int = 1,
    elapsed_s: float = 0.0,
    margin: float = SAFETY_MARGIN,
    checkpoint_interval_s: float = 0.0,
    max_epochs: int | None = None,
) -> BudgetPlan:
    """The largest number of whole epochs (at least one, at most ``max_epochs``) that fits the budget.

    Args:
        budget_s: the whole run's wall-clock budget in seconds (``--time-budget`` minutes times 60).
        step_s, eval_s, checkpoint_s: measured seconds per training step, per evaluation, per checkpoint
            (:func:`pilot_timing`).
        steps_per_epoch: optimizer steps per epoch.
        eval_every: evaluate every this many epochs, and after the last.
        elapsed_s: seconds already spent when the plan is made (counted against the budget).
        margin: fraction of the remaining budget kept free, in [0, 1).
        checkpoint_interval_s: in-epoch checkpoints every this many seconds (0: only after each epoch).
        max_epochs: an upper limit (``None``: as many as fit).

    Raises:
        ValueError: a timing or count out of range, or a budget shorter than one epoch with its evaluation and
            checkpoint (the message says how long one takes).

    Example:
        >>> plan_epochs(budget_s=600, step_s=0.1, steps_per_epoch=100, eval_s=5, checkpoint_s=1).epochs  # 16 s each
        35
    """
    finite = math.isfinite
    _check("budget_s", budget_s, finite(budget_s) and budget_s > 0, "a finite number > 0")
    _check("step_s", step_s, finite(step_s) and step_s > 0, "a finite number > 0")
    _check("steps_per_epoch", steps_per_epoch, steps_per_epoch >= 1, "an integer >= 1")
    for name, value in (("eval_s", eval_s), ("checkpoint_s", checkpoint_s), ("elapsed_s", elapsed_s)):
        _check(name, value, finite(value) and value >= 0, "a finite number >= 0")
    _check("eval_every", eval_every, eval_every >= 1, "an integer >= 1")
    _check("margin", margin, 0 <= margin < 1, "in [0, 1)")
    _check("checkpoint_interval_s", checkpoint_interval_s, checkpoint_interval_s >= 0, "a number >= 0")
    _check("max_epochs", max_epochs, max_epochs is None or max_epochs >= 1, "None or an integer >= 1")
    timings = {
        "steps_per_epoch": steps_per_epoch,
        "step_s": step_s,
        "eval_s": eval_s,
        "checkpoint_s": checkpoint_s,
        "eval_every": eval_every,
        "checkpoint_interval_s": checkpoint_interval_s,
    }
    available = (budget_s - elapsed_s) * (1.0 - margin)
    one = run_seconds(1, **timings)
    if one > available:
        needed = elapsed_s + one / (1.0 - margin)
        raise ValueError(
            f"time budget of {budget_s / 60:.4g} min is shorter than one measured epoch ({needed / 60:.4g} min, "
            f"with its evaluation and checkpoint, {elapsed_s / 60:.3g} min already spent and a {margin:.0%} margin)"
        )
    # T(E) is nondecreasing in E and at least E times an epoch's training and checkpoints (one - eval_s > 0),
    # which bounds the search; the + 1 covers that bound's rounding.
    low, high = 1, math.floor(available / (one - eval_s)) + 1
    if max_epochs is not None:
        high = min(high, max_epochs)
    while low < high:  # the largest E in [low, high] with T(E) <= available; T(low) always fits
        mid = (low + high + 1) // 2
        if run_seconds(mid, **timings) <= available:
            low = mid
        else:
            high = mid - 1
    return BudgetPlan(
        epochs=low,
        total_steps=low * steps_per_epoch,
        budget_s=float(budget_s),
        elapsed_s=float(elapsed_s),
        margin=float(margin),
        planned_s=elapsed_s + run_seconds(low, **timings),
        **timings,
    )


@dataclass(frozen=True)
class PilotTiming:
    """What :func:`pilot_timing` measured, in seconds (``None``: not measured)."""

    step_s: float
    steps: int
    warmup_steps: int
    eval_s: float | None = None
    checkpoint_s: float | None = None


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that the clock measures it (CUDA, MPS, XPU run asynchronously)."""
    if device.type == "mps":
        torch.mps.synchronize()  # takes no device
        return
    backend = getattr(torch, device.type, None)
    if hasattr(backend, "synchronize"):
        backend.synchronize(device)


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def pilot_timing(
    step: Callable[[nn.Module, torch.optim.Optimizer, Any], Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Any],
    *,
    steps: int = 10,
    warmup_steps: int = 2,
    evaluate: Callable[[nn.Module], Any] | None = None,
    checkpoint: Callable[[nn.Module, torch.optim.Optimizer], Any] | None = None,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> PilotTiming:
    """Time ``steps`` training steps (after ``warmup_steps`` untimed ones) on deep copies of model and optimizer.

    ``step(model, optimizer, batch)`` must do one whole training step (forward, backward, optimizer step) with
    the model and optimizer it is given. The copies are made together, so the copied optimizer updates the
    copied parameters, and torch's global random generators are restored afterwards: the real run starts from
    exactly the state it had. The untimed steps absorb one-off costs (``torch.compile``, cuDNN autotuning, lazy
    allocations); the device is synchronised before each clock reading.

    Args:
        step: one training step on the given model, optimizer and batch.
        model: the model (wrappers are unwrapped before copying: DDP and compiled modules cannot be deep-copied).
        optimizer: its optimizer.
        batches: at least ``warmup_steps + steps`` batches. Draw them from their own generator, not from the
            run's first epoch, whose order must not change (Note [exact resume]).
        evaluate: ``evaluate(model)``, timed once after the steps (one whole evaluation), if given.
        checkpoint: ``checkpoint(model, optimizer)``, timed once, if given (write to a scratch path).
        wrap: applied to the model copy before the steps: the speed options the real run uses (DDP,
            ``torch.compile``, ``capture_weight_maps``), so the pilot pays the gradient all-reduce and runs the
            same code. Pass ``model`` without them: captured CUDA graphs and process groups cannot be copied.
        clock: seconds, monotonic.

    Returns:
        :class:`PilotTiming`; ``step_s`` is the mean over the timed steps.
    """
    if steps < 1 or warmup_steps < 0:
        raise ValueError(f"the pilot needs steps >= 1 and warmup_steps >= 0; got {steps} and {warmup_steps}")
    rng = _rng_state()
    trial, trial_optimizer = copy.deepcopy((unwrap_model(model), optimizer))
    device = next((p.device for p in trial.parameters()), torch.device("cpu"))
    runner = wrap(trial) if wrap is not None else trial
    it = iter(batches)
    try:

        def run(count: int) -> None:
            for _ in range(count):
                try:
                    batch = next(it)
                except StopIteration:
                    raise ValueError(f"the pilot needs {warmup_steps + steps} batches; got fewer") from None
                step(runner, trial_optimizer, batch)

        def timed(fn: Callable[[], Any]) -> float:
            _synchronize(device)
            start = clock()
            fn()
            _synchronize(device)
            return clock() - start

        run(warmup_steps)
        step_s = timed(lambda: run(steps)) / steps
        eval_s = timed(lambda: evaluate(runner)) if evaluate is not None else None
        checkpoint_s = timed(lambda: checkpoint(trial, trial_optimizer)) if checkpoint is not None else None
    finally:
        _set_rng_state(rng)
    return PilotTiming(step_s, steps, warmup_steps, eval_s, checkpoint_s)
