r"""Lipschitz bounds of whole networks: a certified upper bound by composition, an empirical lower bound.

.. math:: L(f_k \circ \dots \circ f_1) \le \prod_i L(f_i), \qquad L(x \mapsto x + h(x)) \le 1 + L(h)

A module is bounded by, in order: its own ``lipschitz_bound()`` method (every stablenet layer has one;
it receives ``input_shape`` when it accepts that argument), ``1 + L(branch)`` when it has a
``residual_branch()`` method (it promises ``forward(x) = x + branch(x)``; with a ``residual_weights()`` method
returning ``(a, b)`` it promises ``forward(x) = a x + b branch(x)`` and is bounded by ``|a| + |b| L(branch)``,
e.g. ``stablenet.nn.LipResidual``), a rule for its type (built-in
rules for the torch modules below, or one added with :func:`register_lipschitz_rule`), or recursion into
``nn.Sequential``. Any other module raises: a module is never skipped, since a skipped module would make
the bound, and every certificate built on it, wrong.

Built-in rules: ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` (need ``input_shape``), ``nn.BatchNorm1d/2d/3d``
(eval mode), ``nn.AvgPool1d/2d``, ``nn.AdaptiveAvgPool1d/2d`` and ``nn.AdaptiveMaxPool1d/2d`` (need
``input_shape``), ``nn.MaxPool1d/2d``, ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.ELU``, ``nn.GELU``, ``nn.SiLU``,
``nn.Tanh``, ``nn.Sigmoid``, ``nn.Hardtanh`` (and ``nn.ReLU6``), ``nn.Identity``, ``nn.Flatten``,
``nn.Unflatten`` and dropout (eval mode). A rule written for a type covers its subclasses only when they
keep its ``forward``.

# Note [shape recording]
Some operators' norms depend on the input size (a convolution's, an adaptive pooling's). Given the shape
of one input, we run one forward pass on zeros of shape ``(1, *input_shape)`` under ``torch.no_grad()``,
in the model's current mode, with pre-forward hooks recording each module's input shape (without the
batch dimension). Buffers are restored afterwards, so the pass leaves no trace (running statistics,
power-iteration vectors). A module called on several shapes is bounded by the largest of its bounds.

The bounds are bounds on the exact function that the parameters define; floating-point rounding of the
*bound computation* is covered by an explicit slack (and products round up, one ulp per factor).
"""

from __future__ import annotations

import contextvars
import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablenet.spectral.conv import conv_spectral_norm_upper_bounds
from stablenet.spectral.dense import spectral_norm_upper_bound

__all__ = [
    "BoundNode",
    "layer_lipschitz_bounds",
    "lipschitz_bound_tree",
    "lipschitz_lower_bound",
    "lipschitz_upper_bound",
    "register_lipschitz_rule",
    "unbounded_modules",
]

Shape = tuple[int, ...]

#: Relative slack on closed forms evaluated in float64 with a handful of correctly rounded operations
#: (each off by at most 2**-53 relatively); sums over ``n`` terms add ``n * 2**-52`` on top.
_FLOAT64_SLACK = 1e-12

# Largest |derivative| of GELU (exact: Phi(sqrt 2) + sqrt 2 phi(sqrt 2) = 1.12890..., tanh approximation
# 1.12899...) and of SiLU (1.09984... at x = 2.3994); both checked numerically in tests/spectral.
_GELU_BOUND = 1.13
_SILU_BOUND = 1.1

_RULES: dict[type[nn.Module], Callable[[nn.Module, Shape | None], float]] = {}


def _accepts_two(rule: Callable[..., float]) -> bool:
    try:
        signature = inspect.signature(rule)
    except (TypeError, ValueError):  # some builtins have no signature: call them with the module only
        return False
    try:
        signature.bind(None, None)
    except TypeError:
        return False
    return True


