"""The lockstep Gram iteration: pruning, several batches at once, Gram-matrix sources and the memory budget."""

import itertools

import pytest
import torch

from stablenet.bench.spectral import cpu_peak_bytes
from stablenet.spectral import (
    gram_iteration,
    gram_iteration_max,
    gram_iteration_max_many,
    lockstep,
    spectral_norm_exact,
)
from stablenet.spectral.lockstep import FIRST_CHECK, _gram_max_many


def test_gram_max_prunes_and_matches_unpruned_gram_at_the_same_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 16, 16, dtype=torch.float64, generator=g)
    w[17] *= 1.5  # one matrix clearly on top: the others are dropped after a few steps
    (state,) = _gram_max_many([w], 14, 1e-6)
    bound, sizes = torch.tensor(state.top, dtype=torch.float64), state.sizes
    assert sizes[0] == 200 and sizes[-1] < 10, sizes
    exact = spectral_norm_exact(w[17])
    assert exact <= bound <= exact * (1 + 1e-6)
    # Pruning never changes the value: the unpruned iteration with as many steps gives the same maximum.
    assert torch.isclose(bound, gram_iteration(w, len(sizes)).max(), rtol=1e-12)


def test_gram_max_many_equals_one_at_a_time():
    g = torch.Generator().manual_seed(2)
    weights = [
        torch.randn(30, 8, 8, dtype=torch.complex128, generator=g),
        torch.randn(1, 12, 5, dtype=torch.float64, generator=g),
        torch.randn(4, 3, 9, dtype=torch.float64, generator=g),
        torch.zeros(2, 3, 3, dtype=torch.float64),
        # Same shape as the first, 100x smaller: iterated in the same batch, and must not be pruned by it.
        torch.randn(30, 8, 8, dtype=torch.complex128, generator=g) / 100,
        torch.randn(1, 12, 5, dtype=torch.float64, generator=g),
    ]
    many = gram_iteration_max_many(weights)
    for w, value in zip(weights, many, strict=True):
        assert value == float(gram_iteration_max(w))
        exact = float(torch.linalg.matrix_norm(w, 2).max())
        assert exact <= value <= exact * (1 + 1e-4) + 1e-300
    assert gram_iteration_max_many([]) == []


class _GramOf:
    """A MatrixSource of the Gram matrices A^H A of a batch (gram=True), recording its reads."""

    gram = True

    def __init__(self, a):
        self.h = a.mH @ a
        self.count, self.shape = len(a), (a.shape[-1], a.shape[-1])
        self.dtype, self.device = a.dtype, a.device
        self.reads = []

    def matrices(self, start, stop, out=None):
        self.reads.append((start, stop))
        return out.copy_(self.h[start:stop])


def test_gram_max_many_from_gram_matrices_bounds_their_factors():
    g = torch.Generator().manual_seed(5)
    factors = [
        torch.randn(40, 9, 6, dtype=torch.complex128, generator=g),
        torch.randn(3, 5, 5, dtype=torch.float64, generator=g) * 1e-3,
        torch.zeros(2, 4, 4, dtype=torch.float64),
    ]
    sources = [_GramOf(a) for a in factors]
    values = gram_iteration_max_many(sources)
    for a, source, value, direct in zip(factors, sources, values, gram_iteration_max_many(factors), strict=True):
        exact = float(torch.linalg.matrix_norm(a, 2).max())
        assert exact <= value <= exact * (1 + 1e-4) + 1e-300
        assert value == pytest.approx(direct, rel=1e-9)
        assert source.reads == [(0, len(a))]  # read once, whole, into the group's buffer
    with pytest.raises(ValueError, match="square if Gram"):
        bad = _GramOf(factors[0])
        bad.shape = (6, 5)
        gram_iteration_max_many([bad])


def test_gram_max_many_budget_admits_batches_in_turn_with_the_same_bounds():
    g = torch.Generator().manual_seed(6)
    weights = [torch.randn(64, 12, 12, dtype=torch.complex128, generator=g) for _ in range(3)]
    weights += [torch.randn(30, 20, 7, dtype=torch.float64, generator=g), torch.randn(8, 3, 3, generator=g)]
    free = _gram_max_many(weights, 14, 1e-5, max_memory_bytes=None)
    one_at_a_time = _gram_max_many(weights, 14, 1e-5, max_memory_bytes=1)
    some = _gram_max_many(weights, 14, 1e-5, max_memory_bytes=3 * 64 * 12 * 12 * 16)
    assert [p.start for p in free] == [0] * len(weights)
    starts = sorted(p.start for p in one_at_a_time)
    assert all(b >= a + FIRST_CHECK for a, b in itertools.pairwise(starts))  # each waits for the last to end
    assert 0 < max(p.start for p in some) < starts[-1]
    for runs in (one_at_a_time, some):
        assert [(p.top, p.steps, p.argmax, p.sizes) for p in runs] == [
            (p.top, p.steps, p.argmax, p.sizes) for p in free
        ]
    with pytest.raises(ValueError, match="max_memory_bytes"):
        gram_iteration_max_many(weights, max_memory_bytes=0)


def test_gram_max_many_peak_memory_follows_the_budget():
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(256, 32, 32, dtype=torch.complex128, generator=g) for _ in range(6)]  # 4 MiB each
    size = 4 * 2**20
    _, free = cpu_peak_bytes(lambda: gram_iteration_max_many(weights, max_memory_bytes=None))
    budget = 3 * size
    _, bounded = cpu_peak_bytes(lambda: gram_iteration_max_many(weights, max_memory_bytes=budget))
    assert free >= 6 * size  # every batch's iterates at once: the measurement sees them
    assert bounded <= budget + 2 * size < free  # plus the transients of forming one batch's first Gram matrices


def test_dense_still_exports_the_lockstep_names():
    """The lockstep's public names moved out of ``stablenet.spectral.dense``, which keeps them importable."""
    from stablenet.spectral import dense

    for name in lockstep.__all__:
        assert name in dense.__all__ and getattr(dense, name) is getattr(lockstep, name)
