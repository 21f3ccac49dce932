"""Tests for stablenet.smoothing.grid_noise: the rounded Gaussian to 62 bits, the exact alias table, the law of the
draws, and argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps

from stablenet.smoothing.grid_noise import GRID_BITS, GridNoise
from stablenet.smoothing.sampling import make_generator


def rounding_errors(grid: GridNoise) -> list[float]:
    """``|w_v - 2^62 p_v|`` per cell, ``p_v`` the exact (40-digit) probability of round(levels * N(0, sigma^2)) = v
    on -support .. support, tails lumped into the end cells."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(40):
        support, scale = grid.support, 2 * grid.levels * mpmath.mpf(grid.sigma)
        cdf = [mpmath.ncdf((2 * v + 1) / scale) for v in range(-support, support)]
        exact = [b - a for a, b in zip([mpmath.mpf(0), *cdf], [*cdf, mpmath.mpf(1)], strict=True)]
        one = mpmath.mpf(2) ** GRID_BITS
        return [float(abs(w - p * one)) for w, p in zip(grid._weights, exact, strict=True)]


@pytest.mark.parametrize(("sigma", "levels"), [(0.25, 255), (0.5, 64), (0.01, 255), (1e-4, 255)])
def test_grid_noise_is_the_rounded_gaussian_to_62_bits(sigma, levels):
    grid = GridNoise(sigma, levels)
    assert sum(grid._weights) == 2**GRID_BITS and min(grid._weights) >= 0
    assert grid._weights == grid._weights[::-1]  # symmetric by construction
    err = rounding_errors(grid)
    assert max(err) <= 1.0  # two cell boundaries, each rounded to nearest
    # the total-variation bound covers the actual distance, and is about a unit in the last bit per boundary
    tv = 0.5 * sum(err) / 2**GRID_BITS
    assert tv <= grid.tv_bound(1) <= 1.1 * 2 * grid.support * 2.0**-63 + 1e-30
    assert grid.tv_bound(3 * 32 * 32) == pytest.approx(3 * 32 * 32 * grid.tv_bound(1), rel=1e-12)


@pytest.mark.parametrize(("sigma", "levels"), [(0.25, 255), (0.5, 3), (2.0, 255), (1e-4, 255)])
def test_alias_table_gives_every_cell_exactly_its_weight(sigma, levels):
    # Note [alias table]: with u uniform on [0, 2^62) the drawn law is exactly weights / 2^62.
    grid = GridNoise(sigma, levels)
    k, cap = grid._k, 2 ** (GRID_BITS - grid._k)
    mass = [0] * (1 << k)
    for column, entry in enumerate(grid._packed):
        keep, alias = entry >> k, entry & ((1 << k) - 1)
        assert 0 <= keep <= cap and entry < 2**63
        mass[column] += keep
        mass[alias] += cap - keep
    assert mass == [*grid._weights, *[0] * ((1 << k) - len(grid._weights))]


def test_grid_draws_follow_their_law():
    grid = GridNoise(0.1, 255)
    steps = grid.sample((400_000,), make_generator(0, torch.device("cpu")))
    assert steps.dtype == torch.long and int(steps.abs().max()) <= grid.support
    counts = np.bincount((steps + grid.support).numpy(), minlength=2 * grid.support + 1)
    expected = grid.probabilities() * len(steps)
    cells = expected > 20
    chi2 = float(((counts[cells] - expected[cells]) ** 2 / expected[cells]).sum())
    assert chi2 < sps.chi2.ppf(0.999, int(cells.sum()) - 1)
    assert abs(float(steps.double().std()) - 0.1 * 255) < 0.05


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0.0, 255), "sigma must be a finite number > 0"),
        ((float("inf"), 255), "sigma must be a finite number > 0"),
        ((0.5, 0), "levels must be an int >= 1"),
        ((0.5, 2.5), "levels must be an int >= 1"),
        ((10.0, 1000), "sigma \\* levels must be at most 4096"),
    ],
)
def test_bad_grid_noise_arguments(args, match):
    with pytest.raises(ValueError, match=match) as excinfo:
        GridNoise(*args)
    assert "\n" not in str(excinfo.value)