def register_lipschitz_rule(module_type: type[nn.Module], rule: Callable[..., float]) -> None:
    """Teach :func:`lipschitz_upper_bound` a module type.

    Args:
        module_type: the ``nn.Module`` subclass; the rule also covers subclasses that keep its ``forward``.
        rule: ``rule(module)`` or ``rule(module, input_shape)``, returning a true upper bound on the l2
            Lipschitz constant of ``module``. ``input_shape`` is the shape of the module's input without the
            batch dimension, or ``None`` when the caller gave no ``input_shape`` (see Note [shape recording]).

    Example:
        >>> class Double(nn.Module):
        ...     def forward(self, x):
        ...         return 2 * x
        >>> register_lipschitz_rule(Double, lambda module: 2.0)
        >>> lipschitz_upper_bound(nn.Sequential(Double(), nn.ReLU())) >= 2.0
        True
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass; got {module_type!r}")
    if not callable(rule):
        raise TypeError(f"rule must be a callable rule(module) or rule(module, input_shape); got {rule!r}")
    if _accepts_two(rule):
        _RULES[module_type] = rule
    else:
        _RULES[module_type] = lambda module, input_shape: rule(module)


# ---------------------------------------------------------------------------------------------- rules
def _tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, Sequence) else (int(value),) * n


def _spatial(module: nn.Module, input_shape: Shape | None, n: int) -> tuple[int, ...]:
    if input_shape is None:
        raise ValueError(
            f"{type(module).__name__} needs the input size: pass input_shape, the shape of one input without the "
            "batch dimension, e.g. lipschitz_upper_bound(model, input_shape=(3, 32, 32))"
        )
    if len(input_shape) < n:
        raise ValueError(f"{type(module).__name__} needs inputs with {n} spatial dimensions; got shape {input_shape}")
    return tuple(input_shape[len(input_shape) - n :])


def _sqrt_up(m: int) -> float:
    """An upper bound on sqrt(m) for an integer m: exact for squares, else one ulp above the rounded root."""
    root = math.isqrt(m)
    return float(root) if root * root == m else math.nextafter(math.sqrt(m), math.inf)


def _linear_bound(module: nn.Linear) -> float:
    """Certified Gram-iteration bound on the spectral norm of the weight (the bias only shifts)."""
    return float(spectral_norm_upper_bound(module.weight))


def _rule_type(module: nn.Module) -> type[nn.Module] | None:
    """The nearest class in ``module``'s MRO with a registered rule (``_walk`` checks the forward is kept)."""
    return next((t for t in type(module).__mro__ if t in _RULES), None)


def _conv_problem(module: nn.Conv1d | nn.Conv2d, input_shape: Shape | None) -> dict[str, object]:
    if module.padding_mode not in ("zeros", "circular"):
        raise TypeError(
            f"padding_mode must be one of 'circular', 'zeros'; got {module.padding_mode!r} ('reflect' and "
            "'replicate' padding are not supported)"
        )
    nd = module.weight.dim() - 2
    return {
        "kernel": module.weight,
        "input_size": _spatial(module, input_shape, nd),
        "padding": module.padding_mode,
        "padding_size": module.padding,
        "stride": module.stride,
        "dilation": module.dilation,
        "groups": module.groups,
    }


#: Convolution bounds computed ahead of a walk, by ``(id(module), input shape)`` (Note [prefetched convolutions]).
_PREFETCHED: contextvars.ContextVar[dict[tuple[int, Shape | None], float] | None] = contextvars.ContextVar(
    "stablenet_prefetched_conv_bounds", default=None
)


def _conv_bound(module: nn.Conv1d | nn.Conv2d, input_shape: Shape | None) -> float:
    """Certified bound on the spectral norm of the convolution operator on this input size (bias only shifts)."""
    prefetched = _PREFETCHED.get()
    if prefetched is not None and (id(module), input_shape) in prefetched:
        return prefetched[(id(module), input_shape)]
    return conv_spectral_norm_upper_bounds([_conv_problem(module, input_shape)])[0]


def _prefetch_conv_bounds(
    model: nn.Module, shapes: dict[int, list[Shape | None]]
) -> dict[tuple[int, Shape | None], float]:
    """Bounds of the convolutions that :func:`_walk` will bound by rule, computed in one call.

    # Note [prefetched convolutions]
    On a GPU the convolutions' Gram iterations run in lockstep (Note [lockstep Gram] in
    ``stablenet.spectral.lockstep``), several times faster than one after another. This visits the modules as
    ``_walk`` does (layers with their own bound are not entered). Anything that fails here is left out, so that
    the walk itself computes it and raises its error with the module's name.
    """
    keys: list[tuple[int, Shape | None]] = []
    problems: list[dict[str, object]] = []

    def visit(module: nn.Module) -> None:
        if callable(getattr(module, "lipschitz_bound", None)):
            return
        branch_fn = getattr(module, "residual_branch", None)
        if callable(branch_fn):
            visit(branch_fn())
            return
        rule_type = _rule_type(module)
        if rule_type is not None:
            if _RULES[rule_type] is _conv_bound:
                for shape in dict.fromkeys(shapes.get(id(module)) or [None]):
                    try:
                        problem = _conv_problem(module, shape)  # type: ignore[arg-type]
                    except (TypeError, ValueError):
                        continue
                    keys.append((id(module), shape))
                    problems.append(problem)
            return
        if isinstance(module, nn.Sequential):
            for child in module._modules.values():
                if child is not None:
                    visit(child)

    visit(model)
    try:
        return dict(zip(keys, conv_spectral_norm_upper_bounds(problems), strict=True))
    except (TypeError, ValueError):
        return {}


