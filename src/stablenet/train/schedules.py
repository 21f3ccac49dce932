r"""Learning-rate schedules by name: pure functions of the global step (STYLE §5).

A *schedule* is a callable ``schedule(step, total_steps) -> lr``: the learning rate of optimizer step ``step``
(0-based, counted over the whole run) in a run of ``total_steps`` steps. It is a function, not a stateful
``torch.optim.lr_scheduler`` object, because an exactly resumed run recomputes the rate from the step it resumes
at (Note [exact resume] in ``stablenet.train.trainer``): nothing about the schedule needs saving.

The registered *schedule functions* take ``(step, total_steps, *, lr, **options)``, with ``lr`` the peak rate;
:func:`create_schedule` binds ``lr`` and the options and returns the schedule. A user's callable
``(step, total_steps) -> lr`` is accepted wherever a name is, and :func:`register_schedule` files a schedule
function under a name a config may then use.

* ``constant``: :math:`\eta`.
* ``cosine``: linear warm-up over :math:`w` steps, then cosine decay to 0 (:func:`cosine_lr`).
* ``onecycle``: torch's ``OneCycleLR`` with cosine annealing (:func:`onecycle_lr`).
* ``step``: multiply by :math:`\gamma` every ``step_size`` steps (:func:`step_lr`).

:func:`scaled_lr` scales the peak rate with the batch size (``lr_scaling: none | linear | sqrt``).

# Note [schedule options]
``create_schedule`` passes each option to the schedule functions that take it (``warmup_steps`` to ``cosine``,
``pct_start`` to ``onecycle``, ``step_size`` and ``gamma`` to ``step`` ...), and drops it for the others, so one
config serves every schedule, as ``momentum`` does for the optimizers (Note [optimizer hyperparameters]).
A user's callable receives ``lr`` and any option whose name it takes as a keyword.

# Note [schedule units]
Every schedule counts optimizer steps: its only clock is the global step. A config that speaks in epochs
(``warmup_epochs``, a step decay every so many epochs) is converted by the caller, ``warmup_steps =
warmup_epochs * steps_per_epoch``, ``step_size = step_epochs * steps_per_epoch``; ``step`` then changes the
rate exactly at epoch boundaries and equals ``torch.optim.lr_scheduler.StepLR`` stepped once per epoch.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial
from typing import Any

__all__ = [
    "LR_SCALING",
    "Schedule",
    "constant_lr",
    "cosine_lr",
    "create_schedule",
    "list_schedules",
    "onecycle_lr",
    "register_schedule",
    "scaled_lr",
    "step_lr",
]

Schedule = Callable[[int, int], float]
"""``schedule(step, total_steps) -> lr`` for the 0-based global optimizer step."""


def _check_step(step: int, total_steps: int) -> None:
    if step < 0 or total_steps < 1:
        raise ValueError(f"a schedule needs step >= 0 and total_steps >= 1; got step {step}, total_steps {total_steps}")


def constant_lr(step: int, total_steps: int, *, lr: float) -> float:
    r""":math:`\eta_s = \eta` at every step."""
    _check_step(step, total_steps)
    return lr


def cosine_lr(step: int, total_steps: int, *, lr: float, warmup_steps: int = 0) -> float:
    r"""Linear warm-up to the peak ``lr`` over ``warmup_steps`` steps, then cosine decay to 0 at ``total_steps``.

    .. math::
        \eta_s = \begin{cases} \eta\, s / w & s < w \\
        \tfrac12 \eta \bigl(1 + \cos(\pi\, (\min(s, T) - w) / \max(T - w, 1))\bigr) & s \ge w \end{cases}

    (Loshchilov & Hutter, "SGDR", ICLR 2017; warm-up as in Goyal et al. 2017). The curve is continuous: step 0
    has rate 0, step :math:`w` the peak, step :math:`T` (one past the last) rate 0 again. With :math:`w = 0` it
    is, bit for bit, the trainer's original ``0.5 * lr * (1 + cos(pi * min(s, T) / max(T, 1)))``.

    Example:
        >>> cosine_lr(2, 12, lr=0.1, warmup_steps=4), cosine_lr(4, 12, lr=0.1, warmup_steps=4)
        (0.05, 0.1)
    """
    _check_step(step, total_steps)
    if warmup_steps < 0 or warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps = {total_steps}); got {warmup_steps}")
    if step < warmup_steps:
        return lr * step / warmup_steps
    # Written as the trainer wrote it (pi * s / T, left to right) so that w = 0 rounds identically.
    return (
        0.5
        * lr
        * (1.0 + math.cos(math.pi * (min(step, total_steps) - warmup_steps) / max(total_steps - warmup_steps, 1)))
    )


def _annealing_cos(start: float, end: float, fraction: float) -> float:
    """Cosine from ``start`` (fraction 0) to ``end`` (fraction 1), in the float operations torch uses."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * fraction) + 1)


