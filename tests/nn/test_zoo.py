"""Every layer of the zoo under bf16 autocast, torch.compile and DDP; the package exports and bounds agree."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed as dist
from torch import nn

import stablenet.nn as snn
from stablenet.spectral import lipschitz_upper_bound

C, H, W = 4, 6, 6

ZOO = {
    "SLLLinear": (lambda: snn.SLLLinear(8, 12), (8,)),
    "SLLConv2d": (lambda: snn.SLLConv2d(C, 6, kernel_size=3), (C, H, W)),
    "CPLLinear": (lambda: snn.CPLLinear(8, 12), (8,)),
    "CPLConv2d": (lambda: snn.CPLConv2d(C, 6, kernel_size=3), (C, H, W)),
    "AOLLinear": (lambda: snn.AOLLinear(8, 6), (8,)),
    "AOLConv2d": (lambda: snn.AOLConv2d(C, 6, 3, padding=1), (C, H, W)),
    "SRLinear": (lambda: snn.SRLinear(8, 6), (8,)),
    "SRConv2d": (lambda: snn.SRConv2d(C, 6, 3, padding=1), (C, H, W)),
    "SpectralLinear": (lambda: snn.SpectralLinear(8, 6), (8,)),
    "SpectralConv2d": (lambda: snn.SpectralConv2d(C, 6, 3, padding=1), (C, H, W)),
    "SpectralConv2d-sized": (lambda: snn.SpectralConv2d(C, 6, 3, padding=1, input_size=(H, W)), (C, H, W)),
    "OrthogonalLinear-bjorck": (lambda: snn.OrthogonalLinear(8, 6, method="bjorck"), (8,)),
    "OrthogonalLinear-cayley": (lambda: snn.OrthogonalLinear(8, 6, method="cayley"), (8,)),
    "CayleyConv2d": (lambda: snn.CayleyConv2d(C, C, 3), (C, H, W)),
    "LinearNormalized": (lambda: snn.LinearNormalized(8, 5), (8,)),
    "LipAvgPool2d": (lambda: snn.LipAvgPool2d(2), (C, H, W)),
    "L2NormPool2d": (lambda: snn.L2NormPool2d(2), (C, H, W)),
    "LipResidual": (lambda: snn.LipResidual(nn.Sequential(snn.AOLConv2d(C, C, 3, padding=1), snn.MaxMin())), (C, H, W)),
}


def _params(name):
    return pytest.mark.parametrize("name", sorted(name))


@_params(ZOO)
def test_bf16_autocast_keeps_constraint_math_in_float32(name):
    factory, shape = ZOO[name]
    torch.manual_seed(0)
    layer = factory()
    x = torch.randn(2, *shape, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        out.float().sum().backward()
    ref = layer(x)
    # bf16 has 8 bits of mantissa; a float32 constraint keeps the bf16 output within bf16 rounding of float32.
    assert torch.allclose(out.float(), ref, atol=0.1, rtol=0.05)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in layer.parameters())


@_params(ZOO)
def test_torch_compile_matches_eager(name):
    factory, shape = ZOO[name]
    torch.manual_seed(0)
    layer = factory()
    if getattr(layer, "train_estimate", False):
        layer.train_estimate = False  # each training forward moves the estimate; compiled in test_spectral_norm.py
    x = torch.randn(3, *shape)
    compiled = torch.compile(layer, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)
    params = [p for p in layer.parameters() if p.requires_grad]
    if params:  # the hand-written backward passes (stablenet.nn.fused_rescaling) under compile too
        compiled_grads = torch.autograd.grad(compiled(x).square().sum(), params)
        for g, ref in zip(compiled_grads, torch.autograd.grad(layer(x).square().sum(), params), strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    if dist.is_initialized():
        yield
        return
    # A file store: no port to pick, no environment variables left behind for later tests.
    store = tmp_path_factory.mktemp("ddp") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@_params(ZOO)
def test_ddp_gradients_match_the_plain_layer(name, process_group):
    factory, shape = ZOO[name]
    if not any(p.requires_grad for p in factory().parameters()):
        pytest.skip("no parameters")
    torch.manual_seed(0)
    layer = factory()
    twin = factory()
    twin.load_state_dict(layer.state_dict())
    ddp = nn.parallel.DistributedDataParallel(twin)
    try:
        x = torch.randn(3, *shape)
        layer(x).square().sum().backward()
        ddp(x).square().sum().backward()
        assert any(p.grad is not None for p in layer.parameters())
        for p, q in zip(layer.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    finally:
        # The reducer must not outlive the process group (see tests/curvature/test_sam.py).
        del ddp
        gc.collect()


@_params(ZOO)
def test_network_bound_uses_the_layer_bound(name):
    factory, shape = ZOO[name]
    if name == "LinearNormalized":
        pytest.skip("a head with unit rows, not 1-Lipschitz (its bound is the normalised weight's norm)")
    layer = factory().eval()
    bound = lipschitz_upper_bound(layer, shape)
    assert 0.99 <= bound <= 1 + 1e-4


def test_every_zoo_layer_is_exported_by_the_package():
    for name in ZOO:
        assert name.split("-")[0] in snn.__all__
    for fn in ("lipschitz_spectral", "lipschitz_aol", "lipschitz_sr", "lipschitz_orthogonal"):
        assert fn in snn.__all__ and "remove_" + fn in snn.__all__


def test_eval_cache_sees_changes_made_between_dtype_round_trips():
    """A cached weight must not survive .double(), an in-place edit, .float() (the allocator may reuse addresses)."""
    torch.manual_seed(0)
    for _ in range(20):
        layer = snn.AOLLinear(16, 16).eval()
        x = torch.randn(2, 16)
        with torch.no_grad():
            layer(x)  # fills the cache
            layer.double()
            layer.weight.mul_(-1.0)
            layer.float()
            expected = torch.nn.functional.linear(x, layer.constrained_weight(), layer.bias)
            torch.testing.assert_close(layer(x), expected)