def _batch_norm_bound(module: nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d) -> float:
    r"""In eval mode with running statistics, BatchNorm is :math:`x_c \mapsto \gamma_c (x_c - \mu_c) /
    \sqrt{v_c + \epsilon} + \beta_c`, diagonal, so its norm is :math:`\max_c |\gamma_c| / \sqrt{v_c + \epsilon}`."""
    if module.training or module.running_var is None:
        raise TypeError(
            "BatchNorm is supported only in eval mode with running statistics (track_running_stats=True), where it "
            "is a fixed affine map; call model.eval()"
        )
    scale = torch.rsqrt(module.running_var.detach().double() + module.eps)
    if module.weight is not None:
        scale = scale * module.weight.detach().double().abs()
    return float(scale.max()) * (1.0 + _FLOAT64_SLACK)


def _matrix_bound(a: Tensor) -> float:
    r"""Upper bound on :math:`\|A\|_2` for a float64 matrix: the smaller of the Schur test
    :math:`\sqrt{\|A\|_1 \|A\|_\infty}` (exact for non-overlapping pooling) and the Gram-iteration bound."""
    slack = 1.0 + _FLOAT64_SLACK + max(a.shape) * 2.0**-52
    schur = math.sqrt(float(a.abs().sum(1).max()) * float(a.abs().sum(0).max())) * slack
    return min(schur, float(spectral_norm_upper_bound(a)))


def _one_hots(n: int) -> Tensor:
    """``(n, 1, n)``: a batch of the ``n`` unit vectors of length ``n``, one channel each."""
    return torch.eye(n, dtype=torch.float64).unsqueeze(1)


