import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stablenet.spectral import (
    GRAM_ROUNDING_SLACK,
    gram_iteration,
    power_iteration,
    spectral_norm_exact,
    spectral_norm_upper_bound,
)

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
