r"""Forward rounding of a whole network, bounded over a ball: what makes Lipschitz certificates hold in floating point.

A Lipschitz-margin certificate reasons about the *exact* network :math:`f` (whose Lipschitz bound
``stablenet.spectral`` computes), but the prediction a user gets is the *computed* :math:`\tilde f`. For a
certified radius :math:`r` around :math:`x` we need, at every :math:`x'` with :math:`\|x' - x\| \le r`,

.. math:: \|\tilde f(x') - f(x')\|_2 \le E(r) = e_0 + e_1 r ,

a bound that holds on the whole ball, not only at :math:`x`.

# Note [rounding over the ball]
Write the network as layers :math:`g_k` (a chain, with residual blocks :math:`z + h(z)`), :math:`z_k` the exact
activations, :math:`\tilde z_k` the computed ones, :math:`P_k` a Lipschitz bound of the exact prefix up to layer
:math:`k` and :math:`L_k` that of layer :math:`k` (both from :func:`stablenet.spectral.lipschitz_bound_tree`).
Telescoping, :math:`\|\tilde z_k - z_k\| \le L_k \|\tilde z_{k-1} - z_{k-1}\| + \delta_k(\tilde z_{k-1})` where
:math:`\delta_k(z) \le \rho_k \|z\| + \beta_k` is the layer's own rounding (its :class:`RoundingBound`:
``rounding_bound()`` method or a registered rule). Over the ball, the inputs' norms are bounded from the
computed activations at :math:`x` itself:

.. math::
    \|\tilde z_k(x')\| \le \|\tilde z_k(x)\| + \|\tilde z_k(x) - z_k(x)\| + \|z_k(x) - z_k(x')\|
    + \|z_k(x') - \tilde z_k(x')\| \le \|\tilde z_k(x)\| + E_k(0) + P_k r + E_k(r),

so every :math:`E_k` stays affine in :math:`r`, and one pass over the network (in forward order) computes it
for the whole batch. A residual block adds its skip input (``E`` passes through with factor 1, or
:math:`|a|` for ``residual_weights``) and one rounded addition per element (at most four roundings for the
weighted form, as :class:`stablenet.nn.LipResidual` computes it). Each rule also says up to which input norm
nothing overflows; the radius stays below the point where an input norm could exceed it.

The norms :math:`\|\tilde z_k(x)\|` are read by forward hooks during the certifier's own forward pass, in
float64 and inflated for their rounding. A module the walk cannot bound (no rounding rule) raises: it is
never skipped.

The radius (``stablenet.certify.lipschitz``) then keeps, for each class :math:`j`, the computed margin at
:math:`x` minus the errors at :math:`x` and at :math:`x'` above the exact margin's drop
:math:`D_{cj} L r`: :math:`r < (\tilde m_{cj} - 2\alpha_{cj}) / (D_{cj} L + \beta_{cj})` (see
:class:`LogitErrorBound`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from stablenet.nn.constrained import conv_rounding
from stablenet.spectral.network import BoundNode, lipschitz_upper_bound
from stablenet.spectral.rounding import (
    EVAL_SLACK,
    RoundingBound,
    gamma,
    linear_rounding,
    max_input_norm,
    smallest_normal,
    unit_roundoff,
)

__all__ = [
    "ASSUMED_ACCURACY_ULPS",
    "LogitErrorBound",
    "RoundingWalk",
    "register_rounding_rule",
    "rounding_bound_of",
]

Shape = tuple[int, ...]
RoundingRule = Callable[[nn.Module, Shape, torch.dtype], RoundingBound]

#: Assumed accuracy, in units of :math:`u`, of torch's elementwise ``exp``, ``tanh``, ``erf`` and the few
#: operations around them (Note [rounding model] in ``stablenet.spectral.rounding``: the libraries document 1-2 ulps).
ASSUMED_ACCURACY_ULPS = 16.0

_RULES: dict[type[nn.Module], RoundingRule] = {}


def register_rounding_rule(module_type: type[nn.Module], rule: RoundingRule) -> None:
    """Teach the rounding walk a module type (the counterpart of ``register_lipschitz_rule``).

    Args:
        module_type: the ``nn.Module`` subclass; the rule covers subclasses that keep its ``forward``.
        rule: ``rule(module, input_shape, dtype)`` returning a :class:`~stablenet.spectral.rounding.RoundingBound`
            that holds for the module's forward on one input of ``input_shape`` (no batch dimension) in ``dtype``,
            against the exact map whose Lipschitz bound the module's Lipschitz rule gives.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass; got {module_type!r}")
    if not callable(rule):
        raise TypeError(f"rule must be a callable rule(module, input_shape, dtype); got {rule!r}")
    _RULES[module_type] = rule


