"""Lipschitz penalty: a hinge on differentiable Gram upper bounds of the layers' spectral norms."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from stablenet.curvature.regularizers.base import Regularizer, _check_choice
from stablenet.curvature.regularizers.conv_bounds import _CONV_BOUNDS
from stablenet.curvature.regularizers.passes import _rerun, _zero
from stablenet.curvature.regularizers.registry import register_regularizer
from stablenet.spectral.dense import gram_iteration

__all__ = ["LipschitzPenalty"]

_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _penalised_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear and Conv1d/2d layers (subclasses that keep their ``forward``) with a trainable weight."""
    layers = []
    for name, module in model.named_modules():
        base = next((t for t in type(module).__mro__ if t in _LAYER_TYPES), None)
        if base is None or type(module).forward is not base.forward or not module.weight.requires_grad:
            continue
        if base is not nn.Linear and module.padding_mode not in ("zeros", "circular"):
            raise ValueError(
                f"lipschitz_penalty supports padding_mode 'zeros' or 'circular'; layer {name!r} has "
                f"{module.padding_mode!r}"
            )
        layers.append((name, module))
    return layers


@register_regularizer("lipschitz_penalty")
class LipschitzPenalty(Regularizer):
    r"""Hinge on per-layer spectral-norm bounds (lip4conv-style training; Delattre et al., ICML 2023,
    arXiv 2305.16173, and 2024, arXiv 2402.00240).

    .. math:: R = \sum_l \max(\hat\sigma_l - \tau, 0), \qquad \hat\sigma_l \ge \sigma_1(\text{layer } l),

    over the ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` layers with a trainable weight (subclasses that
    keep their ``forward``, e.g. parametrized ones; layers with their own ``forward``, such as stablenet's
    constrained layers, carry their own constraint and are left out). Each :math:`\hat\sigma_l` is a
    differentiable Gram-iteration upper bound (``spectral/``):

    * Linear: :func:`~stablenet.spectral.dense.gram_iteration` on the weight (``n_iter`` default 6).
    * Convolution, ``conv_bound="input_size"`` (default): the input sizes are recorded by a no-grad forward
      pass on the first call (and again when the input shape changes; Note [re-running the model]). Circular
      padding: the Gram bound over the DFT frequencies at that size (exact operator for ``padding = (k-1)/2``);
      zero padding: the same on the circular operator that contains the zero-padded one (``method="embed"``).
      A layer the pass did not reach, or run on maps smaller than its kernel, gets the spatial bound.
    * Convolution, ``conv_bound="spatial"``: the spatial Gram bound, valid for every input size and both
      paddings (``n_iter`` default 4).

    Strides are ignored (subsampling is 1-Lipschitz, so the bound stays valid). The bias does not change the
    Lipschitz constant. :math:`\hat\sigma_l \ge \sigma_1` in exact arithmetic; the penalty is a training
    signal, not a certificate (use ``stablenet.spectral.network.lipschitz_upper_bound`` to certify).

    Args:
        weight: :math:`\lambda \ge 0`.
        tau: the target norm :math:`\tau \ge 0` (default 1: penalise layers that expand).
        conv_bound: ``"input_size"`` or ``"spatial"``.
        n_iter: Gram iterations (default: 6 for dense and Fourier-domain bounds, 4 for the spatial one).
    """

    name = "lipschitz_penalty"

    def __init__(
        self, weight: float, *, tau: float = 1.0, conv_bound: str = "input_size", n_iter: int | None = None
    ) -> None:
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau >= 0):
            raise ValueError(f"tau must be a finite number >= 0; got {tau!r}")
        if n_iter is not None and (isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1):
            raise ValueError(f"n_iter must be an int >= 1 or None; got {n_iter!r}")
        conv_bound = _check_choice("conv_bound", conv_bound, _CONV_BOUNDS)
        super().__init__(weight, tau=tau, conv_bound=conv_bound, n_iter=n_iter)
        self.tau, self.conv_bound, self.n_iter = float(tau), conv_bound, n_iter
        self._sizes: dict[str, set[tuple[int, ...]]] = {}
        self._recorded_for: tuple[weakref.ref, tuple[int, ...]] | None = None

    def layer_bounds(self, model: nn.Module, inputs: Tensor | None = None) -> dict[str, Tensor]:
        """The differentiable bound :math:`\\hat\\sigma_l` of every penalised layer, by module name.

        ``inputs`` (a batch) is needed to record convolution input sizes with ``conv_bound="input_size"``;
        without it the sizes recorded earlier are used (or the spatial bound).
        """
        layers = _penalised_layers(model)
        if not layers:
            raise ValueError(
                "lipschitz_penalty found no nn.Linear, nn.Conv1d or nn.Conv2d layer with a trainable weight "
                "in the model"
            )
        convs = [(n, m) for n, m in layers if not isinstance(m, nn.Linear)]
        if convs and inputs is not None and self.conv_bound == "input_size":
            self._record_sizes(model, inputs, convs)
        bounds = {}
        for name, module in layers:
            if isinstance(module, nn.Linear):
                bounds[name] = gram_iteration(module.weight, self.n_iter or 6)
            else:
                bounds[name] = _CONV_BOUNDS[self.conv_bound](module, self._sizes.get(name, set()), self.n_iter)
        return bounds

    def penalty(self, model, inputs, targets, outputs, loss_fn, features=None) -> Tensor:
        bounds = self.layer_bounds(model, inputs)
        return sum(((b - self.tau).clamp_min(0) for b in bounds.values()), _zero(next(iter(bounds.values()))))

    def _record_sizes(self, model: nn.Module, inputs: Tensor, convs: list[tuple[str, nn.Module]]) -> None:
        shape = tuple(inputs.shape[1:])
        if self._recorded_for is not None and self._recorded_for[0]() is model and self._recorded_for[1] == shape:
            return
        sizes: dict[str, set[tuple[int, ...]]] = {name: set() for name, _ in convs}

        def recorder(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
            return lambda module, args: sizes[name].add(tuple(args[0].shape[2:])) if args else None

        handles = [module.register_forward_pre_hook(recorder(name)) for name, module in convs]
        try:
            with torch.no_grad():
                _rerun(model, inputs)
        finally:
            for handle in handles:
                handle.remove()
        self._sizes, self._recorded_for = sizes, (weakref.ref(model), shape)