def onecycle_lr(
    step: int,
    total_steps: int,
    *,
    lr: float,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> float:
    r"""One cycle (Smith & Topin 2019), the values of ``torch.optim.lr_scheduler.OneCycleLR`` with cosine annealing.

    With :math:`a = p\,T - 1` the last warm-up step (possibly fractional), :math:`\eta_0 = \eta / d` the start,
    :math:`\eta_{\min} = \eta_0 / d_f` the end and :math:`C(x_0, x_1, f) = x_1 + \tfrac12 (x_0 - x_1)(1 + \cos\pi f)`:

    .. math::
        \eta_s = \begin{cases} C(\eta_0, \eta, s / a) & s \le a \\
        C(\eta, \eta_{\min}, \min((s - a) / (T - 1 - a), 1)) & s > a. \end{cases}

    Step :math:`T - 1` (the last) has :math:`\eta_{\min}`, and so has any later step (torch raises there).
    Where torch divides by zero (:math:`a = 0`, or :math:`p = 1` past the end) the fraction is 1. Only the
    rate cycles: torch's momentum cycling (``cycle_momentum``) is left out, because it writes the optimizer's
    momentum or Adam's :math:`\beta_1`, state a function of the step could not restore on resume without
    knowing the optimizer, and the certified-training recipes we follow (SLL, AOL) use Adam with a fixed
    :math:`\beta_1`.

    Args:
        pct_start: fraction :math:`p` of the steps spent warming up.
        div_factor: :math:`d`, the peak over the starting rate.
        final_div_factor: :math:`d_f`, the starting rate over the final one.
    """
    _check_step(step, total_steps)
    if not 0.0 <= pct_start <= 1.0:
        raise ValueError(f"pct_start must be in [0, 1]; got {pct_start}")
    if div_factor <= 0 or final_div_factor <= 0:
        raise ValueError(f"div_factor and final_div_factor must be > 0; got {div_factor} and {final_div_factor}")
    initial = lr / div_factor
    final = initial / final_div_factor
    end_warmup = float(pct_start * total_steps) - 1
    if step <= end_warmup:
        return _annealing_cos(initial, lr, step / end_warmup if end_warmup > 0 else 1.0)
    span = (total_steps - 1) - end_warmup
    return _annealing_cos(lr, final, min((step - end_warmup) / span, 1.0) if span > 0 else 1.0)


def step_lr(step: int, total_steps: int, *, lr: float, step_size: int, gamma: float = 0.1) -> float:
    r"""Step decay: :math:`\eta_s = \eta\, \gamma^{\lfloor s / \text{step\_size} \rfloor}`.

    The power is taken as that many successive multiplications, as ``torch.optim.lr_scheduler.StepLR`` takes
    it, so the values equal StepLR's bit for bit (Note [schedule units] for epochs).
    """
    _check_step(step, total_steps)
    if step_size < 1 or gamma <= 0:
        raise ValueError(f"step_size must be >= 1 and gamma > 0; got step_size {step_size}, gamma {gamma}")
    value = lr
    for _ in range(step // step_size):
        value = value * gamma
    return value


_SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": constant_lr,
    "cosine": cosine_lr,
    "onecycle": onecycle_lr,
    "step": step_lr,
}


def register_schedule(
    name: str, function: Callable[..., float] | None = None
) -> Callable[[Callable[..., float]], Callable[..., float]] | Callable[..., float]:
    """Register ``function(step, total_steps, *, lr, **options) -> lr`` under ``name`` (also as a decorator).

    A name is registered once; registering the same function again is a no-op.

    Example:
        >>> @register_schedule("linear_decay")
        ... def linear_decay(step, total_steps, *, lr):
        ...     return lr * (1 - step / total_steps)
        >>> create_schedule("linear_decay", lr=0.1)(5, 10)
        0.05
    """

    def wrap(function: Callable[..., float]) -> Callable[..., float]:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a schedule name must be a non-empty string; got {name!r}")
        if not callable(function):
            raise ValueError(f"schedule {name!r} must be callable; got {type(function).__name__}")
        if name in _SCHEDULES and _SCHEDULES[name] is not function:
            raise ValueError(f"schedule name {name!r} is already registered")
        _SCHEDULES[name] = function
        return function

    return wrap if function is None else wrap(function)


def list_schedules() -> tuple[str, ...]:
    """The registered names, sorted."""
    return tuple(sorted(_SCHEDULES))


def _keywords(function: Callable[..., Any]) -> set[str] | None:
    """The keyword names ``function`` takes; ``None`` when it takes any (``**kwargs``) or has no signature."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def create_schedule(schedule: str | Callable[..., float], *, lr: float, **options: Any) -> Schedule:
    """The schedule ``schedule(step, total_steps) -> lr`` with peak rate ``lr``.

    Args:
        schedule: a name from :func:`list_schedules`, or a callable ``(step, total_steps) -> lr`` (which gets
            ``lr`` and the options it names as keywords, Note [schedule options]).
        lr: the peak learning rate (after :func:`scaled_lr`).
        **options: ``warmup_steps``, ``pct_start``, ``div_factor``, ``final_div_factor``, ``step_size``,
            ``gamma``, or a user function's own; each goes to the functions that take it.

    Example:
        >>> sched = create_schedule("cosine", lr=0.1, warmup_steps=10, step_size=5)  # step_size: not cosine's
        >>> [round(sched(s, 110), 4) for s in (0, 5, 10, 60, 110)]
        [0.0, 0.05, 0.1, 0.05, 0.0]
    """
    if isinstance(schedule, str):
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(list_schedules())} or a callable; got {schedule!r}")
        function = _SCHEDULES[schedule]
    elif callable(schedule):
        function = schedule
    else:
        raise ValueError(f"schedule must be one of {', '.join(list_schedules())} or a callable; got {schedule!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0; got {lr!r}")
    taken = _keywords(function)
    bound = {k: v for k, v in {"lr": lr, **options}.items() if taken is None or k in taken}
    return partial(function, **bound) if bound else function


def _linear(ratio: float) -> float:
    return ratio


def _unscaled(ratio: float) -> float:
    return 1.0


#: ``lr_scaling`` rules: the factor applied to ``lr`` as a function of ``batch_size / reference_batch_size``.
LR_SCALING: dict[str, Callable[[float], float]] = {"none": _unscaled, "linear": _linear, "sqrt": math.sqrt}


def scaled_lr(
    lr: float, batch_size: int, reference_batch_size: int, rule: str | Callable[[float], float] = "none"
) -> float:
    r"""The peak rate for ``batch_size`` given the rate ``lr`` tuned at ``reference_batch_size``.

    ``linear`` (Goyal et al. 2017): :math:`\eta B / B_0`; ``sqrt`` (Krizhevsky 2014, the rule that keeps the
    gradient noise's variance for Adam-like optimizers): :math:`\eta \sqrt{B / B_0}`; ``none``: :math:`\eta`
    unchanged (the same float). A callable maps :math:`B / B_0` to the factor. Under DDP, :math:`B` is the global
    batch (all ranks together).

    Example:
        >>> scaled_lr(0.1, 512, 128, "linear"), scaled_lr(0.1, 512, 128, "sqrt"), scaled_lr(0.1, 512, 128)
        (0.4, 0.2, 0.1)
    """
    if batch_size < 1 or reference_batch_size < 1:
        raise ValueError(
            f"batch_size and reference_batch_size must be >= 1; got {batch_size} and {reference_batch_size}"
        )
    if callable(rule):
        factor = rule
    elif isinstance(rule, str) and rule in LR_SCALING:
        factor = LR_SCALING[rule]
    else:
        raise ValueError(f"lr scaling rule must be one of {', '.join(LR_SCALING)} or a callable; got {rule!r}")
    if factor is _unscaled:
        return lr
    return lr * factor(batch_size / reference_batch_size)
