"""Tests for stablenet.smoothing.simplex: sparsemax is the Euclidean projection onto the simplex."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stablenet.smoothing.simplex import sparsemax


def _projection_reference(z: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the simplex by bisection on tau in sum(max(z - tau, 0)) = 1 (no sorting)."""
    lo, hi = z.max() - 1.0, z.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(z - mid, 0.0).sum() > 1.0:
            lo = mid
        else:
            hi = mid
    return np.maximum(z - 0.5 * (lo + hi), 0.0)


@pytest.mark.parametrize("k", [1, 2, 3, 7, 30])
def test_sparsemax_is_the_euclidean_projection_onto_the_simplex(k):
    gen = torch.Generator().manual_seed(k)
    for scale in (0.1, 1.0, 10.0):
        z = scale * torch.randn(50, k, generator=gen, dtype=torch.float64)
        p = sparsemax(z)
        assert torch.all(p >= 0)
        torch.testing.assert_close(p.sum(-1), torch.ones(50, dtype=torch.float64), rtol=0, atol=1e-12)
        ref = np.stack([_projection_reference(row) for row in z.numpy()])
        np.testing.assert_allclose(p.numpy(), ref, atol=1e-10)


def test_sparsemax_ties_batching_dim_and_two_class_closed_form():
    z = torch.tensor([[1.0, 1.0, 0.2, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    np.testing.assert_allclose(sparsemax(z).numpy(), [[1 / 3, 1 / 3, 0, 1 / 3], [0.25] * 4], atol=1e-15)
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(sparsemax(x, dim=1), sparsemax(x.transpose(1, 2)).transpose(1, 2))
    torch.testing.assert_close(sparsemax(x + 3.7), sparsemax(x))  # translation invariance
    # Two classes: sparsemax(a, b)_0 = clip((1 + a - b) / 2, 0, 1).
    a = torch.linspace(-2, 2, 41, dtype=torch.float64)
    two = sparsemax(torch.stack([a, torch.zeros_like(a)], dim=1))[:, 0]
    torch.testing.assert_close(two, ((1 + a) / 2).clamp(0, 1))
