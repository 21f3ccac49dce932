r"""Krylov methods for a symmetric operator given only as a matrix-vector product.

Pure tensor math: no module state, no I/O. The operator is a function ``matvec`` taking a flat float64
vector of length ``n`` on ``device`` and returning :math:`A v` (any floating dtype, any shape with ``n``
entries); everything else is accumulated in float64. :class:`stablenet.curvature.Hessian` builds on it.

* :func:`lanczos_tridiagonal`: the Lanczos process :math:`A Q_m \approx Q_m T_m` with full
  reorthogonalisation; :func:`tridiagonal_eigh` diagonalises :math:`T_m`.
* :func:`lanczos_eigsh`: the top-:math:`k` eigenpairs by Lanczos, stopped when the Ritz values settle.
* :func:`power_eigsh`: the same by power iteration with deflation (slower; kept as a cross-check).
* :func:`lanczos_quadrature`, :func:`stochastic_lanczos_quadrature` and :func:`gaussian_density`: the
  spectral density by stochastic Lanczos quadrature (Ghorbani, Krishnan and Xiao, ICML 2019).

Memory: full reorthogonalisation keeps the whole basis, ``num_steps x n`` float64 numbers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "EigshResult",
    "Matvec",
    "gaussian_density",
    "lanczos_eigsh",
    "lanczos_quadrature",
    "lanczos_tridiagonal",
    "power_eigsh",
    "rademacher",
    "stochastic_lanczos_quadrature",
    "tridiagonal_eigh",
]

logger = logging.getLogger(__name__)

#: A symmetric linear operator: flat float64 vector of length ``n`` in, :math:`A v` (``n`` entries) out.
Matvec = Callable[[Tensor], Tensor]

# A residual below this fraction of the largest |alpha|, |beta| seen so far is an invariant subspace.
# Full reorthogonalisation in float64 leaves residuals of about n * 1e-16 relative, well below it.
_BREAKDOWN_RTOL = 1e-12


class EigshResult(NamedTuple):
    """Top eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``(k,)`` float64, descending.
        eigenvectors: ``(k, n)`` float64, orthonormal rows; row ``i`` belongs to ``eigenvalues[i]``.
        num_matvec: products with the operator that were used.
        converged: whether the stopping rule was met before ``max_iter``.
        residuals: ``(k,)`` float64 :math:`\\|A x_i - \\lambda_i x_i\\|` (Lanczos: the cheap estimate
            :math:`\\beta_m |s_{m,i}|`, exact up to rounding; power iteration: measured).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    num_matvec: int
    converged: bool
    residuals: Tensor


def rademacher(n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """A float64 vector of ``n`` independent signs :math:`\\pm 1` (drawn on the CPU, then moved)."""
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8)
    return (2.0 * signs.to(torch.float64) - 1.0).to(device)


def _apply(matvec: Matvec, q: Tensor) -> Tensor:
    return matvec(q).detach().reshape(-1).to(dtype=torch.float64, device=q.device)