# ---------------------------------------------------------------------------------------------- rules
def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def _exact(module: nn.Module, input_shape: Shape, dtype: torch.dtype) -> RoundingBound:
    """Copies, reshapes, maxima and clamps compute no new values."""
    return RoundingBound.exact()


def _linear_rule(module: nn.Linear, input_shape: Shape, dtype: torch.dtype) -> RoundingBound:
    return linear_rounding(module.weight, module.bias, input_shape, dtype)


def _conv_rule(module: nn.Conv1d | nn.Conv2d, input_shape: Shape, dtype: torch.dtype) -> RoundingBound:
    return conv_rounding(module, module.weight.detach(), input_shape, dtype, 0)


def _batch_norm_rule(module: nn.modules.batchnorm._BatchNorm, input_shape: Shape, dtype: torch.dtype) -> RoundingBound:
    r"""Eval-mode BatchNorm :math:`\alpha_c (x - \mu_c) + \beta_c`, :math:`\alpha_c = \gamma_c/\sqrt{v_c + \epsilon}`:
    torch folds it into :math:`x\tilde\alpha + \tilde\beta` (about eight roundings from the exact value, ten
    allowed), so each output is within :math:`\gamma_{10}(|\alpha_c||x| + |\alpha_c \mu_c| + |\beta_c|)`."""
    if module.training or module.running_var is None:
        raise TypeError("BatchNorm is supported only in eval mode with running statistics; call model.eval()")
    alpha = torch.rsqrt(module.running_var.detach().double() + module.eps)
    if module.weight is not None:
        alpha = alpha * module.weight.detach().double()
    shift = (alpha * module.running_mean.detach().double()).abs()
    if module.bias is not None:
        shift = shift + module.bias.detach().double().abs()
    per_channel = _numel(input_shape[1:])
    g = gamma(10, dtype)
    scale = float(alpha.abs().max()) * (1.0 + EVAL_SLACK)
    offset = float(shift.norm()) * math.sqrt(per_channel) * (1.0 + EVAL_SLACK)
    absolute = g * offset + 2.0 * smallest_normal(dtype) * math.sqrt(_numel(input_shape))
    return RoundingBound(g * scale, absolute, max_input_norm(scale * (1.0 + g), offset * (1.0 + g), dtype))