def _avg_pool_bound(module: nn.AvgPool1d | nn.AvgPool2d, input_shape: Shape | None) -> float:
    r"""Average pooling is linear and separable, :math:`A = A_h \otimes A_w` (torch's divisor is a product
    of per-axis counts), so :math:`\|A\| = \|A_h\|\|A_w\|`. Each output averages at most :math:`k` inputs
    (row sums :math:`\le 1`) and each input lies in at most :math:`\lceil k/s \rceil` windows, so by the
    Schur test :math:`\|A_h\| \le \sqrt{\lceil k/s \rceil / k}` when the divisor is always :math:`k`; with
    ``input_shape`` the per-axis matrices are built and bounded exactly (see :func:`_matrix_bound`)."""
    nd = 1 if isinstance(module, nn.AvgPool1d) else 2
    k = _tuple(module.kernel_size, nd)
    s = _tuple(module.stride if module.stride is not None else module.kernel_size, nd)
    p = _tuple(module.padding, nd)
    divisor = getattr(module, "divisor_override", None)
    if input_shape is not None:
        total = 1.0
        for n, ki, si, pi in zip(_spatial(module, input_shape, nd), k, s, p, strict=True):
            if divisor:  # sum pooling over the window's real entries, divided once by the override below
                a = F.avg_pool1d(_one_hots(n), ki, si, pi, module.ceil_mode, count_include_pad=False)
                a = (a > 0).double()
            else:
                a = F.avg_pool1d(_one_hots(n), ki, si, pi, module.ceil_mode, module.count_include_pad)
            total *= _matrix_bound(a[:, 0, :].T)
        return total / divisor * (1.0 + _FLOAT64_SLACK) if divisor else total * (1.0 + _FLOAT64_SLACK)
    overlap = math.prod(-(-ki // si) for ki, si in zip(k, s, strict=True))
    if divisor:  # entries 1/d; rows hold <= prod(k) entries, columns <= overlap
        bound = math.sqrt(math.prod(k) * overlap) / divisor
    elif module.count_include_pad and not module.ceil_mode:  # every window fits the padded input: divisor prod(k)
        bound = math.sqrt(overlap / math.prod(k))
    else:  # border windows may divide by less, but every weight is <= 1 and every row sums to <= 1
        bound = math.sqrt(overlap)
    return bound * (1.0 + _FLOAT64_SLACK)


def _adaptive_regions(module: nn.Module, input_shape: Shape | None, nd: int, average: bool) -> list[Tensor]:
    """Per-axis ``(out, in)`` float64 matrices of adaptive pooling (averaging weights, or 0/1 membership)."""
    sizes = _spatial(module, input_shape, nd)
    out = module.output_size if isinstance(module.output_size, Sequence) else (module.output_size,) * nd
    mats = []
    for n, m in zip(sizes, out, strict=True):
        a = F.adaptive_avg_pool1d(_one_hots(n), n if m is None else int(m))[:, 0, :].T
        mats.append(a if average else (a > 0).double())
    return mats


def _adaptive_avg_pool_bound(module: nn.AdaptiveAvgPool1d | nn.AdaptiveAvgPool2d, input_shape: Shape | None) -> float:
    r"""Adaptive average pooling is separable (:math:`A = A_h \otimes A_w`, divisor a product of region
    lengths), so :math:`\|A\| = \|A_h\|\|A_w\|`, each bounded on the actual regions (:func:`_matrix_bound`)."""
    nd = 1 if isinstance(module, nn.AdaptiveAvgPool1d) else 2
    return math.prod(_matrix_bound(a) for a in _adaptive_regions(module, input_shape, nd, True)) * (
        1.0 + _FLOAT64_SLACK
    )


def _max_pool_multiplicity_bound(module: nn.Module, multiplicity: int) -> float:
    r"""Max pooling is piecewise linear, continuous; on each piece the Jacobian copies one input per output,
    so :math:`J^\top J` is diagonal with the number of outputs copying each input, at most ``multiplicity``."""
    if module.return_indices:
        raise TypeError("max pooling with return_indices=True returns a tuple; only return_indices=False is supported")
    return _sqrt_up(multiplicity)


def _max_pool_bound(module: nn.MaxPool1d | nn.MaxPool2d) -> float:
    r"""Input :math:`x` is in window :math:`i` iff :math:`x + p = is + jd` for some :math:`0 \le j < k`; distinct
    :math:`j` give distinct :math:`i`, and the solvable :math:`j` form one class modulo :math:`s/g`,
    :math:`g = \gcd(d, s)`: at most :math:`\lceil kg/s \rceil` windows per axis (:math:`\lceil k/s \rceil` for
    :math:`d = 1`), so :math:`L \le \sqrt{\prod_{\text{axes}} \lceil kg/s \rceil}` (1 when stride >= kernel)."""
    nd = 1 if isinstance(module, nn.MaxPool1d) else 2
    k, d = _tuple(module.kernel_size, nd), _tuple(module.dilation, nd)
    s = _tuple(module.stride if module.stride is not None else module.kernel_size, nd)
    per_axis = [-(-ki * math.gcd(di, si) // si) for ki, si, di in zip(k, s, d, strict=True)]
    return _max_pool_multiplicity_bound(module, math.prod(per_axis))


def _adaptive_max_pool_bound(module: nn.AdaptiveMaxPool1d | nn.AdaptiveMaxPool2d, input_shape: Shape | None) -> float:
    """As max pooling, with the multiplicity counted on the actual adaptive regions (needs the input size)."""
    nd = 1 if isinstance(module, nn.AdaptiveMaxPool1d) else 2
    mats = _adaptive_regions(module, input_shape, nd, False)
    return _max_pool_multiplicity_bound(module, math.prod(int(a.sum(0).max()) for a in mats))


def _one(module: nn.Module) -> float:
    """1-Lipschitz: a reshape, the identity, a clamp (Hardtanh, ReLU6), ReLU, or tanh (derivative <= 1)."""
    return 1.0


def _sigmoid_bound(module: nn.Sigmoid) -> float:
    r""":math:`\sigma' = \sigma(1 - \sigma) \le 1/4`."""
    return 0.25


def _leaky_relu_bound(module: nn.LeakyReLU) -> float:
    """Piecewise linear with slopes 1 and ``negative_slope``."""
    return max(1.0, abs(module.negative_slope))


def _elu_bound(module: nn.ELU) -> float:
    r"""Slope 1 for :math:`x > 0`, :math:`\alpha e^x` for :math:`x \le 0`, so :math:`|f'| \le \max(1, |\alpha|)`."""
    return max(1.0, abs(float(module.alpha)))


def _gelu_bound(module: nn.GELU) -> float:
    r""":math:`\sup |(x\Phi(x))'| = \Phi(\sqrt2) + \sqrt2\,\varphi(\sqrt2) \approx 1.12890` (tanh form 1.12899)."""
    return _GELU_BOUND


def _silu_bound(module: nn.SiLU) -> float:
    r""":math:`\sup |(x\sigma(x))'| \approx 1.09984` (at :math:`x \approx \pm 2.3994`)."""
    return _SILU_BOUND


def _dropout_bound(module: nn.Module) -> float:
    """Dropout is the identity in eval mode; in training mode it is random, so no fixed function to bound."""
    if module.training:
        raise TypeError("dropout is supported only in eval mode, where it is the identity; call model.eval()")
    return 1.0


register_lipschitz_rule(nn.Linear, _linear_bound)
register_lipschitz_rule(nn.Conv1d, _conv_bound)
register_lipschitz_rule(nn.Conv2d, _conv_bound)
for _type in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_lipschitz_rule(_type, _batch_norm_bound)
for _type in (nn.AvgPool1d, nn.AvgPool2d):
    register_lipschitz_rule(_type, _avg_pool_bound)
for _type in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d):
    register_lipschitz_rule(_type, _adaptive_avg_pool_bound)
for _type in (nn.MaxPool1d, nn.MaxPool2d):
    register_lipschitz_rule(_type, _max_pool_bound)
for _type in (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d):
    register_lipschitz_rule(_type, _adaptive_max_pool_bound)
for _type in (nn.Identity, nn.Flatten, nn.Unflatten, nn.ReLU, nn.Tanh, nn.Hardtanh):
    register_lipschitz_rule(_type, _one)
for _type in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d):
    register_lipschitz_rule(_type, _dropout_bound)
register_lipschitz_rule(nn.Sigmoid, _sigmoid_bound)
register_lipschitz_rule(nn.LeakyReLU, _leaky_relu_bound)
register_lipschitz_rule(nn.ELU, _elu_bound)
register_lipschitz_rule(nn.GELU, _gelu_bound)
register_lipschitz_rule(nn.SiLU, _silu_bound)
del _type


# --------------------------------------------------------------------------------------------- walker
def _product(bounds: Iterable[float]) -> float:
    """Product rounded up: each float multiplication is off by at most half an ulp, so step one ulp up."""
    total = 1.0
    for bound in bounds:
        total = math.nextafter(total * bound, math.inf)
    return total


def _checked(bound: object, where: str) -> float:
    value = float(bound)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"module {where!r} returned Lipschitz bound {value}; a bound must be a finite number >= 0")
    return value


def _call_bound_method(bound_fn: Callable[..., float], input_shape: Shape | None) -> float:
    try:
        takes_shape = "input_shape" in inspect.signature(bound_fn).parameters
    except (TypeError, ValueError):
        takes_shape = False
    return bound_fn(input_shape=input_shape) if takes_shape else bound_fn()


def _unsupported(module: nn.Module, where: str, why: str) -> TypeError:
    return TypeError(
        f"cannot bound the Lipschitz constant of module {where!r} of type {type(module).__name__}: {why}; "
        "supported: nn.Sequential, modules with a lipschitz_bound() or residual_branch() method, "
        f"{', '.join(sorted(t.__name__ for t in _RULES))}, and types added by register_lipschitz_rule()"
    )


def _keeps_forward(module: nn.Module, base: type[nn.Module], where: str) -> None:
    if type(module).forward is not base.forward:
        raise _unsupported(
            module, where, f"it overrides the forward of {base.__name__}, whose rule then does not apply"
        )


@dataclass(frozen=True)
class BoundNode:
    """One module of a walked network and its Lipschitz bound (see :func:`lipschitz_bound_tree`).

    Attributes:
        name: the module's qualified name in the network (its type name for the root).
        module: the module.
        bound: the upper bound on its Lipschitz constant (for a chain, the product of its entries').
        kind: ``"leaf"`` (bounded as a whole: its own method or a rule), ``"chain"`` (an ``nn.Sequential``,
            children in forward order) or ``"residual"`` (``children == (branch,)``).
        children: see ``kind``.
        weights: ``(a, b)`` of a residual with ``residual_weights()``, else ``None``.
    """

    name: str
    module: nn.Module
    bound: float
    kind: str
    children: tuple[BoundNode, ...] = ()
    weights: tuple[float, float] | None = None

    def entries(self) -> list[tuple[str, float]]:
        """``[(name, bound), ...]`` with chains flattened (what :func:`layer_lipschitz_bounds` returns)."""
        if self.kind == "chain":
            return [entry for child in self.children for entry in child.entries()]
        return [(self.name, self.bound)]


def _walk(module: nn.Module, name: str, shapes: dict[int, list[Shape | None]] | None) -> BoundNode:
    where = name or "<root>"
    label = name or type(module).__name__
    seen = (shapes or {}).get(id(module)) or [None]
    candidates = list(dict.fromkeys(seen))  # a module called on several shapes: take the largest bound

    bound_fn = getattr(module, "lipschitz_bound", None)
    if callable(bound_fn):
        bound = max(_checked(_call_bound_method(bound_fn, s), where) for s in candidates)
        return BoundNode(label, module, bound, "leaf")

    branch_fn = getattr(module, "residual_branch", None)
    if callable(branch_fn):
        branch = branch_fn()
        child = next((n for n, m in module._modules.items() if m is branch), "branch")
        inner = _walk(branch, f"{name}.{child}" if name else child, shapes)
        weights_fn = getattr(module, "residual_weights", None)
        if callable(weights_fn):  # forward(x) = a x + b branch(x): |a| + |b| L(branch), float64-rounded up
            a, b = (_checked(abs(float(w)), where) for w in weights_fn())
            combined = a + math.nextafter(b * inner.bound, math.inf)
            bound = math.nextafter(combined * (1.0 + _FLOAT64_SLACK), math.inf)
            return BoundNode(label, module, bound, "residual", (inner,), (a, b))
        return BoundNode(label, module, math.nextafter(1.0 + inner.bound, math.inf), "residual", (inner,))

    rule_type = _rule_type(module)
    if rule_type is not None:
        _keeps_forward(module, rule_type, where)
        try:
            values = [_RULES[rule_type](module, s) for s in candidates]
        except (TypeError, ValueError) as e:
            if type(e) not in (TypeError, ValueError) or str(e).startswith("cannot bound"):
                raise
            raise type(e)(
                f"cannot bound the Lipschitz constant of module {where!r} of type {type(module).__name__}: {e}"
            ) from e
        return BoundNode(label, module, max(_checked(v, where) for v in values), "leaf")

    if isinstance(module, nn.Sequential):
        _keeps_forward(module, nn.Sequential, where)
        # Iterate _modules, as Sequential.forward does: named_children() would visit a reused module once.
        children = tuple(
            _walk(child, f"{name}.{child_name}" if name else child_name, shapes)
            for child_name, child in module._modules.items()
            if child is not None
        )
        bound = _product(b for child in children for _, b in child.entries())
        return BoundNode(label, module, bound, "chain", children)
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        raise _unsupported(module, where, "a container without forward; bound the module whose forward uses it")
    raise _unsupported(module, where, "no rule for this type")


def _record_input_shapes(model: nn.Module, input_shape: Shape) -> dict[int, list[Shape | None]]:
    """Input shape of every module call in one forward pass on zeros (see Note [shape recording])."""
    shapes: dict[int, list[Shape | None]] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        shapes.setdefault(id(module), []).append(tuple(x.shape[1:]) if isinstance(x, Tensor) else None)

    ref = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    device, dtype = (ref.device, ref.dtype) if ref is not None else (None, torch.get_default_dtype())
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
    return shapes


def _check_input_shape(input_shape: Sequence[int]) -> Shape:
    try:
        shape = tuple(int(s) for s in input_shape)
        ok = len(shape) > 0 and all(s > 0 and s == d for s, d in zip(shape, input_shape, strict=True))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            "input_shape must be the shape of one input without the batch dimension, a sequence of positive ints "
            f"such as (3, 32, 32); got {input_shape!r}"
        )
    return shape


