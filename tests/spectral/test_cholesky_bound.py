"""Cholesky-verified circular norms: against the explicit operator's SVD, in float32 against the float64 truth."""

import importlib
import math
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stablenet.spectral import (
    cholesky_bound,
    cholesky_circular_bound,
    conv_operator_matrix,
    conv_spectral_norm,
    conv_spectral_norm_upper_bound,
    gram_spectrum,
    power_iteration,
)
from stablenet.spectral.cholesky_bound import _factorises, _screen, _Spectrum
from stablenet.spectral.conv import conv_operator

RTOL = 1e-4


def circular_operator(kernel: torch.Tensor, size: tuple[int, int], groups: int = 1) -> torch.Tensor:
    """Explicit matrix of the circular cross-correlation on ``size`` pixels, wrapping kernels larger than it."""
    c_out, c_in_g, kh, kw = kernel.shape
    c_in = c_in_g * groups
    eye = torch.eye(c_in * size[0] * size[1], dtype=kernel.dtype).reshape(-1, c_in, *size)
    out = torch.zeros(eye.shape[0], c_out, *size, dtype=kernel.dtype)
    go, gi = c_out // groups, c_in // groups
    for a in range(kh):
        for b in range(kw):
            shifted = torch.roll(eye, shifts=(-a, -b), dims=(2, 3))
            for g in range(groups):
                block = kernel[g * go : (g + 1) * go, :, a, b]
                out[:, g * go : (g + 1) * go] += torch.einsum("oi,bihw->bohw", block, shifted[:, g * gi : (g + 1) * gi])
    return out.reshape(eye.shape[0], -1).T


