r"""Spectral norm of dense matrices: exact, Gram-iteration upper bound, power-iteration lower estimate.

Pure tensor math: no module state, no I/O. Everything here works on a batch of matrices ``(..., m, n)``,
real or complex, on the device of its input.

Which one to use:

* :func:`gram_iteration` is a **guaranteed upper bound** on :math:`\sigma_1` (the value is a Schatten
  :math:`p`-norm with :math:`p = 2^{T+1}`), differentiable with plain autograd. Certificates use
  :func:`spectral_norm_upper_bound`, which runs it in float64 and adds a rounding slack.
* :func:`power_iteration` **converges from below**: a lower estimate for normalising during training,
  never for certifying.
* :func:`spectral_norm_exact` is the SVD, the reference in tests.

:func:`gram_iteration_max` bounds the largest norm in a batch with the scheduler of
:mod:`stablenet.spectral.lockstep`, which also bounds many batches at once (:func:`gram_iteration_max_many`,
:class:`MatrixSource`, :data:`LOCKSTEP_MEMORY_BYTES`, re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from stablenet.spectral.lockstep import (
    LOCKSTEP_MEMORY_BYTES,
    MatrixSource,
    _gram_max_many,
    _gram_side_scaled,
    gram_iteration_max_many,
)

__all__ = [
    "GRAM_ROUNDING_SLACK",
    "LOCKSTEP_MEMORY_BYTES",
    "MatrixSource",
    "Operator",
    "gram_iteration",
    "gram_iteration_amax",
    "gram_iteration_max",
    "gram_iteration_max_many",
    "operator_matrix",
    "power_iteration",
    "spectral_norm_exact",
    "spectral_norm_upper_bound",
]

#: Relative slack added to float64 Gram bounds used to certify. The bound equals a Schatten norm, which
#: may coincide with :math:`\sigma_1` (rank-one matrices); float64 rounding of ``T`` squarings of an
#: ``n x n`` matrix perturbs it by roughly ``n * T * 2**-52`` relatively, far below this slack for any
#: matrix we handle (``n <= 1e5``, ``T <= 12``). Tested in ``tests/spectral/test_dense.py``.
GRAM_ROUNDING_SLACK = 1e-9

#: A matrix, or a ``(matvec, rmatvec)`` pair applying a linear operator and its adjoint.
Operator = Tensor | tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]


def spectral_norm_exact(weight: Tensor) -> Tensor:
    """Largest singular value by SVD, batched over leading dimensions."""
    return torch.linalg.matrix_norm(weight, ord=2)


def operator_matrix(
    matvec: Callable[[Tensor], Tensor],
    input_shape: tuple[int, ...],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    max_entries: int = 1 << 24,
) -> Tensor:
    """The explicit ``(output numel, input numel)`` matrix of a linear ``matvec``, from the identity basis."""
    d_in = math.prod(input_shape)
    eye = torch.eye(d_in, dtype=dtype or torch.get_default_dtype(), device=device)
    columns = torch.stack([matvec(e.reshape(input_shape)).reshape(-1) for e in eye], dim=1)
    if columns.numel() > max_entries:
        raise ValueError(f"the explicit operator has {tuple(columns.shape)} entries, over the limit {max_entries}")
    return columns


def gram_iteration(
    weight: Tensor | Operator,
    n_iter: int = 6,
    *,
    detach_normalizers: bool = True,
    tol: float | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> Tensor:
    r"""Upper bound on the spectral norm by Gram iteration (Delattre et al., ICML 2023, arXiv 2305.16173).

    With :math:`G_0 = W` and :math:`s_0 = 0`, each step rescales and squares:

    .. math::
        c_t = \|G_{t-1}\|_F,\quad G_t = (G_{t-1}/c_t)^H (G_{t-1}/c_t),\quad s_t = 2(s_{t-1} + \log c_t),

    and the bound is :math:`\hat\sigma = \|G_T\|_F^{2^{-T}} \exp(2^{-T} s_T)`. Without rescaling
    :math:`G_T = (W^H W)^{2^{T-1}}`, so :math:`\hat\sigma = \|W\|_{S_p}` with :math:`p = 2^{T+1}`, which
    satisfies :math:`\sigma_1 \le \hat\sigma \le \mathrm{rank}^{1/p}\sigma_1`. The rescaling only prevents
    overflow. The Gram side is the smaller of ``m, n``.

    Args:
        weight: ``(..., m, n)`` real or complex matrices, or a ``(matvec, rmatvec)`` operator pair with
            ``input_shape``: Gram iteration squares the matrix, so the operator is materialised first
            (small operators only; :func:`operator_matrix`).
        n_iter: number of squarings ``T >= 1``.
        detach_normalizers: detach the rescaling factors ``c_t`` from autograd (exact, as the value is
            1-homogeneous in ``W``; cheaper backward).
        tol: adaptive mode: ``n_iter`` is then the maximum, and the iteration stops once the largest bound in
            the batch decreased by less than ``tol`` (relative) in one step. The excess over
            :math:`\sigma_1` roughly halves each step, so it ends close to ``tol``. Every iterate is an upper
            bound, so stopping early never breaks the guarantee.

    Returns:
        Real tensor of shape ``(...)``: the bound, in the dtype of ``weight`` (its real counterpart).

    Example:
        >>> w = torch.randn(50, 30, dtype=torch.float64)
        >>> bool(gram_iteration(w) >= torch.linalg.matrix_norm(w, 2))
        True
    """
    if not isinstance(weight, Tensor):
        if input_shape is None:
            raise ValueError("an operator pair needs input_shape for the Gram iteration")
        weight = operator_matrix(weight[0], tuple(input_shape), dtype=torch.float64)
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dimensions (..., m, n); got shape {tuple(weight.shape)}")
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1; got {n_iter}")
    g, peak = _gram_side_scaled(weight)
    log_scale = torch.zeros(peak.shape, dtype=peak.dtype, device=weight.device)
    previous = None
    for t in range(1, n_iter + 1):
        c = torch.linalg.matrix_norm(g, ord="fro")
        if detach_normalizers:
            c = c.detach()
        # An all-zero matrix has norm 0: keep it at 0 instead of dividing by zero.
        c = torch.where(c > 0, c, torch.ones_like(c))
        g = g / c[..., None, None].to(g.dtype)
        g = g.mH @ g
        log_scale = 2.0 * (log_scale + torch.log(c))
        if tol is not None:
            bound = _gram_value(g, log_scale, t) * peak
            current = float(bound.detach().amax()) if bound.numel() else 0.0
            if previous is not None and previous - current <= tol * current:
                return bound
            previous = current
    return _gram_value(g, log_scale, n_iter) * peak


def gram_iteration_max(weight: Tensor, max_iter: int = 14, *, tol: float = 1e-5) -> Tensor:
    r"""Upper bound on the largest spectral norm in a batch of matrices: adaptive Gram iteration with pruning.

    The same iterates as :func:`gram_iteration` on every matrix of the batch, with two additions
    (Note [Gram pruning] in ``stablenet.spectral.lockstep``, which runs it):

    * from step ``FIRST_CHECK`` on, a **lower estimate** per matrix, :math:`\ell = (\|G_t x\|/\|x\|)^{2^{-t}}`
      (rescaled), with :math:`x` the column of :math:`G_t` through its largest diagonal entry:
      :math:`\|G_t\| \ge \|G_t x\|/\|x\|` for any :math:`x`, and :math:`\|G_t\|^{2^{-t}} = \sigma_1` up to
      the rescaling. It is one power step on :math:`G_t`, i.e. :math:`2^t` steps on :math:`W^H W`, so it is
      tight within a few iterations;
    * a matrix whose upper bound :math:`u` is below ``(1 - PRUNE_MARGIN) * max(ell)`` cannot hold the maximum
      (its :math:`\sigma_1 \le u < \max \ell \le \max \sigma_1`), so it leaves the batch. On the circular
      spectra of ResNet-18's convolutions, after 4 to 6 full steps only a few frequencies remain.

    The iteration stops once ``max(u) <= (1 + tol) * max(ell)``, which guarantees the bound is within ``tol``
    of the exact maximum (up to rounding), or once ``max(u)`` changed by at most ``tol`` (relative) in one step
    (a repeated top singular value, where :math:`u` converges slowly), or after ``max_iter`` steps.

    Args:
        weight: ``(..., m, n)`` real or complex matrices, at least one.
        max_iter: the most squarings.
        tol: the relative tightness to stop at.

    Returns:
        A 0-dim real tensor in the dtype of ``weight`` (its real counterpart), differentiable in ``weight``
        (the rescalings are detached, as in :func:`gram_iteration`); it equals the maximum over the batch of
        :func:`gram_iteration` at the step it stopped, up to rounding.

    Example:
        >>> w = torch.randn(6, 20, 10, dtype=torch.float64)
        >>> bound = gram_iteration_max(w)
        >>> exact = torch.linalg.matrix_norm(w, 2).max()
        >>> bool(exact <= bound <= exact * (1 + 1e-5))
        True
    """
    dtype = weight.real.dtype if weight.is_complex() else weight.dtype
    with torch.no_grad():
        (problem,) = _gram_max_many([weight.detach()], max_iter, tol)
    top = torch.tensor(problem.top, dtype=dtype, device=weight.device)
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return top
    # Note [gradient of the maximum]
    # The result is the bound of one matrix, the kept argmax, at the step the iteration stopped; its gradient is
    # that matrix's Gram bound's gradient (a subgradient of the maximum where several tie). So the batch iterates
    # without autograd, and only that matrix is iterated again, with it: the backward costs one matrix, not the
    # batch (a 128-channel convolution's circular spectrum holds 612 matrices), and nothing of the batch is kept
    # for it. The value stays the batch's (`top + (b - b) = top` exactly); b equals it up to rounding.
    single = gram_iteration(weight.reshape(-1, *weight.shape[-2:])[problem.argmax], problem.steps)
    return top + (single - single.detach())


def gram_iteration_amax(weight: Tensor, n_iter: int) -> Tensor:
    """``gram_iteration(weight, n_iter).amax()`` with the backward of one matrix (Note [gradient of the maximum]).

    The batch is iterated without autograd, then only its argmax matrix again with it. The argmax is found and
    selected on the device, with no host synchronisation (so a CUDA graph can capture it). The value is the batched
    one exactly; the gradient is that of the argmax matrix's bound (a subgradient of the maximum where matrices
    tie), as for autograd through the whole batch.

    Example:
        >>> w = torch.randn(6, 20, 10, dtype=torch.float64, requires_grad=True)
        >>> bool(gram_iteration_amax(w, 4) == gram_iteration(w, 4).amax())
        True
    """
    with torch.no_grad():
        bounds = gram_iteration(weight, n_iter).reshape(-1)
    top = bounds.amax()
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return top
    flat = weight.reshape(-1, *weight.shape[-2:])
    single = gram_iteration(flat.index_select(0, bounds.argmax().reshape(1)), n_iter)[0]
    return top + (single - single.detach())


def _gram_value(g: Tensor, log_scale: Tensor, n_iter: int) -> Tensor:
    exponent = 2.0**-n_iter
    return torch.linalg.matrix_norm(g, ord="fro").pow(exponent) * torch.exp(log_scale * exponent)


def spectral_norm_upper_bound(weight: Tensor, n_iter: int = 8) -> Tensor:
    """A certified upper bound on the spectral norm: Gram iteration in float64 times ``1 + slack``.

    The value is never below the float64 SVD of ``weight`` (see :data:`GRAM_ROUNDING_SLACK`). It is
    computed without gradient; use :func:`gram_iteration` inside a training graph.
    """
    with torch.no_grad():
        w64 = weight.detach().to(torch.complex128 if weight.is_complex() else torch.float64)
        return gram_iteration(w64, n_iter) * (1.0 + GRAM_ROUNDING_SLACK)


def power_iteration(
    operator: Operator,
    n_iter: int = 100,
    *,
    u: Tensor | None = None,
    v: Tensor | None = None,
    input_shape: tuple[int, ...] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Power iteration on :math:`A^H A`: a **lower estimate** of :math:`\sigma_1`. Never certify with it.

    .. math:: u \leftarrow Av/\|Av\|,\quad v \leftarrow A^H u/\|A^H u\|,\quad \hat\sigma = \|A v\|.

    Args:
        operator: a matrix ``(m, n)`` or a pair ``(matvec, rmatvec)`` of functions applying :math:`A` and
            :math:`A^H` to a single vector (or tensor of ``input_shape``).
        n_iter: iterations.
        u, v: persistent state from a previous call (warm start). ``v`` has the input shape.
        input_shape: shape of an input for an operator pair without ``v``.
        generator: random generator for the initial ``v`` (drawn on the CPU, then moved).
        device, dtype: of the initial ``v`` for an operator pair without ``v`` (default: torch's defaults).

    Returns:
        ``(sigma, u, v)``: the estimate (a scalar tensor, :math:`\le \sigma_1` up to rounding), and the
        state to pass back next time.
    """
    if isinstance(operator, Tensor):
        if operator.dim() != 2:
            raise ValueError(f"matrix must be 2-D; got shape {tuple(operator.shape)}")
        mat = operator
        matvec, rmatvec = (lambda x: mat @ x), (lambda y: mat.mH @ y)
        shape, dtype, device = (mat.shape[1],), mat.dtype, mat.device
    else:
        matvec, rmatvec = operator
        if v is None and input_shape is None:
            raise ValueError("an operator pair needs v or input_shape to start the power iteration")
        shape = tuple(v.shape) if v is not None else tuple(input_shape)
        dtype = v.dtype if v is not None else (dtype or torch.get_default_dtype())
        device = v.device if v is not None else device
    if v is None:
        v = torch.randn(shape, dtype=dtype, device="cpu", generator=generator).to(device)
    v = v / v.norm().clamp_min(torch.finfo(v.real.dtype).tiny)
    with torch.no_grad():
        for _ in range(n_iter):
            u = matvec(v)
            u = u / u.norm().clamp_min(torch.finfo(u.real.dtype).tiny)
            v = rmatvec(u)
            v = v / v.norm().clamp_min(torch.finfo(v.real.dtype).tiny)
        av = matvec(v)
        sigma = av.norm()
        u = av / sigma.clamp_min(torch.finfo(av.real.dtype).tiny)
    return sigma, u, v
