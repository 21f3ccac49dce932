"""CPLLinear / CPLConv2d: the property protocol, the norm bound against the exact SVD, errors, export, autocast."""

import math

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

from stablenet.nn.base import LAYER_ROUNDING_SLACK
from stablenet.nn.cpl import CPL_FFT_GRAM_ITERS, CPLConv2d, CPLLinear
from stablenet.spectral.conv import conv_spectral_norm, conv_spectral_norm_upper_bound

#: float64 rounding of the Gram iteration: the bound may equal sigma_1 (rank one) and land an ulp below it.
ROUNDING = 1e-12


@pytest.mark.parametrize("features,inner", DENSE)
def test_cpl_linear_protocol(features, inner):
    measured = check_layer(lambda: CPLLinear(features, inner), (features,))
    assert max(measured.values()) <= 1 + 1e-10


@pytest.mark.parametrize("index,case", list(enumerate(CONV_GRID)))
def test_cpl_conv_protocol(index, case):
    """Every case once; the size-specific bound (``input_size``) on every other case."""
    channels, inner, kernel, padding_mode = case
    size = spatial_size(index, kernel, padding_mode)
    input_size = size if (index // 2) % 2 else None
    measured = check_layer(
        lambda: CPLConv2d(channels, inner, kernel, padding_mode=padding_mode, input_size=input_size),
        (channels, *size),
        n_points=2,
    )
    assert max(measured.values()) <= 1 + 1e-10


@pytest.mark.parametrize("features,inner", DENSE)
def test_cpl_linear_bound_is_above_the_exact_norm(features, inner):
    torch.manual_seed(features * 10 + inner)
    layer = CPLLinear(features, inner).double()
    exact = torch.linalg.matrix_norm(layer.weight.detach(), 2)
    bound = layer.norm_bound().detach()
    assert bound >= exact * (1 - ROUNDING)
    assert bound <= exact * min(features, inner) ** (1 / 128) * (1 + ROUNDING)  # a Schatten-128 norm


@pytest.mark.parametrize("channels,inner,kernel,padding_mode", CONV_GRID)
def test_cpl_conv_bound_is_above_the_exact_norm(channels, inner, kernel, padding_mode):
    """sigma_hat >= ||C|| by SVD of the explicit operator (float64): at every size by default, else at input_size.

    Sizes below the kernel (circular 5x5 on 2x3 or 4x6) check that the kernel is folded, not cropped, by the DFT.
    """
    torch.manual_seed(channels * 100 + inner * 10 + kernel)
    weight = torch.randn(inner, channels, kernel, kernel, dtype=torch.float64)
    sizes = [s for s in [(5, 5), (4, 6), (1, 7), (2, 3), (9, 9)] if padding_mode == "zeros" or min(s) >= kernel // 2]
    general = CPLConv2d(channels, inner, kernel, padding_mode=padding_mode).double()
    with torch.no_grad():
        general.weight.copy_(weight)
    general_bound = general.norm_bound().detach()
    for size in sizes:
        exact = torch.linalg.matrix_norm(explicit_conv(weight, size, padding_mode), 2)
        assert general_bound >= exact * (1 - ROUNDING), size
        specific = CPLConv2d(channels, inner, kernel, padding_mode=padding_mode, input_size=size).double()
        with torch.no_grad():
            specific.weight.copy_(weight)
        bound = specific.norm_bound().detach()
        assert bound >= exact * (1 - ROUNDING), size
        if padding_mode == "circular":  # per-frequency Gram bound: nearly exact
            assert bound <= exact * 1.02, size
        elif min(size) >= kernel:  # the embedding bound of stablenet.spectral (which needs n >= k)
            # on a CPU, "auto" verifies it by Cholesky factorisations; "gram" takes CPL_FFT_GRAM_ITERS steps
            verified = conv_spectral_norm_upper_bound(weight, size, padding="zeros", method="cholesky")
            assert float(bound) == verified, size
            gram = CPLConv2d(channels, inner, kernel, input_size=size, method="gram").double()
            with torch.no_grad():
                gram.weight.copy_(weight)
            embed = conv_spectral_norm(weight, size, "zeros", method="embed", n_iter=CPL_FFT_GRAM_ITERS)
            torch.testing.assert_close(gram.norm_bound().detach(), embed, rtol=1e-12, atol=0)


@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("input_size", [None, (4, 5)])
def test_cpl_conv_worst_case_jacobian_is_contractive(padding_mode, input_size):
    """Exact: ||I - (2 / sigma_hat^2) C^T D C|| <= 1 for activation patterns D in [0, 1]."""
    torch.manual_seed(0)
    layer = CPLConv2d(3, 2, 3, padding_mode=padding_mode, input_size=input_size).double()
    c = explicit_conv(layer.weight.detach(), (4, 5), padding_mode)
    step = layer.step().detach()
    n_out = c.shape[0]
    patterns = torch.cat([torch.ones(1, n_out), torch.rand(20, n_out), (torch.rand(20, n_out) > 0.5).float()]).double()
    jac = torch.eye(c.shape[1], dtype=torch.float64) - step * c.T @ (patterns[:, :, None] * c)
    assert torch.linalg.matrix_norm(jac, 2).max() <= 1 + ROUNDING


def test_cpl_bad_arguments():
    with pytest.raises(ValueError, match="odd kernel"):
        CPLConv2d(3, kernel_size=2)
    with pytest.raises(ValueError, match=r"method must be one of auto, cholesky, gram.*got method='svd'"):
        CPLConv2d(3, input_size=5, method="svd")
    with pytest.raises(ValueError, match=r"only 'auto' with input_size 'any'.*got method='gram', input_size=any"):
        CPLConv2d(3, method="gram", input_size="any")
    with pytest.raises(ValueError, match="input_size must be None, 'any'"):
        CPLConv2d(3, input_size="lazy")
    with pytest.raises(ValueError, match=r"zeros, circular.*'replicate'"):
        CPLConv2d(3, padding_mode="replicate")
    with pytest.raises(ValueError, match="input_size must be"):
        CPLConv2d(3, input_size=(4, 0))
    with pytest.raises(ValueError, match="input_size must be"):
        CPLConv2d(3, input_size=(4, 4, 4))
    with pytest.raises(ValueError, match="inner_channels must be >= 1"):
        CPLConv2d(3, 0)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        CPLConv2d(3)(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match=r"built for input_size \(5, 5\).*\(4, 6\)"):
        CPLConv2d(3, input_size=5)(torch.randn(1, 3, 4, 6))
    with pytest.raises(ValueError, match="features must be >= 1"):
        CPLLinear(0)
    with pytest.raises(ValueError, match="last dimension 4"):
        CPLLinear(4)(torch.randn(2, 3))


@pytest.mark.parametrize(
    "layer,shape",
    [(CPLLinear(4, 3), (2, 4)), (CPLConv2d(2, 3), (1, 2, 5, 5)), (CPLConv2d(2, 3, input_size=5), (1, 2, 5, 5))],
)
def test_cpl_zero_weight_is_the_identity(layer, shape):
    with torch.no_grad():
        layer.weight.zero_()
    x = torch.randn(*shape)
    assert layer.step() == 0
    torch.testing.assert_close(layer(x), x, rtol=0, atol=0)


@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_cpl_export_matches_in_float32_and_float64(padding_mode):
    torch.manual_seed(0)
    layers = [
        (CPLLinear(6, 9), (7, 6)),
        (CPLConv2d(3, 4, 3, padding_mode=padding_mode, input_size="any"), (2, 3, 6, 5)),
        (CPLConv2d(2, 3, (5, 1), bias=False, padding_mode=padding_mode, input_size=(6, 4)), (2, 2, 6, 4)),
    ]
    check_export_matches(layers)


def test_cpl_eval_cache_and_bound():
    check_eval_cache_and_bound(lambda: CPLConv2d(2, 3, train_estimate=False), (2, 2, 5, 5), tol=1e-6)


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: CPLLinear(6, 8), (4, 6)),
        (lambda: CPLConv2d(2, 3), (4, 2, 5, 5)),
        (lambda: CPLConv2d(2, 3, padding_mode="circular", input_size=(5, 5)), (4, 2, 5, 5)),
    ],
)
def test_bf16_autocast_on_cpu_keeps_the_bound_in_float64(make, shape):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(*shape)
    check_bf16_autocast(layer, x, layer.norm_bound, torch.float64)  # Note [constraint precision]


