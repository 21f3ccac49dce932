"""Tests for stablenet.smoothing.lvm_radii: the Bonferroni split of the bounds, the two radii and their rounding."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from stablenet.smoothing.lvm_radii import lvm_bounds, lvm_radius, margin_radius
from stablenet.smoothing.stats import empirical_bernstein_lower, empirical_bernstein_upper


def test_bounds_use_the_documented_bonferroni_split():
    rng = np.random.default_rng(0)
    k, n, alpha = 5, 1000, 0.01
    mean = rng.dirichlet(np.ones(k), size=20)
    var = rng.uniform(0, 0.25, size=(20, k))
    top = mean.argmax(-1)
    p_lower, p_upper = lvm_bounds(mean, var, n, alpha, top)
    rows = np.arange(20)
    lower_ref = empirical_bernstein_lower(mean, var, n, alpha / 2)[rows, top]
    upper_all = empirical_bernstein_upper(mean, var, n, alpha / (2 * (k - 1)))
    upper_all[rows, top] = -np.inf
    upper_ref = upper_all.max(-1)
    # Sound side of the reference (summation slack), and no looser than a hair.
    assert np.all(p_lower <= lower_ref) and np.all(p_upper >= upper_ref)
    np.testing.assert_allclose(p_lower, lower_ref, atol=1e-9)
    np.testing.assert_allclose(p_upper, upper_ref, atol=1e-9)


def test_radius_is_rounded_down_and_cohen_form_dominates_margin_form():
    pa = np.linspace(0.3, 0.999, 60)[:, None]
    pb = np.linspace(0.001, 0.6, 50)[None, :]
    sigma = 0.37
    radius = lvm_radius(pa, pb, sigma)
    cohen = 0.5 * sigma * (stats.norm.ppf(pa) - stats.norm.ppf(pb))
    margin = sigma * math.sqrt(math.pi / 2) * (pa - pb)
    positive = pa > pb
    assert np.all(radius[~positive] == 0) and np.all(radius[positive] > 0)
    assert np.all(radius[positive] < cohen[np.broadcast_to(positive, cohen.shape)])  # strictly: rounded down
    np.testing.assert_allclose(radius[positive], cohen[np.broadcast_to(positive, cohen.shape)], rtol=1e-9)
    assert np.all(margin_radius(pa, pb, sigma) <= radius)
    assert np.all(margin[np.broadcast_to(positive, margin.shape)] <= cohen[np.broadcast_to(positive, cohen.shape)])


def test_margin_form_takes_over_where_the_normal_quantile_is_infinite():
    radius = lvm_radius(np.array([1.0, 0.7]), np.array([0.2, 0.0]), sigma=1.0)
    expected = math.sqrt(math.pi / 2) * np.array([0.8, 0.7])
    assert np.all(np.isfinite(radius)) and np.all(radius < expected)
    np.testing.assert_allclose(radius, expected, rtol=1e-10)