def _pool_window(module: nn.Module, input_shape: Shape, nd: int) -> int:
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        out = module.output_size if isinstance(module.output_size, Sequence) else (module.output_size,) * nd
        sizes = input_shape[-nd:]
        # an adaptive region spans at most ceil(n / m) + 1 entries per axis
        return math.prod(-(-int(n) // int(m or n)) + 1 for n, m in zip(sizes, out, strict=True))
    kernel = module.kernel_size if isinstance(module.kernel_size, Sequence) else (module.kernel_size,) * nd
    return math.prod(int(k) for k in kernel)


def _avg_pool_rule(module: nn.Module, input_shape: Shape, dtype: torch.dtype) -> RoundingBound:
    r"""Average pooling is a non-negative matrix :math:`A`; a window of :math:`w` terms summed and divided is within
    :math:`\gamma_{w+2}` of :math:`(A|z|)_i`, and :math:`\|A|z|\| \le \|A\|\,\|z\|` (its Lipschitz bound)."""
    nd = 1 if isinstance(module, (nn.AvgPool1d, nn.AdaptiveAvgPool1d)) else 2
    window = _pool_window(module, input_shape, nd)
    norm = lipschitz_upper_bound(module, input_shape)
    g = gamma(window + 2, dtype)
    absolute = smallest_normal(dtype) * math.sqrt(_numel(input_shape)) * (window + 2)
    return RoundingBound(g * norm, absolute, max_input_norm(math.sqrt(window) * (1.0 + g), 0.0, dtype))


def _leaky_relu_rule(module: nn.LeakyReLU, input_shape: Shape, dtype: torch.dtype) -> RoundingBound:
    """One product by the slope on the negative side."""
    slope = abs(float(module.negative_slope))
    eta = smallest_normal(dtype) * math.sqrt(_numel(input_shape))
    return RoundingBound(unit_roundoff(dtype) * slope, eta, max_input_norm(max(1.0, slope) * 2.0, 0.0, dtype))


def _assumed(relative_ulps: float, absolute_ulps: float) -> RoundingRule:
    r"""Elementwise :math:`|\tilde y - y| \le u (a|x| + b)` with library accuracy *assumed* (Note [rounding model])."""

    def rule(module: nn.Module, input_shape: Shape, dtype: torch.dtype) -> RoundingBound:
        u, eta = unit_roundoff(dtype), smallest_normal(dtype)
        alpha = abs(float(getattr(module, "alpha", 1.0)))
        root = math.sqrt(_numel(input_shape))
        absolute = u * absolute_ulps * alpha * root + 4.0 * eta * root
        return RoundingBound(u * relative_ulps, absolute)

    return rule


for _type in (nn.Linear,):
    register_rounding_rule(_type, _linear_rule)
for _type in (nn.Conv1d, nn.Conv2d):
    register_rounding_rule(_type, _conv_rule)
for _type in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_rounding_rule(_type, _batch_norm_rule)
for _type in (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d):
    register_rounding_rule(_type, _avg_pool_rule)
for _type in (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
):
    register_rounding_rule(_type, _exact)
register_rounding_rule(nn.LeakyReLU, _leaky_relu_rule)
register_rounding_rule(nn.Tanh, _assumed(ASSUMED_ACCURACY_ULPS, 0.0))
register_rounding_rule(nn.Sigmoid, _assumed(0.0, ASSUMED_ACCURACY_ULPS))
register_rounding_rule(nn.GELU, _assumed(ASSUMED_ACCURACY_ULPS, 0.0))
register_rounding_rule(nn.SiLU, _assumed(ASSUMED_ACCURACY_ULPS, 0.0))
register_rounding_rule(nn.ELU, _assumed(0.0, 2.0 * ASSUMED_ACCURACY_ULPS))
del _type


def _rule_for(module: nn.Module) -> Callable[[Shape, torch.dtype], RoundingBound]:
    method = getattr(module, "rounding_bound", None)
    if callable(method):
        return method
    rule_type = next((t for t in type(module).__mro__ if t in _RULES), None)
    if rule_type is None or type(module).forward is not rule_type.forward:
        raise TypeError(
            f"no forward-rounding rule for module type {type(module).__name__}: give it a rounding_bound(input_shape, "
            "dtype) method or register one with stablenet.certify.rounding.register_rounding_rule; built-in: "
            f"{', '.join(sorted(t.__name__ for t in _RULES))} and every stablenet layer"
        )
    rule = _RULES[rule_type]
    return lambda shape, dtype: rule(module, shape, dtype)


def rounding_bound_of(module: nn.Module, input_shape: Sequence[int], dtype: torch.dtype) -> RoundingBound:
    """The rounding bound of one (leaf) module: its ``rounding_bound()`` method, else a registered rule.

    Raises:
        TypeError: when the module has neither (the certificate would otherwise ignore its rounding).
    """
    return _rule_for(module)(tuple(int(s) for s in input_shape), dtype)


# --------------------------------------------------------------------------------------------- result
@dataclass(frozen=True)
class LogitErrorBound:
    r"""Bounds, per example, on how far computed logits are from exact ones anywhere in a ball.

    For :math:`\|x' - x\| \le r \le` ``radius_limit`` and any classes :math:`c \ne j`, with :math:`D_{cj}` the
    Lipschitz factor of the exact margin in the body's output (:math:`\|w_c - w_j\|` for an LLN head,
    :math:`\sqrt2` in the generic form, where the whole model is the "body"):

    .. math::
        |(\tilde f_c - \tilde f_j)(x') - (f_c - f_j)(x')| \le \alpha_{cj} + \beta_{cj} r, \quad
        \alpha_{cj} = D_{cj} b_0 + h_{0,c} + h_{0,j},\ \beta_{cj} = D_{cj} b_1 + h_{1,c} + h_{1,j},

    with body error :math:`b_0 + b_1 r` (``body_offset``, ``body_slope``) and per-logit head error
    :math:`h_0 + h_1 r` (``head_offset``, ``head_slope``; zero in the generic form).
    """

    body_offset: Tensor
    body_slope: Tensor
    head_offset: Tensor
    head_slope: Tensor
    radius_limit: Tensor

    @classmethod
    def exact(cls, batch: int, num_classes: int, device: torch.device | str | None = None) -> LogitErrorBound:
        """No error at all: only for logits computed exactly (e.g. symbolic tests); never for a float forward."""
        zeros = torch.zeros(batch, dtype=torch.float64, device=device)
        head = torch.zeros(batch, num_classes, dtype=torch.float64, device=device)
        return cls(zeros, zeros, head, head, torch.full_like(zeros, math.inf))


# ----------------------------------------------------------------------------------------------- walk
@dataclass
class _Call:
    in_norm: Tensor  # (N,) float64, rounded up
    out_norm: Tensor
    shape: Shape
    dtype: torch.dtype


def _norms(t: Tensor) -> Tensor:
    """Per-example l2 norms in float64, inflated for their own rounding (a sum of ``n`` squares and a root)."""
    flat = t.detach().reshape(t.shape[0], -1)
    norms = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64)
    return norms * (1.0 + EVAL_SLACK + (flat.shape[1] + 2) * 2.0**-52)


def _times(c: float, t: Tensor) -> Tensor:
    """``c * t`` with ``inf * 0 = inf`` (a vacuous bound stays vacuous)."""
    return t * c if math.isfinite(c) else torch.full_like(t, math.inf)


def _up(x: float) -> float:
    return math.nextafter(x, math.inf)


@dataclass
class _State:
    e0: Tensor  # error bound at the current point: e0 + e1 r
    e1: Tensor
    prefix: float  # Lipschitz bound of the exact prefix
    limit: Tensor  # largest radius for which every rule's input range holds


class RoundingWalk:
    """Bounds the forward rounding of a network over balls (Note [rounding over the ball]).

    Built once from the network's :class:`~stablenet.spectral.network.BoundNode` tree; :meth:`record` is a context
    manager around the network's own forward that reads the activation norms, and :meth:`body_error` turns them
    into the error bound at the output.

    Args:
        tree: ``lipschitz_bound_tree(network, input_shape)``.

    Raises:
        TypeError: a leaf module without a rounding rule (:func:`rounding_bound_of`).
    """

    def __init__(self, tree: BoundNode) -> None:
        self.tree = tree
        self._modules: dict[int, nn.Module] = {}
        self._rules: dict[tuple[int, Shape, torch.dtype], RoundingBound] = {}
        self._collect(tree)
        self._calls: dict[int, list[_Call]] = {}

    def _collect(self, node: BoundNode) -> None:
        self._modules[id(node.module)] = node.module
        if node.kind == "leaf":
            _rule_for(node.module)  # a module without a rounding rule fails here, before any forward
        for child in node.children:
            self._collect(child)

    @contextmanager
    def record(self, extra: Sequence[nn.Module] = ()) -> Iterator[None]:
        """Hooks that record each module call's input and output norms (and of ``extra`` modules) during the block."""
        self._calls = {}

        def hook(module: nn.Module, args: tuple, output: object) -> None:
            x = args[0] if args else None
            if not isinstance(x, Tensor) or not isinstance(output, Tensor):
                raise TypeError(f"{type(module).__name__} must take and return one tensor to be certified")
            call = _Call(_norms(x), _norms(output), tuple(x.shape[1:]), x.dtype)
            self._calls.setdefault(id(module), []).append(call)

        modules = {**self._modules, **{id(m): m for m in extra}}
        handles = [m.register_forward_hook(hook) for m in modules.values()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def call_of(self, module: nn.Module) -> _Call:
        """The next recorded call of ``module`` (in forward order)."""
        queue = self._calls.get(id(module))
        if not queue:
            raise RuntimeError(
                f"{type(module).__name__} ran fewer times than the network structure says: a module's forward calls "
                "modules the walk cannot see; certify a model whose structure the Lipschitz walk describes"
            )
        return queue.pop(0)

    def _rule(self, module: nn.Module, call: _Call) -> RoundingBound:
        key = (id(module), call.shape, call.dtype)
        if key not in self._rules:
            self._rules[key] = rounding_bound_of(module, call.shape, call.dtype)
        return self._rules[key]

    def body_error(self, batch: int, device: torch.device) -> tuple[_State, _Call]:
        """The error bound at the tree's output for the recorded forward, and the root's call."""
        zeros = torch.zeros(batch, dtype=torch.float64, device=device)
        state = _State(zeros, zeros, 1.0, torch.full_like(zeros, math.inf))
        state, call = self._walk(self.tree, state)
        leftover = [self._modules.get(k, k) for k, v in self._calls.items() if v and k in self._modules]
        if leftover:
            raise RuntimeError(
                f"{type(leftover[0]).__name__} ran more times than the network structure says; certify a model "
                "whose forward is the structure the Lipschitz walk describes"
            )
        slack = 1.0 + EVAL_SLACK
        return _State(state.e0 * slack, state.e1 * slack, state.prefix, state.limit), call

    def _walk(self, node: BoundNode, s: _State) -> tuple[_State, _Call]:
        call = self.call_of(node.module)
        if node.kind == "chain":
            for child in node.children:
                s, _ = self._walk(child, s)
            return s, call
        m0 = call.in_norm + 2.0 * s.e0  # bound on the input norm over the ball: m0 + m1 r
        m1 = s.e1 + s.prefix
        if node.kind == "residual":
            return self._residual(node, s, call, m0, m1), call
        rule = self._rule(node.module, call)
        lipschitz = node.bound
        e0 = s.e0 * lipschitz + _times(rule.relative, m0) + rule.absolute
        e1 = s.e1 * lipschitz + _times(rule.relative, m1)
        limit = torch.minimum(s.limit, _radius_below(rule.max_input_norm, m0, m1))
        return _State(e0, e1, _up(s.prefix * lipschitz), limit), call

    def _residual(self, node: BoundNode, s: _State, call: _Call, m0: Tensor, m1: Tensor) -> _State:
        (branch,) = node.children
        h, branch_call = self._walk(branch, s)
        h0 = branch_call.out_norm + 2.0 * h.e0
        h1 = h.e1 + h.prefix
        dtype = call.dtype
        root = math.sqrt(_numel(call.shape))
        if node.weights is None:  # x + h(x): one addition per element
            a, b, g, underflow = 1.0, 1.0, unit_roundoff(dtype), smallest_normal(dtype) * root
        else:  # a x + b h(x) in at most four roundings per element
            a, b = node.weights
            g, underflow = gamma(4, dtype) * (1.0 + a + b), 4.0 * smallest_normal(dtype) * root
        e0 = s.e0 * a + h.e0 * b + _times(g, m0 + h0) + underflow
        e1 = s.e1 * a + h.e1 * b + _times(g, m1 + h1)
        limit = torch.minimum(h.limit, _radius_below(max_input_norm(1.0 + a + b, 0.0, dtype), m0 + h0, m1 + h1))
        prefix = _up(_up(a * s.prefix) + _up(b * h.prefix))
        return _State(e0, e1, prefix, limit)


def _radius_below(max_norm: float, m0: Tensor, m1: Tensor) -> Tensor:
    """The largest ``r`` with ``m0 + m1 r <= max_norm`` (``inf`` if any, 0 if none)."""
    if math.isinf(max_norm):
        return torch.full_like(m0, math.inf)
    room = max_norm - m0
    r = torch.where(m1 > 0, room / m1.clamp_min(torch.finfo(torch.float64).tiny), torch.full_like(m0, math.inf))
    return torch.where(room > 0, r, torch.zeros_like(r))
