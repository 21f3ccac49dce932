import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stablenet.spectral import (
    GRAM_ROUNDING_SLACK,
    gram_iteration,
    gram_iteration_amax,
    gram_iteration_max,
    gram_iteration_max_many,
    power_iteration,
    spectral_norm_exact,
    spectral_norm_upper_bound,
)
from stablenet.spectral.lockstep import _gram_max_many

SHAPES = [(1, 7), (7, 1), (1, 1), (30, 5), (5, 30), (40, 40), (64, 17)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_iter", [1, 3, 6])
def test_gram_is_upper_bound_of_svd(shape, n_iter):
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    w = torch.randn(shape, dtype=torch.float64, generator=g)
    exact = spectral_norm_exact(w)
    bound = gram_iteration(w, n_iter)
    assert bound >= exact * (1 - 1e-14)
    # Schatten-p norm: at most rank^(1/p) times sigma_1, p = 2^(T+1)
    rank = min(shape)
    assert bound <= exact * rank ** (1 / 2 ** (n_iter + 1)) * (1 + 1e-12)


def test_gram_converges_to_exact():
    w = torch.randn(500, 400, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = spectral_norm_exact(w)
    ratios = [float(gram_iteration(w, t) / exact) for t in (2, 4, 6, 8, 10)]
    assert all(a >= b for a, b in itertools.pairwise(ratios))
    assert ratios[-1] < 1 + 1e-3


def test_gram_closed_form_diagonal_and_rank_one():
    d = torch.tensor([3.0, -5.0, 0.5], dtype=torch.float64)
    assert torch.isclose(gram_iteration(torch.diag(d), 12), torch.tensor(5.0, dtype=torch.float64), rtol=1e-9)
    u, v = torch.randn(6, 1, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
    w = u @ v  # rank one: the bound equals sigma_1 for every T
    for t in (1, 5, 10):
        assert torch.isclose(gram_iteration(w, t), u.norm() * v.norm(), rtol=1e-12)
        assert spectral_norm_upper_bound(w, t) >= spectral_norm_exact(w)


def test_gram_zero_matrix_and_batch_and_complex():
    assert gram_iteration(torch.zeros(3, 4)) == 0
    w = torch.randn(5, 6, 3, dtype=torch.complex128)
    b = gram_iteration(w, 8)
    assert b.shape == (5,) and b.dtype == torch.float64
    assert torch.all(b >= spectral_norm_exact(w) * (1 - 1e-14))


def test_gram_large_scale_does_not_overflow():
    w = torch.randn(20, 20, dtype=torch.float32) * 1e20
    b = gram_iteration(w, 10)
    assert torch.isfinite(b) and b >= spectral_norm_exact(w.double()).float() * (1 - 1e-5)


def test_upper_bound_float32_input_never_below_float64_truth():
    for seed in range(20):
        w = torch.randn(16, 9, generator=torch.Generator().manual_seed(seed))
        u = torch.randn(16, 1, generator=torch.Generator().manual_seed(seed + 100))
        for m in (w, u @ u.T):  # generic and rank one (where the bound is tight)
            assert spectral_norm_upper_bound(m) >= spectral_norm_exact(m.double())
    assert GRAM_ROUNDING_SLACK > 0


def test_gram_gradcheck():
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: gram_iteration(m, 4, detach_normalizers=False), (w,))
    # detaching the normalisers gives the same gradient (1-homogeneity)
    g1 = torch.autograd.grad(gram_iteration(w, 4), w)[0]
    g2 = torch.autograd.grad(gram_iteration(w, 4, detach_normalizers=False), w)[0]
    torch.testing.assert_close(g1, g2)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_gram_upper_bound_hypothesis(m, n, seed):
    w = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert spectral_norm_upper_bound(w) >= spectral_norm_exact(w)


def test_power_iteration_is_lower_estimate_and_warm_starts():
    w = torch.randn(30, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = spectral_norm_exact(w)
    s, u, v = power_iteration(w, 3, generator=torch.Generator().manual_seed(0))
    assert s <= exact * (1 + 1e-12)
    s2, _, _ = power_iteration(w, 200, u=u, v=v)
    assert s2 <= exact * (1 + 1e-12) and torch.isclose(s2, exact, rtol=1e-6)
    # operator form gives the same answer
    s3, _, _ = power_iteration((lambda x: w @ x, lambda y: w.T @ y), 200, v=v)
    assert torch.isclose(s3, s2, rtol=1e-10)


def test_bad_input():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        gram_iteration(torch.ones(3))
    with pytest.raises(ValueError, match="n_iter must be >= 1"):
        gram_iteration(torch.ones(3, 3), 0)
    with pytest.raises(ValueError, match="needs v or input_shape"):
        power_iteration((lambda x: x, lambda x: x))


def test_gram_accepts_an_operator_pair():
    w = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    from_pair = gram_iteration((lambda x: w @ x, lambda y: w.T @ y), 6, input_shape=(5,))
    assert torch.isclose(from_pair, gram_iteration(w, 6), rtol=1e-12)
    with pytest.raises(ValueError, match="needs input_shape"):
        gram_iteration((lambda x: x, lambda y: y))


def _batch_norms(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(w, 2).max()


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 40),
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    spread=st.floats(0.0, 3.0),
    seed=st.integers(0, 10_000),
    complex_=st.booleans(),
)
def test_gram_max_is_tight_upper_bound_of_batch_max(batch, m, n, spread, seed, complex_):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.complex128 if complex_ else torch.float64
    w = torch.randn(batch, m, n, dtype=dtype, generator=g)
    # Matrices of very different sizes, so that most of the batch is pruned early.
    w = w * torch.exp(spread * torch.randn(batch, 1, 1, dtype=torch.float64, generator=g)).to(dtype)
    exact = _batch_norms(w)
    bound = gram_iteration_max(w)
    assert bound >= exact * (1 - 1e-14)
    # Unless a top singular value repeats (then the change rule stops it), the stop rule guarantees tol.
    assert bound <= exact * (1 + 1e-4)


def test_gram_max_zero_matrices_repeated_top_and_gradient():
    w = torch.zeros(3, 4, 5, dtype=torch.float64)
    assert gram_iteration_max(w) == 0
    w[1] = torch.eye(4, 5, dtype=torch.float64) * 2.0  # top singular value repeated 4 times
    bound = gram_iteration_max(w)
    assert 2.0 <= bound <= 2.0 * (1 + 1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, 4, dtype=torch.float64, generator=g)
    x[2] *= 3.0
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: gram_iteration_max(a, 6), (x,))
    (grad,) = torch.autograd.grad(gram_iteration_max(x), x)
    assert grad[[0, 1, 3, 4]].abs().max() == 0  # only the maximising matrix carries gradient
    assert grad[2].abs().max() > 0


def test_gram_max_bad_input():
    with pytest.raises(ValueError, match="non-empty batch"):
        gram_iteration_max(torch.zeros(0, 3, 3))
    with pytest.raises(ValueError, match="max_iter"):
        gram_iteration_max(torch.ones(2, 3, 3), 0)


def test_gram_iteration_max_gradient_is_the_argmax_matrix_gradient():
    """The gradient of the pruned maximum equals autograd through the whole batch at the same step count."""
    torch.manual_seed(11)
    weight = torch.randn(40, 6, 5, dtype=torch.complex128)
    weight[7] *= 3.0  # a clear maximum
    weight.requires_grad_()
    bound = gram_iteration_max(weight)
    (grad,) = torch.autograd.grad(bound, weight)
    with torch.no_grad():
        (problem,) = _gram_max_many([weight.detach()], 14, 1e-5)
    assert problem.argmax == 7 and problem.steps >= 1
    reference = gram_iteration(weight, problem.steps).amax()
    (ref_grad,) = torch.autograd.grad(reference, weight)
    torch.testing.assert_close(bound.detach(), reference.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    assert grad[torch.arange(40) != 7].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
def test_gram_iteration_max_deep_on_flat_spectra_does_not_underflow(dtype):
    """Orthogonal matrices (all singular values equal) run to max_iter with sparse rescaling (Note [sparse
    rescaling]): the bound stays >= 1 (float64) or close to it (float32), never 0, inf or nan."""
    torch.manual_seed(12)
    q = torch.linalg.qr(torch.randn(6, 256, 256, dtype=torch.float64))[0]
    weight = (q * torch.tensor([1.0, 0.5, 0.25, 1.0, 0.9, 0.3], dtype=torch.float64)[:, None, None]).to(dtype)
    bound = float(gram_iteration_max(weight, 14, tol=1e-9))
    many = gram_iteration_max_many([weight, weight[:3]], 14, tol=1e-9)
    exact = 1.0
    slack = 1e-12 if dtype == torch.float64 else 1e-4
    upper = 256 ** (2.0**-15)  # the Gram bound of a flat spectrum after 14 squarings: rank^(2^-(T+1))
    for value in (bound, *many):
        assert exact * (1 - slack) <= value <= upper * (1 + slack)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("n_iter", [1, 3, 6])
def test_gram_iteration_amax_value_gradient_and_hessian_vector_product(dtype, n_iter):
    """The batched value exactly, and autograd-through-the-batch's gradient and Hessian-vector product (one matrix
    iterated with autograd; Note [gradient of the maximum])."""
    torch.manual_seed(12 + n_iter)
    weight = torch.randn(2, 15, 6, 5, dtype=dtype)
    weight[1, 4] *= 3.0  # a clear maximum, at flat index 19
    weight.requires_grad_()
    direction = torch.randn_like(weight)
    value = gram_iteration_amax(weight, n_iter)
    reference = gram_iteration(weight, n_iter).amax()
    assert torch.equal(value.detach(), reference.detach())
    with torch.no_grad():
        assert torch.equal(gram_iteration_amax(weight, n_iter), reference.detach())
    grads = []
    for bound in (value, reference):
        (grad,) = torch.autograd.grad(bound, weight, create_graph=True)
        (hvp,) = torch.autograd.grad((grad.conj() * direction).real.sum(), weight)
        grads.append((grad.detach(), hvp))
    for ours, theirs in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12 * float(theirs.abs().max()))
    assert grads[0][0].reshape(30, 6, 5)[torch.arange(30) != 19].abs().max() == 0
