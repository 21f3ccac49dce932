"""Shared machinery of stablenet layers: the eval-mode weight cache and the rounding slack.

# Note [eval cache]
A constrained layer maps free parameters to constrained weights (a normalisation, a rescaling). In
training that map runs at every forward so gradients flow through it. In eval mode, with no gradient
needed for the parameters, the weights are fixed, so we compute them once and reuse them: inference then
costs what a plain layer costs. The cache must never serve weights of parameters that have since changed: a
certificate computed from the new parameters would then describe a forward that does not use them. The key
holds each parameter's storage pointer and in-place version counter, which an optimiser step,
``load_state_dict`` (an in-place ``copy_``), ``copy_`` under ``no_grad`` or ``.to()`` (new storage) change; but
writes through ``.data`` (common in EMA and weight-averaging code), numpy views or DLPack change neither. So a
hit is also checked against a copy of the parameters' values taken when the weights were computed (one
comparison per parameter, far cheaper than the constraint). The cache keeps the keyed storages alive, so their
addresses cannot be reused by new tensors while the key stands. The comparison reads a result back to the host;
loops that run one fixed model many times (randomized smoothing's sampling) wrap each forward in
:func:`checked_once`, so each cache compares once per loop, not once per forward.

# Note [cached weights with gradients]
An attack on a trained model (PGD, AutoAttack) runs it in eval mode with gradients on, and its parameters
require grad as torch leaves them: recomputing the constrained weights in every forward would make each attack
step pay the constraint (70 times the frozen cost on the digits demo model). So in eval mode the cache serves
those forwards too, through :class:`_CachedMap`, an autograd node whose forward returns the cached weights
and whose backward, only when a gradient with respect to the parameters is requested, recomputes the map with
its graph and returns the exact vector-Jacobian product (with a graph of its own when ``create_graph`` asks for
one, so Hessian-vector products stay exact). Input gradients never run the map. The parameters are saved for
backward, so writing one in place between forward and backward raises autograd's usual error instead of
returning the gradient of other weights. Under ``torch.func`` transforms and forward-mode AD the map runs in the
forward, as in training, and its result is never stored: every tensor made inside a transform belongs to it
(``lipschitz_lower_bound``'s ``jvp`` over the inputs wraps even weights computed from plain parameters), and a
stored one broke the next ``deepcopy`` of the model. An entry stored outside still serves plain parameters that
need no gradient there.

# Note [rounding slack]
``lipschitz_bound()`` bounds the layer's *exact* map, the one with the ideal weights its constraint computes in
float64 (Note [constraint precision]); their own float64 rounding moves its norm by about 1e-13. It returns
``1 + LAYER_ROUNDING_SLACK``, a margin far above that (and 100 times the excess a float32 forward shows in
``tests/nn``). The forward's rounding in its own dtype, including the rounding of those weights to it, is bounded
separately by the layer's ``rounding_bound()`` (``stablenet.spectral.rounding``), and certificates pay for both.

# Note [constraint precision]
The scales and norm bounds that make a layer 1-Lipschitz (SLL's and AOL's row sums, SR's Gram iterates, CPL's
and spectral normalisation's Gram bound) are computed in float64 from the weight, whatever its dtype, and only
then applied to the weight in its own dtype. In float32 they can land on the wrong side by more than the slack:
GPUs run float32 convolutions in TF32 by default (cuDNN), which loses about 1e-3, and long float32 sums lose
about 1e-5 on large layers. The float64 work is on weight-sized tensors only, never on activations.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

__all__ = ["LAYER_ROUNDING_SLACK", "WeightCache", "at_least_float32", "checked_once"]

LAYER_ROUNDING_SLACK = 1e-5

#: Caches (by id) whose parameters were compared within the current :func:`checked_once` block.
_CHECKED: contextvars.ContextVar[set[int] | None] = contextvars.ContextVar("stablenet_checked_caches", default=None)


@contextmanager
def checked_once(seen: set[int]) -> Iterator[None]:
    """Within the block, a weight cache already in ``seen`` skips its parameter comparison (Note [eval cache]).

    Pass the same set to every forward of a loop in which no code changes the parameters: each cache then
    compares once, in the first forward, instead of reading back to the host in every one.
    """
    token = _CHECKED.set(seen)
    try:
        yield
    finally:
        _CHECKED.reset(token)


class WeightCache:
    """Caches a function of some parameters while they do not change (see Note [eval cache])."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: object = None
        self._alive: list[Tensor] = []
        self._values: list[Tensor] = []
        #: a ``stablenet.nn.cuda_graphs.CapturedWeightMap`` when the map runs as CUDA graphs in training
        self.graphs = None

    def get(self, module: nn.Module, params: Sequence[Tensor], compute: Callable[[], object]) -> object:
        """Return ``compute()``, reusing the cached value in eval mode while no parameter's values changed since it
        was computed (Note [eval cache]); a forward that needs parameter gradients gets it through an autograd node
        that recomputes the map in its backward (Note [cached weights with gradients])."""
        if module.training:
            self.clear()
            if self.graphs is not None and self.graphs.applies(params):
                return self.graphs(module, params, compute)  # Note [captured weight maps] in stablenet.nn.cuda_graphs
            return compute()
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if torch._C._are_functorch_transforms_active() or _dual(params):
            # Note [cached weights with gradients]: nothing computed inside a transform is kept (its tensors belong
            # to the transform); a valid entry from outside serves plain parameters that need no gradient.
            plain = not any(torch._C._functorch.is_functorch_wrapped_tensor(p) for p in params)
            if plain and not grad and self._key == _key(params) and self._unchanged(params):
                return self._value
            return compute()
        value = self._lookup(params, compute)
        if grad and isinstance(value, Tensor):  # Note [cached weights with gradients]
            return _CachedMap.apply(compute, value, *params)
        return value

    def _lookup(self, params: Sequence[Tensor], compute: Callable[[], object]) -> object:
        key = _key(params)
        checked = _CHECKED.get()
        if checked is not None and key == self._key and id(self) in checked:
            return self._value
        if checked is not None:
            checked.add(id(self))
        if key != self._key or not self._unchanged(params):
            with torch.no_grad():
                self._value = compute()
                self._values = [p.detach().clone() for p in params]
            self._key = key
            # Holding the storages keeps their addresses from being reused by a later allocation (after a
            # `.to()`, say), so an equal key always means the same tensors.
            self._alive = [p.detach() for p in params]
        return self._value

    def _unchanged(self, params: Sequence[Tensor]) -> bool:
        """Whether every parameter still holds the values the cached weights were computed from."""
        return len(params) == len(self._values) and all(
            torch.equal(p.detach(), v) for p, v in zip(params, self._values, strict=True)
        )

    def clear(self) -> None:
        self._key, self._value, self._alive, self._values = None, None, [], []