def grouped(kernel: torch.Tensor, groups: int) -> torch.Tensor:
    return kernel.reshape(groups, kernel.shape[0] // groups, *kernel.shape[1:])


@settings(max_examples=40, deadline=None)
@given(
    groups=st.sampled_from([1, 1, 2, 3]),
    c_out=st.integers(1, 4),
    c_in=st.integers(1, 4),
    kh=st.integers(1, 5),
    kw=st.integers(1, 5),
    n1=st.integers(1, 7),
    n2=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_bound_brackets_the_explicit_operator(groups, c_out, c_in, kh, kw, n1, n2, seed):
    """Even kernels, c_in != c_out, kernels larger than the input, groups: exact <= bound <= exact (1 + rtol)."""
    gen = torch.Generator().manual_seed(seed)
    kernel = torch.randn(c_out * groups, c_in, kh, kw, dtype=torch.float64, generator=gen)
    exact = float(torch.linalg.matrix_norm(circular_operator(kernel, (n1, n2), groups), 2))
    bound = float(cholesky_circular_bound(grouped(kernel, groups), (n1, n2)))
    assert exact <= bound <= exact * (1 + RTOL) + 1e-12


def test_identity_kernel_has_norm_one():
    kernel = torch.zeros(5, 5, 3, 3, dtype=torch.float64)
    kernel[:, :, 1, 1] = torch.eye(5)
    bound = float(cholesky_circular_bound(kernel[None], (8, 8)))
    assert 1.0 <= bound <= 1.0 + RTOL + 1e-9


def test_scaled_orthogonal_taps_closed_form():
    """A kernel with one orthogonal tap scaled by 3 has norm exactly 3 at every size."""
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    kernel = torch.zeros(6, 6, 2, 4, dtype=torch.float64)
    kernel[:, :, 1, 3] = 3 * q
    bound = float(cholesky_circular_bound(kernel[None], (5, 9)))
    assert 3.0 <= bound <= 3.0 * (1 + RTOL) + 1e-9


def test_matches_the_published_example_size():
    """The 64x64x5x5 Gaussian kernel on 12x12 (METHODS 1.2, seed 0): within rtol of the exact circular norm."""
    kernel = torch.randn(64, 64, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = float(conv_spectral_norm(kernel, 12, "circular", method="exact"))
    bound = float(cholesky_circular_bound(kernel[None], (12, 12)))
    assert exact <= bound <= exact * (1 + RTOL) + 1e-12


def test_gram_spectrum_error_bound_covers_float32_rounding():
    """The computed error bound of Note [verified rounding] holds where it is large enough to see: float32 G
    against the float64 G, frequency by frequency, on wide kernels with positive taps (the worst case)."""
    gen = torch.Generator().manual_seed(2)
    for kernel in (
        torch.randn(1, 48, 40, 3, 3, dtype=torch.float64, generator=gen),
        torch.rand(1, 48, 40, 3, 3, dtype=torch.float64, generator=gen),
        torch.rand(2, 7, 30, 5, 2, dtype=torch.float64, generator=gen) + 1.0,
    ):
        g64, _ = gram_spectrum(kernel, (9, 8))
        g32, err32 = gram_spectrum(kernel.float(), (9, 8))
        per_group = len(g64) // kernel.shape[0]
        diff = torch.linalg.matrix_norm(g32.to(torch.complex128) - g64, 2).reshape(kernel.shape[0], per_group)
        assert (diff.amax(dim=1) <= err32.double()).all()
        assert (diff.amax(dim=1) >= 1e-5 * err32.double()).all()  # worst-case, yet not vacuous


@pytest.mark.parametrize("seed", range(6))
def test_float32_pipeline_stays_above_the_float64_truth(seed):
    """With a level one float32 ulp above the estimate, only the rounding terms keep the bound sound."""
    gen = torch.Generator().manual_seed(seed)
    kernel = torch.rand(1, 24, 20, 3, 3, dtype=torch.float64, generator=gen) - 0.3
    exact = float(conv_spectral_norm(kernel[0], 10, "circular", method="exact"))
    bound = float(cholesky_circular_bound(kernel, (10, 10), rtol=1e-7, dtype=torch.float32))
    assert bound >= exact


def test_misleading_trace_ranking_and_fallback_stay_sound():
    """The frequency with the largest trace is not the one with the largest eigenvalue: rounds (and, with one
    round, the Gram-iteration fallback) still end above the exact norm and within rtol when rounds suffice."""
    size = (8, 8)
    kernel = torch.zeros(1, 6, 6, 3, 3, dtype=torch.float64)
    kernel[0, :, :, 1, 1] = 0.9 * torch.eye(6)  # flat spectrum, trace 6 * 0.81 everywhere
    spike = torch.zeros(6, 6, dtype=torch.float64)
    spike[0, 0] = 1.0
    kernel[0, :, :, 0, 1] += spike  # one channel gets a frequency-dependent rank-one bump
    kernel[0, :, :, 2, 1] += 0.2 * torch.eye(6)  # traces peak where the bump does not
    exact = float(torch.linalg.matrix_norm(torch.fft.fft2(kernel[0], s=size).permute(2, 3, 0, 1), 2).max())
    assert exact <= float(cholesky_circular_bound(kernel, size)) <= exact * (1 + RTOL) + 1e-12
    assert float(cholesky_circular_bound(kernel, size, max_rounds=1)) >= exact


def test_zero_kernel_has_norm_zero():
    bound = float(cholesky_circular_bound(torch.zeros(1, 3, 4, 3, 3, dtype=torch.float64), (6, 6)))
    assert 0.0 <= bound <= 1e-150


@pytest.mark.parametrize("seed", range(3))
def test_single_precision_screen_passes_only_frequencies_below_the_level(seed):
    """Note [single-precision screen]: at any level, a frequency the complex64 pass verifies has its exact top
    eigenvalue below the level, including frequencies just below it (where complex64 rounding alone could pass
    them); and the screen does verify most frequencies well below the level."""
    gen = torch.Generator().manual_seed(seed)
    kernel = torch.rand(1, 96, 80, 3, 3, dtype=torch.float64, generator=gen) - 0.45
    spectrum = _Spectrum(kernel, (12, 12))
    exact = torch.linalg.eigvalsh(spectrum.gram(torch.arange(len(spectrum))))[:, -1]
    diag = spectrum.diagonals()
    for level in (*exact.quantile(torch.tensor([0.25, 0.5, 0.9], dtype=torch.float64)).tolist(), float(exact.max())):
        for nudged in (level * (1 + 1e-7), level * 1.002):
            failed = _screen(spectrum, diag, nudged, batch_len=7)
            passed = torch.ones(len(spectrum), dtype=torch.bool)
            passed[failed] = False
            assert (exact[passed] <= nudged).all()
    failed = _screen(spectrum, diag, float(exact.max()) * 1.05, batch_len=7)
    assert len(failed) < len(spectrum) // 2


def test_lowered_twin_error_bound_covers_its_rounding():
    """The single-precision twin's e_G bounds its G's distance to the float64 G, frequency by frequency."""
    gen = torch.Generator().manual_seed(8)
    for kernel in (
        torch.rand(1, 96, 80, 3, 3, dtype=torch.float64, generator=gen),
        torch.randn(2, 9, 30, 5, 3, dtype=torch.float64, generator=gen),
    ):
        spectrum = _Spectrum(kernel, (10, 9))
        index = torch.arange(len(spectrum))
        low = spectrum.lowered()
        diff = torch.linalg.matrix_norm(low.gram(index).to(torch.complex128) - spectrum.gram(index), 2)
        per_group = diff.reshape(kernel.shape[0], -1).amax(dim=1)
        assert (per_group <= low.err.double()).all() and (per_group >= 1e-5 * low.err.double()).all()


def test_screen_does_not_change_the_bound():
    kernel = torch.randn(1, 64, 48, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    with_screen = cholesky_circular_bound(kernel, (16, 16))
    without = cholesky_circular_bound(kernel, (16, 16), screen=False)
    assert torch.equal(with_screen, without)


def test_small_batches_give_the_same_bound():
    kernel = torch.randn(1, 9, 7, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    whole = cholesky_circular_bound(kernel, (11, 11))
    batched = cholesky_circular_bound(kernel, (11, 11), max_batch_bytes=1)
    assert torch.equal(whole, batched)


@pytest.mark.parametrize("threads", [1, 2])
def test_factorises_reports_definiteness(threads):
    """In place, threaded or not, success means positive definite: checked against eigenvalues."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(4)
        a = torch.randn(40, 12, 12, dtype=torch.complex128, generator=gen)
        hermitian = a.mH @ a
        shift = torch.linalg.eigvalsh(hermitian)[:, -1] * torch.linspace(0.5, 1.5, 40, dtype=torch.float64)
        shifted = shift[:, None, None] * torch.eye(12, dtype=torch.complex128) - hermitian
        expected = torch.linalg.eigvalsh(shifted)[:, 0] > 0
        assert torch.equal(_factorises(shifted.clone()), expected)
        assert expected.any() and (~expected).any()
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_certified_method_against_explicit_operator_and_attack(padding):
    """Through the public API: above the explicit operator's norm, and above 300 power steps (the attack)."""
    gen = torch.Generator().manual_seed(5)
    kernel = torch.randn(5, 3, 3, 3, dtype=torch.float64, generator=gen)
    bound = conv_spectral_norm_upper_bound(kernel, 7, padding=padding, method="cholesky")
    exact = float(torch.linalg.matrix_norm(conv_operator_matrix(kernel, 7, padding=padding), 2))
    matvec, rmatvec, shape = conv_operator(kernel, 7, padding=padding)
    attack, _, _ = power_iteration((matvec, rmatvec), 300, input_shape=shape, generator=gen, dtype=torch.float64)
    assert exact <= bound and float(attack) <= bound
    svd = conv_spectral_norm_upper_bound(kernel, 7, padding=padding, method="svd")
    assert math.isclose(bound, svd, rel_tol=2 * RTOL)


def test_auto_uses_cholesky_on_cpu():
    kernel = torch.randn(4, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert conv_spectral_norm_upper_bound(kernel, 9, method="auto") == conv_spectral_norm_upper_bound(
        kernel, 9, method="cholesky"
    )


def test_bad_input_names_what_is_accepted():
    kernel = torch.randn(1, 2, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="rtol must be a positive float"):
        cholesky_circular_bound(kernel, (5, 5), rtol=0.0)
    with pytest.raises(ValueError, match=r"dtype must be torch\.float64 or torch\.float32"):
        cholesky_circular_bound(kernel, (5, 5), dtype=torch.float16)
    with pytest.raises(ValueError, match="NaN or Inf"):
        cholesky_circular_bound(torch.full((1, 2, 2, 3, 3), float("inf")), (5, 5))
    with pytest.raises(ValueError, match="method in auto, cholesky, gram, svd"):
        conv_spectral_norm_upper_bound(kernel[0], 5, padding="circular", method="power")
    with pytest.raises(ValueError, match="NaN or Inf"):
        conv_spectral_norm_upper_bound(torch.full((2, 2, 3, 3), float("nan")), 5, method="cholesky")


def test_gram_range_equals_gram_across_groups():
    kernel = torch.randn(3, 4, 5, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    spectrum = _Spectrum(kernel, (5, 6))
    f = spectrum.n_freqs
    for start, stop in ((0, len(spectrum)), (1, f - 1), (f - 2, 2 * f + 3), (2 * f, 3 * f)):
        expected = spectrum.gram(torch.arange(start, stop))
        assert torch.equal(spectrum.gram_range(start, stop), expected)
        out = torch.empty_like(expected)
        assert spectrum.gram_range(start, stop, out=out) is out and torch.equal(out, expected)


def test_old_module_path_is_a_deprecated_alias():
    """``stablenet.spectral.verified`` (the old name) re-exports the public names, and warns on import."""
    sys.modules.pop("stablenet.spectral.verified", None)
    with pytest.warns(DeprecationWarning, match="import from stablenet.spectral.cholesky_bound"):
        verified = importlib.import_module("stablenet.spectral.verified")
    assert {name: getattr(verified, name) for name in verified.__all__} == {
        name: getattr(cholesky_bound, name) for name in cholesky_bound.__all__
    }
