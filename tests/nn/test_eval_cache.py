"""The eval-mode weight cache never serves weights of parameters that changed (Note [eval cache]).

For every layer type that caches, and every way a user's code changes a parameter (``.data`` writes in place
and by assignment, ``copy_`` under ``no_grad``, ``load_state_dict``, an optimiser step, ``.to()``, an EMA
update), the next eval forward must equal a freshly built layer's forward, and the bounds a certificate uses
must describe the weights that forward used.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import stablenet.nn as snn
from stablenet.spectral.rounding import pairwise_distance_upper_bounds


def _layers():
    torch.manual_seed(0)
    return {
        "AOLLinear": (snn.AOLLinear(6, 5), (3, 6)),
        "AOLConv2d": (snn.AOLConv2d(2, 3, 3, padding=1), (2, 2, 5, 5)),
        "SRLinear": (snn.SRLinear(6, 5), (3, 6)),
        "SRConv2d": (snn.SRConv2d(2, 3, 3, padding=1), (2, 2, 5, 5)),
        "SpectralLinear": (snn.SpectralLinear(6, 5), (3, 6)),
        "SpectralConv2d": (snn.SpectralConv2d(2, 3, 3, padding=1, input_size=5), (2, 2, 5, 5)),
        "OrthogonalLinear": (snn.OrthogonalLinear(6, 5), (3, 6)),
        "SLLLinear": (snn.SLLLinear(6, 4), (3, 6)),
        "SLLConv2d": (snn.SLLConv2d(2, 3), (2, 2, 5, 5)),
        "CPLLinear": (snn.CPLLinear(6, 4), (3, 6)),
        "CPLConv2d": (snn.CPLConv2d(2, 3), (2, 2, 5, 5)),
        "LinearNormalized": (snn.LinearNormalized(6, 5), (3, 6)),
        "CayleyConv2d": (snn.CayleyConv2d(2, 2, 3), (2, 2, 5, 5)),
    }


LAYERS = sorted(_layers())


def _data_in_place(layer):
    layer.weight.data.mul_(-1.5).add_(0.25)


def _data_assign(layer):
    layer.weight.data = torch.randn_like(layer.weight)


def _copy_no_grad(layer):
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight))


def _load_state_dict(layer):
    other = copy.deepcopy(layer)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5 * torch.randn_like(p))
    layer.load_state_dict(other.state_dict())


def _optimiser_step(layer):
    optimiser = torch.optim.SGD(layer.parameters(), lr=0.5)
    for p in layer.parameters():
        p.grad = torch.randn_like(p)
    optimiser.step()


def _ema_through_data(layer):
    """The classic EMA: ``ema.data.mul_(d).add_(p.data, alpha=1 - d)``, invisible to version counters."""
    source = copy.deepcopy(layer)
    with torch.no_grad():
        for p in source.parameters():
            p.copy_(torch.randn_like(p))
    for ema_p, p in zip(layer.parameters(), source.parameters(), strict=True):
        ema_p.data.mul_(0.5).add_(p.data, alpha=0.5)


def _ema_foreach(layer):
    """``torch._foreach_lerp_`` on ``.data`` views, as some fused EMA implementations do."""
    targets = [torch.randn_like(p) for p in layer.parameters()]
    torch._foreach_lerp_([p.data for p in layer.parameters()], targets, 0.5)


PATHS = {
    "data_in_place": _data_in_place,
    "data_assign": _data_assign,
    "copy_no_grad": _copy_no_grad,
    "load_state_dict": _load_state_dict,
    "optimiser_step": _optimiser_step,
    "ema_through_data": _ema_through_data,
    "ema_foreach": _ema_foreach,
}


def _fresh(layer: nn.Module) -> nn.Module:
    """A copy that has never cached anything: its forward computes the constrained weights from scratch."""
    fresh = copy.deepcopy(layer)
    for m in fresh.modules():
        for attr in ("_cache",):
            cache = getattr(m, attr, None)
            if cache is not None:
                cache.clear()
        if hasattr(m, "_caches"):
            m._caches.clear()
    return fresh


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("name", LAYERS)
def test_eval_forward_follows_every_parameter_change(name, path):
    layer, shape = _layers()[name]
    layer = layer.double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)  # fills the cache
        layer(x)  # and serves it
        PATHS[path](layer)
        after = layer(x)
        expected = _fresh(layer)(x)
    assert not torch.equal(before, expected), "the change should change the output"
    assert torch.equal(after, expected)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_lln_distances_describe_the_rows_forward_uses(path):
    """The stale-cache finding: rows set to (1,0),(-1,0), then through .data to (1,0),(1,1e-3)."""
    head = snn.LinearNormalized(2, 2, bias=False).double().eval()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        head(torch.zeros(1, 2))  # cache the first rows
    if path == "data_in_place":
        head.weight.data.copy_(torch.tensor([[1.0, 0.0], [1.0, 1e-3]]))
    else:
        PATHS[path](head)
    with torch.no_grad():
        rows_used = head(torch.eye(2, dtype=torch.float64)).T  # forward(e_k) = column k of the used weight
        bounds = head.pairwise_distance_bounds()
    exact = torch.cdist(rows_used[None], rows_used[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
    assert torch.all(bounds >= exact)
    torch.testing.assert_close(bounds, pairwise_distance_upper_bounds(rows_used), rtol=1e-12, atol=1e-300)


def test_to_dtype_and_device_recompute():
    layer = snn.SLLLinear(4, 3).eval()
    x = torch.randn(2, 4)
    with torch.no_grad():
        layer(x)
        layer.double()
        torch.testing.assert_close(layer(x.double()), _fresh(layer)(x.double()), rtol=0, atol=0)


def test_cache_hits_when_nothing_changed():
    """The check compares values only: an unchanged layer keeps serving the same cached tensor."""
    layer = snn.AOLLinear(5, 4).eval()
    with torch.no_grad():
        layer(torch.randn(1, 5))
        first = layer._cache._value
        layer(torch.randn(1, 5))
    assert layer._cache._value is first


def test_checked_once_compares_each_cache_once_per_loop(monkeypatch):
    from stablenet.nn import base

    layer = snn.AOLLinear(5, 4).eval()
    calls = []
    original = base.WeightCache._unchanged

    def counting(self, params):
        calls.append(1)
        return original(self, params)

    monkeypatch.setattr(base.WeightCache, "_unchanged", counting)
    seen: set[int] = set()
    with torch.no_grad():
        layer(torch.randn(1, 5))  # fills the cache (no comparison)
        for _ in range(5):
            with base.checked_once(seen):
                layer(torch.randn(1, 5))
        assert len(calls) == 1
        layer(torch.randn(1, 5))  # outside the block: compared again
    assert len(calls) == 2


# ------------------------------------------------------------ Note [cached weights with gradients]
def _uncached(monkeypatch):
    """Every cache computes its map in every forward, with its graph: the reference the cache must equal."""
    from stablenet.nn import base

    monkeypatch.setattr(base.WeightCache, "get", lambda self, module, params, compute: compute())


def _derivatives(layer: nn.Module, x: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Output, input gradient, parameter gradients and a parameter Hessian-vector product, in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    x = x.clone().requires_grad_(True)
    params = [p for p in layer.parameters() if p.requires_grad]
    out = layer(x)
    weights = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    loss = (out * weights).sum() + 0.5 * (out**2).sum()
    grads = torch.autograd.grad(loss, [x, *params], create_graph=True)
    vectors = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    dot = sum((g * v).sum() for g, v in zip(grads[1:], vectors, strict=True))
    hvp = torch.autograd.grad(dot, params, allow_unused=True)
    return [out.detach(), *(g.detach() for g in grads), *(h for h in hvp if h is not None)]


@pytest.mark.parametrize("name", LAYERS)
def test_eval_gradients_through_the_cache_equal_the_uncached_map(name, monkeypatch):
    layer, shape = _layers()[name]
    layer = layer.double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    reference = copy.deepcopy(layer)
    with torch.no_grad():
        layer(x)  # the cache is warm: every value below comes through it
    cached = [_derivatives(layer, x, seed) for seed in (0, 1)]
    _uncached(monkeypatch)
    expected = [_derivatives(reference, x, seed) for seed in (0, 1)]
    for got, want in zip(cached, expected, strict=True):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def _counting(layer: nn.Module, method: str) -> list[int]:
    calls: list[int] = []
    original = getattr(layer, method)

    def counted():
        calls.append(1)
        return original()

    setattr(layer, method, counted)
    return calls


@pytest.mark.parametrize(
    ("make", "method"),
    [
        (lambda: snn.SpectralLinear(6, 5), "constrained_weight"),
        (lambda: snn.SLLLinear(6, 4), "back_weight"),
    ],
)
def test_input_gradients_in_eval_mode_never_run_the_map(make, method):
    layer = make().double().eval()
    calls = _counting(layer, method)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    for _ in range(5):  # an attack: forward and input gradient, parameters requiring grad
        torch.autograd.grad(layer(x).square().sum(), x)
    assert len(calls) == 1  # the first forward filled the cache
    with torch.no_grad():  # Jacobian products over the inputs (lipschitz_lower_bound): served from outside
        torch.func.jvp(layer, (x.detach(),), (torch.ones_like(x),))
    assert len(calls) == 1
    layer(x).sum().backward()  # a parameter gradient is requested: the backward runs the map, once
    assert len(calls) == 2
    assert layer.weight.grad is not None and torch.all(torch.isfinite(layer.weight.grad))


def test_writing_a_parameter_between_forward_and_backward_raises():
    layer = snn.SpectralLinear(6, 5).double().eval()
    out = layer(torch.randn(3, 6, dtype=torch.float64))
    with torch.no_grad():
        layer.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_torch_func_transforms_run_the_map_in_the_forward():
    layer = snn.AOLLinear(5, 4).double().eval()
    x = torch.randn(2, 5, dtype=torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p):
        return torch.func.functional_call(layer, p, (x,)).square().sum()

    grads = torch.func.grad(loss)(params)
    layer.zero_grad()
    layer(x).square().sum().backward()
    for k, p in layer.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-10, atol=1e-12)


def _wrapped_tensors(obj: object, path: str = "layer", seen: set[int] | None = None) -> list[str]:
    """Paths of the functorch-wrapped tensors reachable from ``obj`` (attributes, lists, dicts)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [path] if torch._C._functorch.is_functorch_wrapped_tensor(obj) else []
    if isinstance(obj, list | tuple):
        items = enumerate(obj)
    elif isinstance(obj, dict):
        items = obj.items()
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = vars(obj).items()
    else:
        return []
    return [w for k, v in items for w in _wrapped_tensors(v, f"{path}.{k}", seen)]


