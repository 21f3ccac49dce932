"""Forward-rounding bounds (``stablenet.spectral.rounding`` and the layers' ``rounding_bound``) against measurements.

Each bound must hold for any summation order; we measure one order (this machine's), in float32 and bfloat16,
against the float64 evaluation of the exact map, on random and on hostile inputs (large offsets that cancel,
inputs near overflow), and check the norm bounds against exact values (SVD of the explicit operator).
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stablenet.nn as snn
from stablenet.certify.rounding import rounding_bound_of
from stablenet.spectral.rounding import (
    RoundingBound,
    abs_conv_norm_bound,
    abs_matrix_norm_bound,
    affine_rounding,
    gamma,
    pairwise_distance_upper_bounds,
    unit_roundoff,
)


def test_gamma_closed_form_and_vacuous_range():
    u = 2.0**-24
    assert gamma(10, torch.float32) >= 10 * u / (1 - 10 * u)
    assert gamma(10, torch.float32) <= 10 * u / (1 - 10 * u) * (1 + 1e-8)
    assert gamma(0, torch.float32) == 0.0
    assert math.isinf(gamma(200, torch.bfloat16))  # 200 * 2**-8 >= 1/2: no bound
    with pytest.raises(ValueError, match="dtype must be one of"):
        unit_roundoff(torch.int32)


def test_rounding_bound_rejects_negative_and_nan():
    with pytest.raises(ValueError, match="must be a number >= 0"):
        RoundingBound(-1.0, 0.0)
    with pytest.raises(ValueError, match="must be a number >= 0"):
        RoundingBound(0.0, float("nan"))


@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (5, 5), (3, 9), (9, 3)])
def test_abs_matrix_norm_bound_is_above_the_svd(shape):
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.float64)
    exact = float(torch.linalg.matrix_norm(w.abs(), 2))
    bound = abs_matrix_norm_bound(w)
    assert exact <= bound <= exact * math.sqrt(min(shape)) * 1.01


@pytest.mark.parametrize(
    "c_in,c_out,k,padding,mode,stride,groups,dilation,n",
    [
        (2, 3, 3, 1, "zeros", 1, 1, 1, 5),
        (3, 2, 3, 1, "circular", 1, 1, 1, 4),
        (2, 2, 5, 2, "circular", 1, 1, 1, 3),  # the kernel wraps around: entries add up
        (4, 2, 3, 1, "zeros", 2, 2, 1, 6),
        (2, 3, 3, 2, "zeros", 1, 1, 2, 5),
    ],
)
def test_abs_conv_norm_bound_is_above_the_explicit_operator(c_in, c_out, k, padding, mode, stride, groups, dilation, n):
    torch.manual_seed(1)
    kernel = torch.randn(c_out, c_in // groups, k, k, dtype=torch.float64)
    eye = torch.eye(c_in * n * n, dtype=torch.float64).reshape(-1, c_in, n, n)
    if mode == "circular":  # torch's own circular padding, which wraps a kernel larger than the input
        out = F.conv2d(F.pad(eye, (padding,) * 4, mode="circular"), kernel, None, stride, 0, dilation, groups)
    else:
        out = F.conv2d(eye, kernel, None, stride, padding, dilation, groups)
    matrix = out.reshape(eye.shape[0], -1).T
    bound = abs_conv_norm_bound(kernel, groups)
    assert float(torch.linalg.matrix_norm(matrix.abs(), 2)) <= bound
    assert float(torch.linalg.matrix_norm(matrix.T.abs(), 2)) <= bound  # the transpose


def test_affine_rounding_covers_a_cancelling_dot_product():
    """sum of +-2**k terms that cancel to 1: float32 loses everything, the bound must say so."""
    n = 64
    w = torch.tensor([[(-1.0) ** j * 2.0 ** (20 - (j // 2)) for j in range(n)]], dtype=torch.float32)
    z = torch.ones(n, dtype=torch.float32)
    z[-1] = 1.0 + 2.0**-20
    exact = (w.double() @ z.double()).item()
    computed = (w @ z).item()
    rb = affine_rounding(abs_matrix_norm_bound(w), 0.0, n, 1, float(w.abs().max()), torch.float32)
    assert abs(computed - exact) <= rb.relative * float(z.double().norm()) + rb.absolute


def test_pairwise_distances_bound_near_duplicate_rows_exactly():
    """100 rows of width 512 with a pair at relative distance 1e-2 ... 1e-7: the bound is above the exact distance
    (rational arithmetic), where ``torch.cdist``'s matrix-product form falls below it."""
    gen = torch.Generator().manual_seed(0)
    below_cdist = 0
    for rel in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7):
        for _ in range(5):
            rows = torch.randn(100, 512, generator=gen)
            rows = rows / rows.norm(dim=1, keepdim=True)
            rows[1] = rows[0] + rel * torch.randn(512, generator=gen) / math.sqrt(512)
            bounds = pairwise_distance_upper_bounds(rows)
            a, b = (list(map(Fraction, r.tolist())) for r in (rows[0], rows[1]))
            exact_sq = sum((x - y) ** 2 for x, y in zip(a, b, strict=True))
            assert Fraction(bounds[0, 1].item()) ** 2 >= exact_sq
            assert Fraction(bounds[1, 0].item()) ** 2 >= exact_sq
            assert bounds[0, 1].item() <= math.sqrt(float(exact_sq)) * (1 + 2e-9) + 1e-150
            cdist = torch.cdist(rows.double()[None], rows.double()[None])[0, 0, 1].item()
            below_cdist += Fraction(cdist) ** 2 < exact_sq
    assert below_cdist > 0, "the construction should defeat the matrix-product distances"


