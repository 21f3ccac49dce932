"""Activation decay: the squared norm of the last layer's input, a bound on smoothing the loss over its weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from stablenet.curvature.regularizers.base import Regularizer
from stablenet.curvature.regularizers.passes import _RERUNNING, _rerun
from stablenet.curvature.regularizers.registry import register_regularizer

__all__ = ["ActivationDecay"]


def _last_layer(model: nn.Module, layer: str | None) -> nn.Module:
    """The module named ``layer``, or the last module (in registration order) that holds parameters."""
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if "parametrizations" not in name.split(".")
        and (next(m.parameters(recurse=False), None) is not None or parametrize.is_parametrized(m))
    ]
    if layer is not None:
        modules = dict(model.named_modules())
        if layer not in modules:
            names = ", ".join(repr(n) for n, _ in candidates) or "none"
            raise ValueError(f"layer must name a submodule of the model, e.g. one of {names}; got {layer!r}")
        return modules[layer]
    if not candidates:
        raise ValueError("the model has no module with parameters; pass layer='...' or features")
    return candidates[-1][1]


@register_regularizer("activation_decay")
class ActivationDecay(Regularizer):
    r"""Activation decay: :math:`R = \frac1B \sum_i \|h_i\|^2`, ``h`` the input of the model's last layer.

    ``h`` is read from ``features`` when given, else from a forward pre-hook on ``layer`` (a name from
    ``model.named_modules()``; default: the last module holding parameters, in registration order).

    Derivation (the one we adopt; the published form, Delattre, "Activation decay by loss smoothing",
    ICLR 2025 submission, withdrawn, could not be checked). Let the last layer be :math:`z = Wh + b`,
    :math:`p = \operatorname{softmax}(z)` and :math:`\ell = -\log p_y`. Then :math:`\nabla_W \ell = (p - e_y)h^\top`
    and, differentiating once more,

    .. math::
        \nabla^2_{\operatorname{vec} W}\,\ell = (\operatorname{diag} p - pp^\top) \otimes hh^\top,
        \qquad \operatorname{tr}\nabla^2_W \ell = (1 - \|p\|^2)\,\|h\|^2 \le \|h\|^2,

    since :math:`\operatorname{tr}(\operatorname{diag}p - pp^\top) = 1 - \|p\|^2 \in [0, 1 - 1/K]`. Smoothing the
    loss over Gaussian perturbations of the last layer, with :math:`Z` standard normal (odd moments vanish,
    :math:`\mathbb E[Z^\top H Z] = \operatorname{tr} H`),

    .. math::
        \mathbb E_Z\, \ell(W + \sigma Z) = \ell(W) + \frac{\sigma^2}{2}\operatorname{tr}\nabla^2_W \ell + O(\sigma^4)
        \le \ell(W) + \frac{\sigma^2}{2}\|h\|^2 + O(\sigma^4),

    so with :math:`\lambda = \sigma^2/2`, :math:`\lambda R` bounds the smoothing term of the batch-mean loss to
    second order: cheap, deterministic, and tight when :math:`p` is near uniform. Perturbing the bias too adds
    :math:`\frac{\sigma^2}{2}(1 - \|p\|^2) \le \frac{\sigma^2}{2}` (append a 1 to ``h``). Tested numerically
    against explicit Hessians in ``tests/curvature/test_regularizers.py``.

    Args:
        weight: :math:`\lambda \ge 0`.
        layer: name of the last layer (default: found automatically, see above).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x = torch.randn(5, 4)
        >>> reg = ActivationDecay(0.01)
        >>> h = torch.tanh(model[0](x))
        >>> torch.allclose(reg(model, x, None, model(x), None), h.pow(2).sum(1).mean())
        True
    """

    name = "activation_decay"

    def __init__(self, weight: float, *, layer: str | None = None) -> None:
        if layer is not None and not isinstance(layer, str):
            raise ValueError(f"layer must be a module name (str) or None; got {type(layer).__name__}")
        super().__init__(weight, layer=layer)
        self.layer = layer
        self._captured: Tensor | None = None
        self._handle: RemovableHandle | None = None

    def attach(self, model: nn.Module) -> RemovableHandle:
        """Capture the last layer's input during the training forward (Note [reusing the training forward]).

        Each call of the regulariser then uses, and releases, the input captured by the latest forward pass
        run with gradients enabled and a batch of the same size. Returns the hook's handle; :meth:`detach`
        removes it.
        """
        self.detach()
        module = _last_layer(model, self.layer)

        def capture(_: nn.Module, args: tuple[Any, ...]) -> None:
            if args and torch.is_grad_enabled() and not _RERUNNING.get():
                self._captured = args[0]

        self._handle = module.register_forward_pre_hook(capture)
        return self._handle

    def detach(self) -> None:
        """Remove the hook set by :meth:`attach` and drop any captured activations."""
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._captured = None, None

    def penalty(self, model, inputs, targets, outputs, loss_fn, features=None) -> Tensor:
        h = features
        if h is None:
            captured, self._captured = self._captured, None
            if captured is not None and captured.shape[:1] == inputs.shape[:1]:
                h = captured
        if h is None:
            h = self._features(model, inputs)
        if h.dim() < 2:
            raise ValueError(f"features must have a batch dimension (B, ...); got shape {tuple(h.shape)}")
        return h.flatten(1).pow(2).sum(1).mean()

    def _features(self, model: nn.Module, inputs: Tensor) -> Tensor:
        module = _last_layer(model, self.layer)
        seen: list[Tensor] = []
        handle = module.register_forward_pre_hook(lambda _, args: seen.append(args[0]) if args else None)
        try:
            _rerun(model, inputs)
        finally:
            handle.remove()
        if not seen:
            raise ValueError("the last layer was not called with a positional input; pass layer='...' or features")
        return seen[-1]
