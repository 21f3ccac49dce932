r"""Curvature regularisers: differentiable penalties added to the training loss, created by name.

A regulariser is called as ``reg(model, inputs, targets, outputs, loss_fn, features=None)`` and returns its
*unweighted* value, a differentiable 0-dim tensor; its ``weight`` multiplies it in :func:`total_penalty`:

.. math:: \mathcal L_{\text{train}} = \text{loss\_fn}(f(x), y) + \sum_r \lambda_r\, R_r(f, x, y).

Registered names (:data:`REGULARIZERS`; :func:`register_regularizer` adds more, and a user's callable is
accepted wherever a name is):

* ``activation_decay`` (:class:`ActivationDecay`): :math:`\operatorname{mean}_i \|h_i\|^2`, ``h`` the input of
  the last layer; bounds the effect of smoothing the loss over the last layer's weights.
* ``input_curvature`` (:class:`InputCurvature`): CURE, :math:`\|\nabla_x\ell(x + hz) - \nabla_x\ell(x)\|^2`.
* ``gradient_norm`` (:class:`GradientNorm`): :math:`\|\nabla_x\ell\|^2` (or :math:`\|\nabla_\theta L\|^2`).
* ``hessian_trace`` (:class:`HessianTrace`): Hutchinson's estimate of :math:`\operatorname{tr}\nabla^2_\theta L`
  (or of the input Hessian).
* ``lipschitz_penalty`` (:class:`LipschitzPenalty`): :math:`\sum_l \max(\hat\sigma_l - \tau, 0)` with Gram
  upper bounds on the layers' spectral norms.

Conventions. ``loss_fn(outputs, targets)`` is the training loss :math:`L`, a *mean* over the batch of
per-example losses :math:`\ell_i`. Input derivatives are taken per example: we differentiate :math:`B \cdot L`
(:math:`B` the batch size), whose gradient with respect to :math:`x_i` is :math:`\nabla_{x_i}\ell_i` as long as
examples do not interact (BatchNorm in training mode makes them interact slightly). Input-space penalties are
then averaged over the batch, so their scale does not depend on :math:`B`. Penalties that need a forward pass
the training step did not make run it without a trace in the model (Note [re-running the model]), or reuse
the training forward's ``outputs`` (Note [reusing the training forward]); both notes are in
:mod:`stablenet.curvature.regularizers.passes`.

Layout: :mod:`~stablenet.curvature.regularizers.base` (the :class:`Regularizer` interface and
:func:`total_penalty`), :mod:`~stablenet.curvature.regularizers.registry` (names, :func:`create_regularizer`,
:func:`regularizers_from_config`), one module per registered penalty, and
:mod:`~stablenet.curvature.regularizers.conv_bounds` (the Lipschitz penalty's convolution bounds).

Example:
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> regs = regularizers_from_config([{"name": "activation_decay", "weight": 0.01},
    ...                                  {"name": "input_curvature", "weight": 0.1, "h": 0.5}])
    >>> x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    >>> out = model(x)
    >>> loss = F.cross_entropy(out, y) + total_penalty(regs, model, x, y, out, F.cross_entropy)
    >>> loss.backward()
"""

# Importing the penalty modules registers their names in REGULARIZERS.
from stablenet.curvature.regularizers.activation_decay import ActivationDecay
from stablenet.curvature.regularizers.base import FunctionRegularizer, Regularizer, penalty_terms, total_penalty
from stablenet.curvature.regularizers.gradient_norm import GradientNorm
from stablenet.curvature.regularizers.hessian_trace import HessianTrace
from stablenet.curvature.regularizers.input_curvature import InputCurvature
from stablenet.curvature.regularizers.lipschitz import LipschitzPenalty
from stablenet.curvature.regularizers.registry import (
    REGULARIZERS,
    create_regularizer,
    register_regularizer,
    regularizers_from_config,
)

__all__ = [
    "REGULARIZERS",
    "ActivationDecay",
    "FunctionRegularizer",
    "GradientNorm",
    "HessianTrace",
    "InputCurvature",
    "LipschitzPenalty",
    "Regularizer",
    "create_regularizer",
    "penalty_terms",
    "register_regularizer",
    "regularizers_from_config",
    "total_penalty",
]