def _key(params: Sequence[Tensor]) -> tuple:
    """What a cache entry is filed under: each parameter's storage address and version counter."""
    return tuple((p.data_ptr(), p._version) for p in params)


def _dual(params: Sequence[Tensor]) -> bool:
    """Whether a parameter carries a forward-mode tangent (``torch.autograd.forward_ad``)."""
    return forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(p).tangent is not None for p in params)


class _CachedMap(torch.autograd.Function):
    """The cached weights as an autograd node over the parameters (Note [cached weights with gradients])."""

    @staticmethod
    def forward(ctx: Any, compute: Callable[[], Tensor], value: Tensor, *params: Tensor) -> Tensor:
        ctx.compute = compute
        ctx.save_for_backward(*params)
        return value.view_as(value)  # a new tensor object: the cached one never gets this node as its grad_fn

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        params = ctx.saved_tensors  # raises if a parameter was written in place since the forward
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[2:]) if need]
        out: list[Tensor | None] = [None] * len(params)
        if wanted:
            with torch.enable_grad():
                value = ctx.compute()
            grads = torch.autograd.grad(
                value, [params[i] for i in wanted], grad, allow_unused=True, create_graph=torch.is_grad_enabled()
            )
            for i, g in zip(wanted, grads, strict=True):
                out[i] = g
        return (None, None, *out)


def at_least_float32(t: Tensor) -> Tensor:
    """``t`` in float32 if it is half precision, else unchanged: constraint math never runs in 16 bits."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
