"""Every convolution bound against the SVD of the explicit operator matrix (float64)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stablenet.spectral.conv import (
    conv_operator_matrix,
    conv_spectral_norm,
    conv_spectral_norm_upper_bound,
    conv_spectral_norm_upper_bounds,
    spatial_gram_bound,
)


def explicit_norm(kernel, n, **kw):
    return float(torch.linalg.matrix_norm(conv_operator_matrix(kernel, n, **kw), 2))


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2]))
    c_in = groups * draw(st.integers(1, 3))
    c_out = groups * draw(st.integers(1, 3))
    k = draw(st.integers(1, 4))
    dilation = draw(st.sampled_from([1, 1, 2]))
    k_eff = dilation * (k - 1) + 1
    n = draw(st.integers(k_eff, k_eff + 4))
    return dict(
        shape=(c_out, c_in // groups, k, draw(st.sampled_from([k, max(1, k - 1)]))),
        n=n,
        padding=draw(st.sampled_from(["circular", "zeros"])),
        stride=draw(st.sampled_from([1, 1, 2])),
        dilation=dilation,
        groups=groups,
        seed=draw(st.integers(0, 10_000)),
    )


@settings(max_examples=60, deadline=None)
@given(case=conv_cases())
def test_bounds_against_explicit_operator(case):
    g = torch.Generator().manual_seed(case["seed"])
    kernel = torch.randn(case["shape"], dtype=torch.float64, generator=g)
    args = dict(padding=case["padding"], stride=case["stride"], dilation=case["dilation"], groups=case["groups"])
    exact = explicit_norm(kernel, case["n"], **args)
    assert float(conv_spectral_norm(kernel, case["n"], method="exact", **args)) == pytest.approx(exact, rel=1e-9)
    # upper bounds: never below the truth
    assert float(conv_spectral_norm(kernel, case["n"], method="gram", **args)) >= exact * (1 - 1e-12)
    if case["padding"] == "zeros":
        assert float(conv_spectral_norm(kernel, case["n"], method="embed", **args)) >= exact * (1 - 1e-12)
    assert conv_spectral_norm_upper_bound(kernel, case["n"], **args) >= exact
    lockstep = "gram" if case["padding"] == "circular" else "embed"  # the GPU default: Gram kernel + lockstep
    assert conv_spectral_norm_upper_bound(kernel, case["n"], method=lockstep, **args) >= exact
    assert conv_spectral_norm_upper_bound(kernel.float(), case["n"], **args) >= explicit_norm(
        kernel.float().double(), case["n"], **args
    )
    # power iteration: a lower estimate
    power = float(conv_spectral_norm(kernel, case["n"], method="power", n_iter=50, generator=g, **args))
    assert power <= exact * (1 + 1e-9)


@pytest.mark.parametrize("padding", ["circular", "zeros"])
def test_circular_exact_fft_matches_explicit_and_gram_is_tight(padding):
    torch.manual_seed(0)
    kernel = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    exact = explicit_norm(kernel, 9, padding=padding)
    assert float(conv_spectral_norm(kernel, 9, padding, method="exact")) == pytest.approx(exact, rel=1e-10)
    if padding == "circular":
        assert float(conv_spectral_norm(kernel, 9, padding, method="gram", n_iter=8)) == pytest.approx(exact, rel=1e-6)


def test_one_d_convolution():
    kernel = torch.randn(3, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for padding in ("circular", "zeros"):
        exact = explicit_norm(kernel, 11, padding=padding)
        assert conv_spectral_norm_upper_bound(kernel, 11, padding=padding) >= exact
        assert float(conv_spectral_norm(kernel, (11,), padding, method="exact")) == pytest.approx(exact, rel=1e-9)


def test_closed_forms():
    identity = torch.zeros(3, 3, 3, 3, dtype=torch.float64)
    identity[range(3), range(3), 1, 1] = 1.0
    for padding in ("circular", "zeros"):
        assert float(conv_spectral_norm(identity, 6, padding, method="exact")) == pytest.approx(1.0, rel=1e-9)
    # Gram is a Schatten-p norm (p = 2^(T+1)): with 3 equal singular values it is exactly 3^(1/p)
    assert float(conv_spectral_norm(identity, 6, "circular", method="gram", n_iter=6)) == pytest.approx(3 ** (1 / 128))
    ones = torch.ones(1, 1, 3, 3, dtype=torch.float64)  # circular: the DC frequency gives the tap sum
    assert float(conv_spectral_norm(ones, 7, "circular", method="exact")) == pytest.approx(9.0, rel=1e-12)
    mat = torch.randn(5, 4, dtype=torch.float64)  # 1x1 conv = the channel matrix
    assert float(conv_spectral_norm(mat[:, :, None, None], 4, "zeros", method="exact")) == pytest.approx(
        float(torch.linalg.matrix_norm(mat, 2)), rel=1e-10
    )


def test_spatial_gram_is_independent_of_n_and_bounds_every_size():
    torch.manual_seed(2)
    kernel = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    bound = float(conv_spectral_norm(kernel, 3, "zeros", method="gram"))
    assert bound == float(conv_spectral_norm(kernel, 12, "zeros", method="gram"))
    for n in (3, 5, 8, 12):
        for padding in ("zeros", "circular"):
            assert bound >= explicit_norm(kernel, n, padding=padding)


def test_spatial_gram_memory_budget_reduces_iterations_soundly():
    torch.manual_seed(3)
    kernel5 = torch.randn(1, 4, 4, 3, 3, dtype=torch.float64)
    exact = explicit_norm(kernel5[0], 8, padding="zeros")
    full = float(spatial_gram_bound(kernel5, 5))
    tiny = float(spatial_gram_bound(kernel5, 5, max_memory_bytes=20_000))  # forces fewer iterations
    assert tiny >= full >= exact
    assert tiny > full * (1 + 1e-6)


def test_gradients():
    kernel = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k: conv_spectral_norm(k, 5, "circular", method="gram", n_iter=3), (kernel,))
    assert torch.autograd.gradcheck(lambda k: conv_spectral_norm(k, 5, "zeros", method="gram", n_iter=2), (kernel,))
    assert torch.autograd.gradcheck(lambda k: conv_spectral_norm(k, 5, "zeros", method="embed", n_iter=3), (kernel,))


def test_published_example_seed_0():
    """METHODS.md 1.2: a 64x64x5x5 Gaussian kernel on 12x12 (our draw: torch.manual_seed(0), float64).

    Published: exact circular 83.09 and Gram (5 it.) +0.026 for their draw. Ours: exact 81.10, Gram +0.021.
    """
    torch.manual_seed(0)
    kernel = torch.randn(64, 64, 5, 5, dtype=torch.float64)
    exact = float(conv_spectral_norm(kernel, 12, "circular", method="exact"))
    gram = float(conv_spectral_norm(kernel, 12, "circular", method="gram", n_iter=5))
    assert 78 < exact < 86
    assert 0 <= gram - exact < 0.05
    power = float(conv_spectral_norm(kernel, 12, "zeros", method="power", n_iter=100))
    embed = float(conv_spectral_norm(kernel, 12, "zeros", method="embed"))
    assert power <= embed < power * 1.05


@pytest.mark.slow
def test_published_example_zero_padding_bound_six_iterations():
    """Zero-padding spatial Gram with T=6: published about +3.3 over the exact circular norm (~40 s on CPU)."""
    torch.manual_seed(0)
    kernel = torch.randn(64, 64, 5, 5, dtype=torch.float64)
    exact = float(conv_spectral_norm(kernel, 12, "circular", method="exact"))
    bound = float(conv_spectral_norm(kernel.float(), 12, "zeros", method="gram", n_iter=6, max_memory_bytes=4 << 30))
    assert exact < bound < exact + 4.0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(kernel=torch.ones(3, 3)), r"kernel must have shape \(c_out, c_in/groups, kh, kw\)"),
        (dict(input_size=2), r"input_size \(2, 2\) is smaller than the \(dilated\) kernel \(3, 3\)"),
        (dict(padding="reflect"), "padding must be one of 'circular', 'zeros'; got 'reflect'"),
        (dict(method="svd"), "method for padding 'zeros' must be one of auto, embed, exact, gram, power"),
        (dict(kernel=torch.full((2, 2, 3, 3), float("nan"))), "kernel contains NaN or Inf"),
        (dict(groups=3), "groups must be a positive int dividing c_out=2"),
        (dict(stride=0), "stride must be a positive int"),
    ],
)
def test_bad_input(kwargs, message):
    args = dict(kernel=torch.ones(2, 2, 3, 3), input_size=6, padding="zeros", method="gram")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        conv_spectral_norm(**args)


def test_power_iteration_keeps_kernel_dtype():
    kernel = torch.randn(3, 3, 3, 3, dtype=torch.float64)
    assert conv_spectral_norm(kernel, 6, "zeros", method="power", n_iter=5).dtype == torch.float64


@pytest.mark.parametrize("padding_size", [0, (0, 0), (1, 0), (0, 2), "valid", "same", 1])
def test_numeric_padding_sizes_including_zero(padding_size):
    kernel = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    exact = explicit_norm(kernel, 6, padding="zeros", padding_size=padding_size)
    assert conv_spectral_norm_upper_bound(kernel, 6, padding="zeros", padding_size=padding_size) >= exact
    with pytest.raises(ValueError, match="padding_size must be"):
        conv_spectral_norm(kernel, 6, "zeros", padding_size="full")
    with pytest.raises(ValueError, match="padding_size must be a non-negative int"):
        conv_spectral_norm(kernel, 6, "zeros", padding_size=-1)


def test_circular_bounds_fold_a_kernel_larger_than_the_input():
    """On N < k pixels the circular operator wraps taps onto each other; the bounds must see every tap."""
    import torch.nn.functional as F

    from stablenet.spectral.conv import _circular_exact, circular_gram_bound

    torch.manual_seed(0)
    kernel = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    h, w = 4, 6
    n = 2 * h * w
    eye = torch.eye(n, dtype=torch.float64).reshape(n, 2, h, w)
    tiled = eye.repeat(1, 1, 3, 3)[:, :, h - 2 : 2 * h + 2, w - 2 : 2 * w + 2]  # circular padding by 2, wrapped
    exact = torch.linalg.matrix_norm(F.conv2d(tiled, kernel).reshape(n, -1).T, 2)
    assert float(_circular_exact(kernel[None], (h, w))) == pytest.approx(float(exact), rel=1e-12)
    assert float(circular_gram_bound(kernel[None], (h, w))) >= float(exact) * (1 - 1e-12)


@pytest.mark.parametrize("method", ["embed", "gram", "cholesky"])
def test_upper_bounds_of_several_convolutions_match_one_at_a_time_and_the_explicit_operator(method):
    g = torch.Generator().manual_seed(4)
    problems = [
        {"kernel": torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64), "input_size": 7},
        {"kernel": torch.randn(5, 5, 1, 1, generator=g, dtype=torch.float64), "input_size": (4, 6)},
        {"kernel": torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64), "input_size": 6, "groups": 2},
        {"kernel": torch.randn(3, 3, 5, generator=g, dtype=torch.float64), "input_size": 9, "stride": 2},
    ]
    if method != "embed":
        problems.append({"kernel": torch.randn(4, 4, 3, 3, generator=g), "input_size": 5, "padding": "circular"})
    bounds = conv_spectral_norm_upper_bounds(problems, method=method)
    for problem, bound in zip(problems, bounds, strict=True):
        args = {k: v for k, v in problem.items() if k not in ("kernel", "input_size")}
        assert bound == conv_spectral_norm_upper_bound(problem["kernel"], problem["input_size"], method=method, **args)
        exact_args = {"padding": "zeros", **args}  # the upper bounds' default padding
        exact = float(
            conv_spectral_norm(problem["kernel"].double(), problem["input_size"], method="exact", **exact_args)
        )
        assert bound >= exact


def test_upper_bounds_bad_problem():
    with pytest.raises(ValueError, match="needs 'kernel' and 'input_size'"):
        conv_spectral_norm_upper_bounds([{"kernel": torch.ones(2, 2, 3, 3)}])
    with pytest.raises(ValueError, match="needs 'kernel' and 'input_size'"):
        conv_spectral_norm_upper_bounds([{"kernel": torch.ones(2, 2, 3, 3), "input_size": 5, "pad": 1}])
    for bad in (float("nan"), float("inf")):  # one check for all kernels, whichever holds it, by every method
        kernels = [torch.ones(2, 2, 3, 3), torch.ones(3, 2, 3, 3), torch.ones(2, 3, 1, 1)]
        kernels[1][2, 1, 0, 2] = bad
        for method in ("auto", "embed", "gram", "svd", "cholesky"):
            with pytest.raises(ValueError, match="NaN or Inf"):
                conv_spectral_norm_upper_bounds([{"kernel": k, "input_size": 5} for k in kernels], method=method)


# (groups, c_out/g, c_in/g, kh, kw) and the circular size: groups, a 1-wide axis, 1x1, a kernel larger than the
# input (folded), an even kernel
NORM_BOUND_CASES = [
    ((1, 5, 4, 3, 3), (6, 7)),
    ((2, 3, 6, 3, 1), (5, 4)),
    ((1, 4, 4, 1, 1), (5, 5)),
    ((1, 6, 3, 5, 5), (3, 4)),
    ((3, 4, 2, 2, 3), (4, 6)),
]


@pytest.mark.parametrize("shape,size", NORM_BOUND_CASES)
def test_circular_norm_bound_cholesky_value_and_gradient(shape, size):
    """The verified value is within 1e-4 above the exact circular norm; its gradient is the exact norm's (the max
    over frequencies of sigma_1 by SVD, differentiated by autograd), in float64."""
    from stablenet.spectral.conv import _circular_exact, _half_spectrum, circular_norm_bound

    torch.manual_seed(sum(shape) + size[0])
    kernel = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    bound = circular_norm_bound(kernel, size, method="cholesky")
    (grad,) = torch.autograd.grad(bound, kernel)
    bound = bound.detach()
    exact_tensor = torch.linalg.matrix_norm(_half_spectrum(kernel, size), 2).amax()
    (exact_grad,) = torch.autograd.grad(exact_tensor, kernel)
    exact = exact_tensor.detach()
    assert float(_circular_exact(kernel.detach(), size)) == pytest.approx(float(exact), rel=1e-12)
    assert float(exact) <= float(bound) <= float(exact) * (1 + 1e-4 + 1e-9)
    torch.testing.assert_close(grad, exact_grad, rtol=1e-9, atol=1e-12)


def test_circular_norm_bound_against_the_explicit_operator_and_methods():
    from stablenet.spectral.cholesky_bound import cholesky_circular_bound
    from stablenet.spectral.conv import circular_gram_bound, circular_norm_bound

    torch.manual_seed(5)
    kernel = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    exact = explicit_norm(kernel, (6, 7), padding="circular")
    verified = float(circular_norm_bound(kernel[None], (6, 7), method="cholesky"))
    assert exact <= verified <= exact * (1 + 1e-4 + 1e-9)
    # auto: the verified bound on a CPU unless an iteration count asks for the Gram iteration
    assert float(circular_norm_bound(kernel[None], (6, 7))) == verified
    assert verified == float(cholesky_circular_bound(kernel[None], (6, 7)))
    k5 = kernel[None]
    assert torch.equal(circular_norm_bound(k5, (6, 7), 3), circular_gram_bound(k5, (6, 7), 3))
    assert torch.equal(circular_norm_bound(k5, (6, 7), method="gram"), circular_gram_bound(k5, (6, 7)))
    k32 = k5.float()  # auto keeps the Gram iteration for what the Cholesky path does not certify
    assert torch.equal(circular_norm_bound(k32, (6, 7)), circular_gram_bound(k32, (6, 7)))
    small = torch.randn(1, 3, 2, 3, 3, dtype=torch.float64, requires_grad=True)  # second derivatives (curvature)
    assert torch.autograd.gradgradcheck(lambda k: circular_norm_bound(k, (5, 5), method="cholesky"), (small,))
    zero = torch.zeros(1, 2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    value = circular_norm_bound(zero, (5, 5), method="cholesky")
    assert float(value.detach()) == 0.0
    value.backward()
    assert torch.isfinite(zero.grad).all()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"method": "svd"}, "method must be one of auto, cholesky, gram"),
        ({"method": "cholesky", "n_iter": 3}, "n_iter applies to the Gram iteration only"),
        ({"method": "cholesky", "dtype": torch.float32}, "certifies float64 kernels"),
    ],
)
def test_circular_norm_bound_bad_input(kwargs, message):
    from stablenet.spectral.conv import circular_norm_bound

    dtype = kwargs.pop("dtype", torch.float64)
    with pytest.raises(ValueError, match=message):
        circular_norm_bound(torch.ones(1, 2, 2, 3, 3, dtype=dtype), (5, 5), **kwargs)


@pytest.mark.parametrize("shape,size", NORM_BOUND_CASES)
def test_lockstep_bound_from_the_gram_kernel(shape, size):
    """The lockstep's first Gram matrices come from the Gram kernel (a power-of-two scale and a rounding bound
    ``err``): the bound is above the exact circular norm and within the adaptive tolerance of it, and equals the
    bound of the spectrum's own Gram iteration."""
    import math

    from stablenet.spectral.conv import GRAM_MAX_ITER, GRAM_TOL, _circular_exact, _GramSource, circular_gram_bound
    from stablenet.spectral.lockstep import gram_iteration_max_many

    torch.manual_seed(sum(shape) + size[1])
    kernel = torch.randn(*shape, dtype=torch.float64)
    exact = float(_circular_exact(kernel, size))
    for factor in (1.0, 2.0**-1000, 1e200):  # the scale keeps G from underflowing or overflowing
        source = _GramSource(kernel * factor, size)
        (value,) = gram_iteration_max_many([source], GRAM_MAX_ITER, tol=GRAM_TOL)
        assert 0 < float(source.err) < 1e-9 and math.log2(float(source.scale)) % 1 == 0
        bound = math.sqrt(value**2 + float(source.err)) * float(source.scale) / factor
        assert exact <= bound <= exact * (1 + 2 * GRAM_TOL)
        assert bound == pytest.approx(float(circular_gram_bound(kernel, size)), rel=1e-9)


