"""CayleyConv2d: orthogonal circular convolutions by the Cayley transform in the Fourier domain."""

import pytest
import torch
import torch.nn.functional as F
from lipschitz_checks import check_layer
from torch import nn

from stablenet.nn.base import LAYER_ROUNDING_SLACK
from stablenet.nn.cayley_conv import CayleyConv2d
from stablenet.spectral.dense import operator_matrix

CHANNELS = [(1, 1), (2, 3), (3, 2)]
SHAPES = [(5, 5), (4, 6), (1, 7)]


@pytest.mark.parametrize("c_in,c_out", CHANNELS)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_cayley_conv_protocol(c_in, c_out, k):
    size = SHAPES[(c_in + k) % 3]  # every size meets every channel pair and kernel across the grid
    measured = check_layer(lambda: CayleyConv2d(c_in, c_out, k), (c_in, *size), n_points=2)
    assert min(measured.values()) > 1 - 1e-9


def _operator(layer: CayleyConv2d, c_in: int, size) -> torch.Tensor:
    bias = layer.bias
    layer.bias = None  # the linear part
    try:
        with torch.no_grad():
            return operator_matrix(lambda x: layer(x[None])[0], (c_in, *size), dtype=torch.float64)
    finally:
        layer.bias = bias


@pytest.mark.parametrize("c_in,c_out", [*CHANNELS, (3, 3)])
@pytest.mark.parametrize("size", [*SHAPES, (2, 2)])
def test_explicit_operator_is_orthogonal(c_in, c_out, size):
    torch.manual_seed(0)
    layer = CayleyConv2d(c_in, c_out, 3).double()
    with torch.no_grad():
        layer.weight.mul_(4)  # far from the identity
    s = torch.linalg.svdvals(_operator(layer, c_in, size))
    n_one = min(c_in, c_out) * size[0] * size[1]  # an isometry (c_out >= c_in) or co-isometry: the rest is 0
    torch.testing.assert_close(s[:n_one], torch.ones(n_one, dtype=torch.float64), rtol=0, atol=1e-10)
    assert float(s.max()) <= 1 + 1e-10


def test_small_kernel_is_identity_minus_twice_the_skew_part():
    """Q = (I - A)(I + A)^{-1} = I - 2A + O(|A|^2) with A = C - C^T, C the circular 'same' convolution."""
    torch.manual_seed(0)
    layer = CayleyConv2d(2, 2, 3, bias=False).double()
    eps = 1e-6
    with torch.no_grad():
        layer.weight.mul_(eps / layer.weight.abs().max())
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)

    def conv(v):
        return F.conv2d(F.pad(v, (1, 1, 1, 1), mode="circular"), layer.weight)

    _, conv_t = torch.func.vjp(conv, torch.zeros_like(x))
    expected = x - 2 * (conv(x) - conv_t(x)[0])
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("size", [(5, 5), (4, 6), (1, 7), (6, 3)])
def test_export_is_a_plain_circular_conv_with_equal_outputs(size):
    torch.manual_seed(0)
    layer = CayleyConv2d(3, 2, 3).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    plain = layer.export(size)
    assert type(plain) is nn.Conv2d and plain.padding_mode == "circular"
    assert plain.kernel_size == tuple(2 * (n // 2) + 1 for n in size)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), layer(x), rtol=0, atol=1e-12)


def test_export_defaults_to_the_last_input_size():
    layer = CayleyConv2d(2, 2, 3)
    with pytest.raises(ValueError, match="input_size"):
        layer.export()
    layer(torch.randn(1, 2, 4, 4))
    x = torch.randn(1, 2, 6, 5)
    with torch.no_grad():
        y = layer(x)
        torch.testing.assert_close(layer.export()(x), y, rtol=1e-5, atol=1e-5)


def test_eval_cache_is_keyed_on_the_input_size():
    torch.manual_seed(0)
    layer = CayleyConv2d(2, 3, 3).double()
    xs = [torch.randn(2, 2, *s, dtype=torch.float64) for s in ((5, 5), (4, 6), (5, 5))]
    with torch.no_grad():
        train_outs = [layer(x) for x in xs]
        layer.eval()
        for _ in range(2):  # the second round reads the cache
            for x, expected in zip(xs, train_outs, strict=True):
                assert torch.equal(layer(x), expected)
        layer.weight.add_(torch.randn_like(layer.weight))  # an in-place update invalidates every size's entry
        assert not torch.allclose(layer(xs[0]), train_outs[0])
        layer.train()
        torch.testing.assert_close(layer(xs[1]), layer.eval()(xs[1]), rtol=0, atol=0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="odd"):
        CayleyConv2d(2, 2, 2)
    with pytest.raises(ValueError, match="odd"):
        CayleyConv2d(2, 2, (3, 4))
    layer = CayleyConv2d(2, 3, 3)
    with pytest.raises(ValueError, match=r"\(batch, 2, h, w\)"):
        layer(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match=r"\(batch, 2, h, w\)"):
        layer(torch.randn(2, 5, 5))
    with pytest.raises(ValueError, match="input_size"):
        layer.export((0, 4))
    assert layer.lipschitz_bound() == layer.lipschitz_bound((2, 5, 5)) == 1 + LAYER_ROUNDING_SLACK


def test_bf16_autocast_keeps_the_math_in_float32():
    torch.manual_seed(0)
    layer = CayleyConv2d(3, 4, 3)
    x = torch.randn(2, 3, 6, 6)
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = layer.fourier_matrices((6, 6))
        out = layer(x)
    assert q.dtype == torch.complex64
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    bf16 = CayleyConv2d(2, 2, 3).to(torch.bfloat16)
    xb = torch.randn(1, 2, 5, 5, dtype=torch.bfloat16)
    assert bf16(xb).dtype == torch.bfloat16
    assert bf16.fourier_matrices((5, 5)).dtype == torch.complex64


def test_float32_operator_is_orthogonal_to_rounding():
    torch.manual_seed(0)
    layer = CayleyConv2d(4, 4, 3, bias=False)
    with torch.no_grad():
        layer.weight.mul_(10)
    q = layer.fourier_matrices((8, 8)).to(torch.complex128)
    s = torch.linalg.svdvals(q)
    assert float((s.detach() - 1).abs().max()) <= 1e-6