# ------------------------------------------------------------------ Note [training estimate]
def _explicit(layer, shape):
    """The matrix of the layer's first operator (W, or the "same" convolution) on inputs of ``shape``."""
    n = math.prod(shape)
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        bias, layer.bias = layer.bias, None
        try:
            return layer._first(eye).reshape(n, -1).T
        finally:
            layer.bias = bias


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: CPLLinear(6, 9), (6,)),
        (lambda: CPLConv2d(2, 3), (2, 5, 5)),
        (lambda: CPLConv2d(2, 3, padding_mode="circular"), (2, 4, 5)),
    ],
)
def test_training_with_the_estimate_then_eval_is_1_lipschitz(make, shape):
    torch.manual_seed(0)
    layer = make().double().train()
    with torch.no_grad():
        layer.weight.mul_(30.0)  # a hostile magnitude
    optimiser = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(10):
        optimiser.zero_grad()
        layer(torch.randn(4, *shape, dtype=torch.float64)).square().mean().backward()
        optimiser.step()
    a = _explicit(layer, shape)
    exact = float(torch.linalg.matrix_norm(a, 2))
    with torch.no_grad():
        sigma = layer._sigma_estimate((-1, *shape), update=False)
    assert exact * (1 - 1e-2) <= float(sigma) <= exact * (1 + 1e-9)  # a lower estimate, close after a few steps
    x = torch.randn(8, *shape, dtype=torch.float64)
    bound = layer.lipschitz_bound(shape) if len(shape) == 3 else layer.lipschitz_bound()
    for mode, step in (("train", 2.0 / float(sigma) ** 2), ("eval", float(layer.step()))):
        layer.train(mode == "train")
        for point in x:  # the Jacobian I - t A^T D A at each point, from the explicit operator
            pre = a @ point.reshape(-1) + (0 if layer.bias is None else _bias_map(layer, shape))
            jac = torch.eye(a.shape[1], dtype=torch.float64) - step * a.T @ torch.diag((pre > 0).double()) @ a
            norm = float(torch.linalg.matrix_norm(jac, 2))
            if mode == "train":
                assert norm <= bound
            else:
                assert norm <= 1 + 1e-5
        with torch.no_grad():  # and the layer's forward is that map
            h = torch.relu(a @ x[0].reshape(-1) + _bias_map(layer, shape))
            torch.testing.assert_close(
                layer(x[:1]).reshape(-1), x[0].reshape(-1) - step * a.T @ h, rtol=1e-9, atol=1e-9
            )
    layer.eval()
    assert (layer.lipschitz_bound(shape) if len(shape) == 3 else layer.lipschitz_bound()) == 1 + LAYER_ROUNDING_SLACK


def _bias_map(layer, shape):
    """The bias of the first operator, flattened as its outputs."""
    if layer.bias is None:
        return 0.0
    if len(shape) == 1:
        return layer.bias.detach()
    return layer.bias.detach()[:, None, None].expand(-1, *shape[1:]).reshape(-1)


def test_a_lazy_cpl_conv_takes_the_size_of_its_first_input():
    layer = CPLConv2d(2, 3)
    assert layer.input_size is None
    layer(torch.randn(1, 2, 6, 5))
    assert layer.input_size == (6, 5)
    with pytest.raises(ValueError, match=r"built for input_size \(6, 5\)"):
        layer(torch.randn(1, 2, 5, 5))
    anywhere = CPLConv2d(2, 3, input_size="any")
    for size in (4, 7):
        anywhere(torch.randn(1, 2, size, size))
    assert anywhere.input_size is None
    assert "estimate.u" in layer.state_dict()