def _orthogonalise(w: Tensor, basis: Tensor) -> Tensor:
    # Classical Gram-Schmidt twice ("twice is enough", Giraud et al. 2005): orthogonal to rounding.
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def _lanczos_steps(
    matvec: Matvec,
    v0: Tensor,
    max_steps: int,
    *,
    reorthogonalize: bool,
    restart: bool,
    generator: torch.Generator | None,
):
    """Yield ``(alphas, betas, basis, residual_norm, restarting)`` after each Lanczos step.

    ``basis`` is a view of the first ``m`` rows; ``residual_norm`` is :math:`\\beta_m`, the norm of the
    part of :math:`A q_m` outside the basis (0 after a breakdown that ends the process). ``restarting`` is
    True when the basis spans an invariant subspace and the process goes on from a new random vector: its
    Ritz values are then exact eigenvalues, but not necessarily the largest.
    """
    n = v0.numel()
    device = v0.device
    q = v0.detach().reshape(-1).to(torch.float64)
    norm = q.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("the starting vector must be finite and nonzero")
    # The basis grows geometrically: preallocating max_steps rows of a large model's dimension would cost
    # hundreds of MB and a noticeable share of the run for the few steps a tolerance usually needs.
    basis = torch.empty(min(max_steps, 16), n, dtype=torch.float64, device=device)
    basis[0] = q / norm
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    scale = 0.0
    for j in range(max_steps):
        w = _apply(matvec, basis[j])
        alpha = torch.dot(w, basis[j])
        w = w - alpha * basis[j]
        if j > 0:
            w = w - betas[-1] * basis[j - 1]
        if reorthogonalize:
            w = _orthogonalise(w, basis[: j + 1])
        alphas.append(alpha)
        beta = w.norm()
        scale = max(scale, abs(alpha.item()), beta.item())
        broke = beta.item() <= _BREAKDOWN_RTOL * scale
        last = j + 1 == max_steps or j + 1 == n
        if broke and (last or not restart):
            zero = torch.zeros((), dtype=torch.float64)
            yield torch.stack(alphas), _stack(betas, device), basis[: j + 1], zero, False
            return
        yield torch.stack(alphas), _stack(betas, device), basis[: j + 1], beta, broke and not last
        if last:
            return
        if j + 2 > basis.shape[0]:
            grown = torch.empty(min(max_steps, 2 * basis.shape[0]), n, dtype=torch.float64, device=device)
            grown[: basis.shape[0]] = basis
            basis = grown
        if broke:
            # Invariant subspace found: continue in its orthogonal complement (T becomes block diagonal),
            # so that every eigenvalue, repeated ones included, is eventually reached.
            r = _orthogonalise(torch.randn(n, generator=generator, dtype=torch.float64).to(device), basis[: j + 1])
            basis[j + 1] = r / r.norm()
            betas.append(torch.zeros((), dtype=torch.float64, device=device))
        else:
            basis[j + 1] = w / beta
            betas.append(beta)


def _stack(values: list[Tensor], device: torch.device) -> Tensor:
    return torch.stack(values) if values else torch.zeros(0, dtype=torch.float64, device=device)


