"""IEEE float32 arithmetic on GPUs: a context that switches TF32 off where a computation must be sound.

Ampere and later GPUs can run float32 matmuls and convolutions in TF32 (a 10-bit mantissa): cuDNN convolutions
do so by default, and many training scripts switch matmuls on too. Certified computations that reason about
float32 rounding (the forward-rounding tolerance of Lipschitz certificates) need real float32 and use
:func:`ieee_float32`. Constraint math runs in float64 instead (Note [constraint precision] in
``stablenet.nn.base``), which TF32 never touches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["ieee_float32"]


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