def test_lockstep_bounds_scale_with_the_kernel_without_overflow():
    kernel = torch.randn(6, 5, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for padding in ("circular", "zeros"):
        problems = [{"kernel": kernel * f, "input_size": 7, "padding": padding} for f in (1.0, 1e-300, 1e300)]
        bounds = conv_spectral_norm_upper_bounds(problems, method="gram" if padding == "circular" else "embed")
        assert bounds[1] / 1e-300 == pytest.approx(bounds[0], rel=1e-12)
        assert bounds[2] / 1e300 == pytest.approx(bounds[0], rel=1e-12)


@pytest.mark.parametrize("shape,size", NORM_BOUND_CASES)
def test_adaptive_circular_gram_bound_value_and_gradient(shape, size):
    """From the Gram kernel: above the exact circular norm and within the adaptive tolerance; its gradient is the
    argmax frequency's Gram bound's, as autograd gives through the spectrum's own adaptive Gram iteration, and
    close to the exact norm's (the max over frequencies of sigma_1 by SVD)."""
    from stablenet.spectral.conv import GRAM_MAX_ITER, GRAM_TOL, _half_spectrum, circular_gram_bound
    from stablenet.spectral.dense import gram_iteration_max

    torch.manual_seed(sum(shape) + size[0])
    kernel = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    bound = circular_gram_bound(kernel, size)
    (grad,) = torch.autograd.grad(bound, kernel)
    spectrum = _half_spectrum(kernel, size)
    (spectrum_grad,) = torch.autograd.grad(
        gram_iteration_max(spectrum, GRAM_MAX_ITER, tol=GRAM_TOL), kernel, retain_graph=True
    )
    exact = torch.linalg.matrix_norm(spectrum, 2).amax()
    (exact_grad,) = torch.autograd.grad(exact, kernel)
    exact = float(exact.detach())
    assert exact <= float(bound.detach()) <= exact * (1 + 2 * GRAM_TOL)
    torch.testing.assert_close(grad, spectrum_grad, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(grad, exact_grad, rtol=1e-2, atol=1e-4)
    with torch.no_grad():
        assert float(circular_gram_bound(kernel, size)) == float(bound.detach())
