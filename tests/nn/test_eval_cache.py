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