def lipschitz_bound_tree(model: nn.Module, input_shape: Sequence[int] | None = None) -> BoundNode:
    """The network as a tree of :class:`BoundNode` (chains, residuals, leaves), each with its upper bound.

    Args:
        model: the network (an ``nn.Sequential`` of supported modules, or one supported module).
        input_shape: shape of one input without the batch dimension, e.g. ``(3, 32, 32)``; needed by
            shape-dependent rules (convolutions, adaptive pooling). See Note [shape recording].

    Raises:
        TypeError: a module that cannot be bounded (named by its path), or one in a mode with no fixed
            function (BatchNorm or dropout in training mode).
        ValueError: a shape-dependent module without ``input_shape``, or a forward pass that fails on it.
    """
    if input_shape is None:
        return _walk(model, "", None)
    shape = _check_input_shape(input_shape)
    try:
        shapes = _record_input_shapes(model, shape)
    except Exception as e:
        # A module we cannot bound anyway (BatchNorm1d in training mode fails on one example) is the clearer error.
        try:
            _walk(model, "", None)
        except TypeError:
            raise
        except ValueError:
            pass
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"the forward pass on zeros of shape {(1, *shape)} failed: {message}") from e
    token = _PREFETCHED.set(_prefetch_conv_bounds(model, shapes))
    try:
        return _walk(model, "", shapes)
    finally:
        _PREFETCHED.reset(token)


