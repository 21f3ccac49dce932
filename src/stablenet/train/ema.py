r"""An exponential moving average (EMA) of a model's weights, swapped into the model to evaluate, certify and save.

After every optimizer step, each floating-point parameter :math:`\theta` moves its shadow :math:`\bar\theta`:

.. math:: \bar\theta \leftarrow d_t\, \bar\theta + (1 - d_t)\, \theta, \qquad
          d_t = \min\bigl(d, \tfrac{1 + t}{10 + t}\bigr)

with :math:`t` the number of earlier updates (Polyak & Juditsky 1992 for averaging; the warm-up of the decay is
``tf.train.ExponentialMovingAverage``'s ``num_updates`` rule). The shadow starts at the weights the EMA is built
from, usually a random initialisation: with a constant :math:`d = 0.999` that start still weighs
:math:`d^{t} \approx 37\%` after 1000 steps, which spoils the short runs a time budget produces. With the warm-up
its weight after :math:`t` updates is :math:`\prod_{k<t} \tfrac{1+k}{10+k} = \tfrac{9!\, t!}{(t+9)!}`, below
:math:`10^{-7}` after 20 updates, and :math:`d_t` reaches :math:`d` after :math:`(10d - 1)/(1 - d)` updates
(8990 for 0.999). ``warmup=False`` gives the plain recursion.

# Note [EMA buffers]
Only parameters are averaged. Buffers (BatchNorm statistics, normalisation constants, counters) are taken from
the model as they are: they are not trained by the optimizer, the running statistics are already averages over
time, and an integer counter cannot be averaged. The averaged model is therefore "the shadow parameters plus the
model's current buffers", which is what :meth:`WeightEMA.swapped` evaluates and :meth:`WeightEMA.averaged_state_dict`
returns. (BatchNorm statistics of the averaged weights would need a pass over the data, ``torch.optim.swa_utils.
update_bn``; the constrained models here have no BatchNorm.)

# Note [EMA precision]
The shadow is kept in at least float32 (float64 for float64 parameters; ``dtype=torch.float64`` on request).
A float32 shadow stops moving where an increment :math:`(1 - d)|\theta - \bar\theta|` is below half an ulp of
:math:`\bar\theta`, i.e. where the weights are within at most :math:`2^{-23}/(1 - d)` relatively of the
average: :math:`1.2 \cdot 10^{-4}` for :math:`d = 0.999`, :math:`1.2 \cdot 10^{-3}` for 0.9999. The average is
then off by at most that much, relatively, which is small beside the step-to-step fluctuation an EMA is used to
average out, so float32 is the default (the usual choice, and the parameters' own precision); ask for float64
with decays of 0.9999 and above, at twice the shadow's memory and bandwidth.

# Note [EMA swap]
A certificate must describe the weights the forward uses (Note [certified weights] in
``stablenet.certify.lipschitz``). :meth:`WeightEMA.swapped` therefore writes the shadow into the model's own
parameter tensors with ``copy_`` under ``no_grad``: the same tensor objects (so an optimizer, a DDP reducer and a
compiled or CUDA-graph module that hold them see the new values), new in-place versions (so the layers' eval
caches, Note [eval cache] in ``stablenet.nn.base``, recompute their constrained weights), and on exit the saved
values are written back bit for bit, which also happens when the block raises. Evaluate, certify and save inside
the block; a ``LipschitzCertifier`` built inside refuses to run after it (the weights changed). A compiled model
sees the swap because its parameters are graph inputs; inductor's ``freezing`` option, which folds parameters into
constants, must stay off (its default).

# Note [EMA under DDP]
Every rank keeps its own EMA. DDP leaves the parameters identical on all ranks after each step (the all-reduced
gradients are identical, and so is the optimizer's arithmetic), so the shadows stay identical without any
communication: nothing more is needed. Rank 0 saves ``state_dict()`` with the checkpoint; on resume every rank
loads the same state. Every rank enters :meth:`WeightEMA.swapped` around a sharded evaluation, so the ranks
evaluate the same weights. A DDP-wrapped or ``torch.compile``'d model is accepted: the EMA works on the
underlying module (``.module``, ``._orig_mod``), whose parameters are the ones the wrappers use.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["WeightEMA", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module a DDP / DataParallel / ``torch.compile`` wrapper runs (unwrapped repeatedly); its parameters are
    the wrapper's. Anything else is returned as it is."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


class WeightEMA:
    """EMA of a model's floating-point parameters (see the module docstring for the update and its warm-up).

    Args:
        model: the model being trained (DDP-wrapped or compiled is fine). Build the EMA after moving the model to
            its device: the shadow lives on the parameters' devices.
        decay: :math:`d \\in [0, 1)`; 0 makes the shadow a copy of the latest weights.
        warmup: use :math:`\\min(d, (1 + t)/(10 + t))` (default) instead of :math:`d` at update :math:`t`.
        dtype: shadow precision; default at least float32 (Note [EMA precision]).

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> ema = WeightEMA(model, decay=0.99)
        >>> # after each optimizer.step(): ema.update()
        >>> with ema.swapped() as averaged:  # the same module, holding the averaged weights
        ...     logits = averaged(torch.randn(4, 3))
    """

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = True, dtype: torch.dtype | None = None):
        if not (isinstance(decay, (int, float)) and 0.0 <= decay < 1.0):
            raise ValueError(f"ema decay must be in [0, 1); got {decay!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"ema dtype must be a floating-point dtype; got {dtype}")
        self.module = unwrap_model(model)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        named = [(n, p) for n, p in self.module.named_parameters() if p.is_floating_point()]
        if not named:
            raise ValueError("the model has no floating-point parameters to average")
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        with torch.no_grad():
            self._shadow = [
                p.detach().to(dtype or torch.promote_types(p.dtype, torch.float32), copy=True) for p in self._params
            ]
        # Shadows in their parameter's dtype take one fused kernel (the common float32 case); others one each.
        self._fused = [i for i, (s, p) in enumerate(zip(self._shadow, self._params, strict=True)) if s.dtype == p.dtype]
        self._converted = [i for i in range(len(self._params)) if i not in set(self._fused)]
        self._swapped = False

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        if not self.warmup:
            return self.decay
        t = self.num_updates
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self) -> None:
        """Move the shadow towards the current weights; call after every optimizer step."""
        if self._swapped:
            raise RuntimeError("cannot update the EMA while its weights are swapped into the model")
        weight = 1.0 - self.current_decay()
        if self._fused:
            torch._foreach_lerp_([self._shadow[i] for i in self._fused], [self._params[i] for i in self._fused], weight)
        for i in self._converted:
            self._shadow[i].lerp_(self._params[i].to(self._shadow[i].dtype), weight)
        self.num_updates += 1

    @contextmanager
    def swapped(self) -> Iterator[nn.Module]:
        """Within the block the model holds the averaged weights (Note [EMA swap]); yields the underlying module.

        Example:
            >>> with ema.swapped() as averaged:
            ...     accuracy, certified = evaluate(averaged, x_test, y_test, radius)
            ...     save_model(run_dir, averaged, metadata)
        """
        if self._swapped:
            raise RuntimeError("the EMA weights are already swapped into the model")
        with torch.no_grad():
            saved = [p.detach().clone() for p in self._params]
            for p, s in zip(self._params, self._shadow, strict=True):
                p.copy_(s)
        self._swapped = True
        try:
            yield self.module
        finally:
            with torch.no_grad():
                for p, v in zip(self._params, saved, strict=True):
                    p.copy_(v)
            self._swapped = False

    def averaged_state_dict(self) -> dict[str, Tensor]:
        """The model's ``state_dict`` with the averaged parameters (in the parameters' dtypes) and the model's own
        buffers (Note [EMA buffers]): load it into a fresh model to get the averaged model."""
        state = self.module.state_dict()
        shadow = {id(p): s for p, s in zip(self._params, self._shadow, strict=True)}
        for name, p in self.module.named_parameters(remove_duplicate=False):  # tied weights under every name
            if id(p) in shadow and name in state:
                state[name] = shadow[id(p)].to(p.dtype, copy=True)
        return state

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs for an exact resume: shadow, update count, decay, warm-up."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": {n: s.detach().clone() for n, s in zip(self._names, self._shadow, strict=True)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (its tensors may be on any device; they are copied into the shadow)."""
        if (state.get("decay"), state.get("warmup")) != (self.decay, self.warmup):
            raise ValueError(
                f"EMA state has decay {state.get('decay')} and warmup {state.get('warmup')}; this EMA has decay "
                f"{self.decay} and warmup {self.warmup}"
            )
        saved = state["shadow"]
        missing, unexpected = sorted(set(self._names) - set(saved)), sorted(set(saved) - set(self._names))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {missing}, unexpected {unexpected}")
        for name, s in zip(self._names, self._shadow, strict=True):
            if tuple(saved[name].shape) != tuple(s.shape) or saved[name].dtype != s.dtype:
                raise ValueError(
                    f"EMA state of {name} has shape {tuple(saved[name].shape)} and dtype {saved[name].dtype}; "
                    f"expected {tuple(s.shape)} and {s.dtype}"
                )
        with torch.no_grad():
            for name, s in zip(self._names, self._shadow, strict=True):
                s.copy_(saved[name])
        self.num_updates = int(state["num_updates"])
