"""SLLLinear / SLLConv2d: the property protocol, exact operator checks, q, errors, export and autocast."""

import pytest
import torch
from lipschitz_checks import check_layer
from residual_cases import (
    CONV_GRID,
    DENSE,
    PADDINGS,
    check_bf16_autocast,
    check_eval_cache_and_bound,
    check_export_matches,
    explicit_conv,
    spatial_size,
)
from torch import nn

from stablenet.nn.relu_residual import _conv_same, _conv_same_adjoint
from stablenet.nn.sll import SLLConv2d, SLLLinear, sll_rescaling
from stablenet.spectral.conv import conv_operator_matrix


def with_random_q(layer: nn.Module, scale: float = 1.0) -> nn.Module:
    with torch.no_grad():
        layer.q_log.normal_(0, scale)
    return layer


@pytest.mark.parametrize("features,inner", DENSE)
def test_sll_linear_protocol(features, inner):
    measured = check_layer(lambda: with_random_q(SLLLinear(features, inner)), (features,))
    assert max(measured.values()) <= 1 + 1e-10


@pytest.mark.parametrize("index,case", list(enumerate(CONV_GRID)))
def test_sll_conv_protocol(index, case):
    channels, inner, kernel, padding_mode = case
    size = spatial_size(index, kernel, padding_mode)
    measured = check_layer(
        lambda: with_random_q(SLLConv2d(channels, inner, kernel, padding_mode=padding_mode)),
        (channels, *size),
        n_points=2,
    )
    assert max(measured.values()) <= 1 + 1e-10


