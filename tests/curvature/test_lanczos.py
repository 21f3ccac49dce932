"""Lanczos, power iteration and stochastic Lanczos quadrature against explicit symmetric matrices (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from stablenet.curvature.lanczos import (
    _lanczos_steps,
    gaussian_density,
    lanczos_eigsh,
    lanczos_quadrature,
    lanczos_tridiagonal,
    power_eigsh,
    rademacher,
    stochastic_lanczos_quadrature,
    tridiagonal_eigh,
)


def symmetric(eigenvalues, seed=0):
    """A dense symmetric matrix with the given spectrum and a random orthonormal eigenbasis."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=g, dtype=torch.float64))
    return (q * lam) @ q.T


def spectrum(n, seed=1):
    """An indefinite spectrum with a close pair at the top, a dominant negative one and a bulk near zero."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.randn(n, generator=g, dtype=torch.float64)
    lam[0] = 7.0
    lam[1] = 6.99
    lam[2] = 6.5
    lam[3] = -9.0
    return lam


def test_tridiagonal_eigh_matches_dense():
    g = torch.Generator().manual_seed(0)
    alpha, beta = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    t = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    theta, s = tridiagonal_eigh(alpha, beta)
    torch.testing.assert_close(theta, torch.linalg.eigvalsh(t), rtol=0, atol=1e-12)
    torch.testing.assert_close(t @ s, s * theta, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"alpha must be \(m,\) and beta \(m - 1,\)"):
        tridiagonal_eigh(alpha, beta[:-1])


@pytest.mark.parametrize("restart", [False, True])
def test_tridiagonalisation_is_orthonormal_and_exact(restart):
    n = 40
    lam = torch.linspace(-3.0, 5.0, n, dtype=torch.float64)  # simple spectrum: no breakdown before n steps
    a = symmetric(lam)
    v0 = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    alpha, beta, q = lanczos_tridiagonal(lambda v: a @ v, v0, n, restart=restart)
    assert alpha.shape == (n,) and beta.shape == (n - 1,) and q.shape == (n, n)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    t = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    torch.testing.assert_close(q @ a @ q.T, t, rtol=0, atol=1e-10)
    torch.testing.assert_close(tridiagonal_eigh(alpha, beta)[0], lam, rtol=0, atol=1e-10)
    torch.testing.assert_close(q[0], v0 / v0.norm(), rtol=0, atol=1e-15)


def test_without_reorthogonalisation_orthogonality_is_lost():
    # Widely spread eigenvalues converge fast, and plain three-term Lanczos then loses orthogonality
    # (Paige 1971): the option matters.
    n = 80
    a = symmetric(torch.logspace(0, 6, n, dtype=torch.float64))
    v0 = torch.ones(n, dtype=torch.float64)
    _, _, q_plain = lanczos_tridiagonal(lambda v: a @ v, v0, n, reorthogonalize=False)
    _, _, q_full = lanczos_tridiagonal(lambda v: a @ v, v0, n, reorthogonalize=True)
    eye = torch.eye(n, dtype=torch.float64)
    assert (q_plain @ q_plain.T - eye).abs().max() > 1e-3
    assert (q_full @ q_full.T - eye).abs().max() < 1e-10


def test_breakdown_and_restart_find_repeated_eigenvalues():
    # Three distinct eigenvalues: from one vector the Krylov space has dimension 3 (breakdown after 3 steps).
    lam = torch.tensor([4.0, 4.0, 4.0, 1.0, 1.0, -2.0], dtype=torch.float64)
    a = symmetric(lam)
    v0 = torch.randn(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    alpha, _, _ = lanczos_tridiagonal(lambda v: a @ v, v0, 6, restart=False)
    assert alpha.numel() == 3
    alpha, beta, _ = lanczos_tridiagonal(lambda v: a @ v, v0, 6, restart=True, generator=torch.Generator())
    torch.testing.assert_close(tridiagonal_eigh(alpha, beta)[0], lam.sort().values, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_lanczos_eigsh_top_k_to_1e10(k):
    n = 60
    lam = spectrum(n)
    a = symmetric(lam)
    calls = []

    def matvec(v):
        calls.append(1)
        return a @ v

    result = lanczos_eigsh(matvec, n, k, max_iter=n, tol=1e-14, generator=torch.Generator().manual_seed(0))
    expected = lam.sort(descending=True).values[:k]
    torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-10, atol=0)
    assert result.num_matvec == len(calls) <= n
    assert result.converged
    x = result.eigenvectors
    assert x.shape == (k, n)
    torch.testing.assert_close(x @ x.T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-8)
    measured = (x @ a - result.eigenvalues[:, None] * x).norm(dim=1)
    assert measured.max() < 1e-6
    torch.testing.assert_close(result.residuals, measured, rtol=1e-3, atol=1e-12)


def test_lanczos_eigsh_stops_early_with_loose_tol():
    n = 200
    lam = torch.cat([torch.tensor([50.0, 20.0]), torch.rand(n - 2, generator=torch.Generator().manual_seed(0))])
    a = symmetric(lam.double())
    result = lanczos_eigsh(lambda v: a @ v, n, 1, max_iter=n, tol=1e-8, generator=torch.Generator().manual_seed(1))
    assert result.converged and result.num_matvec < 40
    assert abs(result.eigenvalues[0].item() - 50.0) < 1e-6
    # Too few steps: not converged, and the Ritz value is below the eigenvalue (interlacing).
    short = lanczos_eigsh(lambda v: a @ v, n, 1, max_iter=2, tol=1e-14, generator=torch.Generator().manual_seed(1))
    assert not short.converged and short.eigenvalues[0] < 50.0


def test_residual_rule_stops_before_the_change_rule_and_within_tol():
    """Note [residual stopping rule]: on a separated top eigenvalue the residual estimate settles a step (or more)
    before consecutive Ritz values agree, and the value it stops at is within tol of the eigenvalue."""
    n, tol = 300, 1e-6
    lam = torch.cat([torch.tensor([40.0]), torch.rand(n - 1, generator=torch.Generator().manual_seed(0)) * 10])
    a = symmetric(lam.double())
    v0 = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    result = lanczos_eigsh(lambda v: a @ v, n, 1, max_iter=n, tol=tol, v0=v0)
    # The change rule alone, replayed on the same process.
    previous, change_steps = None, None
    for alpha, beta, *_ in _lanczos_steps(lambda v: a @ v, v0, n, reorthogonalize=True, restart=True, generator=None):
        theta = tridiagonal_eigh(alpha, beta)[0][-1]
        if previous is not None and abs(theta - previous) <= tol * abs(theta):
            change_steps = alpha.numel()
            break
        previous = theta
    assert result.converged and result.num_matvec < change_steps
    assert 0 <= 40.0 - result.eigenvalues[0].item() <= tol * 40.0


def test_breakdown_does_not_stop_on_a_vanishing_residual():
    """A start vector that is an eigenvector (of the smaller eigenvalue) gives residual 0 at the first step: an
    invariant subspace, not the top of the spectrum. The solver must go on (restart) and find the larger one."""
    a = torch.diag(torch.tensor([1.0, 10.0, 2.0, 3.0], dtype=torch.float64))
    v0 = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    result = lanczos_eigsh(
        lambda v: a @ v, 4, 1, max_iter=4, tol=1e-3, v0=v0, generator=torch.Generator().manual_seed(0)
    )
    assert result.eigenvalues[0].item() == pytest.approx(10.0, rel=1e-3)


def test_power_eigsh_starts_from_v0():
    lam = torch.tensor([5.0, 2.0, 1.0, -1.0], dtype=torch.float64)
    a = symmetric(lam)
    top = torch.linalg.eigh(a).eigenvectors[:, -1]
    result = power_eigsh(lambda v: a @ v, 4, 1, max_iter=50, tol=1e-10, v0=3.0 * top)
    assert result.num_matvec == 1 and result.eigenvalues[0].item() == pytest.approx(5.0, rel=1e-12)
    for bad in (torch.zeros(4), torch.ones(3), torch.tensor([1.0, float("nan"), 0.0, 0.0])):
        with pytest.raises(ValueError, match="v0 must be a finite, nonzero vector of 4 entries"):
            power_eigsh(lambda v: a @ v, 4, 1, v0=bad)


def test_power_eigsh_with_deflation_on_separated_spectrum():
    n = 30
    lam = torch.cat([torch.tensor([10.0, 5.0, 2.5], dtype=torch.float64), torch.linspace(-1.0, 1.0, n - 3).double()])
    a = symmetric(lam)
    result = power_eigsh(lambda v: a @ v, n, 3, max_iter=2000, tol=1e-10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(result.eigenvalues, lam[:3], rtol=1e-8, atol=0)
    assert result.converged and result.residuals.max() < 1e-5
    x = result.eigenvectors
    torch.testing.assert_close(x @ x.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-6)


def test_power_eigsh_finds_largest_algebraic_when_a_negative_one_dominates():
    lam = torch.tensor([3.0, 1.0, 0.0, -0.5, -8.0], dtype=torch.float64)
    a = symmetric(lam)
    result = power_eigsh(lambda v: a @ v, 5, 2, max_iter=5000, tol=1e-10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(result.eigenvalues, lam[:2], rtol=1e-8, atol=0)


def test_quadrature_is_exact_up_to_degree_2m_minus_1():
    n, m = 50, 5
    a = symmetric(spectrum(n))
    v = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    nodes, weights = lanczos_quadrature(lambda x: a @ x, v, m)
    assert nodes.shape == weights.shape == (m,)
    u = v / v.norm()
    for p in range(2 * m + 1):
        exact = u @ torch.linalg.matrix_power(a, p) @ u
        gauss = (weights * nodes**p).sum()
        if p <= 2 * m - 1:
            assert abs(gauss - exact) <= 1e-10 * max(1.0, abs(exact)), p
        else:
            # degree 2m is where Gauss quadrature stops being exact (the test above could fail)
            assert abs(gauss - exact) > 1e-6 * abs(exact)


def test_slq_moments_match_exact_spectral_density():
    n, runs, m = 80, 40, 8
    lam = spectrum(n)
    a = symmetric(lam)
    nodes, weights = stochastic_lanczos_quadrature(
        lambda x: a @ x, n, runs, m, generator=torch.Generator().manual_seed(0)
    )
    assert nodes.shape == weights.shape == (runs, m)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(runs, dtype=torch.float64), rtol=0, atol=1e-12)
    assert nodes.min() >= lam.min() - 1e-10 and nodes.max() <= lam.max() + 1e-10
    for p in (1, 2, 3, 4):
        per_run = (weights * nodes**p).sum(dim=1)
        exact = (lam**p).mean()
        se = per_run.std() / math.sqrt(runs)
        assert abs(per_run.mean() - exact) <= 4 * se, p
    # Moment 0 and the Hutchinson link: moment 1 of each run is z^T A z / n for its Rademacher z.
    g = torch.Generator().manual_seed(0)
    z = rademacher(n, generator=g)
    assert abs((weights[0] * nodes[0]).sum() - z @ a @ z / n) < 1e-12


def test_gaussian_density_integrates_to_one_and_keeps_the_mean():
    nodes = torch.tensor([[-1.0, 0.5, 2.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    weights = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.4, 0.0]], dtype=torch.float64)
    sigma = 0.05
    grid = torch.linspace(-2.0, 4.0, 4001, dtype=torch.float64)
    density = gaussian_density(nodes, weights, grid, sigma)
    assert density.shape == grid.shape and density.min() >= 0
    assert abs(torch.trapezoid(density, grid) - 1.0) < 1e-8
    mean = (weights * nodes).sum() / 2
    assert abs(torch.trapezoid(density * grid, grid) - mean) < 1e-8
    variance = (weights * nodes**2).sum() / 2 - mean**2 + sigma**2
    assert abs(torch.trapezoid(density * (grid - mean) ** 2, grid) - variance) < 1e-8
    with pytest.raises(ValueError, match="sigma must be > 0; got 0"):
        gaussian_density(nodes, weights, grid, 0.0)


def test_bad_arguments_raise_one_line_errors():
    a = torch.eye(4, dtype=torch.float64)

    def mv(v):
        return a @ v

    cases = [
        (lambda: lanczos_eigsh(mv, 4, 5), r"k must be between 1 and the dimension 4; got 5"),
        (lambda: lanczos_eigsh(mv, 4, 2, max_iter=1), r"max_iter must be >= k = 2; got 1"),
        (lambda: power_eigsh(mv, 4, 0), r"k must be between 1 and the dimension 4; got 0"),
        (lambda: lanczos_tridiagonal(mv, torch.zeros(4), 2), r"starting vector must be finite and nonzero"),
        (lambda: lanczos_tridiagonal(mv, torch.ones(4), 0), r"num_steps must be >= 1; got 0"),
        (lambda: stochastic_lanczos_quadrature(mv, 4, 0), r"num_runs must be >= 1; got 0"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
