r"""A persistent power-iteration estimate of an operator norm, for training only.

# Note [training estimate]
Training does not need a guaranteed bound; a certificate does. A spectrally normalised layer therefore trains
with :math:`W/\tilde\sigma`, :math:`\tilde\sigma = \|A u\|` for a unit vector :math:`u` that a power iteration
on :math:`A^\top A` carries from one optimiser step to the next (one step per training forward, as
``torch.nn.utils.spectral_norm`` does for matrices), :math:`A` being the layer's *true* operator: the matrix, or
the padded, strided convolution at the size of the current input. The estimate costs one forward and one
backward of the operator on a single input; the guaranteed bound (Gram iteration, verified Cholesky
factorisations) costs far more and runs only where it is needed: in eval mode, in ``constrained_weight()``,
``export()`` and the bounds a certificate uses.

Power iteration converges from *below* (:math:`\tilde\sigma \le \|A\|`), so a training-mode layer may have norm
slightly above 1: its ``lipschitz_bound()`` in training mode is :math:`\hat\sigma/\tilde\sigma` (times the
usual slack), :math:`\hat\sigma` the guaranteed bound, which is honest for the forward it describes. A
no-grad forward in training mode uses the current :math:`u` without moving it, so that forward and that bound
stay fixed while a certifier evaluates them. The eval-mode layer divides by :math:`\hat\sigma` and is
1-Lipschitz, as before; its outputs differ from the training-mode ones by the factor
:math:`\tilde\sigma/\hat\sigma` (close to 1 once the iteration has converged and the guaranteed bound is the
size-specific one).

:math:`u` is a buffer saved with the model (``state_dict``), so a resumed run continues the same iteration; a
checkpoint without it (or an input of another size) starts a fresh :math:`u`, from a fixed seed, with
:data:`INIT_STEPS` steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["INIT_STEPS", "PowerEstimate"]

#: Power steps when :math:`u` starts afresh (a random start needs a few before the estimate is useful).
INIT_STEPS = 20


class PowerEstimate(nn.Module):
    """Holds :math:`u` and returns :math:`\\|A u\\|` (Note [training estimate]).

    Call it as ``estimate(apply, weight, shape, update)``: ``apply(u, weight)`` is the operator :math:`A` (linear in
    ``u``), ``shape`` the shape of ``u`` (one input), ``update`` whether to take one power step first.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("u", None)

    def forward(
        self, apply: Callable[[Tensor, Tensor], Tensor], weight: Tensor, shape: tuple[int, ...], update: bool
    ) -> Tensor:
        u = self.u
        fresh = u is None or tuple(u.shape) != tuple(shape)
        if not fresh and (u.device != weight.device or u.dtype != weight.dtype):
            u = u.to(device=weight.device, dtype=weight.dtype)
        if fresh:
            gen = torch.Generator().manual_seed(0)
            u = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=weight.device, dtype=weight.dtype)
            u = u / u.norm()
        if fresh or update:
            u = self._steps(apply, weight.detach(), u, INIT_STEPS if fresh else 1)
            if not torch._C._are_functorch_transforms_active():  # never keep a transform's wrapped tensor as state
                self.u = u
        return torch.linalg.vector_norm(apply(u, weight))

    @staticmethod
    def _steps(apply: Callable[[Tensor, Tensor], Tensor], weight: Tensor, u: Tensor, steps: int) -> Tensor:
        """``steps`` power steps on :math:`A^\\top A` (the adjoint by autograd, so any padding and stride is exact)."""
        for _ in range(steps):
            with torch.enable_grad():
                leaf = u.detach().requires_grad_(True)
                v = apply(leaf, weight)
                (w,) = torch.autograd.grad(v, leaf, v.detach())
            norm = torch.linalg.vector_norm(w)
            # A zero operator (or a vector in its kernel) keeps the last direction; no host sync on a GPU.
            u = torch.where(norm > 0, w / torch.where(norm > 0, norm, 1.0), u).detach()
        return u

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The buffer exists only once a training forward ran: take it from a checkpoint that has it, whether or not
        # this module has one yet, and accept a checkpoint without it (the iteration then starts afresh).
        u = state_dict.pop(prefix + "u", None)
        self.u = None  # so that the base class expects no key for it
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.u = None if u is None else u.detach().clone()