def unbounded_modules(model: nn.Module, input_shape: Sequence[int] | None = None) -> list[dict[str, str]]:
    """Every module that keeps :func:`lipschitz_bound_tree` from bounding ``model``: ``[]`` when it can.

    The walker stops at the first such module; this lists them all, each as ``{"name", "type", "reason"}``
    (``name`` as in the walker's errors, ``<root>`` for the model itself): leaves whose rule or
    ``lipschitz_bound()`` fails (a BatchNorm in training mode, an overridden forward), and modules with no rule
    that are not an ``nn.Sequential``, whose children are then listed too (a rule registered for such a
    container would still need theirs only if its own rule composes them).

    Example:
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv = nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return x + self.conv(x)
        >>> [m["name"] for m in unbounded_modules(nn.Sequential(nn.Linear(4, 4), Block()))]
        ['1']
    """
    shape = None if input_shape is None else _check_input_shape(input_shape)
    try:
        lipschitz_bound_tree(model, shape)
        return []
    except TypeError:
        pass
    except ValueError as e:  # no shape for a shape-dependent rule, or a forward that fails: the model as a whole
        return [{"name": "<root>", "type": type(model).__name__, "reason": str(e).splitlines()[0]}]
    try:
        shapes = _record_input_shapes(model, shape) if shape is not None else None
    except Exception:
        shapes = None
    found: list[dict[str, str]] = []

    def visit(module: nn.Module, name: str) -> None:
        where = name or "<root>"
        leaf = callable(getattr(module, "lipschitz_bound", None)) or _rule_type(module) is not None
        branch_fn = getattr(module, "residual_branch", None)
        if leaf:
            try:
                _walk(module, name, shapes)
            except (TypeError, ValueError) as e:
                reason = str(e).splitlines()[0]
                reason = reason.split(": ", 1)[1] if reason.startswith("cannot bound") and ": " in reason else reason
                found.append({"name": where, "type": type(module).__name__, "reason": reason.split("; supported")[0]})
            return
        if callable(branch_fn):
            branch = branch_fn()
            child = next((n for n, m in module._modules.items() if m is branch), "branch")
            visit(branch, f"{name}.{child}" if name else child)
            return
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            for child_name, child in module._modules.items():
                if child is not None:
                    visit(child, f"{name}.{child_name}" if name else child_name)
            return
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            reason = "a container without forward; bound the module whose forward uses it"
        elif isinstance(module, nn.Sequential):
            reason = "it overrides the forward of Sequential, whose rule then does not apply"
        else:
            reason = "no rule for this type"
        found.append({"name": where, "type": type(module).__name__, "reason": reason})
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return found


