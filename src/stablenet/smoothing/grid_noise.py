r"""Exact grid noise: the Gaussian rounded to the grid of the inputs, drawn from random bits (Voráček & Hein,
"Sound randomized smoothing in floating-point arithmetic", ICLR 2023, arXiv 2207.07209).

Why ``torch.randn`` noise in floating point is not sound against every base model is Note [floating-point noise]
in :mod:`stablenet.smoothing.sampling`, whose sampling loop draws this noise instead when given a
:class:`GridNoise`.

# Note [exact grid noise]
:class:`GridNoise` (``noise="grid"`` in :class:`~stablenet.smoothing.cohen.Smooth`,
:class:`~stablenet.smoothing.lvm.LVMSmooth`, :func:`~stablenet.smoothing.soft.soft_predict` and, with hard votes,
:class:`~stablenet.smoothing.cpm.CPMSmooth`; ``--noise grid`` in ``stablenet certify``) follows Voráček & Hein:

* inputs lie on a grid :math:`\{k/L\}` (``levels`` :math:`L`, 255 for 8-bit images; anything else is refused,
  not rounded), and the noise is the real Gaussian *rounded to that grid*, :math:`V = \mathrm{round}(L\delta)`,
  so :math:`k + V = \mathrm{round}(L(x + \delta))`. The model is handed :math:`\phi(k + V)`, where
  :math:`\phi(m) = m / L` in floating point is one fixed map of the integer :math:`m`, so drawing :math:`V`
  exactly is smoothing :math:`F(y) = f(\phi(\mathrm{round}(L y)))` with the real Gaussian. Cohen's theorem
  holds for :math:`F` as for any measurable classifier, whatever the model does with the bits of
  :math:`\phi(m)`, and at grid points the smoothed :math:`F` is exactly what this sampling estimates;
* :math:`V` is drawn coordinate-wise from 62 random bits by an alias table (Note [alias table]) with integer
  weights :math:`w_v`, :math:`w_v/2^{62}` the cell masses computed to 30 digits (``mpmath``) and rounded to
  nearest. All of it is exact integer arithmetic, so the drawn law differs from the rounded Gaussian only by
  that rounding and the dropped tails: a total-variation distance :math:`\eta` per coordinate (about
  :math:`2.5\cdot10^{-16}` at :math:`\sigma = 0.5`, :math:`L = 255`), at most :math:`d\eta` per noisy copy of a
  :math:`d`-dimensional input (:meth:`GridNoise.tv_bound`, :math:`8\cdot10^{-13}` for CIFAR-10), which the
  certifiers subtract from lower bounds and add to upper ones (``predict`` tests at
  :math:`\alpha - n d\eta`);
* assumed: the generator's bits are independent fair coins (``torch.randint`` over :math:`[0, 2^{62})`
  reduces the generator's 64-bit words exactly, with no modulo bias), and the model is a fixed function of each
  row (eval mode; a kernel whose rounding depends on the rest of the batch makes :math:`f` depend on other
  rows, which no sampling scheme fixes);
* cost: a 64-bit draw, one table look-up and about eight integer operations per coordinate instead of one
  ``randn`` and one add. On a shared 2-core CPU the noise alone costs 2.2-3.5 times as much, and the whole
  certification loop takes 1.02-1.12 times as long for a small CIFAR CNN and 1.5 times for a small MNIST MLP
  (``stablenet.bench.smoothing`` models, ``sigma = 0.25``, best of 15); the table is built once per
  :math:`(\sigma, L)`, in about 0.1 s.
"""

from __future__ import annotations

import functools
import math
import numbers

import numpy as np
import torch
from torch import Tensor

__all__ = ["GRID_BITS", "GRID_MAX_STEPS", "GridNoise"]


#: Random bits per noise coordinate of :class:`GridNoise` (``torch.randint`` gives up to 63 exactly).
GRID_BITS = 62
#: Decimal digits to which :class:`GridNoise` computes the Gaussian CDF before rounding it to ``GRID_BITS`` bits.
_GRID_DIGITS = 30
#: Largest ``sigma * levels`` :class:`GridNoise` accepts (its table has about 18 entries per unit).
GRID_MAX_STEPS = 4096


