"""AOL and spectral-rescaling scales against exact values: SVDs of the rescaled (explicit) operators in float64."""

import pytest
import torch

from stablenet.spectral.conv import conv_operator_matrix
from stablenet.spectral.rescaling import (
    aol_conv_rescaling,
    aol_rescaling,
    conv_gram_kernel,
    conv_gram_power_rowsums,
    dilate_kernel,
    safe_reciprocal,
    sr_conv_rescaling,
    sr_rescaling,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems (tests/conftest.py)


F64 = torch.float64
EXACT_TOL = 1e-12
DENSE_SHAPES = [(1, 1), (1, 5), (5, 1), (6, 6), (9, 4), (4, 9), (20, 3)]


def norm(m: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(m, 2))


def dense_weights(shape, seed):
    """A random matrix, and the same with a zero row and a zero column (where there is more than one)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, dtype=F64, generator=g) * torch.rand(shape[0], 1, dtype=F64, generator=g) * 3
    zeroed = w.clone()
    if shape[0] > 1:
        zeroed[0] = 0
    if shape[1] > 1:
        zeroed[:, -1] = 0
    return [w, zeroed, torch.zeros(*shape, dtype=F64)]


def scale_input_channels(kernel, d, groups):
    co, ci_g = kernel.shape[:2]
    return kernel * d.reshape(groups, 1, ci_g).expand(groups, co // groups, ci_g).reshape(co, ci_g, 1, 1)


# --- dense -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", DENSE_SHAPES)
def test_aol_dense_norm_at_most_one(shape):
    for w in dense_weights(shape, seed=shape[0] * 10 + shape[1]):
        d = aol_rescaling(w)
        assert d.shape == (shape[1],) and bool(torch.isfinite(d).all())
        assert norm(w * d) <= 1 + EXACT_TOL
        assert bool((d[w.abs().sum(0) == 0] == 0).all())  # zero columns get d = 0


@pytest.mark.parametrize("shape", DENSE_SHAPES)
@pytest.mark.parametrize("n_iter", [1, 2, 3, 4, 5])
def test_sr_dense_norm_at_most_one(shape, n_iter):
    for w in dense_weights(shape, seed=shape[0] * 10 + shape[1]):
        t = sr_rescaling(w, n_iter)
        assert t.shape == (shape[0],) and bool(torch.isfinite(t).all())
        assert norm(w * safe_reciprocal(t)[:, None]) <= 1 + EXACT_TOL
        zero_rows = w.abs().sum(1) == 0
        assert bool((t[zero_rows] == 0).all())
        # ||w_i|| <= t_i <= m^(2^-(T+1)) sigma_1: (A^k)_ii >= (A_ii)^k, and a row sum is <= sqrt(m) times its norm.
        assert bool((t >= w.norm(dim=1) * (1 - 1e-12)).all())
        assert bool((t <= shape[0] ** (2.0 ** -(n_iter + 1)) * norm(w) * (1 + 1e-12)).all())


def test_sr_with_one_iteration_is_aol_on_the_rows():
    w = torch.randn(7, 5, dtype=F64)
    torch.testing.assert_close(sr_rescaling(w, 1), 1 / aol_rescaling(w.T), rtol=1e-12, atol=0)


def test_sr_tightens_towards_spectral_normalisation():
    torch.manual_seed(0)
    w = torch.randn(8, 6, dtype=F64)
    norms = [norm(w / sr_rescaling(w, n)[:, None]) for n in (1, 3, 10)]
    assert norms[0] < norms[1] < norms[2] <= 1 + EXACT_TOL
    assert norms[-1] >= 1 - 2e-3
    torch.testing.assert_close(sr_rescaling(w, 12), torch.full((8,), norm(w), dtype=F64), rtol=2e-3, atol=0)


def test_closed_forms_diagonal_and_orthogonal():
    diag = torch.diag(torch.tensor([3.0, -0.5, 2.0, 1e-3], dtype=F64))
    torch.testing.assert_close(aol_rescaling(diag), 1 / diag.diagonal().abs())
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=F64))
    for n_iter in (1, 3, 6):
        torch.testing.assert_close(sr_rescaling(diag, n_iter), diag.diagonal().abs())
        torch.testing.assert_close(sr_rescaling(q, n_iter), torch.ones(6, dtype=F64))
    torch.testing.assert_close(aol_rescaling(q), torch.ones(6, dtype=F64))


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_no_overflow_in_float32(scale):
    torch.manual_seed(1)
    w = torch.randn(6, 4)
    for n_iter in (1, 5):
        t = sr_rescaling(w * scale, n_iter)
        assert bool(torch.isfinite(t).all())
        torch.testing.assert_close(t / scale, sr_rescaling(w, n_iter), rtol=1e-5, atol=0)
    torch.testing.assert_close(aol_rescaling(w * scale) * scale, aol_rescaling(w), rtol=1e-5, atol=0)
    k = torch.randn(3, 2, 3, 3)
    torch.testing.assert_close(sr_conv_rescaling(k * scale, 3) / scale, sr_conv_rescaling(k, 3), rtol=1e-5, atol=0)
    torch.testing.assert_close(aol_conv_rescaling(k * scale) * scale, aol_conv_rescaling(k), rtol=1e-5, atol=0)


def test_batched_matches_single():
    w = torch.randn(3, 5, 4, dtype=F64)
    torch.testing.assert_close(sr_rescaling(w, 3), torch.stack([sr_rescaling(m, 3) for m in w]))
    torch.testing.assert_close(aol_rescaling(w), torch.stack([aol_rescaling(m) for m in w]))


def test_gradients_exact_and_finite_at_zero_rows():
    w = torch.randn(4, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sr_rescaling(x, 3), (w,))  # detached normalisers are exact
    assert torch.autograd.gradcheck(aol_rescaling, (w,))
    k = torch.randn(2, 2, 3, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sr_conv_rescaling(x, 2), (k,))
    assert torch.autograd.gradcheck(aol_conv_rescaling, (k,))
    zeroed = torch.randn(4, 3, dtype=F64)
    zeroed[1] = 0
    zeroed[:, 2] = 0
    zeroed.requires_grad_(True)
    (
        sr_rescaling(zeroed, 3).sum() + safe_reciprocal(sr_rescaling(zeroed, 2)).sum() + aol_rescaling(zeroed).sum()
    ).backward()
    assert bool(torch.isfinite(zeroed.grad).all())


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="n_iter"):
        sr_rescaling(torch.randn(3, 3), 0)
    with pytest.raises(ValueError, match="n_iter"):
        sr_conv_rescaling(torch.randn(3, 3, 3, 3), True)
    with pytest.raises(ValueError, match=r"\(\.\.\., m, n\)"):
        aol_rescaling(torch.randn(3))
    with pytest.raises(ValueError, match="kernel"):
        aol_conv_rescaling(torch.randn(3, 3, 3))
    with pytest.raises(ValueError, match="groups"):
        sr_conv_rescaling(torch.randn(3, 1, 3, 3), 2, groups=2)
    with pytest.raises(ValueError, match="side"):
        conv_gram_power_rowsums(torch.randn(1, 2, 2, 3, 3), 2, side="rows")


# --- convolutions ------------------------------------------------------------------------------------------

# (c_out, c_in, k, input size, padding_size, stride, groups, dilation)
CONV_CASES = [
    (1, 1, 1, 5, 0, 1, 1, 1),
    (3, 2, 1, (4, 6), 0, 2, 1, 1),
    (2, 3, 3, 5, 1, 1, 1, 1),
    (3, 2, 3, (4, 6), 0, 1, 1, 1),
    (2, 2, 3, 5, 2, 1, 1, 1),
    (4, 2, 3, 6, 1, 2, 2, 1),
    (2, 4, 3, 6, 2, 1, 2, 2),
    (2, 3, (3, 1), (5, 4), (1, 0), 1, 1, 1),
    (3, 2, 5, 5, 2, 1, 1, 1),
    (1, 2, 5, (5, 7), "same", 1, 1, 1),
]


def over_padded(case) -> bool:
    """Circular padding wider than d(k-1)/2 repeats rows of the circulant: not a convolution the bounds cover."""
    _, _, k, _, pad, _, _, dilation = case
    ks = (k, k) if isinstance(k, int) else k
    pads = (pad, pad) if isinstance(pad, int) else pad
    return not isinstance(pad, str) and any(2 * p > dilation * (kk - 1) for p, kk in zip(pads, ks, strict=True))


GRID = [(i, "zeros") for i in range(len(CONV_CASES))]
GRID += [(i, "circular") for i, case in enumerate(CONV_CASES) if not over_padded(case)]


@pytest.mark.parametrize(("index", "padding"), GRID)
def test_conv_rescalings_give_norm_at_most_one(index, padding):
    co, ci, k, size, pad, stride, groups, dilation = CONV_CASES[index]
    ks = (k, k) if isinstance(k, int) else k
    g = torch.Generator().manual_seed(index)
    kernel = torch.randn(co, ci // groups, *ks, dtype=F64, generator=g)
    kernel[0] *= 5  # uneven channels
    dilated = dilate_kernel(kernel, (dilation, dilation))
    conv = {"padding": padding, "padding_size": pad, "stride": stride, "groups": groups, "dilation": dilation}
    aol = scale_input_channels(kernel, aol_conv_rescaling(dilated, groups), groups)
    assert norm(conv_operator_matrix(aol, size, **conv)) <= 1 + EXACT_TOL
    for n_iter in (1, 2, 3):
        t = sr_conv_rescaling(dilated, n_iter, groups)
        assert t.shape == (co,)
        sr = kernel * safe_reciprocal(t)[:, None, None, None]
        assert norm(conv_operator_matrix(sr, size, **conv)) <= 1 + EXACT_TOL


def test_conv_zero_filters_and_channels_are_safe():
    kernel = torch.randn(3, 2, 3, 3, dtype=F64)
    kernel[1] = 0  # output channel 1
    kernel[:, 0] = 0  # input channel 0
    t, d = sr_conv_rescaling(kernel, 3), aol_conv_rescaling(kernel)
    assert float(t[1]) == 0 and float(d[0]) == 0 and bool(torch.isfinite(t).all() and torch.isfinite(d).all())
    m = conv_operator_matrix(kernel * safe_reciprocal(t)[:, None, None, None], 5, padding="zeros")
    assert norm(m) <= 1 + EXACT_TOL
    assert float(sr_conv_rescaling(torch.zeros(2, 2, 3, 3), 2).abs().max()) == 0


@pytest.mark.parametrize("n_iter", [1, 2, 4])
def test_one_by_one_conv_is_the_dense_rescaling(n_iter):
    w = torch.randn(5, 3, dtype=F64)
    torch.testing.assert_close(sr_conv_rescaling(w[..., None, None], n_iter), sr_rescaling(w, n_iter))
    torch.testing.assert_close(aol_conv_rescaling(w[..., None, None]), aol_rescaling(w))


@pytest.mark.parametrize(("n_iter", "ks", "groups"), [(1, (3, 3), 1), (2, (3, 3), 2), (2, (3, 2), 1), (3, (3, 3), 1)])
def test_sr_conv_scales_are_exact_row_sums_of_the_gram_power(n_iter, ks, groups):
    """On a circular input of size >= 2^T (k-1) + 1, (CC^T)^(2^(T-1)) has the kernel G_T without wrap-around."""
    co, ci = (2, 2) if n_iter < 3 else (2, 1)
    kernel = torch.randn(co, ci // groups, *ks, dtype=F64)
    size = tuple(2**n_iter * (k - 1) + 1 for k in ks)
    c = conv_operator_matrix(kernel, size, padding="circular", groups=groups)
    power = torch.linalg.matrix_power(c @ c.T, 2 ** (n_iter - 1))
    rowsums = power.abs().sum(dim=1).reshape(co, -1)
    expected = rowsums[:, 0]
    torch.testing.assert_close(rowsums, expected[:, None].expand_as(rowsums))  # every pixel alike
    t = sr_conv_rescaling(kernel, n_iter, groups)
    torch.testing.assert_close(t ** (2**n_iter), expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_gram_kernel_matches_the_explicit_gram_operator(groups):
    kernel = torch.randn(4, 6 // groups, 3, 2, dtype=F64)
    size = (7, 6)
    c = conv_operator_matrix(kernel, size, padding="circular", groups=groups)
    for side, gram, channels in (("output", c @ c.T, 4), ("input", c.T @ c, 6)):
        g = conv_gram_kernel(kernel, groups, side)
        kh, kw = g.shape[-2:]
        full = torch.zeros(channels, channels, kh, kw, dtype=F64)
        per = channels // groups
        for i in range(groups):
            full[i * per : (i + 1) * per, i * per : (i + 1) * per] = g[i]
        if side == "input":
            full = full.flip(-2, -1)  # C^T C's kernel is indexed by the opposite offset
        rows = gram.reshape(channels, *size, channels, *size)[:, 3, 3]  # rows of pixel (3, 3), all channels
        centred = torch.roll(rows, shifts=((kh - 1) // 2 - 3, (kw - 1) // 2 - 3), dims=(-2, -1))
        torch.testing.assert_close(centred[..., :kh, :kw], full, rtol=1e-12, atol=1e-12)
        outside = centred.clone()
        outside[..., :kh, :kw] = 0
        assert float(outside.abs().max()) == 0  # a large circular input: no wrap-around


def test_gram_power_rowsums_sides_are_transposes():
    kernel5 = torch.randn(2, 3, 2, 3, 3, dtype=F64)
    out, _ = conv_gram_power_rowsums(kernel5, 2, "output")
    inp, log_in = conv_gram_power_rowsums(kernel5.transpose(1, 2), 2, "output")
    inp2, log_in2 = conv_gram_power_rowsums(kernel5, 2, "input")
    assert out.shape == (2, 3) and inp.shape == (2, 2)
    torch.testing.assert_close(inp * log_in.exp()[:, None], inp2 * log_in2.exp()[:, None])


@pytest.mark.parametrize("side", ["output", "input"])
@pytest.mark.parametrize("shape", [(1, 3, 2, 3, 3), (2, 1, 2, 3, 3), (3, 2, 4, 2, 4), (1, 4, 4, 1, 1), (2, 3, 3, 3, 1)])
@pytest.mark.parametrize("n_iter", [1, 2, 3])
def test_unscaled_spatial_gram_equals_rescaled(monkeypatch, side, shape, n_iter):
    """Note [unscaled spatial Gram]: the GEMM-started, unscaled iteration gives the rescaled one's row sums and
    gradients, with and without autograd (the in-place squarings), for every group count and side."""
    from stablenet.spectral import rescaling

    torch.manual_seed(14)
    kernel5 = (torch.randn(*shape, dtype=F64) * 3).requires_grad_()
    upstream = torch.randn(shape[0], shape[2] if side == "input" else shape[1], dtype=F64)
    assert rescaling._unscaled_is_safe(kernel5, n_iter, side)

    def run():
        rows, log_scale = conv_gram_power_rowsums(kernel5, n_iter, side)
        value = rows * torch.exp(log_scale)[:, None]
        (grad,) = torch.autograd.grad(value, kernel5, upstream)
        with torch.no_grad():
            rows, log_scale = conv_gram_power_rowsums(kernel5, n_iter, side)
        return value.detach(), grad, rows * torch.exp(log_scale)[:, None]

    unscaled = run()
    monkeypatch.setattr(rescaling, "_unscaled_is_safe", lambda *args: False)
    rescaled = run()
    for a, b in zip(unscaled, rescaled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))


def test_square_in_place_of_a_non_contiguous_batch():
    """A batch whose leading dimensions cannot be merged without a copy is squared, not silently left as it was."""
    from stablenet.spectral.rescaling import _square_in_place

    m = torch.randn(2, 5, 3, 4, 4, dtype=torch.complex128).permute(0, 2, 1, 3, 4)  # (2, 3, 5, 4, 4), strided
    assert not m.is_contiguous()
    expected = m @ m
    torch.testing.assert_close(_square_in_place(m), expected)
    torch.testing.assert_close(_square_in_place(m.contiguous()), expected)


@pytest.mark.parametrize(
    "shape,size", [((2, 3, 4, 5, 5), (9, 9)), ((1, 5, 5, 1, 5), (3, 17)), ((1, 4, 4, 5, 3), (17, 8))]
)
def test_half_symbol_is_the_rfft2_of_the_rolled_taps(shape, size):
    """The phase GEMM equals padding the taps, rolling the centre to index 0 and rfft2, values and gradients."""
    import torch.nn.functional as F

    from stablenet.spectral.rescaling import _half_symbol

    torch.manual_seed(15)
    taps = torch.randn(*shape, dtype=F64, requires_grad=True)
    a, b = shape[-2:]
    padded = F.pad(taps, (0, size[1] - b, 0, size[0] - a))
    reference = torch.fft.rfft2(torch.roll(padded, (-(a // 2), -(b // 2)), (-2, -1))).permute(0, 3, 4, 1, 2)
    symbol = _half_symbol(taps, size)
    torch.testing.assert_close(symbol, reference, rtol=0, atol=1e-13)
    upstream = torch.randn_like(symbol)
    (grad,) = torch.autograd.grad((symbol * upstream).real.sum(), taps)
    (expected,) = torch.autograd.grad((reference * upstream).real.sum(), taps)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("shape,groups,n_iter", [((6, 4, 3, 3), 1, 3), ((6, 2, 3, 3), 3, 2), ((4, 4, 3, 1), 1, 4)])
def test_hermitian_squaring_gives_autograds_gradients_and_hessian_vector_products(dtype, shape, groups, n_iter):
    """Note [Hermitian squaring]: the one-product backward gives the kernel the gradient and the Hessian-vector
    product of the plain squaring (torch.func runs the plain product), on the unscaled (float64) and rescaled
    (float32) paths; gradcheck in float64."""
    torch.manual_seed(16)
    kernel = torch.randn(*shape, dtype=dtype, requires_grad=True)
    upstream = torch.randn(shape[0], dtype=dtype)
    direction = torch.randn_like(kernel)

    def loss(k):
        return (sr_conv_rescaling(k, n_iter, groups) * upstream).sum()

    (plain,) = torch.autograd.grad(loss(kernel), kernel)  # the buffered backward (chunked on a CPU)
    (grad,) = torch.autograd.grad(loss(kernel), kernel, create_graph=True)  # the differentiable one
    (hvp,) = torch.autograd.grad((grad * direction).sum(), kernel)
    expected_grad = torch.func.grad(loss)(kernel.detach())
    expected_hvp = torch.func.jvp(torch.func.grad(loss), (kernel.detach(),), (direction,))[1]
    tol = 1e-12 if dtype == F64 else 1e-4
    for g in (plain, grad.detach()):
        torch.testing.assert_close(g, expected_grad, rtol=tol, atol=tol * float(expected_grad.abs().max()))
    torch.testing.assert_close(hvp, expected_hvp, rtol=tol, atol=tol * float(expected_hvp.abs().max()))
    if dtype == F64:
        assert torch.autograd.gradcheck(
            lambda k: sr_conv_rescaling(k, n_iter, groups), (kernel.detach().requires_grad_(),)
        )