def layer_lipschitz_bounds(model: nn.Module, input_shape: Sequence[int] | None = None) -> list[tuple[str, float]]:
    """Per-layer upper bounds ``[(qualified name, bound), ...]`` whose product bounds ``model``.

    The entries of :func:`lipschitz_bound_tree` with chains flattened (a residual block is one entry); arguments
    and errors as there.
    """
    return lipschitz_bound_tree(model, input_shape).entries()


def lipschitz_upper_bound(model: nn.Module, input_shape: Sequence[int] | None = None) -> float:
    r"""A certified upper bound on the l2 Lipschitz constant of ``model``: the product of per-layer bounds.

    .. math:: \|f(x) - f(y)\|_2 \le L\,\|x - y\|_2 \quad \text{for all } x, y

    Args:
        model: the network; every module in it must be supported (see the module docstring), else it raises.
        input_shape: shape of one input without the batch dimension; needed for convolutions and adaptive
            pooling (see Note [shape recording]).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten())
        >>> L = lipschitz_upper_bound(net, input_shape=(3, 16, 16))
    """
    return _product(bound for _, bound in layer_lipschitz_bounds(model, input_shape))


# --------------------------------------------------------------------------------------- lower bound
def _rows(v: Tensor) -> Tensor:
    """``(B, ...)`` as ``(B, features)``, also for scalar examples ``(B,)``."""
    return v.reshape(v.shape[0], -1)