def lanczos_tridiagonal(
    matvec: Matvec,
    v0: Tensor,
    num_steps: int,
    *,
    reorthogonalize: bool = True,
    restart: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Lanczos tridiagonalisation of a symmetric operator (Lanczos 1950; Golub and Van Loan §10.1).

    From :math:`q_1 = v_0/\|v_0\|`, with :math:`\beta_0 q_0 = 0`:

    .. math::
        \alpha_j = q_j^\top A q_j,\quad
        \beta_j q_{j+1} = A q_j - \alpha_j q_j - \beta_{j-1} q_{j-1},

    so that :math:`Q_m^\top A Q_m = T_m = \mathrm{tridiag}(\beta, \alpha, \beta)`. In floating point the
    :math:`q_j` lose orthogonality as Ritz values converge; full reorthogonalisation (Gram-Schmidt of each
    new vector against all previous ones, twice) keeps :math:`Q_m` orthonormal to rounding.

    Args:
        matvec: the operator (see :data:`Matvec`).
        v0: starting vector, ``n`` entries; its device is used throughout.
        num_steps: at most ``min(num_steps, n)`` steps are taken.
        reorthogonalize: full reorthogonalisation (recommended; without it, spurious copies of converged
            eigenvalues appear).
        restart: on breakdown (an invariant subspace, :math:`\beta_j \approx 0`), continue from a random
            vector orthogonal to the basis instead of stopping; then ``n`` steps give the whole spectrum,
            repeated eigenvalues included.
        generator: random generator for restart vectors (drawn on the CPU, then moved).

    Returns:
        ``(alpha, beta, basis)``: float64 ``(m,)``, ``(m - 1,)`` and ``(m, n)`` with orthonormal rows,
        ``m <= num_steps`` (smaller after a breakdown without restart).

    Example:
        >>> a = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> alpha, beta, q = lanczos_tridiagonal(lambda v: a @ v, torch.ones(5), 5)
        >>> torch.allclose(tridiagonal_eigh(alpha, beta)[0], torch.arange(1.0, 6.0, dtype=torch.float64))
        True
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    steps = min(num_steps, v0.numel())
    *_, result = _lanczos_steps(
        matvec, v0, steps, reorthogonalize=reorthogonalize, restart=restart, generator=generator
    )
    alpha, beta, basis, *_ = result
    return alpha, beta, basis.clone()


def tridiagonal_eigh(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    r"""Eigen-decomposition :math:`T = S \Theta S^\top` of the symmetric tridiagonal matrix with diagonal
    ``alpha`` (``(m,)``) and off-diagonal ``beta`` (``(m - 1,)``), in float64.

    Returns:
        ``(theta, s)``: eigenvalues ascending ``(m,)`` and orthonormal eigenvectors as columns ``(m, m)``.
    """
    if alpha.dim() != 1 or beta.shape != (max(alpha.numel() - 1, 0),):
        raise ValueError(f"alpha must be (m,) and beta (m - 1,); got {tuple(alpha.shape)} and {tuple(beta.shape)}")
    alpha = alpha.to(torch.float64)
    beta = beta.to(torch.float64)
    t = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    return torch.linalg.eigh(t)


def _check_dim(dim: int, k: int) -> None:
    if dim < 1:
        raise ValueError(f"the operator dimension must be >= 1; got {dim}")
    if not 1 <= k <= dim:
        raise ValueError(f"k must be between 1 and the dimension {dim}; got {k}")


def _error_estimate(ritz: Tensor, residuals: Tensor, k: int) -> Tensor:
    r"""Estimated errors of the top-:math:`k` Ritz values ``ritz`` (all of them, descending).

    Note [residual stopping rule]: for a symmetric :math:`A` and a unit Ritz vector :math:`x` with Ritz value
    :math:`\theta` and residual :math:`r = \|Ax - \theta x\|`, some eigenvalue lies within :math:`r` of
    :math:`\theta` (Parlett, *The Symmetric Eigenvalue Problem*, Thm 4.5.1), and within :math:`r^2/\delta`
    when :math:`\delta` is the distance from :math:`\theta` to the rest of the spectrum (Thm 11.7.1, the
    gap theorem). :math:`\delta` is unknown; the distance to the nearest other Ritz value stands in for it,
    as in ARPACK-style Lanczos codes. It converges to the true gap, but early on it can overstate it: the
    quadratic bound is an estimate, which is why the rule is one of two heuristics, not a certificate.
    """
    if ritz.numel() < 2:
        return residuals
    estimates = residuals.clone()
    for i in range(k):
        others = torch.cat([ritz[:i], ritz[i + 1 :]])
        gap = (others - ritz[i]).abs().min()
        if gap > 0:
            estimates[i] = torch.minimum(residuals[i], residuals[i] ** 2 / gap)
    return estimates


def lanczos_eigsh(
    matvec: Matvec,
    dim: int,
    k: int = 1,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> EigshResult:
    r"""The :math:`k` largest (algebraic) eigenpairs of a symmetric operator by Lanczos.

    After step :math:`m` the Ritz values :math:`\theta_1 \ge \dots \ge \theta_k` are the top eigenvalues of
    :math:`T_m` (:func:`lanczos_tridiagonal`, full reorthogonalisation, restart on breakdown); they
    increase monotonically towards :math:`\lambda_1 \ge \dots \ge \lambda_k` (Cauchy interlacing). The
    Ritz vectors are :math:`Q_m^\top s_i`, with residual :math:`r_i = \|A x_i - \theta_i x_i\| =
    \beta_m |s_{m,i}|`, free to compute. The iteration stops at the first step :math:`m \ge k` where, for
    every :math:`i = 1, \dots, k`, either error estimate is below ``tol`` relative:

    * the residual estimate (Note [residual stopping rule]):
      :math:`\min(r_i,\ r_i^2/\hat\delta_i) \le \mathrm{tol}\cdot|\theta_i|`, with
      :math:`\hat\delta_i` the distance from :math:`\theta_i` to the nearest other Ritz value
      (only :math:`r_i` while :math:`T_m` has no other);
    * the change in one step (:math:`m > k`):
      :math:`|\theta_i^{(m)} - \theta_i^{(m-1)}| \le \mathrm{tol}\cdot|\theta_i^{(m)}|`;

    or after ``min(max_iter, dim)`` steps (``dim`` steps are exact up to rounding). Each step costs one
    product with the operator.

    Both rules are heuristics: a clustered or hidden eigenvalue can make the Ritz values stall with a small
    residual for a few steps. Use a small ``tol`` (or ``max_iter = dim``) where accuracy matters; the
    returned ``residuals`` bound the distance from each Ritz value to the nearest eigenvalue. A single starting
    vector sees one copy of a repeated eigenvalue: the other copies appear only once the Krylov space is
    exhausted (breakdown, then restart).

    Args:
        matvec: the operator (see :data:`Matvec`).
        dim: its dimension ``n``.
        k: number of eigenpairs.
        max_iter: maximum number of Lanczos steps (products with the operator), at least ``k``.
        tol: relative change of the Ritz values that stops the iteration.
        v0: starting vector (default: a random Gaussian vector).
        generator: random generator for the starting and restart vectors (drawn on the CPU, then moved).
        device: device of the vectors when ``v0`` is not given.

    Example:
        >>> a = torch.diag(torch.tensor([3.0, -5.0, 1.0, 2.0], dtype=torch.float64))
        >>> [round(x, 8) for x in lanczos_eigsh(lambda v: a @ v, 4, k=2, tol=1e-12).eigenvalues.tolist()]
        [3.0, 2.0]
    """
    _check_dim(dim, k)
    if max_iter < k:
        raise ValueError(f"max_iter must be >= k = {k}; got {max_iter}")
    if v0 is None:
        v0 = torch.randn(dim, generator=generator, dtype=torch.float64).to(device)
    steps = min(max_iter, dim)
    previous = None
    converged = False
    state = None
    for state in _lanczos_steps(matvec, v0, steps, reorthogonalize=True, restart=True, generator=generator):
        alpha, beta, _, residual, restarting = state
        if alpha.numel() < k:
            continue
        ritz, s = tridiagonal_eigh(alpha, beta)
        ritz, s = ritz.flip(0), s.flip(1)
        theta = ritz[:k]
        # The floor keeps an exactly zero top-k eigenvalue from defeating the relative test.
        limit = tol * theta.abs().clamp_min(1e-10 * theta.abs().max())
        # After a breakdown the residuals vanish, yet a larger eigenvalue may lie outside the subspace found.
        settled = torch.zeros(k, dtype=torch.bool, device=theta.device)
        if not restarting:
            settled |= _error_estimate(ritz, residual * s[-1, :k].abs(), k) <= limit
        if previous is not None:
            settled |= (theta - previous).abs() <= limit
        if bool(settled.all()):
            converged = True
            break
        previous = theta
    alpha, beta, basis, residual, _ = state
    m = alpha.numel()
    converged = converged or m == dim or bool(residual == 0)
    theta, s = tridiagonal_eigh(alpha, beta)
    theta, s = theta.flip(0)[:k], s.flip(1)[:, :k]
    vectors = (basis.T @ s).T
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    logger.debug("lanczos_eigsh: %d steps, converged=%s, top Ritz values %s", m, converged, theta.tolist())
    return EigshResult(theta, vectors, m, converged, residual * s[-1].abs())


def power_eigsh(
    matvec: Matvec,
    dim: int,
    k: int = 1,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> EigshResult:
    r"""The :math:`k` largest (algebraic) eigenpairs of a symmetric operator by power iteration with deflation.

    Eigenpair :math:`i` is the dominant one of the deflated, shifted operator

    .. math::
        A_i = A + c I - \sum_{j < i} (\lambda_j + c)\, x_j x_j^\top,

    iterating :math:`x \leftarrow A_i x/\|A_i x\|` until the residual of the Rayleigh quotient
    :math:`\mu = x^\top A_i x` is small, :math:`\|A_i x - \mu x\| \le` ``tol`` :math:`\max(|\mu|, |\lambda_1 + c|)`
    (then an eigenvalue of :math:`A_i` lies within that distance of :math:`\mu`), or ``max_iter`` products; then
    :math:`\lambda_i = \mu - c`. The
    shift starts at :math:`c = 0`; if the dominant eigenvalue found is negative, the largest algebraic one
    was not dominant, so :math:`c` is set to its magnitude (an upper bound on :math:`-\lambda_{\min}`), which
    makes :math:`A_i` positive semi-definite, and the pair is searched again. Convergence is linear with
    ratio :math:`|\lambda_{i+1} + c| / |\lambda_i + c|`: use it on well-separated spectra, or prefer
    :func:`lanczos_eigsh`.

    Args:
        matvec, dim, k, generator, device: as for :func:`lanczos_eigsh`.
        max_iter: maximum number of iterations per eigenpair (and per shift).
        tol: relative residual that stops the iteration for one eigenpair.
        v0: starting vector of the first eigenpair (default: a random Gaussian vector); later pairs, and the
            first after a shift, start from random vectors.

    Example:
        >>> a = torch.diag(torch.tensor([3.0, -5.0, 1.0], dtype=torch.float64))
        >>> [round(x, 6) for x in power_eigsh(lambda v: a @ v, 3, k=1, max_iter=500, tol=1e-14).eigenvalues.tolist()]
        [3.0]
    """
    _check_dim(dim, k)
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1; got {max_iter}")
    values: list[float] = []
    vectors: list[Tensor] = []
    residuals: list[Tensor] = []
    shift = 0.0
    count = 0
    converged = True

    def deflated(x: Tensor, found: Tensor | None) -> tuple[Tensor, Tensor]:
        ax = _apply(matvec, x)
        y = ax + shift * x
        if found is not None:
            y = y - found.T @ ((torch.tensor(values, dtype=torch.float64, device=x.device) + shift) * (found @ x))
        return y, ax

    if v0 is not None:
        if v0.numel() != dim or not bool(torch.isfinite(v0).all()) or not bool((v0 != 0).any()):
            raise ValueError(f"v0 must be a finite, nonzero vector of {dim} entries")
        device = v0.device
    while len(values) < k:
        found = torch.stack(vectors) if vectors else None
        if v0 is not None and not values and shift == 0.0:
            x = v0.detach().reshape(-1).to(torch.float64)
        else:
            x = torch.randn(dim, generator=generator, dtype=torch.float64).to(device)
        if found is not None:
            x = _orthogonalise(x, found)
        x = x / x.norm()
        ok = False
        for _ in range(max_iter):
            y, ax = deflated(x, found)
            count += 1
            mu = torch.dot(x, y).item()
            norm = y.norm()
            if norm == 0:  # x spans the null space of the deflated operator: nothing left above it
                ok = True
                break
            # Stop on the residual: for a symmetric operator some eigenvalue lies within ||y - mu x|| of mu. Later
            # pairs inherit the deflation error of earlier ones, so their residual is measured against the
            # operator's scale (the first eigenvalue found), not their own, possibly much smaller, eigenvalue.
            scale = max(abs(mu), abs(values[0] + shift)) if values else abs(mu)
            if torch.linalg.vector_norm(y - mu * x) <= tol * scale:
                ok = True
                break
            x = y / norm
            if found is not None:
                x = _orthogonalise(x, found)
                x = x / x.norm()
        if not ok:  # x moved after the last product: evaluate it once more
            y, ax = deflated(x, found)
            count += 1
            mu = torch.dot(x, y).item()
        value = mu - shift
        if value < 0 and shift == 0.0 and dim > len(values) + 1:
            # Dominant but negative: the largest algebraic eigenvalue lies above it; shift and redo this pair.
            shift = abs(value)
            continue
        converged = converged and ok
        values.append(value)
        vectors.append(x)
        residuals.append((ax - value * x).norm())
    order = torch.argsort(torch.tensor(values, dtype=torch.float64), descending=True)
    eigenvalues = torch.tensor(values, dtype=torch.float64)[order].to(vectors[0].device)
    logger.debug("power_eigsh: %d products, converged=%s, values %s", count, converged, eigenvalues.tolist())
    return EigshResult(
        eigenvalues, torch.stack(vectors)[order.to(vectors[0].device)], count, converged, torch.stack(residuals)
    )


def lanczos_quadrature(matvec: Matvec, v0: Tensor, num_steps: int) -> tuple[Tensor, Tensor]:
    r"""Gauss quadrature of the spectral measure of :math:`A` seen from :math:`v = v_0/\|v_0\|`.

    With :math:`T_m = S\,\mathrm{diag}(\theta)\,S^\top` from ``num_steps`` Lanczos steps started at
    :math:`v`, the nodes are :math:`\theta_i` and the weights :math:`\tau_i = S_{1i}^2` (they sum to 1), and

    .. math:: \sum_i \tau_i\, p(\theta_i) = v^\top p(A)\, v

    exactly for every polynomial of degree :math:`\le 2m - 1` (Golub and Meurant 2010, ch. 6). A breakdown
    (invariant subspace) ends the process early: the rule is then exact for all polynomials.

    Returns:
        ``(nodes, weights)``: float64 ``(m,)`` each, ``m <= num_steps``.
    """
    alpha, beta, _ = lanczos_tridiagonal(matvec, v0, num_steps, reorthogonalize=True, restart=False)
    theta, s = tridiagonal_eigh(alpha, beta)
    return theta, s[0] ** 2


def stochastic_lanczos_quadrature(
    matvec: Matvec,
    dim: int,
    num_runs: int = 10,
    num_steps: int = 50,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Stochastic Lanczos quadrature of the spectral density (Ghorbani, Krishnan and Xiao, ICML 2019).

    The spectral density :math:`\phi(t) = \frac1n \sum_{i=1}^n \delta(t - \lambda_i)` satisfies
    :math:`\int f\,d\phi = \frac1n \operatorname{tr} f(A) = \mathbb E_v[v^\top f(A) v]` for
    :math:`v = z/\sqrt n`, :math:`z` Rademacher. Each run replaces the expectation by one such :math:`v`
    and :math:`v^\top f(A) v` by :func:`lanczos_quadrature`; averaging ``num_runs`` runs gives

    .. math:: \hat\phi = \frac{1}{R} \sum_{r=1}^{R} \sum_{i=1}^{m} \tau_i^{(r)} \delta(t - \theta_i^{(r)}).

    Its moments of order :math:`p \le 2m - 1` are unbiased estimates of :math:`\operatorname{tr}(A^p)/n`
    (the first one is Hutchinson's trace estimate divided by :math:`n`).

    Args:
        matvec, dim: the operator and its dimension.
        num_runs: number of random starting vectors :math:`R`.
        num_steps: Lanczos steps per run :math:`m` (at most ``dim``).
        generator: random generator for the starting vectors (drawn on the CPU, then moved).
        device: device of the vectors.

    Returns:
        ``(nodes, weights)``: float64 ``(R, m)``; runs that broke down early are padded with zero weights.
        Smooth them with :func:`gaussian_density`.
    """
    if num_runs < 1:
        raise ValueError(f"num_runs must be >= 1; got {num_runs}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    steps = min(num_steps, dim)
    nodes = torch.zeros(num_runs, steps, dtype=torch.float64, device=device)
    weights = torch.zeros_like(nodes)
    for r in range(num_runs):
        theta, tau = lanczos_quadrature(matvec, rademacher(dim, generator=generator, device=device), steps)
        nodes[r, : theta.numel()] = theta
        weights[r, : tau.numel()] = tau
    return nodes, weights


def gaussian_density(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    r"""Smooth a discrete spectral measure with a Gaussian kernel of width :math:`\sigma`:

    .. math:: \hat\phi_\sigma(t) = \frac1R \sum_{r,i} \tau_i^{(r)}
        \frac{1}{\sigma\sqrt{2\pi}} \exp\Big(-\frac{(t - \theta_i^{(r)})^2}{2\sigma^2}\Big).

    It integrates to 1 over the real line (to ~1 over a grid reaching a few :math:`\sigma` past the extreme
    nodes) and has the same mean as the discrete measure.

    Args:
        nodes, weights: ``(R, m)`` (or ``(m,)``) as returned by :func:`stochastic_lanczos_quadrature`.
        grid: 1-D points :math:`t` where the density is evaluated.
        sigma: kernel width, > 0.

    Returns:
        Float64 tensor shaped like ``grid``.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    if nodes.shape != weights.shape:
        raise ValueError(
            f"nodes and weights must have the same shape; got {tuple(nodes.shape)} and {tuple(weights.shape)}"
        )
    nodes = nodes.to(torch.float64).reshape(-1, nodes.shape[-1])
    weights = weights.to(torch.float64).reshape(nodes.shape)
    grid64 = grid.to(dtype=torch.float64, device=nodes.device)
    z = (grid64.reshape(-1, 1) - nodes.reshape(1, -1)) / sigma
    kernel = torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2.0 * math.pi))
    density = kernel @ weights.reshape(-1) / nodes.shape[0]
    return density.reshape(grid.shape)