@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("kernel", [1, 3, 5, (3, 5)])
def test_conv_adjoint_is_exact(padding_mode, kernel):
    """<Cx, y> = <x, C^T y> for the pair the layers use, and C is torch's "same" convolution."""
    torch.manual_seed(0)
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    w = torch.randn(3, 2, *k, dtype=torch.float64)
    pad = (k[0] // 2, k[1] // 2)
    for size in [(5, 5), (4, 6), (2, 7), (1, 7)]:
        if padding_mode == "circular" and (size[0] < pad[0] or size[1] < pad[1]):
            continue
        x, y = torch.randn(2, 2, *size, dtype=torch.float64), torch.randn(2, 3, *size, dtype=torch.float64)
        lhs = (_conv_same(x, w, None, pad, padding_mode) * y).sum()
        rhs = (x * _conv_same_adjoint(y, w, pad, padding_mode)).sum()
        torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
        if min(size[0] - k[0], size[1] - k[1]) >= 0:
            reference = conv_operator_matrix(w, size, padding=padding_mode, padding_size=pad)
            torch.testing.assert_close(explicit_conv(w, size, padding_mode), reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("channels,inner,kernel,padding_mode", CONV_GRID)
def test_sll_conv_worst_case_jacobian_is_contractive(channels, inner, kernel, padding_mode):
    """Exact: ||I - 2 C^T diag(t ⊗ 1) D C|| <= 1 for activation patterns D in [0, 1], on the explicit operator."""
    torch.manual_seed(channels * 100 + inner * 10 + kernel)
    layer = with_random_q(SLLConv2d(channels, inner, kernel, padding_mode=padding_mode).double())
    t = layer.rescaling().detach()
    for size in [(4, 5), (1, 6)] if padding_mode == "zeros" or kernel < 5 else [(4, 5), (2, 3)]:
        c = explicit_conv(layer.weight.detach(), size, padding_mode)
        pixels = size[0] * size[1]
        t_full = t.repeat_interleave(pixels)
        n_out = t_full.numel()
        patterns = torch.cat(
            [
                torch.ones(1, n_out),
                torch.zeros(1, n_out),
                torch.rand(20, n_out, dtype=torch.float64),
                (torch.rand(20, n_out) > 0.5).double(),
            ]
        )
        jac = torch.eye(c.shape[1], dtype=torch.float64) - 2 * c.T @ ((t_full * patterns)[:, :, None] * c)
        assert torch.linalg.matrix_norm(jac, 2).max() <= 1 + 1e-12


@pytest.mark.parametrize("kernel", [1, 3])
def test_sll_conv_rescaling_equals_dense_rescaling_of_circular_operator(kernel):
    """With circular padding and n >= 2k - 1, the kernel row sums are exactly those of the explicit |C C^T|."""
    torch.manual_seed(0)
    layer = with_random_q(SLLConv2d(2, 3, kernel, padding_mode="circular").double())
    size = (2 * kernel - 1 + 1, 2 * kernel - 1 + 2)
    c = explicit_conv(layer.weight.detach(), size, "circular")
    pixels = size[0] * size[1]
    dense = sll_rescaling((c @ c.T).abs(), layer.q_log.detach().repeat_interleave(pixels))
    torch.testing.assert_close(layer.rescaling().detach().repeat_interleave(pixels), dense, rtol=1e-12, atol=0)


def test_sll_conv_1x1_equals_dense_layer_per_pixel():
    torch.manual_seed(0)
    conv = with_random_q(SLLConv2d(3, 4, 1).double())
    dense = SLLLinear(3, 4).double()
    with torch.no_grad():
        dense.weight.copy_(conv.weight[:, :, 0, 0])
        dense.bias.copy_(conv.bias)
        dense.q_log.copy_(conv.q_log)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    expected = dense(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(conv(x), expected, rtol=1e-12, atol=1e-12)


def test_sll_conv_q_has_an_effect_and_zero_channels_are_safe():
    torch.manual_seed(0)
    layer = SLLConv2d(3, 3).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    before = layer(x)
    with torch.no_grad():
        layer.q_log[0] = 3.0
    assert not torch.allclose(before, layer(x)), "q cancelled out (the published-code pitfall)"
    with torch.no_grad():
        layer.weight[1] = 0
        layer.q_log[2] = -800.0  # exp underflows (float64) relative to the others
    t = layer.rescaling()
    assert torch.isfinite(t).all() and t[1] == 0 and t[2] == 0
    assert torch.isfinite(layer(x)).all()
    assert check_layer(lambda: layer, (3, 4, 4), n_points=2, check_export=True)["train"] <= 1 + 1e-10


def test_sll_conv_bad_arguments():
    with pytest.raises(ValueError, match="odd kernel"):
        SLLConv2d(3, kernel_size=4)
    with pytest.raises(ValueError, match="odd kernel"):
        SLLConv2d(3, kernel_size=(3, 2))
    with pytest.raises(ValueError, match=r"zeros, circular.*'reflect'"):
        SLLConv2d(3, padding_mode="reflect")
    with pytest.raises(ValueError, match="channels must be >= 1"):
        SLLConv2d(0)
    with pytest.raises(ValueError, match="inner_channels must be >= 1"):
        SLLConv2d(2, 0)
    layer = SLLConv2d(3)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\).*\(2, 2, 5, 5\)"):
        layer(torch.randn(2, 2, 5, 5))
    with pytest.raises(ValueError, match="got \\(3, 5\\)"):
        layer(torch.randn(3, 5))
    with pytest.raises(ValueError, match="circular padding"):
        SLLConv2d(3, kernel_size=5, padding_mode="circular")(torch.randn(1, 3, 1, 7))
    assert layer(torch.randn(3, 4, 4)).shape == (3, 4, 4)  # unbatched input, like nn.Conv2d


@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_export_matches_in_float32_and_float64(padding_mode):
    torch.manual_seed(0)
    layers = [
        (with_random_q(SLLLinear(6, 9)), (7, 6)),
        (with_random_q(SLLConv2d(3, 4, 3, padding_mode=padding_mode)), (2, 3, 6, 5)),
        (with_random_q(SLLConv2d(2, 3, (1, 5), bias=False, padding_mode=padding_mode)), (2, 2, 4, 6)),
    ]
    check_export_matches(layers)


def test_sll_conv_eval_cache_and_bound():
    check_eval_cache_and_bound(lambda: SLLConv2d(2, 3), (2, 2, 5, 5), tol=0)


@pytest.mark.parametrize("make", [lambda: SLLLinear(6, 8), lambda: SLLConv2d(2, 3, padding_mode="circular")])
def test_bf16_autocast_on_cpu_keeps_the_rescaling_in_float32(make):
    torch.manual_seed(0)
    layer = make()
    shape = (4, 6) if isinstance(layer, SLLLinear) else (4, 2, 5, 5)
    x = torch.randn(*shape)
    check_bf16_autocast(layer, x, layer.rescaling, torch.float32)
    assert layer.q_log.grad is not None