def _unit(v: Tensor) -> Tensor:
    norms = _rows(v).norm(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
    return v / norms.view(-1, *([1] * (v.dim() - 1)))


def lipschitz_lower_bound(
    model: Callable[[Tensor], Tensor],
    inputs: Tensor,
    *,
    n_iter: int = 50,
    restarts: int = 3,
    ascent_steps: int = 20,
    generator: torch.Generator | None = None,
) -> float:
    r"""An **empirical lower bound** on the l2 Lipschitz constant. It brackets the truth with
    :func:`lipschitz_upper_bound`; never certify with it.

    Two estimates, each at most :math:`L`: the largest singular value of the Jacobian at each input, by power
    iteration on :math:`J^\top J` (Jacobian-vector products with ``torch.func.jvp`` and ``torch.func.vjp``,
    all inputs and ``restarts`` random starts in one batch), then ``ascent_steps`` steps of Adam ascent on the
    difference quotient from pairs near the inputs (along the top singular vector found):

    .. math:: \|J_f(x)\|_2 \le L, \qquad \frac{\|f(x) - f(y)\|_2}{\|x - y\|_2} \le L.

    Args:
        model: the network, called on a batch; it must treat examples independently (eval mode).
        inputs: a batch ``(B, ...)`` of inputs (their dtype and device are used).
        n_iter: power iterations.
        restarts: random starting vectors per input.
        ascent_steps: gradient-ascent steps on the difference quotient (0: none).
        generator: random generator for the starting vectors.

    Returns:
        The largest value found (a float), up to floating-point rounding a lower bound on :math:`L`.

    Example:
        >>> net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> lipschitz_lower_bound(net, torch.randn(32, 6)) <= lipschitz_upper_bound(net)
        True
    """
    if inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty batch (B, ...); got shape {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise ValueError(f"inputs must be floating point; got {inputs.dtype}")
    if n_iter < 1 or restarts < 1 or ascent_steps < 0:
        raise ValueError(
            f"n_iter and restarts must be >= 1 and ascent_steps >= 0; got {n_iter}, {restarts}, {ascent_steps}"
        )
    x = inputs.detach()
    batch = x.shape[0]
    xs = x.repeat(restarts, *([1] * (x.dim() - 1)))
    gen_device = generator.device if generator is not None else xs.device
    v = _unit(torch.randn(xs.shape, dtype=xs.dtype, device=gen_device, generator=generator).to(xs.device))
    with torch.no_grad():  # function transforms still differentiate; this keeps parameters out of the graph
        _, vjp_fn = torch.func.vjp(model, xs)
        for _ in range(n_iter):
            _, jv = torch.func.jvp(model, (xs,), (v,))
            v = _unit(vjp_fn(jv)[0])
        _, jv = torch.func.jvp(model, (xs,), (v,))
    sigma = _rows(jv).norm(dim=1)  # ||J v|| with ||v|| = 1, per (restart, input)
    best = float(sigma.max())
    if ascent_steps == 0:
        return best

    # Start each pair at its input, the second point a small step along the best singular vector found.
    pick = sigma.view(restarts, batch).argmax(dim=0) * batch + torch.arange(batch, device=sigma.device)
    scale = float(_rows(x).norm(dim=1).mean()) or 1.0
    px = x.clone().requires_grad_(True)
    pd = (1e-2 * scale * v[pick]).requires_grad_(True)
    opt = torch.optim.Adam([px, pd], lr=1e-3 * scale / math.sqrt(x[0].numel()))
    for step in range(ascent_steps + 1):
        diff = _rows(model(px + pd) - model(px)).norm(dim=1)
        ratio = diff / _rows(pd).norm(dim=1).clamp_min(torch.finfo(pd.dtype).tiny)
        best = max(best, float(ratio.detach().max()))
        if step == ascent_steps:
            break
        gx, gd = torch.autograd.grad(-ratio.sum(), [px, pd])
        px.grad, pd.grad = gx, gd
        opt.step()
    return best
