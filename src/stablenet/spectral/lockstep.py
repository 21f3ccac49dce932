r"""The lockstep Gram iteration: the largest spectral norm of each of many batches of matrices, on one device.

:func:`gram_iteration_max_many` bounds a whole network's convolutions at once (their circular spectra, one batch
of matrices per convolution, from :func:`stablenet.spectral.conv.conv_spectral_norm_upper_bounds`), and
:func:`stablenet.spectral.dense.gram_iteration_max` one batch. Each matrix takes the Gram iteration of
:func:`stablenet.spectral.dense.gram_iteration`; this module schedules the batches:

* the batches advance **in lockstep**, the matrices of one Gram shape in one group, with one device-to-host copy
  per checked step for all of them (Note [lockstep Gram]);
* matrices that cannot hold their batch's maximum are **pruned** (Note [Gram pruning]), and the iterates are
  rescaled only every few steps (Note [sparse rescaling]);
* batches join under a **memory budget**, and a :class:`MatrixSource` lets a batch be produced a range at a time
  instead of existing whole (Note [lockstep memory]).

No value depends on the schedule: each matrix takes the same arithmetic in any group. Pure tensor math on the
device of the inputs, with no module state and no I/O.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

__all__ = ["LOCKSTEP_MEMORY_BYTES", "MatrixSource", "gram_iteration_max_many"]

# Note [lockstep memory]
# A batch's iterates exist from its first squaring until it stops, so running all of a network's convolutions
# in lockstep holds all their spectra at once: 1.9 GB of Gram matrices for ResNet-18 at ImageNet sizes, and a
# 5.5 GB peak on an H200 when the spectra were built whole, copied into one tensor per shape and kept as inputs.
# Now:
# (1) Nothing holds a batch's input matrices. A MatrixSource writes its Gram matrices straight into the group's
#     buffer (stablenet.spectral.conv: Note [lockstep from the Gram kernel]), or produces its matrices
#     BUILD_CHUNK_BYTES at a time, each range scaled and multiplied into its slot (G_1 = A^H A on the smaller
#     side, so a tall batch never exists whole).
# (2) The rescaling divides in place, and a group holds at most GROUP_BYTES (unless one batch is larger), so the
#     transient of a squaring, its output and possibly a copy of its conjugated operand (the CPU's batched
#     GEMM makes one), is at most twice that.
# (3) A batch joins the lockstep (is admitted) only while the running groups' iterates, the new groups' and
#     twice the largest group fit in max_memory_bytes. Waiting batches are admitted at the start and after each
#     check, once pruned or finished batches have freed their iterates, widest Gram side first: wide layers take
#     the most steps, and narrow layers with many frequencies are pruned to a few percent at their first check.
#     A batch admitted late starts at step 1 and is first checked FIRST_CHECK - 1 rounds later, so a binding
#     budget costs device-to-host copies: the ResNet-18 bound takes 9 checked rounds at the default budget
#     instead of 6 with none.
# No value depends on the budget: each matrix takes the same arithmetic in any group (tested).

#: Default memory budget of the lockstep iterates (Note [lockstep memory]).
LOCKSTEP_MEMORY_BYTES = 7 * 2**28  # 1.75 GiB

#: Largest group of the lockstep (unless one batch is larger): a squaring's transient memory is about twice it.
GROUP_BYTES = 256 * 2**20

#: Size of the ranges in which a batch's input matrices are read when its first Gram matrices are formed.
BUILD_CHUNK_BYTES = 64 * 2**20


def gram_iteration_max_many(
    weights: Sequence[Tensor | MatrixSource],
    max_iter: int = 14,
    *,
    tol: float = 1e-5,
    max_memory_bytes: int | None = LOCKSTEP_MEMORY_BYTES,
) -> list[float]:
    """:func:`~stablenet.spectral.dense.gram_iteration_max` of several batches at once, as floats (no gradient).

    The batches advance in lockstep and share one device-to-host copy per checked step, so on a GPU the
    kernels of all of them queue back to back (Note [lockstep Gram]). A whole network's convolutions are
    bounded this way by :func:`stablenet.spectral.conv.conv_spectral_norm_upper_bounds`.

    Args:
        weights: batches of matrices ``(..., m, n)``, or :class:`MatrixSource` objects that produce them a range
            at a time (so that no batch needs to exist whole).
        max_iter, tol: as in :func:`~stablenet.spectral.dense.gram_iteration_max`.
        max_memory_bytes: the budget of the iterates (Note [lockstep memory]): a batch joins the lockstep only
            once the iterates already running, its own and twice the largest group (a squaring's transient) fit
            in it; a batch that alone exceeds it runs alone. ``None``: every batch from the first step.
    """
    with torch.no_grad():
        states = _gram_max_many(list(weights), max_iter, tol, max_memory_bytes=max_memory_bytes)
    return [s.top for s in states]


# Note [Gram pruning]
# Dropping a matrix never lowers the result below the true maximum. A matrix B dropped at step t has
# sigma(B) <= u_t(B) < max_A ell_t(A) <= sigma(A*) for the matrix A* holding that lower estimate, which is
# kept at step t (u_t(A*) >= ell_t(A*)). If A* is dropped later, the same holds with a larger sigma, so by
# induction some kept matrix has sigma >= sigma(B), and the result (the largest upper bound of the kept
# matrices, each >= its own sigma) is >= sigma(B). Rounding could only break this if it moved u or ell by more
# than PRUNE_MARGIN relatively. Without rounding the result equals the unpruned maximum: the Gram bound of
# each matrix decreases with t, so a dropped matrix's final bound would have been below the kept maximum.

#: Relative margin of the pruning test of :func:`_gram_max_many`: a matrix is dropped only when its bound
#: is below ``1 - PRUNE_MARGIN`` times another matrix's lower estimate. Far above the float64 rounding of either
#: value (about ``n * T * 2**-52``), so rounding cannot drop the maximum of a certified (float64) bound; in
#: float32, where the bounds are estimates and not certificates, the margin is about ``n * 2**-24`` for n <= 800.
PRUNE_MARGIN = 1e-4

# Note [sparse rescaling]
# The lockstep iteration divides its iterates by their Frobenius norm only at steps 1, 1 + R, 1 + 2R, ...
# (R = RESCALE_EVERY) and records c_s = 1 at the others: the bound's formula is unchanged, and the division is a
# full pass over the batch (7.8 of the 55 ms of device time of the ResNet-18 bound on an H200). Nothing can
# overflow or underflow in between: right after a rescaling the iterate has Frobenius norm f = 1, and a squaring
# maps f to f' with f^2 / n <= f' <= f^2 (||G^H G||_F <= ||G||_F^2, and >= ||G||_2^2 >= ||G||_F^2 / n for an
# n x n Gram side), so the squaring after a rescaling and the R - 1 unscaled ones keep f within
# [n^(1 - 2^R), 1]: [n^-15, 1] for R = 4 (2e-41 for n = 512), far inside float64's range for any n < 10^20.
# In float32 (uncertified estimates) R is lowered until n^(1 - 2^R) stays 2^60 above the smallest normal number
# (R = 3 for n = 512). The norm itself is only computed when a rescaling or a check reads it.

#: Most squarings between two rescalings of the lockstep iterates (Note [sparse rescaling]).
RESCALE_EVERY = 4


def _rescale_every(n: int, dtype: torch.dtype) -> int:
    floor = math.log(torch.finfo(dtype).tiny) + 60 * math.log(2)
    for r in range(RESCALE_EVERY, 1, -1):
        if (1 - 2**r) * math.log(max(n, 2)) > floor:
            return r
    return 1


#: First step at which :func:`_gram_max_many` computes its lower estimates (before it, nothing can stop or be
#: pruned on the spectra we measured, and each check costs a device-to-host copy).
FIRST_CHECK = 4


class MatrixSource(Protocol):
    r"""A batch of ``count`` matrices of ``shape`` ``(m, n)`` that :func:`gram_iteration_max_many` reads when the
    batch joins the lockstep: ``matrices(start, stop, out)`` returns matrices ``start`` to ``stop - 1``,
    ``(stop - start, m, n)``, written into ``out`` (contiguous, of that shape) where the source can.

    With ``gram = True`` the matrices are Hermitian Gram matrices :math:`H = A^H A` of matrices :math:`A` that
    are not formed, and the bound is on :math:`\sigma_1(A) = \|H\|^{1/2}`; such a source is read in one call
    (``start = 0``, ``stop = count``, ``out`` given).
    """

    count: int
    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    gram: bool

    def matrices(self, start: int, stop: int, out: Tensor | None = None) -> Tensor: ...


class _TensorSource:
    """A tensor ``(..., m, n)`` as a :class:`MatrixSource` (ranges are views)."""

    gram = False

    def __init__(self, weight: Tensor) -> None:
        if weight.dim() < 2 or weight.numel() == 0:
            raise ValueError(
                f"weight must be a non-empty batch of matrices (..., m, n); got shape {tuple(weight.shape)}"
            )
        self.flat = weight.reshape(-1, *weight.shape[-2:])
        self.count, self.shape = len(self.flat), tuple(weight.shape[-2:])
        self.dtype, self.device = weight.dtype, weight.device

    def matrices(self, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        return self.flat[start:stop]


class _Problem:
    """One input batch of :func:`_gram_max_many`: its batch size per step, last bound, and where it ended."""

    def __init__(self, source: MatrixSource) -> None:
        if source.count < 1 or min(source.shape) < 1 or (source.gram and source.shape[0] != source.shape[1]):
            raise ValueError(
                f"a batch needs at least one non-empty matrix, square if Gram; got {source.count} of {source.shape}"
            )
        self.source: MatrixSource | None = source  # dropped once its first Gram matrices are formed
        self.side = min(source.shape)
        self.key = (self.side, source.dtype, source.device)
        self.gram_bytes = source.count * self.side**2 * source.dtype.itemsize
        self.count = source.count
        self.sizes: list[int] = []
        self.previous: float | None = None
        self.top = math.nan  # the bound, computed on the host
        self.argmax = -1  # the index (in the flattened batch) of the matrix holding it
        self.steps = 0  # the squarings it took
        self.start = -1  # the round of the lockstep in which it took its first squaring


class _GramGroup:
    """The matrices of one Gram shape, dtype and device from the problems admitted in one round, iterated as one
    batch.

    Built at step 1: each problem's matrices are read a range at a time, oriented, scaled and multiplied into the
    group's buffer (Note [lockstep memory]). Per step the device squares, and rescales or takes Frobenius norms
    only where needed (Note [sparse rescaling]); the rescaling exponents and the bounds are computed on the host
    at each check (Note [lockstep Gram]). ``owner[i]`` is the problem of matrix ``i``.
    """

    def __init__(self, members: list[tuple[int, _Problem]], first_check: int) -> None:
        side, dtype, device = members[0][1].key
        real = _real_dtype(dtype)
        total = sum(problem.source.count for _, problem in members)
        self.g = torch.empty(total, side, side, dtype=dtype, device=device)
        self.peak = torch.empty(total, dtype=real, device=device)
        c = torch.empty(total, dtype=real, device=device)
        offset = 0
        for _, problem in members:
            source, problem.source = problem.source, None
            if source.gram:  # H = A^H A: G_1 = H / ||H||_F, i.e. c_1 = ||H||_F^(1/2) and no peak scaling
                rows = slice(offset, offset + source.count)
                h = source.matrices(0, source.count, out=self.g[rows])
                f = torch.linalg.vector_norm(h, dim=(-2, -1))
                f = torch.where(f > 0, f, torch.ones_like(f))  # an all-zero matrix stays 0
                h.div_(f[:, None, None])
                self.peak[rows], c[rows] = 1.0, f.sqrt()
                offset += source.count
                continue
            m, n = source.shape
            step = max(1, BUILD_CHUNK_BYTES // (m * n * dtype.itemsize))
            for start in range(0, source.count, step):
                stop = min(start + step, source.count)
                rows = slice(offset + start, offset + stop)
                a, self.peak[rows] = _gram_side_scaled(source.matrices(start, stop))
                c[rows] = torch.linalg.vector_norm(a, dim=(-2, -1)).clamp_min(torch.finfo(real).tiny)
                a.div_(c[rows, None, None])  # an all-zero matrix stays 0
                torch.matmul(a.mH, a, out=self.g[rows])
            offset += source.count
        self.owner = np.concatenate([np.full(problem.count, p) for p, problem in members])
        self.origin = np.concatenate([np.arange(problem.count) for _, problem in members])  # index in its problem
        self.rows = {p: np.flatnonzero(self.owner == p) for p, _ in members}
        self.cs: list[Tensor] = [c]  # the rescaling c_s of each step s, per kept matrix (1: none)
        self.t = 1
        self.first_check = first_check
        self.rescale_every = _rescale_every(side, real)
        self.frobenius = self._norms() if self._reads_norms() else None

    @property
    def nbytes(self) -> int:
        return self.g.numel() * self.g.element_size()

    def _reads_norms(self) -> bool:  # a check now or a rescaling next reads them
        return self.t >= self.first_check or self.t % self.rescale_every == 0

    def _norms(self) -> Tensor:
        return torch.linalg.vector_norm(self.g, dim=(-2, -1))

    def step(self) -> None:
        """One squaring; the rescaling only every ``rescale_every`` steps (Note [sparse rescaling])."""
        self.t += 1
        if (self.t - 1) % self.rescale_every == 0:
            c = self.frobenius.clamp_min(torch.finfo(self.frobenius.dtype).tiny)  # an all-zero matrix stays 0
            self.g.div_(c[:, None, None])
        else:
            c = torch.ones_like(self.peak)
        self.cs.append(c)
        self.g = self.g.mH @ self.g
        self.frobenius = self._norms() if self._reads_norms() else None

    def check_rows(self) -> Tensor:
        r"""``(3 + t, B)``: the Frobenius norms, the lower-estimate ratios, the peaks and every step's ``c``.

        The ratio :math:`\|G_t x\|/\|x\|` is at most :math:`\|G_t\|` for any ``x``; ``x`` is the column of
        :math:`G_t` (Hermitian positive semi-definite from step 1) with the largest diagonal entry, read without a
        pass over the matrix; near convergence :math:`G_t \approx \sigma^{2^t} vv^H` and it is the column of
        largest norm."""
        g = self.g
        column = g.diagonal(dim1=-2, dim2=-1).real.argmax(dim=-1)
        x = g.gather(-1, column[:, None, None].expand(-1, g.shape[-2], 1))
        length = torch.linalg.vector_norm(x, dim=(-2, -1))
        ratio = torch.linalg.vector_norm(g @ x, dim=(-2, -1)) / length.clamp_min(torch.finfo(length.dtype).tiny)
        return torch.stack([self.frobenius, ratio, self.peak, *self.cs])

    def keep(self, index: np.ndarray) -> None:
        self.owner, self.origin = self.owner[index], self.origin[index]
        self.rows = {p: np.flatnonzero(self.owner == p) for p in dict.fromkeys(self.owner.tolist())}
        if not len(index):
            self.g = self.g[:0]  # frees the iterates
            return
        device_index = torch.from_numpy(index).to(self.g.device)
        self.g, self.peak = self.g[device_index], self.peak[device_index]
        self.frobenius = self.frobenius[device_index]
        self.cs = [c[device_index] for c in self.cs]


def _host_bounds(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(upper, lower)`` per matrix from :meth:`_GramGroup.check_rows` (read back to the host, float64)."""
    frobenius, ratio, peak, cs = rows[0], rows[1], rows[2], rows[3:]
    t = len(cs)
    with np.errstate(divide="ignore"):  # log(0) = -inf for an all-zero matrix: its bounds are 0
        log_scale = (2.0 ** np.arange(t, 0, -1)) @ np.log(cs)  # s_t = sum_s 2^(t-s+1) log c_s
        upper = np.exp((np.log(frobenius) + log_scale) * 2.0**-t + np.log(peak))
        lower = np.exp((np.log(ratio) + log_scale) * 2.0**-t + np.log(peak))
    return upper, lower


def _admit(
    problems: list[_Problem], waiting: list[int], groups: list[_GramGroup], budget: int | None
) -> list[list[tuple[int, _Problem]]]:
    """The waiting problems that fit the budget now, taken in order, as the members of new groups: one Gram shape
    each, at most ``GROUP_BYTES`` unless a single problem is larger (Note [lockstep memory])."""
    live = sum(group.nbytes for group in groups)
    largest = max((group.nbytes for group in groups), default=0)
    admitted: list[list[tuple[int, _Problem]]] = []
    new_bytes: list[int] = []
    filling: dict[tuple, int] = {}  # Gram shape -> the new group being filled
    while waiting:
        problem = problems[waiting[0]]
        slot = filling.get(problem.key)
        if slot is None or new_bytes[slot] + problem.gram_bytes > GROUP_BYTES:
            slot = len(admitted)
        grown = (new_bytes[slot] if slot < len(admitted) else 0) + problem.gram_bytes
        squaring = 2 * max(largest, grown, *new_bytes)  # a squaring's output and a copy of its operand
        if (
            budget is not None
            and live + sum(new_bytes) + problem.gram_bytes + squaring > budget
            and (groups or admitted)
        ):
            break
        if slot == len(admitted):
            admitted.append([])
            new_bytes.append(0)
        admitted[slot].append((waiting.pop(0), problem))
        new_bytes[slot] = grown
        filling[problem.key] = slot
    return admitted


def _gram_max_many(
    weights: list[Tensor | MatrixSource], max_iter: int, tol: float, *, max_memory_bytes: int | None = None
) -> list[_Problem]:
    """The finished problems: ``top`` (the bound, computed on the host), ``argmax`` and ``steps`` (the matrix
    holding it and the squarings taken), ``sizes`` (batch size at each step), ``start`` (the round of its first
    step). Run it without autograd."""
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1; got {max_iter}")
    if max_memory_bytes is not None and max_memory_bytes < 1:
        raise ValueError(f"max_memory_bytes must be a positive number of bytes or None; got {max_memory_bytes}")
    problems = [_Problem(_TensorSource(w) if isinstance(w, Tensor) else w) for w in weights]
    first_check = min(FIRST_CHECK, max_iter)
    waiting = sorted(range(len(problems)), key=lambda p: -problems[p].side)  # wide ones take the most steps
    groups: list[_GramGroup] = []
    for round_ in itertools.count():
        if not groups and not waiting:
            return problems
        for group in groups:
            group.step()
        for members in _admit(problems, waiting, groups, max_memory_bytes):
            for _, problem in members:
                problem.start = round_
            groups.append(_GramGroup(members, first_check))
        for group in groups:
            for p, rows in group.rows.items():
                problems[p].sizes.append(len(rows))
        checked = [group for group in groups if group.t >= first_check]
        if not checked:
            continue
        # Note [lockstep Gram]
        # All problems advance together, the matrices of one shape (several convolutions of a network) in one
        # batch, and the check values of all come back in one device-to-host copy, which waits for the device;
        # the decisions below need them. The rescaling exponents and the bounds are computed on the host, so a
        # step costs four kernel launches per shape: on a GPU, launches and not arithmetic dominate small layers.
        blocks = [group.check_rows().to(torch.float64) for group in checked]
        height = max(b.shape[0] for b in blocks)  # 3 + t rows: groups admitted in different rounds differ
        padded = [torch.cat([b, b.new_ones(height - b.shape[0], b.shape[1])]) for b in blocks]
        host = torch.cat(padded, dim=1).cpu().numpy()
        offset = 0
        for group, block in zip(checked, blocks, strict=True):
            upper, lower = _host_bounds(host[: block.shape[0], offset : offset + block.shape[1]])
            offset += block.shape[1]
            keep = np.zeros(len(upper), dtype=bool)
            for p, rows in group.rows.items():
                problem = problems[p]
                top, floor = float(upper[rows].max()), float(lower[rows].max())
                stalled = problem.previous is not None and problem.previous - top <= tol * top
                if top <= (1.0 + tol) * floor or stalled or group.t == max_iter:
                    problem.top, problem.steps = top, group.t
                    problem.argmax = int(group.origin[rows[int(np.argmax(upper[rows]))]])
                    continue
                problem.previous = top
                keep[rows] = upper[rows] >= (1.0 - PRUNE_MARGIN) * floor
            if not keep.all():
                group.keep(np.flatnonzero(keep))
        groups = [group for group in groups if len(group.owner)]
    raise AssertionError("unreachable")


def _gram_side_scaled(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(g, peak)``: the matrices with the smaller Gram side last, divided by their largest entry ``peak``.

    The scaling keeps the first Frobenius norm from overflowing (the bound is 1-homogeneous); an all-zero
    matrix keeps ``peak = 1``. The first step of every Gram iteration, :func:`stablenet.spectral.dense.gram_iteration`
    included: it lives here because ``dense`` re-exports this module's public names, so this module cannot import
    ``dense``.
    """
    g = weight if weight.shape[-2] >= weight.shape[-1] else weight.mH
    peak = g.detach().abs().amax(dim=(-2, -1))
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    return g / peak[..., None, None].to(g.dtype), peak


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)
