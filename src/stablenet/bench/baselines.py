r"""Published convolution-norm bounds, for comparison in benchmarks only (never used to certify).

* :func:`reshaped_kernel_norm`: :math:`\sigma_1` of the kernel reshaped to ``c_out x (c_in k k)``, what
  ``torch.nn.utils.spectral_norm`` normalises by. **Not** the operator norm (pytorch issue 99149): it can be
  below it.
* :func:`singla_feizi_bound`: Singla & Feizi 2021 ("Fantastic Four"), :math:`\sqrt{hw}` times the smallest
  spectral norm of four reshapings of the kernel.
* :func:`araujo_bound`: Araujo et al. 2021 (Toeplitz theory), :math:`\sqrt{\sum_{ij} \sup_\omega
  |\hat K_{ij}(\omega)|^2}`, the supremum taken on a grid of frequencies as in the paper (so slightly below
  the true supremum).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["araujo_bound", "reshaped_kernel_norm", "singla_feizi_bound"]


def reshaped_kernel_norm(kernel: Tensor) -> Tensor:
    return torch.linalg.matrix_norm(kernel.reshape(kernel.shape[0], -1), 2)


def singla_feizi_bound(kernel: Tensor) -> Tensor:
    c_out, c_in, h, w = kernel.shape
    reshapings = [
        kernel.permute(0, 2, 1, 3).reshape(c_out * h, c_in * w),
        kernel.permute(0, 3, 1, 2).reshape(c_out * w, c_in * h),
        kernel.reshape(c_out, c_in * h * w),
        kernel.permute(0, 2, 3, 1).reshape(c_out * h * w, c_in),
    ]
    norms = torch.stack([torch.linalg.matrix_norm(r, 2) for r in reshapings])
    return math.sqrt(h * w) * norms.min()


def araujo_bound(kernel: Tensor, grid: int = 50) -> Tensor:
    spectrum = torch.fft.fft2(kernel, s=(grid, grid)).abs()  # |K_ij(omega)| on a grid x grid lattice
    return spectrum.amax(dim=(-2, -1)).pow(2).sum().sqrt()
