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
then averaged over the batch, so their scale does not depend on :math:`B`.

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
reads the last layer's input captured during that forward once :meth:`ActivationDecay.attach` hooked the
model, or takes ``features``. Without these, the penalty re-runs the model (Note [re-running the model]).

Example:
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> regs = regularizers_from_config([{"name": "activation_decay", "weight": 0.01},
    ...                                  {"name": "input_curvature", "weight": 0.1, "h": 0.5}])
    >>> x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    >>> out = model(x)
    >>> loss = F.cross_entropy(out, y) + total_penalty(regs, model, x, y, out, F.cross_entropy)
    >>> loss.backward()
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from stablenet.spectral.conv import conv_spectral_norm
from stablenet.spectral.dense import gram_iteration

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

_LossFn = Callable[[Tensor, Any], Tensor]

#: Registered regulariser factories by name: ``factory(weight=..., **options) -> Regularizer``.
REGULARIZERS: dict[str, Callable[..., Regularizer]] = {}

# Set while a penalty re-runs the model, so that ActivationDecay's capture hook ignores those passes.
_RERUNNING: ContextVar[bool] = ContextVar("stablenet_regularizer_rerun", default=False)


# ------------------------------------------------------------------------------------------------ helpers
def _check_weight(weight: object) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight must be a finite number >= 0; got {weight!r}")
    return float(weight)


def _check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value  # type: ignore[return-value]


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


def _rademacher_like(t: Tensor) -> Tensor:
    return torch.empty_like(t).bernoulli_(0.5).mul_(2).sub_(1)


def _zero(reference: Tensor) -> Tensor:
    dtype = reference.dtype if reference.is_floating_point() else torch.get_default_dtype()
    return torch.zeros((), dtype=dtype, device=reference.device)


def _options_of(factory: Callable[..., Any], skip: Iterable[str]) -> tuple[list[str], bool]:
    """Keyword options a factory accepts (minus ``skip``) and whether it takes ``**kwargs``."""
    sig = inspect.signature(factory)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [p.name for p in sig.parameters.values() if p.kind in kinds and p.name not in set(skip)]
    var_kw = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return names, var_kw


def _check_options(factory: Callable[..., Any], options: Mapping[str, Any], label: str, skip: Iterable[str]) -> None:
    accepted, var_kw = _options_of(factory, skip)
    unknown = sorted(set(options) - set(accepted))
    if unknown and not var_kw:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for regulariser {label!r}; "
            f"accepted: {', '.join(accepted) or 'none'}"
        )


# --------------------------------------------------------------------------------------------- base class
class Regularizer:
    """A penalty with a ``weight``; calling it returns the unweighted, differentiable 0-dim value.

    Subclasses implement :meth:`penalty`; ``__call__`` first checks that the model has trainable parameters.
    ``options`` holds the constructor's options, so :meth:`config` round-trips through
    :func:`regularizers_from_config`.
    """

    name: ClassVar[str] = "regularizer"

    def __init__(self, weight: float, **options: Any) -> None:
        self.weight = _check_weight(weight)
        self.options = dict(options)

    def __call__(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Any,
        outputs: Tensor | None,
        loss_fn: _LossFn,
        features: Tensor | None = None,
    ) -> Tensor:
        _trainable_parameters(model)
        return self.penalty(model, inputs, targets, outputs, loss_fn, features)

    def penalty(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Any,
        outputs: Tensor | None,
        loss_fn: _LossFn,
        features: Tensor | None = None,
    ) -> Tensor:
        """The unweighted value (see the class docstring of each regulariser)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """``{"name": ..., "weight": ..., **options}``, the entry that :func:`regularizers_from_config` reads."""
        return {"name": self.name, "weight": self.weight, **self.options}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in {"weight": self.weight, **self.options}.items())
        return f"{type(self).__name__}({args})"


def register_regularizer(name: str) -> Callable[[Callable[..., Regularizer]], Callable[..., Regularizer]]:
    """Decorator registering a regulariser class (or factory ``f(weight=..., **options)``) under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a regulariser name must be a non-empty string; got {name!r}")

    def wrap(factory: Callable[..., Regularizer]) -> Callable[..., Regularizer]:
        if name in REGULARIZERS and REGULARIZERS[name] is not factory:
            raise ValueError(f"regulariser name {name!r} is already registered")
        REGULARIZERS[name] = factory
        return factory

    return wrap


