"""The fused AOL and SLL rescalings equal the reference compositions, in value and gradient (float64)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stablenet.nn.fused_rescaling import aol_scaled, sll_back_weight
from stablenet.nn.sll import sll_rescaling
from stablenet.spectral.rescaling import aol_conv_rescaling, aol_rescaling, conv_gram_kernel, dilate_kernel


def aol_reference(weight, groups=1, dilation=(1, 1)):
    if weight.dim() == 2:
        return weight * aol_rescaling(weight)
    co, ci_g = weight.shape[:2]
    d = aol_conv_rescaling(dilate_kernel(weight, dilation), groups)
    scale = d.reshape(groups, 1, ci_g).expand(groups, co // groups, ci_g).reshape(co, ci_g, 1, 1)
    return weight * scale


def sll_reference(weight, q_log):
    if weight.dim() == 2:
        gram_abs = (weight @ weight.T).abs()
        return -2.0 * weight * sll_rescaling(gram_abs, q_log)[:, None]
    gram_abs = conv_gram_kernel(weight)[0].abs().sum(dim=(-2, -1))
    return -2.0 * weight * sll_rescaling(gram_abs, q_log)[:, None, None, None]


def assert_same_value_and_grad(fused, reference, inputs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = fused(*inputs)
    ref = reference(*inputs)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    upstream = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    grads = torch.autograd.grad(out, inputs, upstream)
    ref_grads = torch.autograd.grad(ref, inputs, upstream)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


AOL_CASES = [
    # (c_out, c_in / groups, kh, kw, groups, dilation)
    (3, 2, 3, 3, 1, (1, 1)),
    (2, 5, 3, 3, 1, (1, 1)),
    (4, 4, 1, 1, 1, (1, 1)),
    (4, 3, 2, 4, 1, (1, 1)),
    (6, 2, 3, 3, 3, (1, 1)),
    (4, 3, 3, 3, 2, (2, 1)),
    (1, 1, 5, 5, 1, (1, 1)),
]


@pytest.mark.parametrize("case", AOL_CASES)
def test_aol_scaled_equals_reference(case):
    co, ci_g, kh, kw, groups, dilation = case
    torch.manual_seed(0)
    weight = torch.randn(co, ci_g, kh, kw, dtype=torch.float64, requires_grad=True)
    assert_same_value_and_grad(
        lambda w: aol_scaled(w, groups, dilation), lambda w: aol_reference(w, groups, dilation), (weight,)
    )


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (1, 4), (4, 1)])
def test_aol_scaled_dense_equals_reference(shape):
    torch.manual_seed(1)
    weight = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert_same_value_and_grad(aol_scaled, aol_reference, (weight,))


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (3, 6, 1, 1), (2, 2, 5, 3), (5, 7), (7, 5), (1, 3)])
def test_sll_back_weight_equals_reference(shape):
    torch.manual_seed(2)
    weight = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    q_log = torch.randn(shape[0], dtype=torch.float64, requires_grad=True)
    assert_same_value_and_grad(sll_back_weight, sll_reference, (weight, q_log))


@settings(max_examples=25, deadline=None)
@given(
    co=st.integers(1, 4),
    ci=st.integers(1, 4),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    log2_scale=st.integers(-400, 400),
    seed=st.integers(0, 2**16),
)
def test_fused_maps_are_homogeneous_at_any_scale(co, ci, kh, kw, log2_scale, seed):
    """float64 weights scaled by 2^-400 ... 2^400 (exact): AOL is 0-homogeneous, SLL's back weight -1-homogeneous,
    and their gradients scale accordingly, finite (the references overflow there; the prescaling does not)."""
    gen = torch.Generator().manual_seed(seed)
    unit = torch.randn(co, ci, kh, kw, generator=gen, dtype=torch.float64).requires_grad_()
    q_log = torch.randn(co, generator=gen, dtype=torch.float64, requires_grad=True)
    c = 2.0**log2_scale
    scaled = (unit.detach() * c).requires_grad_()
    assert_same_value_and_grad(aol_scaled, aol_reference, (unit,), seed)
    assert_same_value_and_grad(sll_back_weight, sll_reference, (unit, q_log), seed)
    upstream = torch.randn(unit.shape, generator=gen, dtype=torch.float64)

    out_unit, out = aol_scaled(unit), aol_scaled(scaled)
    torch.testing.assert_close(out, out_unit, rtol=1e-12, atol=0)
    (g_unit,) = torch.autograd.grad(out_unit, unit, upstream)
    (g,) = torch.autograd.grad(out, scaled, upstream)
    peak = unit.abs().max().item()  # gradient scales: |out| / |weight| (weight), |out| (q_log)
    torch.testing.assert_close(g * c, g_unit, rtol=1e-9, atol=1e-12 * out_unit.abs().max().item() / peak)

    back_unit, back = sll_back_weight(unit, q_log), sll_back_weight(scaled, q_log)
    torch.testing.assert_close(back * c, back_unit, rtol=1e-12, atol=0)
    gw_unit, gq_unit = torch.autograd.grad(back_unit, (unit, q_log), upstream)
    gw, gq = torch.autograd.grad(back, (scaled, q_log), upstream)
    torch.testing.assert_close(gw * c * c, gw_unit, rtol=1e-9, atol=1e-12 * back_unit.abs().max().item() / peak)
    torch.testing.assert_close(gq * c, gq_unit, rtol=1e-9, atol=1e-12 * back_unit.abs().max().item())


def test_gradcheck():
    torch.manual_seed(3)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    q_log = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: aol_scaled(w, 1, (1, 2)), (weight,))
    assert torch.autograd.gradcheck(lambda w: aol_scaled(w.reshape(6, 1, 3, 3), 2), (weight,))
    assert torch.autograd.gradcheck(sll_back_weight, (weight, q_log))
    assert torch.autograd.gradcheck(sll_back_weight, (weight[:, :, 1, 1].detach().requires_grad_(), q_log))


def test_zero_channel_gets_zero_scale_and_finite_gradient():
    torch.manual_seed(4)
    weight = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    weight[:, 1] = 0.0  # input channel 1: AOL scale 0
    weight[2] = 0.0  # inner channel 2: SLL scale 0
    weight.requires_grad_()
    q_log = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    assert_same_value_and_grad(aol_scaled, aol_reference, (weight,))
    assert_same_value_and_grad(sll_back_weight, sll_reference, (weight, q_log))


def test_float32_weights_use_float64_math_and_match_reference():
    """A float32 weight skips the prescaling (no overflow possible) and matches the float64 reference."""
    torch.manual_seed(5)
    weight = torch.randn(8, 6, 3, 3)
    q_log = torch.randn(8)
    ref_aol = aol_reference(weight.double()).float()
    ref_sll = sll_reference(weight.double(), q_log.double()).float()
    assert aol_scaled(weight).dtype == torch.float32
    torch.testing.assert_close(aol_scaled(weight), ref_aol, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sll_back_weight(weight, q_log), ref_sll, rtol=1e-6, atol=1e-7)
    # float32 gradients agree with the float64 reference's, rounded
    w32 = weight.clone().requires_grad_()
    w64 = weight.double().requires_grad_()
    (g32,) = torch.autograd.grad(sll_back_weight(w32, q_log).square().sum(), w32)
    (g64,) = torch.autograd.grad(sll_reference(w64, q_log.double()).square().sum(), w64)
    torch.testing.assert_close(g32, g64.float(), rtol=1e-4, atol=1e-6)


def test_autocast_keeps_the_rescaling_in_float64():
    """Under bf16 autocast the maps return what they return without it (the GEMM does not run in bf16)."""
    torch.manual_seed(6)
    weight = torch.randn(16, 16, 3, 3, requires_grad=True)
    q_log = torch.randn(16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = aol_scaled(weight), sll_back_weight(weight, q_log)
        grads = torch.autograd.grad((a.sum() + b.sum()), (weight, q_log))
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, aol_scaled(weight), rtol=0, atol=0)
    torch.testing.assert_close(b, sll_back_weight(weight, q_log), rtol=0, atol=0)
    ref = torch.autograd.grad((aol_scaled(weight).sum() + sll_back_weight(weight, q_log).sum()), (weight, q_log))
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


@pytest.mark.parametrize("which", ["aol", "sll"])
def test_second_derivatives_and_torch_func_equal_reference(which):
    """Double backward (Hessian-vector products) and torch.func transforms go through the reference composition."""
    torch.manual_seed(7)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    q_log = torch.randn(3, dtype=torch.float64, requires_grad=True)
    if which == "aol":
        fused, reference, inputs = aol_scaled, aol_reference, (weight,)
    else:
        fused, reference, inputs = sll_back_weight, sll_reference, (weight, q_log)
    vectors = [torch.randn_like(t) for t in inputs]

    def hvp(fn):
        loss = fn(*inputs).pow(3).sum()
        grads = torch.autograd.grad(loss, inputs, create_graph=True)
        return torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vectors, strict=True)), inputs)

    for h, r in zip(hvp(fused), hvp(reference), strict=True):
        torch.testing.assert_close(h, r, rtol=1e-9, atol=1e-11)
    jac = torch.func.jacrev(lambda *a: fused(*a).sum(0), argnums=0)(*inputs)
    ref_jac = torch.func.jacrev(lambda *a: reference(*a).sum(0), argnums=0)(*inputs)
    torch.testing.assert_close(jac, ref_jac, rtol=1e-9, atol=1e-11)
