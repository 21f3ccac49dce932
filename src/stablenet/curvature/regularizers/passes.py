r"""The extra passes a curvature penalty makes: re-running the model without a trace, and gradients with graph.

Private helpers of :mod:`stablenet.curvature.regularizers` (conventions in its docstring: ``loss_fn`` is the
batch mean :math:`L`, input gradients are those of :math:`B \cdot L`, one per example).

# Note [re-running the model]
Most penalties need a forward pass that the training step did not make (on perturbed inputs, or with inputs
that require a gradient). Such passes run in the model's current mode and leave no trace in its buffers: the
buffers of modules in training mode (BatchNorm running statistics, ``num_batches_tracked``; BatchNorm's kernel
does not bump their version counter), and any other buffer whose version changed, are set back to their
previous values by *rebinding* the module's buffer to a copy saved before the pass, never by writing in
place, so a tensor saved for backward keeps its version. Code that holds references to buffer tensors (a
``DistributedDataParallel`` wrapper) would miss the rebinding: give the penalties the bare module. Dropout
draws fresh masks in these passes.

# Note [reusing the training forward]
To spare a forward pass, pass the training forward's ``outputs``: ``gradient_norm``/``hessian_trace`` with
``wrt="params"`` differentiate ``loss_fn(outputs, targets)`` directly; the input-space penalties do too when
``inputs.requires_grad`` was set before that forward (``inputs.requires_grad_()``); ``activation_decay``
reads the last layer's input captured during that forward once
:meth:`~stablenet.curvature.regularizers.ActivationDecay.attach` hooked the model, or takes ``features``.
Without these, the penalty re-runs the model (Note [re-running the model]).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn

__all__: list[str] = []

_LossFn = Callable[[Tensor, Any], Tensor]

# Set while a penalty re-runs the model, so that ActivationDecay's capture hook ignores those passes.
_RERUNNING: ContextVar[bool] = ContextVar("stablenet_regularizer_rerun", default=False)


def _trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True); a regulariser needs at least one")
    return params


def _rerun(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` with its buffers left as they were (Note [re-running the model])."""
    before = {name: (b, b._version, b.clone()) for name, b in model.named_buffers()}
    token = _RERUNNING.set(True)
    try:
        return model(x)
    finally:
        _RERUNNING.reset(token)
        for name, buffer in list(model.named_buffers()):
            if name not in before:
                continue
            old, version, copy = before[name]
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            # BatchNorm's kernel updates running statistics without bumping the version counter, so a module
            # in training mode gets its buffers back unconditionally; others only when they visibly changed.
            if owner.training or buffer is not old or buffer._version != version:
                owner._buffers[attr] = copy


def _training_loss(model: nn.Module, inputs: Tensor, targets: Any, outputs: Tensor | None, loss_fn: _LossFn) -> Tensor:
    """The batch loss with a graph to the parameters: from ``outputs`` when it has one, else a fresh forward."""
    if outputs is not None and outputs.requires_grad:
        return loss_fn(outputs, targets)
    return loss_fn(_rerun(model, inputs), targets)


def _input_gradient(
    model: nn.Module, inputs: Tensor, targets: Any, outputs: Tensor | None, loss_fn: _LossFn
) -> tuple[Tensor, Tensor]:
    r"""``(x, g)``: the differentiated input and the per-example gradients :math:`\nabla_x (B L)`, with graph."""
    batch = inputs.shape[0]
    if inputs.requires_grad and outputs is not None and outputs.requires_grad:  # Note [reusing the training forward]
        (grad,) = torch.autograd.grad(
            batch * loss_fn(outputs, targets), inputs, create_graph=True, retain_graph=True, allow_unused=True
        )
        if grad is not None:
            return inputs, grad
    x = inputs.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(batch * loss_fn(_rerun(model, x), targets), x, create_graph=True)
    return x, grad


def _param_gradient(
    model: nn.Module, inputs: Tensor, targets: Any, outputs: Tensor | None, loss_fn: _LossFn
) -> tuple[list[Tensor], list[Tensor]]:
    r"""Trainable parameters the loss depends on and :math:`\nabla_\theta L` for them, with graph."""
    params = _trainable_parameters(model)
    loss = _training_loss(model, inputs, targets, outputs, loss_fn)
    grads = torch.autograd.grad(loss, params, create_graph=True, retain_graph=True, allow_unused=True)
    used = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
    return [p for p, _ in used], [g for _, g in used]


def _zero(reference: Tensor) -> Tensor:
    dtype = reference.dtype if reference.is_floating_point() else torch.get_default_dtype()
    return torch.zeros((), dtype=dtype, device=reference.device)
