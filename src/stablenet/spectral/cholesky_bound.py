r"""Circular convolution norms certified by Cholesky factorisations: tight, and fast on CPUs.

The circular convolution on :math:`N_1 \times N_2` pixels has norm
:math:`\max_\omega \sqrt{\lambda_{\max}(G(\omega))}` over the grid frequencies, with
:math:`G(\omega) = \hat K(\omega)^H \hat K(\omega)` on the smaller channel side. Instead of an eigensolver per
frequency (a tridiagonal reduction, :math:`\tfrac{4}{3}c^3` complex multiply-adds) we *verify* one level
:math:`s`: the Cholesky factorisation of :math:`sI - G(\omega)` exists iff :math:`\lambda_{\max}(G(\omega)) < s`,
and costs :math:`\tfrac{1}{3}c^3`. The level comes from cheap estimates:

1. :math:`G(\omega) = \sum_\delta H_\delta e^{i\langle\omega,\delta\rangle}` with :math:`H_\delta =
   \sum_{u-v=\delta} A_u^\top A_v` the Gram kernel (:math:`A_u` the kernel's tap matrices): one set of real
   GEMMs for all frequencies, then a small DFT as one complex GEMM, for the frequencies of the half spectrum only
   (:math:`G(-\omega) = \overline{G(\omega)}` has the same eigenvalues). Any batch of :math:`G(\omega)` is
   recomputed from :math:`H` on demand, so only one batch is held at a time.
2. The frequencies are ranked by :math:`\mathrm{tr}\,G(\omega)` (free), the best-ranked are probed by a long
   Lanczos run (a lower estimate of their top eigenvalue :math:`\theta`), and :math:`s = (1 + 2\,\text{rtol})
   \theta`. Every frequency is verified by ``cholesky_ex`` at :math:`s` (with at most 128 channels, first in
   complex64 at a level lowered by the single-precision error terms: Note [single-precision screen]).
3. The frequencies that fail are ranked by short Lanczos runs and the best are probed (2, 4, 8 ... in successive
   rounds), the level is raised, and only they are factorised again.

The result is within ``rtol`` of the exact circular norm (plus rounding) and never below it.

# Note [verified rounding]
Every floating-point step is bounded, with :math:`u = 2^{-53}` and :math:`\gamma_n = nu/(1-nu)`:

* :math:`\hat G(\omega)` differs from :math:`G(\omega)` entrywise by at most
  :math:`2\gamma_m\,(\bar A^\top \bar A)` with :math:`\bar A = \sum_u |A_u|` and :math:`m = c_o + T + 2D + 128`
  (a dot product of :math:`c_o` terms per GEMM entry, :math:`T` blocks summed per offset, a complex dot product
  of :math:`D` terms in the DFT, phases accurate to :math:`64u`; the factor 2 covers the complex modulus and
  complex multiplication, Higham Lemma 3.5). Since
  :math:`\|E\|_2 \le \||E|\|_2 \le \|B\|_2` whenever :math:`|E| \le B`, the spectral error is at most
  :math:`e_G = 2\gamma_m \|\bar A\|_F^2`.
* If ``cholesky_ex`` succeeds on :math:`\mathrm{fl}(sI - \hat G)`, the factor :math:`R` satisfies
  :math:`sI - \hat G + \Delta = R^H R` with
  :math:`|\Delta| \le \tilde\gamma_{c+1}|R^H||R| + u\,|sI - \hat G|_{\rm diag}`
  (Higham, *Accuracy and Stability*, Thm 10.3, any summation order, :math:`\tilde\gamma` with a factor 4 for
  complex arithmetic), and :math:`\||R|\|_2^2 \le \|R\|_F^2 = \mathrm{tr}(R^H R) \le c(s + e_G)/(1-\tilde\gamma)`.
  So :math:`\lambda_{\max}(\hat G) \le s + \|\Delta\|_2` and
  :math:`\lambda_{\max}(G) \le (s + e_G)(1 + 4u + 2c\,\tilde\gamma_{c+1})`.

Both terms are computed, not assumed; for ``c = 512`` they are about :math:`10^{-10}` relative. The square root
and the last conversions are covered by the final factor ``1 + GRAM_ROUNDING_SLACK``. The traces and the
Lanczos estimates only choose :math:`s`: a wrong estimate costs time, never soundness. Tests run the same
pipeline in float32, where these terms are visible, against the float64 truth.
"""

from __future__ import annotations

