"""Shared machinery of stablenet layers: the eval-mode weight cache and the rounding slack.

# Note [eval cache]
A constrained layer maps free parameters to constrained weights (a normalisation, a rescaling). In
training that map runs at every forward so gradients flow through it. In eval mode, with no gradient
needed for the parameters, the weights are fixed, so we compute them once and reuse them: inference then
costs what a plain layer costs. The cache key holds each parameter's storage pointer and in-place version
counter, so an optimiser step, ``load_state_dict`` (an in-place ``copy_``) or ``.to()`` (new storage)
invalidates it without any hook; the cache keeps the keyed storages alive, so their addresses cannot be
reused by new tensors while the key stands.

# Note [rounding slack]
A layer that is 1-Lipschitz in exact arithmetic computes in float32, so its measured constant can exceed 1
by rounding (we measure about 1e-7). ``lipschitz_bound()`` therefore returns ``1 + LAYER_ROUNDING_SLACK``,
100 times the largest excess seen in ``tests/nn``. Certificates multiply these per-layer bounds.

# Note [constraint precision]
The scales and norm bounds that make a layer 1-Lipschitz (SLL's and AOL's row sums, SR's Gram iterates, CPL's
and spectral normalisation's Gram bound) are computed in float64 from the weight, whatever its dtype, and only
then applied to the weight in its own dtype. In float32 they can land on the wrong side by more than the slack:
GPUs run float32 convolutions in TF32 by default (cuDNN), which loses about 1e-3, and long float32 sums lose
about 1e-5 on large layers. The float64 work is on weight-sized tensors only, never on activations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["LAYER_ROUNDING_SLACK", "WeightCache", "at_least_float32"]

LAYER_ROUNDING_SLACK = 1e-5


class WeightCache:
    """Caches a function of some parameters while they do not change (see Note [eval cache])."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: object = None
        self._alive: list[Tensor] = []
        #: a ``stablenet.nn.graphs.CapturedWeightMap`` when the map runs as CUDA graphs in training
        self.graphs = None

    def get(self, module: nn.Module, params: Sequence[Tensor], compute: Callable[[], object]) -> object:
        """Return ``compute()``, reusing the cached value in eval mode when no parameter needs a gradient."""
        if module.training or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            self._key, self._value, self._alive = None, None, []
            if self.graphs is not None and module.training and self.graphs.applies(params):
                return self.graphs(module, params, compute)  # Note [captured weight maps] in stablenet.nn.graphs
            return compute()
        key = tuple((p.data_ptr(), p._version) for p in params)
        if key != self._key:
            with torch.no_grad():
                self._value = compute()
            self._key = key
            # Holding the storages keeps their addresses from being reused by a later allocation (after a
            # `.to()`, say), so an equal key always means the same, unmodified tensors.
            self._alive = [p.detach() for p in params]
        return self._value

    def clear(self) -> None:
        self._key, self._value, self._alive = None, None, []


def at_least_float32(t: Tensor) -> Tensor:
    """``t`` in float32 if it is half precision, else unchanged: constraint math never runs in 16 bits."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
