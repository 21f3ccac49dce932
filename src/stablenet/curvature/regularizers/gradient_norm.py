"""Gradient norm: the squared norm of the loss gradient, with respect to the inputs or to the parameters."""

from __future__ import annotations

from torch import Tensor

from stablenet.curvature.regularizers.base import Regularizer, _check_choice
from stablenet.curvature.regularizers.passes import _input_gradient, _param_gradient, _zero
from stablenet.curvature.regularizers.registry import register_regularizer

__all__ = ["GradientNorm"]


def _gradient_norm_inputs(model, inputs, targets, outputs, loss_fn) -> Tensor:
    _, grad = _input_gradient(model, inputs, targets, outputs, loss_fn)
    return grad.flatten(1).pow(2).sum(1).mean()


def _gradient_norm_params(model, inputs, targets, outputs, loss_fn) -> Tensor:
    _, grads = _param_gradient(model, inputs, targets, outputs, loss_fn)
    return sum((g.pow(2).sum() for g in grads), _zero(inputs))


_GRADIENT_NORMS = {"inputs": _gradient_norm_inputs, "params": _gradient_norm_params}


@register_regularizer("gradient_norm")
class GradientNorm(Regularizer):
    r"""Squared gradient norm, with respect to the inputs or to the parameters.

    .. math::
        R_{\text{inputs}} = \frac1B \sum_i \|\nabla_x \ell_i(x_i)\|^2, \qquad
        R_{\text{params}} = \|\nabla_\theta L\|^2 .

    The input form is double backpropagation (Drucker & LeCun 1992; Ross & Doshi-Velez, AAAI 2018): to first
    order, :math:`\max_{\|\delta\|\le\varepsilon} \ell(x+\delta) \approx \ell(x) + \varepsilon\|\nabla_x\ell\|`.
    The parameter form penalises sharp regions of the loss (Barrett & Dherin, ICLR 2021, arXiv 2009.11162;
    Zhao, Zhang & Hu, ICML 2022, arXiv 2202.03599). Both differentiate through the gradient (double backward).

    Args:
        weight: :math:`\lambda \ge 0`.
        wrt: ``"inputs"`` (default) or ``"params"``.
    """

    name = "gradient_norm"

    def __init__(self, weight: float, *, wrt: str = "inputs") -> None:
        super().__init__(weight, wrt=_check_choice("wrt", wrt, _GRADIENT_NORMS))
        self.wrt = wrt

    def penalty(self, model, inputs, targets, outputs, loss_fn, features=None) -> Tensor:
        return _GRADIENT_NORMS[self.wrt](model, inputs, targets, outputs, loss_fn)