import copy
import math
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from stablenet.spectral.dense import GRAM_ROUNDING_SLACK, gram_iteration

__all__ = ["cholesky_circular_bound", "gram_spectrum"]

#: Lanczos steps on the probed frequencies (full reorthogonalisation: exact once it reaches ``c``).
PROBE_STEPS = 32
#: Lanczos steps that rank the frequencies failing a round.
RANK_STEPS = 8
#: Frequencies (of the largest traces) whose top eigenvalue sets the first level, at least (up to 64 for small
#: matrices); later rounds probe 2, 4, 8 ... of the failing frequencies, ranked by Lanczos.
FIRST_PROBES = 4
#: Largest channel count screened in single precision first (Note [single-precision screen]).
SCREEN_MAX_CHANNELS = 128
#: Rounds of (probe, raise, re-factorise) before the remaining frequencies fall back to the Gram iteration.
MAX_ROUNDS = 24


def _gamma(n: int, unit: float) -> float:
    if n * unit >= 0.5:
        raise ValueError(f"rounding bound undefined for {n} accumulated terms at unit roundoff {unit:g}")
    return n * unit / (1.0 - n * unit)


def _tap_matrices(kernel5: Tensor) -> Tensor:
    """``(g, T, c_o, c_s)``: the kernel's tap matrices with the smaller channel side last (``T = kh * kw``)."""
    g, co, ci, kh, kw = kernel5.shape
    taps = kernel5.permute(0, 3, 4, 1, 2).reshape(g, kh * kw, co, ci)
    return taps if ci <= co else taps.transpose(-1, -2)


def _gram_kernel(taps: Tensor, kh: int, kw: int) -> Tensor:
    r"""``(g, (2kh-1)(2kw-1), c, c)``: :math:`H_\delta = \sum_{u-v=\delta} A_u^\top A_v`, offsets row-major.

    Only the blocks :math:`u \le v` (raster order) are multiplied, about :math:`\tfrac12 T^2 c^2 c_o`
    multiply-adds for all frequencies at once. Those blocks land on the offsets :math:`\delta \le 0`
    (lexicographically); the others follow from :math:`H_{-\delta} = H_\delta^\top`.
    """
    g, t, _, c = taps.shape
    dw = 2 * kw - 1
    centre = (kh - 1) * dw + kw - 1
    out = taps.new_zeros(g, (2 * kh - 1) * dw, c, c)
    flat = taps.transpose(1, 2).reshape(g, taps.shape[2], t * c)  # (g, c_o, T*c), tap-major columns
    for u in range(t):  # one index_add per u: the offsets u - v of v = u, ..., t - 1 are distinct
        blocks = (taps[:, u].transpose(-1, -2) @ flat[..., u * c :]).reshape(g, c, t - u, c)
        uh, uw = divmod(u, kw)
        offsets = [centre + (uh - vh) * dw + (uw - vw) for vh, vw in (divmod(v, kw) for v in range(u, t))]
        out.index_add_(1, torch.tensor(offsets, device=out.device), blocks.transpose(1, 2))
    # offsets after the centre mirror those before it
    out[:, centre + 1 :] = out[:, :centre].flip(1).transpose(-1, -2)
    return out


def _collapsed_size(kernel5: Tensor, size: tuple[int, int]) -> tuple[int, int]:
    """``size`` with a 1 on every axis where the kernel has one tap (its DFT is the same at every frequency)."""
    kh, kw = kernel5.shape[-2:]
    return (1 if kh == 1 else size[0], 1 if kw == 1 else size[1])