@functools.lru_cache(maxsize=32)
def _grid_tables(sigma: float, levels: int) -> tuple[tuple[int, ...], int, float]:
    """``(weights, support, tv)``: the integer weights ``w_v`` (summing to ``2**GRID_BITS``) of the cells
    ``v = -support .. support``, and an upper bound on the total-variation distance per coordinate between
    ``w / 2**GRID_BITS`` and the Gaussian rounded to the grid (Note [exact grid noise])."""
    import mpmath  # installed with torch (through sympy); only grid noise needs it

    with mpmath.workdps(_GRID_DIGITS):
        one = mpmath.mpf(2) ** GRID_BITS
        scale = 2 * levels * mpmath.mpf(sigma)  # cell boundary (i + 1/2) / levels is (2i + 1) / scale sigmas
        tails: list[int] = []  # tails[i] = 2^b Phi(-(i + 1/2) / (levels sigma)), rounded to nearest
        while True:
            q = int(mpmath.nint(one * mpmath.ncdf(-(2 * len(tails) + 1) / scale)))
            if q == 0:
                break
            tails.append(q)
        support = len(tails)
        # Beyond the last nonzero tail the drawn law has no mass: the missing Gaussian mass is
        # sum_{j >= support} Phi(-c_j) <= Phi(-c) + phi(c) / (h (1 + c^2)), c = c_support, h = 1/(levels sigma)
        # (the sum against the integral of the decreasing Phi(-s), and Mills' ratio).
        c, h = (2 * support + 1) / scale, 2 / scale
        beyond = mpmath.ncdf(-c) + mpmath.npdf(c) / (h * (1 + c * c))
        # Each of the 2 * support rounded CDF values is off by at most half a unit (1 + 2^-20 covers the
        # 30-digit evaluation); TV <= sum over all cell boundaries of the CDF error.
        tv = 2 * support * (1 + mpmath.mpf(2) ** -20) / (2 * one) + 2 * beyond
        tv_bound = math.nextafter(float(tv) * (1 + 2**-40), math.inf)
    cdf = [*reversed(tails), *((1 << GRID_BITS) - q for q in tails), 1 << GRID_BITS]
    weights = tuple(b - a for a, b in zip([0, *cdf[:-1]], cdf, strict=True))
    return weights, support, tv_bound


@functools.lru_cache(maxsize=32)
def _alias_table(weights: tuple[int, ...]) -> tuple[int, list[int]]:
    """``(k, table)``: Vose's alias table over ``2**k`` columns of capacity ``2**(GRID_BITS - k)``, built in
    exact integer arithmetic, each column packed as ``keep << k | alias`` (Note [alias table])."""
    # Note [alias table]
    # A draw u in [0, 2^b) picks column u >> (b - k) and keeps it if the remaining bits are below keep[column],
    # else takes alias[column]. Vose's construction moves capacity from heavy to light columns so that each
    # cell v gets keep[v] + sum over columns aliased to v of (cap - keep) = w_v: with integer weights summing
    # to 2^b = 2^k cap the probabilities are exactly w_v / 2^b, with no rounding anywhere.
    # Packed as keep << k | alias (< 2^63), the test "v < keep" for the low bits v of u is the single integer
    # comparison (v << k | (2^k - 1)) < (keep << k | alias), since alias <= 2^k - 1.
    k = max(1, (len(weights) - 1).bit_length())
    cap = 1 << (GRID_BITS - k)
    w = list(weights) + [0] * ((1 << k) - len(weights))
    keep, alias = [cap] * len(w), list(range(len(w)))
    small = [i for i, v in enumerate(w) if v < cap]
    large = [i for i, v in enumerate(w) if v >= cap]
    while small and large:
        s, big = small.pop(), large.pop()
        keep[s], alias[s] = w[s], big
        w[big] -= cap - w[s]
        (small if w[big] < cap else large).append(big)
    if any(w[i] != cap for i in small + large):
        raise RuntimeError("alias table: weights do not sum to 2**GRID_BITS")  # cannot happen for valid weights
    return k, [(kp << k) | a for kp, a in zip(keep, alias, strict=True)]