class FunctionRegularizer(Regularizer):
    """A user's callable ``fn(model, inputs, targets, outputs, loss_fn, features=None, **options) -> Tensor``.

    ``options`` are passed to ``fn`` as keyword arguments at every call.
    """

    _ARGS = ("model", "inputs", "targets", "outputs", "loss_fn", "features")

    def __init__(self, fn: Callable[..., Tensor], weight: float, **options: Any) -> None:
        if not callable(fn):
            raise ValueError(f"fn must be callable; got {type(fn).__name__}")
        label = getattr(fn, "__name__", type(fn).__name__)
        _check_options(fn, options, label, self._ARGS)
        try:
            inspect.signature(fn).bind(None, None, None, None, None, features=None, **options)
        except TypeError as error:
            raise ValueError(
                f"regulariser {label!r} must accept (model, inputs, targets, outputs, loss_fn, features=None); {error}"
            ) from None
        super().__init__(weight, **options)
        self.fn = fn
        self.name = label  # type: ignore[misc]

    def penalty(self, model, inputs, targets, outputs, loss_fn, features=None) -> Tensor:
        return self.fn(model, inputs, targets, outputs, loss_fn, features=features, **self.options)


# ---------------------------------------------------------------------------------------- activation decay
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


# ------------------------------------------------------------------------------------------ input curvature
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


# -------------------------------------------------------------------------------------------- gradient norm
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


# -------------------------------------------------------------------------------------------- Hessian trace
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


# ---------------------------------------------------------------------------------------- Lipschitz penalty
def _kernel_extent(module: nn.Module) -> tuple[int, ...]:
    k = module.weight.shape[2:]
    return tuple(d * (s - 1) + 1 for d, s in zip(module.dilation, k, strict=True))


def _conv_spatial_bound(module: nn.Module, sizes: set[tuple[int, ...]], n_iter: int | None) -> Tensor:
    """Spatial Gram bound: independent of the input size, valid for zero and circular padding."""
    return conv_spectral_norm(
        module.weight,
        _kernel_extent(module),
        "zeros",
        dilation=module.dilation,
        groups=module.groups,
        method="gram",
        n_iter=n_iter or 4,
    )


def _padding_size(module: nn.Module) -> int | tuple[int, ...] | str:
    # ``spectral.conv`` takes no zeros inside a padding tuple: a layer without padding passes the int 0.
    padding = module.padding
    return 0 if not isinstance(padding, str) and not any(padding) else padding


def _conv_input_size_bound(module: nn.Module, sizes: set[tuple[int, ...]], n_iter: int | None) -> Tensor:
    """Circular Gram at each recorded size (zero padding: the circular embedding), max over sizes."""
    extent = _kernel_extent(module)
    if not sizes or any(n < k for size in sizes for n, k in zip(size, extent, strict=True)):
        # not reached by the recording pass, or run on maps smaller than the kernel: use the size-free bound
        return _conv_spatial_bound(module, sizes, n_iter)
    method = "gram" if module.padding_mode == "circular" else "embed"
    bounds = [
        conv_spectral_norm(
            module.weight,
            size,
            module.padding_mode,
            dilation=module.dilation,
            groups=module.groups,
            method=method,
            n_iter=n_iter or 6,
            padding_size=_padding_size(module),
        )
        for size in sorted(sizes)
    ]
    return torch.stack(bounds).amax()


_CONV_BOUNDS = {"input_size": _conv_input_size_bound, "spatial": _conv_spatial_bound}
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


# -------------------------------------------------------------------------------------------- construction
def create_regularizer(regularizer: str | Callable[..., Any], weight: float, **options: Any) -> Regularizer:
    """A regulariser by registered name, by :class:`Regularizer` subclass, or from a user's callable.

    Args:
        regularizer: a name from :data:`REGULARIZERS`, a :class:`Regularizer` subclass, or a callable
            ``fn(model, inputs, targets, outputs, loss_fn, features=None, **options) -> Tensor`` (wrapped in
            :class:`FunctionRegularizer`).
        weight: the multiplier :math:`\\lambda \\ge 0` applied by :func:`total_penalty`.
        **options: the regulariser's options; unknown ones raise ``ValueError`` naming the accepted ones.

    Example:
        >>> create_regularizer("hessian_trace", 0.1, num_samples=2)
        HessianTrace(weight=0.1, num_samples=2, wrt='params')
    """
    if isinstance(regularizer, str):
        if regularizer not in REGULARIZERS:
            raise ValueError(
                f"unknown regulariser {regularizer!r}; accepted: {', '.join(sorted(REGULARIZERS))}, or a callable"
            )
        factory, label = REGULARIZERS[regularizer], regularizer
    elif isinstance(regularizer, type) and issubclass(regularizer, Regularizer):
        factory, label = regularizer, regularizer.name
    elif callable(regularizer):
        return FunctionRegularizer(regularizer, weight, **options)
    else:
        raise ValueError(
            f"regularizer must be a name ({', '.join(sorted(REGULARIZERS))}) or a callable; "
            f"got {type(regularizer).__name__}"
        )
    _check_options(factory, options, label, ("weight",))
    reg = factory(weight=weight, **options)
    if not isinstance(reg, Regularizer):
        raise TypeError(f"the factory registered as {label!r} must return a Regularizer; got {type(reg).__name__}")
    return reg