def _half_frequencies(size: tuple[int, int], device: torch.device) -> Tensor:
    """``(F, 2)`` integer frequencies, one of each conjugate pair :math:`\\{\\omega, -\\omega\\}`."""
    n1, n2 = size
    j1, j2 = torch.meshgrid(torch.arange(n1, device=device), torch.arange(n2 // 2 + 1, device=device), indexing="ij")
    self_conjugate_column = (j2 == 0) | ((n2 % 2 == 0) & (j2 == n2 // 2))
    keep = ~self_conjugate_column | (j1 <= n1 // 2)
    return torch.stack([j1[keep], j2[keep]], dim=1)


class _Spectrum:
    r"""The Gram kernel of a circular convolution and its phases: :math:`G(\omega)` for any set of frequencies.

    Matrices are indexed group-major over the half spectrum (``index = group * F + frequency``) and recomputed
    on demand, so that only one batch of them is held at a time.
    """

    def __init__(self, kernel5: Tensor, size: tuple[int, int]) -> None:
        g, _, _, kh, kw = kernel5.shape
        size = _collapsed_size(kernel5, size)
        taps = _tap_matrices(kernel5)
        c_o, c = taps.shape[-2], taps.shape[-1]
        h = _gram_kernel(taps, kh, kw)  # (g, D, c, c)
        self.groups, self.c, d = g, c, h.shape[1]
        self.flat = h.reshape(g, d, c * c)
        self._flat_complex: Tensor | None = None
        freqs = _half_frequencies(size, torch.device("cpu")).to(kernel5.device)  # no device sync for the mask
        # Separable phases e^{i w1 d1} e^{i w2 d2}; j * d is reduced modulo N in integers first, so every angle lies
        # in [0, 2 pi) and each factor is accurate to 21 ulps, their product to 64 (Note [verified rounding]).
        axes = []
        for n, k, j in ((size[0], kh, freqs[:, 0]), (size[1], kw, freqs[:, 1])):
            offsets = torch.arange(-(k - 1), k, device=kernel5.device)
            angle = (j[:, None] * offsets[None, :]).remainder(n).to(kernel5.dtype) * (2 * math.pi / n)
            axes.append(torch.polar(torch.ones_like(angle), angle))
        self.phase = (axes[0][:, :, None] * axes[1][:, None, :]).reshape(len(freqs), d)  # (F, D)
        self.n_freqs = len(freqs)
        unit = torch.finfo(kernel5.dtype).eps / 2
        abs_sum = taps.abs().sum(dim=1)  # (g, c_o, c): the entrywise bound A-bar of the Note
        self.abs_norm2 = abs_sum.square().sum(dim=(-2, -1)) * (1 + 4 * unit)  # ||A-bar||_F^2, rounded up
        self.err = 2 * _gamma(c_o + kh * kw + 2 * d + 128, unit) * self.abs_norm2

    def lowered(self) -> _Spectrum:
        """A single-precision twin (Note [single-precision screen]): the same H and phases rounded to complex64,
        with ``err`` bounding its G's distance to the exact G."""
        twin = copy.copy(self)
        twin.flat = self.flat.float()
        twin._flat_complex = self.flat.to(torch.complex64)
        twin.phase = self.phase.to(torch.complex64)
        d = self.phase.shape[1]
        twin.err = (2 * _gamma(2 * d + 128, 2.0**-24) * self.abs_norm2 + self.err).float() * (1 + 2.0**-20)
        return twin

    def __len__(self) -> int:
        return self.groups * self.n_freqs

    def diagonals(self) -> Tensor:
        """``(len, c)``: the real diagonals of all :math:`G(\\omega)` (each entry within the Note's error bound)."""
        diag = self.flat[..., :: self.c + 1]  # (g, D, c)
        return (self.phase.real @ diag).reshape(len(self), self.c)

    def gram(self, index: Tensor, negate: bool = False, out: Tensor | None = None) -> Tensor:
        r"""``(len(index), c, c)``: :math:`G` (or :math:`-G`) at the given matrix indices, written into ``out``.

        One complex GEMM per group, :math:`(\pm\text{phases}) \times H` (negating the phases is exact); writing
        into a reused ``out`` spares the page faults of a fresh buffer, which cost as much as the GEMM itself.
        """
        if out is None:
            out = self.flat.new_empty(len(index), self.c, self.c, dtype=self.phase.dtype)
        if self._flat_complex is None:
            self._flat_complex = self.flat.to(self.phase.dtype)
        group, freq = index // self.n_freqs, index % self.n_freqs
        phase = self.phase.neg() if negate else self.phase
        for g in group.unique().tolist():
            rows = (group == g).nonzero().squeeze(1)
            first, count = int(rows[0]), len(rows)
            if int(rows[-1]) - first + 1 == count:  # contiguous rows (sorted indices): write in place
                torch.mm(phase[freq[rows]], self._flat_complex[g], out=out[first : first + count].view(count, -1))
            else:
                out[rows] = (phase[freq[rows]] @ self._flat_complex[g]).view(count, self.c, self.c)
        return out

    def gram_range(self, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        """:meth:`gram` of the matrices ``start`` to ``stop - 1``, with no host synchronisation (the groups and
        frequencies of a range follow from its ends); ``out`` must be contiguous."""
        if out is None:
            out = self.flat.new_empty(stop - start, self.c, self.c, dtype=self.phase.dtype)
        if self._flat_complex is None:
            self._flat_complex = self.flat.to(self.phase.dtype)
        flat_out, f = out.view(stop - start, -1), self.n_freqs
        for g in range(start // f, (stop - 1) // f + 1):
            lo, hi = max(start, g * f), min(stop, (g + 1) * f)
            torch.mm(self.phase[lo - g * f : hi - g * f], self._flat_complex[g], out=flat_out[lo - start : hi - start])
        return out


def gram_spectrum(kernel5: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    r"""Gram matrices :math:`G(\omega)` of a circular convolution over its half spectrum, with an error bound.

    Args:
        kernel5: ``(groups, c_out/g, c_in/g, kh, kw)`` real kernel (already dilated); float64 for certificates.
        size: the circular input size ``(N1, N2)``; an axis with a kernel of size 1 is evaluated at one frequency.

    Returns:
        ``(G, err)``: ``G`` of shape ``(g * F, c, c)`` (complex, ``c`` the smaller channel side; group-major),
        and ``err`` of shape ``(g,)``, a bound on :math:`\|\hat G(\omega) - G(\omega)\|_2` for every computed
        :math:`\hat G` of the group (Note [verified rounding]).

    Example:
        >>> k = torch.randn(1, 4, 3, 3, 3, dtype=torch.float64)
        >>> gram, err = gram_spectrum(k, (6, 6))
        >>> spec = torch.fft.fft2(k[0], s=(6, 6)).permute(2, 3, 0, 1)
        >>> exact = torch.linalg.matrix_norm(spec, 2).amax() ** 2
        >>> bool(torch.isclose(torch.linalg.eigvalsh(gram)[:, -1].amax(), exact))
        True
    """
    spectrum = _Spectrum(kernel5, size)
    return spectrum.gram(torch.arange(len(spectrum), device=kernel5.device)), spectrum.err


def _lanczos_top(gram: Tensor, steps: int) -> Tensor:
    """Rayleigh quotient of the top Ritz vector per matrix after ``steps`` batched Lanczos steps.

    A lower estimate of the top eigenvalue (exact once ``steps`` reaches the size); it only chooses levels. The
    basis is orthogonalised at every step and a step whose residual vanishes ends that matrix's Krylov space
    (an exhausted space otherwise fills with rounding noise). The returned value is a true Rayleigh quotient,
    so it never exceeds the top eigenvalue even if the basis lost orthogonality.
    """
    b, n, _ = gram.shape
    k = min(steps, n)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, n, 1, generator=gen, dtype=gram.real.dtype).to(device=gram.device, dtype=gram.dtype)
    q = q / torch.linalg.vector_norm(q, dim=1, keepdim=True)
    basis = gram.new_zeros(b, n, k)
    alpha = gram.real.new_zeros(b, k)
    beta = gram.real.new_zeros(b, max(k - 1, 0))
    for j in range(k):
        basis[:, :, j : j + 1] = q
        w = gram @ q
        alpha[:, j] = (q.mH @ w).real[:, 0, 0]
        if j + 1 == k:
            break
        active = basis[:, :, : j + 1]
        w = w - active @ (active.mH @ w)
        norm = torch.linalg.vector_norm(w, dim=1, keepdim=True)
        alive = norm > 1e-12 * (alpha[:, j, None, None].abs() + (beta[:, j - 1, None, None] if j else 0))
        beta[:, j] = torch.where(alive, norm, 0)[:, 0, 0]
        q = torch.where(alive, w / torch.where(alive, norm, 1), 0)
    tri = torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    ritz = basis @ torch.linalg.eigh(tri)[1][:, :, -1:].to(gram.dtype)
    norm2 = torch.linalg.vector_norm(ritz, dim=1)[:, 0].square().clamp_min(torch.finfo(alpha.dtype).tiny)
    return (ritz.mH @ (gram @ ritz)).real[:, 0, 0] / norm2


def _factorises(shifted: Tensor) -> Tensor:
    """Boolean per matrix: ``cholesky_ex`` succeeded. On CPU, overwrites ``shifted`` with its factor.

    On a CPU, batched LAPACK factorisations run one matrix after another on one core; a large batch of small
    matrices is split over ``torch.get_num_threads()`` threads (torch releases the GIL inside the call).
    """

    def factorise(chunk: Tensor) -> Tensor:
        if chunk.device.type != "cpu":  # in-place output is only checked on CPU (tests/spectral/test_cholesky_bound.py)
            return torch.linalg.cholesky_ex(chunk).info == 0
        info = torch.empty(len(chunk), dtype=torch.int32, device=chunk.device)
        torch.linalg.cholesky_ex(chunk, out=(chunk, info))
        return info == 0

    workers = torch.get_num_threads()
    if shifted.device.type != "cpu" or workers < 2 or len(shifted) < 2 * workers or shifted.shape[-1] > 256:
        return factorise(shifted)
    with ThreadPoolExecutor(workers) as pool:
        return torch.cat(list(pool.map(factorise, shifted.chunk(workers))))


def _screen(spectrum: _Spectrum, diag: Tensor, level: float, batch_len: int) -> Tensor:
    r"""Indices of the frequencies that the single-precision pass could not verify below ``level``.

    # Note [single-precision screen]
    A factorisation in complex64 costs about half of one in complex128. With the single-precision error terms
    of Note [verified rounding] (:math:`u = 2^{-24}`; ``_Spectrum.lowered`` for :math:`e_G`), a success at
    :math:`s' = s / (1 + 4u + 2c\tilde\gamma) - e_G` proves :math:`\lambda_{\max}(G) \le s`. The terms grow
    like :math:`c^2`, so only small channel counts are screened; frequencies near the level fail the screen and
    are verified in double precision as usual.
    """
    low = spectrum.lowered()
    unit, c = 2.0**-24, spectrum.c
    chol = _gamma(4 * (c + 1), unit)
    screened_level = level / (1.0 + 4 * unit + 2 * c * chol / (1.0 - chol)) - float(low.err.max())
    index_all = torch.arange(len(spectrum), device=diag.device)
    if screened_level <= 0:
        return index_all
    buffer = diag.new_empty(min(batch_len * 2, len(spectrum)), c, c, dtype=torch.complex64)
    level32 = torch.tensor(screened_level, dtype=torch.float32, device=diag.device).nextafter(
        torch.tensor(0.0, device=diag.device)
    )  # rounded down: the level actually factorised is at most screened_level
    failed = []
    for index in index_all.split(len(buffer)):
        shifted = low.gram(index, True, buffer[: len(index)])
        # fl32(level32 - fl32(g_ii)): the rounding of g_ii to single precision is within low.err
        shifted.diagonal(dim1=-2, dim2=-1).copy_(level32 - diag[index].float())
        failed.append(index[~_factorises(shifted)])
    return torch.cat(failed)


def cholesky_circular_bound(
    kernel5: Tensor,
    size: tuple[int, int],
    *,
    rtol: float = 1e-4,
    max_rounds: int = MAX_ROUNDS,
    max_batch_bytes: int = 1 << 25,
    dtype: torch.dtype = torch.float64,
    screen: bool = True,
) -> Tensor:
    r"""Certified upper bound on the circular convolution's norm on ``size`` pixels, within ``rtol`` of exact.

    Args:
        kernel5: ``(groups, c_out/g, c_in/g, kh, kw)``, already dilated (a kernel larger than ``size`` needs no
            folding: the Gram kernel's DFT at the grid frequencies is that of the wrapped operator).
        size: circular input size ``(N1, N2)``.
        rtol: relative gap allowed above the exact norm (the level is :math:`(1 + 2\,\text{rtol})` times an
            estimate of a top eigenvalue).
        max_rounds: rounds of probing before the last unverified frequencies use the Gram iteration.
        max_batch_bytes: memory for the matrices factorised at once (frequencies are processed in batches, in one
            reused buffer).
        dtype: working precision: float64 for certificates; float32 only to test the rounding analysis, whose
            terms are then large enough to see.
        screen: in float64 with at most ``SCREEN_MAX_CHANNELS`` channels, first verify every frequency in single
            precision at a level lowered by the single-precision error terms (Note [single-precision screen]).

    Returns:
        A 0-dim float64 tensor :math:`\ge \max_\omega \sigma_1(\hat K(\omega))` computed in exact arithmetic
        (Note [verified rounding]); no gradient.

    Example:
        >>> k = torch.randn(1, 8, 6, 3, 3, dtype=torch.float64)
        >>> spec = torch.fft.fft2(k, s=(10, 10)).permute(0, 3, 4, 1, 2)
        >>> exact = torch.linalg.matrix_norm(spec, 2).max()
        >>> bound = cholesky_circular_bound(k, (10, 10))
        >>> bool(exact <= bound <= exact * (1 + 1e-4 + 1e-9))
        True
    """
    return _cholesky_bound(kernel5, size, rtol, max_rounds, max_batch_bytes, dtype, screen)[0]


def _cholesky_bound(
    kernel5: Tensor,
    size: tuple[int, int],
    rtol: float = 1e-4,
    max_rounds: int = MAX_ROUNDS,
    max_batch_bytes: int = 1 << 25,
    dtype: torch.dtype = torch.float64,
    screen: bool = True,
) -> tuple[Tensor, int]:
    """:func:`cholesky_circular_bound` and the index (group-major over the half spectrum, as in
    :class:`_Spectrum`) of the probed matrix whose top eigenvalue estimate set the level: the argmax frequency, or
    one whose top eigenvalue is within ``2 * rtol`` of the largest (every matrix was verified below the level)."""
    if not rtol > 0:
        raise ValueError(f"rtol must be a positive float; got {rtol!r}")
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64 or torch.float32; got {dtype}")
    if not torch.isfinite(kernel5).all():
        raise ValueError("kernel contains NaN or Inf; a spectral norm needs finite weights")
    if not kernel5.any():  # exactly 0 (the factorisations would verify a tiny positive level)
        return torch.zeros((), dtype=torch.float64, device=kernel5.device), 0
    with torch.no_grad():
        spectrum = _Spectrum(kernel5.detach().to(dtype), size)
        diag = spectrum.diagonals()
        unit, c, grow = torch.finfo(dtype).eps / 2, spectrum.c, 1.0 + 2.0 * rtol
        batch_len = max(1, min(len(spectrum), max_batch_bytes // (c * c * 2 * diag.element_size())))
        buffer = diag.new_empty(batch_len, c, c, dtype=spectrum.phase.dtype)
        # The first level: the top eigenvalues of the frequencies with the largest traces (free to rank).
        first = max(FIRST_PROBES, min(64, (1 << 18) // (c * c)))  # small matrices: probing many is cheap
        top = diag.sum(dim=1).topk(min(first, len(spectrum))).indices
        theta = _lanczos_top(spectrum.gram(top), PROBE_STEPS)
        level, argmax = float(theta.max()) * grow, int(top[theta.argmax()])
        pending, probes, gram = torch.arange(len(spectrum), device=diag.device), 2, None
        if screen and dtype == torch.float64 and c <= SCREEN_MAX_CHANNELS:
            pending = _screen(spectrum, diag, level, batch_len)
        for _ in range(max_rounds):
            failed = []
            for index in pending.split(batch_len):
                # Note [shifted diagonal]: the off-diagonal entries are -G's; the diagonal is written as
                # fl(level - g_ii) from `diag`, each within the Note's error bound, so every round factorises
                # fl(level * I - G-hat) for one fixed G-hat.
                shifted = gram.neg_() if gram is not None else spectrum.gram(index, True, buffer[: len(index)])
                shifted.diagonal(dim1=-2, dim2=-1).copy_(level - diag[index])
                failed.append(index[~_factorises(shifted)])
            pending = torch.cat(failed)
            if len(pending) == 0:
                break
            # The failing frequencies (few) are ranked by short Lanczos runs; the best are probed by long ones.
            gram = spectrum.gram(pending, out=buffer[: len(pending)]) if len(pending) <= batch_len else None
            ranked = pending[:batch_len] if gram is None else pending
            ranking = gram if gram is not None else spectrum.gram(ranked, out=buffer[: len(ranked)])
            top = _lanczos_top(ranking, RANK_STEPS).topk(min(probes, len(ranked))).indices
            theta = _lanczos_top(ranking[top], PROBE_STEPS)
            if float(theta.max()) * grow > level:
                level, argmax = float(theta.max()) * grow, int(ranked[top[theta.argmax()]])
            probes *= 2
        if len(pending):  # every iterate of the Gram iteration is an upper bound: sound, only slower
            gram = spectrum.gram(pending).to(torch.complex128)
            gram.diagonal(dim1=-2, dim2=-1).copy_(diag[pending])
            bounds = gram_iteration(gram, 14, tol=1e-6) * (1.0 + GRAM_ROUNDING_SLACK)
            if float(bounds.max()) > level:
                level, argmax = float(bounds.max()), int(pending[bounds.argmax()])
        chol = _gamma(4 * (c + 1), unit)
        lam = (level + float(spectrum.err.max())) * (1.0 + 4 * unit + 2 * c * chol / (1.0 - chol))
        bound = torch.tensor(math.sqrt(lam) * (1.0 + GRAM_ROUNDING_SLACK), dtype=torch.float64, device=diag.device)
        return bound, argmax