class GridNoise:
    r"""Gaussian noise rounded to the grid :math:`\{k/L\}`, drawn exactly from random bits (Voráček & Hein 2023).

    A draw is :math:`V = \mathrm{round}(L\delta) \in \mathbb Z^d`, :math:`\delta \sim \mathcal N(0, \sigma^2 I)`,
    sampled coordinate-wise with probabilities :math:`w_v / 2^{62}`; the noisy input handed to the model is
    :math:`\phi(k + V)`, :math:`\phi(m) = m / L` in floating point, for an input :math:`x = k/L` on the grid.

    Guarantee (Note [exact grid noise]): if the generator's bits are fair coins, a certifier that samples
    with this noise and widens its bounds by :meth:`tv_bound` certifies the smoothed classifier of
    :math:`F(y) = f(\phi(\mathrm{round}(L y)))` under the *real* Gaussian, for any base model :math:`f`,
    including one that reads the low-order bits of its input. At a grid point that smoothed classifier is the
    one this sampling estimates, so no grid point within the radius (no 8-bit image, for ``levels=255``) gets
    another class from it.

    Args:
        sigma: noise level in input units, > 0.
        levels: grid steps per unit of input, an int >= 1 (255 for images stored as ``uint8 / 255``);
            ``sigma * levels`` is at most ``GRID_MAX_STEPS``.

    Example:
        >>> grid = GridNoise(0.5, levels=255)
        >>> steps = grid.sample((4, 3), torch.Generator().manual_seed(0))
        >>> steps.dtype, bool((steps.abs() <= grid.support).all())
        (torch.int64, True)
        >>> grid.tv_bound(3 * 32 * 32) < 1e-11  # what a CIFAR-sized input costs the bounds
        True
    """

    def __init__(self, sigma: float, levels: int = 255) -> None:
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not 0 < sigma < math.inf:
            raise ValueError(f"sigma must be a finite number > 0; got {sigma!r}")
        if isinstance(levels, bool) or not isinstance(levels, numbers.Integral) or levels < 1:
            raise ValueError(f"levels must be an int >= 1; got {levels!r}")
        if sigma * levels > GRID_MAX_STEPS:
            raise ValueError(
                f"sigma * levels must be at most {GRID_MAX_STEPS} (the alias table grows with it); "
                f"got {sigma} * {levels}"
            )
        self.sigma, self.levels = float(sigma), int(levels)
        self._weights, self.support, self._tv = _grid_tables(self.sigma, self.levels)
        self._k, self._packed = _alias_table(self._weights)
        self._tables: dict[torch.device, Tensor] = {}

    def __repr__(self) -> str:
        return f"GridNoise(sigma={self.sigma}, levels={self.levels})"

    def probabilities(self) -> np.ndarray:
        """Exact probabilities of the steps ``-support .. support`` (float64; the weights are ``2**-62`` apart)."""
        return np.array(self._weights, dtype=np.float64) / 2.0**GRID_BITS

    def tv_bound(self, dim: int) -> float:
        """Upper bound on the total-variation distance between one ``dim``-coordinate draw and the exactly
        rounded Gaussian; the probability of any event, and the mean of any ``[0, 1]``-valued function of the
        noisy input, differ by at most this much between the two."""
        return min(1.0, math.nextafter(int(dim) * self._tv, math.inf))

    def lower_bound(self, p: np.ndarray, dim: int) -> np.ndarray:
        """``p - tv_bound(dim)`` rounded down and clipped at 0: a lower bound under the drawn law made one under
        the rounded Gaussian."""
        p = np.asarray(p, dtype=np.float64)
        return np.maximum(np.nextafter(p - self.tv_bound(dim), -np.inf), 0.0)

    def upper_bound(self, p: np.ndarray, dim: int) -> np.ndarray:
        """``p + tv_bound(dim)`` rounded up and clipped at 1 (see :meth:`lower_bound`)."""
        p = np.asarray(p, dtype=np.float64)
        return np.minimum(np.nextafter(p + self.tv_bound(dim), np.inf), 1.0)

    def to_grid(self, x: Tensor) -> Tensor:
        """The grid steps ``k`` (long) of inputs ``x = k / levels``; a ``ValueError`` for any value off the grid
        by more than ``x``'s own rounding."""
        if x.numel() == 0:
            return torch.zeros(x.shape, dtype=torch.long, device=x.device)
        scaled = x.to(torch.float64) * self.levels
        steps = scaled.round()
        # a float nearest to k / levels is within levels * eps * |x| / 2 steps of k; refuse anything further
        tol = self.levels * torch.finfo(x.dtype).eps * x.to(torch.float64).abs().clamp_min(1.0)
        if float(tol.max()) >= 0.25:  # one sync (and one below), before any sampling
            raise ValueError(
                f"x in {x.dtype} cannot tell the grid points k / {self.levels} apart; pass it in float32 or float64"
            )
        if bool(((scaled - steps).abs() > tol).any()):
            far = float((scaled - steps).abs().max())
            raise ValueError(
                f"noise='grid' needs inputs on the grid k / {self.levels} (e.g. uint8 images divided by 255); "
                f"got a value {far:.3g} grid steps away from it"
            )
        return steps.to(torch.long)

    def _table(self, device: torch.device) -> Tensor:
        table = self._tables.get(device)
        if table is None:  # one host-to-device copy per device, before any sampling loop
            table = self._tables[device] = torch.tensor(self._packed, dtype=torch.long, device=device)
        return table

    def _cells(self, shape: tuple[int, ...], generator: torch.Generator, table: Tensor) -> Tensor:
        """Cell indices ``0 .. 2 * support`` (steps plus ``support``), by the alias table (Note [alias table])."""
        k = self._k
        low = GRID_BITS - k
        u = torch.randint(0, 1 << GRID_BITS, shape, generator=generator, device=table.device)
        column = u >> low
        entry = torch.take(table, column)
        # In place where possible: on a CPU every fresh large tensor costs page faults comparable to the arithmetic.
        kept = u.bitwise_and_((1 << low) - 1).bitwise_left_shift_(k).bitwise_or_((1 << k) - 1) < entry
        alias = entry.bitwise_and_((1 << k) - 1)
        return torch.where(kept, column, alias, out=alias)

    def sample(self, shape: tuple[int, ...], generator: torch.Generator, device: torch.device | None = None) -> Tensor:
        """A long tensor of ``shape`` i.i.d. steps (multiples of ``1 / levels``), on ``generator``'s device
        unless ``device`` is given (it must match)."""
        device = generator.device if device is None else torch.device(device)
        return self._cells(tuple(shape), generator, self._table(device)).sub_(self.support)