def regularizers_from_config(config: Iterable[Mapping[str, Any] | Regularizer] | None) -> list[Regularizer]:
    """Regularisers from a list of ``{name: ..., weight: ..., **options}`` entries (``None``: none).

    Entries that already are :class:`Regularizer` objects are kept as they are.

    Example:
        >>> regularizers_from_config([{"name": "gradient_norm", "weight": 0.5, "wrt": "params"}])
        [GradientNorm(weight=0.5, wrt='params')]
    """
    if config is None:
        return []
    if isinstance(config, (str, Mapping)) or not isinstance(config, Iterable):
        raise ValueError(
            f"regularizers must be a list of {{name: ..., weight: ..., **options}} entries; got {type(config).__name__}"
        )
    out = []
    for index, entry in enumerate(config):
        if isinstance(entry, Regularizer):
            out.append(entry)
            continue
        if not isinstance(entry, Mapping):
            raise ValueError(
                f"regularizer entry {index} must be a mapping with keys 'name', 'weight' and options; "
                f"got {type(entry).__name__}"
            )
        missing = [key for key in ("name", "weight") if key not in entry]
        if missing:
            raise ValueError(f"regularizer entry {index} needs keys 'name' and 'weight'; missing {', '.join(missing)}")
        options = {k: v for k, v in entry.items() if k not in ("name", "weight")}
        out.append(create_regularizer(entry["name"], entry["weight"], **options))
    return out


def penalty_terms(
    regularizers: Iterable[Regularizer],
    model: nn.Module,
    inputs: Tensor,
    targets: Any,
    outputs: Tensor | None,
    loss_fn: _LossFn,
    features: Tensor | None = None,
) -> dict[str, Tensor]:
    """Each regulariser's *weighted* value ``weight * reg(...)``, keyed by name (``name#2``... for repeats).

    Regularisers with weight 0 are skipped (not computed). For logging; :func:`total_penalty` sums them.
    """
    terms: dict[str, Tensor] = {}
    for reg in regularizers:
        if reg.weight == 0:
            continue
        value = reg(model, inputs, targets, outputs, loss_fn, features)
        name = getattr(reg, "name", type(reg).__name__)
        if not isinstance(value, Tensor) or value.dim() != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"regulariser {name!r} must return a 0-dim tensor; got {shape}")
        key, count = name, 1
        while key in terms:
            count += 1
            key = f"{name}#{count}"
        terms[key] = reg.weight * value
    return terms


def total_penalty(
    regularizers: Iterable[Regularizer],
    model: nn.Module,
    inputs: Tensor,
    targets: Any,
    outputs: Tensor | None,
    loss_fn: _LossFn,
    features: Tensor | None = None,
) -> Tensor:
    r""":math:`\sum_r \lambda_r R_r`: the sum of ``reg.weight * reg(...)``, a 0-dim tensor on the inputs' device.

    Args:
        regularizers: from :func:`regularizers_from_config` or :func:`create_regularizer`.
        model: the model being trained (the bare module, not a DDP wrapper).
        inputs: the batch, ``(B, ...)``.
        targets: what ``loss_fn`` takes as its second argument.
        outputs: ``model(inputs)`` from the training forward (Note [reusing the training forward]), or None.
        loss_fn: ``loss_fn(outputs, targets)``, the batch-mean training loss.
        features: the last layer's input from the training forward, for ``activation_decay``.
    """
    terms = penalty_terms(regularizers, model, inputs, targets, outputs, loss_fn, features)
    zero = _zero(outputs if outputs is not None else inputs).to(inputs.device)
    return sum(terms.values(), zero)
