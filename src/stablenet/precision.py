"""Floating-point modes for sound computations: TF32, reduced-precision "fast math" and cuDNN algorithms off.

Ampere and later GPUs can run float32 matmuls and convolutions in TF32 (a 10-bit mantissa): cuDNN convolutions
do so by default, and many training scripts switch matmuls on too. oneDNN on recent CPUs can likewise round
float32 inputs to bfloat16 when asked (``torch.backends.mkldnn.*.fp32_precision = "bf16"``). Certified
computations that reason about float32 rounding use real float32 instead:

* :func:`ieee_float32` switches TF32 off (what measurements of float32 rounding need);
* :func:`sound_arithmetic` also switches reduced-precision CPU modes off and, on GPUs, cuDNN, whose Winograd
  and FFT convolution algorithms round differently from dot products (Note [rounding model] in
  ``stablenet.spectral.rounding``); it is what the certifiers' forward passes run under.

Constraint math runs in float64 instead (Note [constraint precision] in ``stablenet.nn.base``), which TF32
never touches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["ieee_float32", "sound_arithmetic"]


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Run the block with TF32 disabled for CUDA matmuls and cuDNN convolutions; the flags are restored after.

    The flags are process-wide, so do not run other float32 GPU work in another thread meanwhile.
    """
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _cpu_precision_settings() -> list[object]:
    """The oneDNN settings objects with an ``fp32_precision`` (newer torch), outermost first."""
    mkldnn = torch.backends.mkldnn
    found = [getattr(torch.backends, "fp32_precision", None) and torch.backends]
    found += [mkldnn, getattr(mkldnn, "matmul", None), getattr(mkldnn, "conv", None)]
    return [s for s in found if s is not None and hasattr(s, "fp32_precision")]


@contextmanager
def sound_arithmetic() -> Iterator[None]:
    """Run the block in IEEE arithmetic as ``stablenet.spectral.rounding`` models it; settings restored after.

    TF32 off (:func:`ieee_float32`), oneDNN's reduced-precision float32 modes off, and cuDNN disabled (torch then
    convolves by im2col and GEMM, plain dot products). Process-wide, as :func:`ieee_float32`.
    """
    saved = [(s, s.fp32_precision) for s in _cpu_precision_settings()]
    cudnn = torch.backends.cudnn.enabled
    try:
        for settings, value in saved:
            if value not in ("none", "ieee"):
                settings.fp32_precision = "ieee"
        torch.backends.cudnn.enabled = False
        with ieee_float32():
            yield
    finally:
        torch.backends.cudnn.enabled = cudnn
        for settings, value in saved:
            if settings.fp32_precision != value:
                settings.fp32_precision = value