# ---------------------------------------------------------------------------------------- layer rules
def _layer_cases():
    torch.manual_seed(0)
    return {
        "Linear": (nn.Linear(40, 30), (40,)),
        "Conv2d": (nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6)),
        "Conv2d-circular-strided": (nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular", stride=2), (4, 7, 7)),
        "Conv1d": (nn.Conv1d(3, 5, 3, padding=1), (3, 9)),
        "BatchNorm2d": (nn.BatchNorm2d(3), (3, 4, 4)),
        "AvgPool2d": (nn.AvgPool2d(3, 2, padding=1), (2, 7, 7)),
        "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d((2, 3)), (2, 7, 5)),
        "LeakyReLU": (nn.LeakyReLU(0.3), (20,)),
        "Tanh": (nn.Tanh(), (20,)),
        "GELU": (nn.GELU(), (20,)),
        "ELU": (nn.ELU(0.7), (20,)),
        "AOLLinear": (snn.AOLLinear(30, 20), (30,)),
        "SRConv2d": (snn.SRConv2d(3, 4, 3, padding=1), (3, 6, 6)),
        "SpectralLinear": (snn.SpectralLinear(30, 20), (30,)),
        "OrthogonalLinear": (snn.OrthogonalLinear(20, 20), (20,)),
        "SLLLinear": (snn.SLLLinear(32, 48), (32,)),
        "SLLConv2d": (snn.SLLConv2d(4, 6, 3, padding_mode="circular"), (4, 5, 5)),
        "CPLLinear": (snn.CPLLinear(32, 16), (32,)),
        "CPLConv2d": (snn.CPLConv2d(4, 4, 3), (4, 5, 5)),
        "LipAvgPool2d": (snn.LipAvgPool2d(2), (3, 6, 6)),
        "L2NormPool2d": (snn.L2NormPool2d(2), (3, 6, 6)),
        "InputNormalization": (snn.InputNormalization([0.5, 0.4], [0.3, 0.2]), (2, 4, 4)),
        "CayleyConv2d": (snn.CayleyConv2d(3, 3, 3), (3, 6, 6)),
        "MaxMin": (snn.MaxMin(), (20,)),
    }


def _exact_twin(layer: nn.Module) -> nn.Module:
    """The exact map a layer's rounding bound is measured against, in float64: the layer itself in float64
    (constraints then compute their ideal float64 weights)."""
    twin = copy.deepcopy(layer).double().eval()
    if isinstance(layer, nn.BatchNorm2d):
        twin.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    return twin


def _hostile_inputs(shape, dtype, gen):
    x = torch.randn(64, *shape, generator=gen)
    x[:16] *= 1e3  # large activations
    x[16:32] += 2.0**12  # a large common offset (cancels in the centred maps)
    x[32:40] *= 1e-30  # tiny ones
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(_layer_cases()))
def test_layer_rounding_bound_covers_the_measured_error(name, dtype):
    layer, shape = _layer_cases()[name]
    if isinstance(layer, nn.BatchNorm2d):
        with torch.no_grad():
            layer.running_mean.uniform_(-3, 3)
            layer.running_var.uniform_(0.1, 4)
            layer.weight.uniform_(-2, 2)
            layer.bias.uniform_(-1, 1)
    layer = layer.eval()
    if dtype == torch.bfloat16 and isinstance(layer, snn.CayleyConv2d):
        layer = layer.to(dtype)  # computes in float32 internally, rounds its output to bf16
    elif dtype == torch.bfloat16:
        layer = layer.to(dtype)
    twin = _exact_twin(layer)
    gen = torch.Generator().manual_seed(0)
    x = _hostile_inputs(shape, dtype, gen)
    rb = rounding_bound_of(layer, shape, dtype)
    with torch.no_grad():
        computed = layer(x).double()
        exact = twin(x.double())
    if isinstance(layer, snn.LinearNormalized):
        pytest.skip("covered by the LLN test below")
    error = (computed - exact).flatten(1).norm(dim=1)
    norms = x.double().flatten(1).norm(dim=1)
    ok = norms <= rb.max_input_norm
    assert ok.any()
    bound = rb.relative * norms + rb.absolute
    assert torch.all(error[ok] <= bound[ok]), f"{name}: worst ratio {float((error / bound)[ok].max())}"


def test_lln_rounding_uses_the_rows_forward_uses():
    torch.manual_seed(0)
    head = snn.LinearNormalized(40, 10).eval()
    x = torch.randn(50, 40) * 10
    with torch.no_grad():
        computed = head(x).double()
        rows = head.used_weight().double()
        exact = F.linear(x.double(), rows, head.bias.double())
    relative, absolute, _ = head.logit_rounding(torch.float32)
    per_logit = relative[None] * x.double().norm(dim=1, keepdim=True) + absolute[None]
    assert torch.all((computed - exact).abs() <= per_logit)
    rb = head.rounding_bound((40,), torch.float32)
    assert torch.all((computed - exact).norm(dim=1) <= rb.relative * x.double().norm(dim=1) + rb.absolute)