@pytest.mark.parametrize("name", LAYERS)
def test_torch_func_transforms_leave_nothing_in_the_cache(name):
    # The audit's stages run torch.func over the parameters (Hessians) and the inputs (Jacobians) of an eval-mode
    # model, with parameters that do or do not require grad; a cache that kept a tensor from inside a transform
    # broke the next deepcopy ("Cannot access storage of TensorWrapper") and would serve weights of a dead level.
    layer, shape = _layers()[name]
    layer = layer.double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, inputs):
        return torch.func.functional_call(layer, p, (inputs,)).square().sum()

    tangents = {k: torch.ones_like(v) for k, v in params.items()}
    transforms = {
        "grad over the parameters": lambda: torch.func.grad(loss)(params, x),
        # forward-over-reverse Hessian-vector product, as stablenet.curvature.hessian
        "jvp of grad": lambda: torch.func.jvp(torch.func.grad(lambda p: loss(p, x)), (params,), (tangents,)),
        # per-sample gradients, torch.func's recipe: vmap over the inputs of a grad over the parameters
        "per-sample grad": lambda: torch.func.vmap(
            torch.func.grad(lambda p, xi: loss(p, xi[None])), in_dims=(None, 0), randomness="same"
        )(params, x),
        # Jacobian products over the inputs of the module itself, as lipschitz_lower_bound
        "jvp": lambda: torch.func.jvp(layer, (x,), (torch.ones_like(x),)),
        "vjp": lambda: torch.func.vjp(layer, x)[1](expected),
    }
    for requires_grad in (True, False):
        layer.requires_grad_(requires_grad)
        for grad_mode in (torch.no_grad, torch.enable_grad):
            for label, transform in transforms.items():
                with grad_mode():
                    transform()
                assert _wrapped_tensors(layer) == [], (label, grad_mode.__name__, requires_grad)
    assert _wrapped_tensors(layer) == []
    copy.deepcopy(layer)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
