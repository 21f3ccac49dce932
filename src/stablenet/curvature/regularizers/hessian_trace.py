"""Hessian trace: Hutchinson's unbiased, differentiable estimate, with respect to the parameters or the inputs."""

from __future__ import annotations

import torch
from torch import Tensor

from stablenet.curvature.regularizers.base import Regularizer, _check_choice
from stablenet.curvature.regularizers.passes import _input_gradient, _param_gradient, _zero
from stablenet.curvature.regularizers.registry import register_regularizer

__all__ = ["HessianTrace"]


def _rademacher_like(t: Tensor) -> Tensor:
    return torch.empty_like(t).bernoulli_(0.5).mul_(2).sub_(1)


def _hutchinson_params(model, inputs, targets, outputs, loss_fn, num_samples: int) -> Tensor:
    params, grads = _param_gradient(model, inputs, targets, outputs, loss_fn)
    total = _zero(inputs)
    if not any(g.requires_grad for g in grads):  # the loss is linear in the parameters: the Hessian is zero
        return total
    for _ in range(num_samples):
        vs = [_rademacher_like(p) for p in params]
        dot = sum((g * v).sum() for g, v in zip(grads, vs, strict=True))
        hvs = torch.autograd.grad(dot, params, create_graph=True, retain_graph=True, allow_unused=True)
        total = total + sum((v * hv).sum() for v, hv in zip(vs, hvs, strict=True) if hv is not None)
    return total / num_samples


def _hutchinson_inputs(model, inputs, targets, outputs, loss_fn, num_samples: int) -> Tensor:
    x, grad = _input_gradient(model, inputs, targets, outputs, loss_fn)
    total = _zero(inputs)
    if not grad.requires_grad:  # the loss is linear in the inputs: the Hessian is zero
        return total
    for _ in range(num_samples):
        v = _rademacher_like(grad)
        (hv,) = torch.autograd.grad((grad * v).sum(), x, create_graph=True, retain_graph=True, allow_unused=True)
        if hv is not None:
            total = total + (v * hv).sum() / inputs.shape[0]
    return total / num_samples


_HUTCHINSON = {"inputs": _hutchinson_inputs, "params": _hutchinson_params}


@register_regularizer("hessian_trace")
class HessianTrace(Regularizer):
    r"""Hutchinson's estimate of the Hessian trace (Hutchinson 1989; as a sharpness measure: Yao et al.,
    PyHessian, 2020, arXiv 1912.07145).

    .. math::
        \operatorname{tr} H = \mathbb E_v [v^\top H v], \qquad \hat T = \frac1m \sum_{k=1}^m v_k^\top H v_k,

    with :math:`v_k` Rademacher vectors (independent :math:`\pm1` entries, :math:`\mathbb E[vv^\top] = I`) and
    :math:`Hv` by double backward. ``wrt="params"``: :math:`H = \nabla^2_\theta L` over all trainable parameters
    (the estimate's variance is :math:`\frac2m\sum_{a\ne b} H_{ab}^2`). ``wrt="inputs"``: the mean over examples
    of :math:`\operatorname{tr}\nabla^2_x \ell_i`, from one Rademacher vector over the whole batch (the
    per-example Hessians are the diagonal blocks of :math:`\nabla^2_x (BL)`). The estimate is unbiased and
    differentiable (``create_graph``); it is *signed*: a non-convex loss can have a negative trace. Vectors
    are drawn from torch's generator on the inputs' device (seed with ``torch.manual_seed``).

    Args:
        weight: :math:`\lambda \ge 0`.
        num_samples: :math:`m \ge 1` Rademacher vectors per call.
        wrt: ``"params"`` (default) or ``"inputs"``.
    """

    name = "hessian_trace"

    def __init__(self, weight: float, *, num_samples: int = 1, wrt: str = "params") -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1; got {num_samples!r}")
        super().__init__(weight, num_samples=num_samples, wrt=_check_choice("wrt", wrt, _HUTCHINSON))
        self.num_samples, self.wrt = num_samples, wrt

    def penalty(self, model, inputs, targets, outputs, loss_fn, features=None) -> Tensor:
        return _HUTCHINSON[self.wrt](model, inputs, targets, outputs, loss_fn, self.num_samples)
