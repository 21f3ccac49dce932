"""Input curvature (CURE): the change of the input gradient along the sign of the gradient."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from stablenet.curvature.regularizers.base import Regularizer
from stablenet.curvature.regularizers.passes import _input_gradient, _rerun
from stablenet.curvature.regularizers.registry import register_regularizer

__all__ = ["InputCurvature"]


@register_regularizer("input_curvature")
class InputCurvature(Regularizer):
    r"""CURE (Moosavi-Dezfooli, Fawzi, Uesato, Frossard, CVPR 2019, arXiv 1811.09716): input-space curvature.

    .. math::
        R = \frac1B \sum_i \big\|\nabla_x \ell_i(x_i + h z_i) - \nabla_x \ell_i(x_i)\big\|^2,
        \qquad z_i = \frac{\operatorname{sign} \nabla_x \ell_i(x_i)}{\|\operatorname{sign} \nabla_x \ell_i(x_i)\|}.

    By Taylor's theorem the difference is :math:`h\,\nabla^2_x \ell_i\, z_i + O(h^2)`, so :math:`R/h^2` measures
    the input Hessian along the direction an :math:`\ell_\infty` attack would take. :math:`z` is held constant;
    both gradients are differentiated with respect to the parameters (double backward). Costs two forward and
    two double-backward passes (one forward fewer with Note [reusing the training forward]).

    Args:
        weight: :math:`\lambda \ge 0` (CURE used 4 on CIFAR-10).
        h: step length in :math:`\ell_2`. :math:`z` has unit norm, so each of the :math:`d` input entries moves
            by :math:`h/\sqrt d`: the default 1.5 (CURE's value) is 1.5/√3072 ≈ 7/255 per pixel on CIFAR-10
            with pixels in [0, 1]. Scale it to your data and target radius.
    """

    name = "input_curvature"

    def __init__(self, weight: float, *, h: float = 1.5) -> None:
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not (math.isfinite(h) and h > 0):
            raise ValueError(f"h must be a finite number > 0; got {h!r}")
        super().__init__(weight, h=h)
        self.h = float(h)

    def penalty(self, model, inputs, targets, outputs, loss_fn, features=None) -> Tensor:
        _, grad = _input_gradient(model, inputs, targets, outputs, loss_fn)
        sign = torch.sign(grad.detach())
        norms = sign.flatten(1).norm(dim=1).clamp_min(1.0)  # all-zero sign: z = 0 (a nonzero row has norm >= 1)
        z = sign / norms.view(-1, *([1] * (sign.dim() - 1)))
        shifted = (inputs.detach() + self.h * z).requires_grad_(True)
        loss = inputs.shape[0] * loss_fn(_rerun(model, shifted), targets)
        (grad_shifted,) = torch.autograd.grad(loss, shifted, create_graph=True)
        return (grad_shifted - grad).flatten(1).pow(2).sum(1).mean()
