r"""Differentiable upper bounds on a convolution layer's spectral norm, for the Lipschitz penalty.

``_CONV_BOUNDS`` maps the penalty's ``conv_bound`` option to a bound ``f(module, sizes, n_iter) -> Tensor``:

* ``"input_size"``: the Gram bound of the circular operator at each input size the layer was run on (for zero
  padding, of the circular operator that contains the zero-padded one, ``method="embed"``), max over sizes;
  the spatial bound where no size was recorded or a map is smaller than the kernel.
* ``"spatial"``: the spatial Gram bound, valid for every input size and both paddings.

Both are :func:`stablenet.spectral.conv.conv_spectral_norm` with ``method="gram"`` or ``"embed"``: training
signals in the kernel's dtype. The certified bounds of :mod:`stablenet.spectral.network` (rounded up, not
differentiable) serve certificates instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stablenet.spectral.conv import conv_spectral_norm

__all__: list[str] = []


def _kernel_extent(module: nn.Module) -> tuple[int, ...]:
    k = module.weight.shape[2:]
    return tuple(d * (s - 1) + 1 for d, s in zip(module.dilation, k, strict=True))


def _conv_spatial_bound(module: nn.Module, sizes: set[tuple[int, ...]], n_iter: int | None) -> Tensor:
    """Spatial Gram bound: independent of the input size, valid for zero and circular padding."""
    return conv_spectral_norm(
        module.weight,
        _kernel_extent(module),
        "zeros",
        dilation=module.dilation,
        groups=module.groups,
        method="gram",
        n_iter=n_iter or 4,
    )


def _padding_size(module: nn.Module) -> int | tuple[int, ...] | str:
    # ``spectral.conv`` takes no zeros inside a padding tuple: a layer without padding passes the int 0.
    padding = module.padding
    return 0 if not isinstance(padding, str) and not any(padding) else padding


def _conv_input_size_bound(module: nn.Module, sizes: set[tuple[int, ...]], n_iter: int | None) -> Tensor:
    """Circular Gram at each recorded size (zero padding: the circular embedding), max over sizes."""
    extent = _kernel_extent(module)
    if not sizes or any(n < k for size in sizes for n, k in zip(size, extent, strict=True)):
        # not reached by the recording pass, or run on maps smaller than the kernel: use the size-free bound
        return _conv_spatial_bound(module, sizes, n_iter)
    method = "gram" if module.padding_mode == "circular" else "embed"
    bounds = [
        conv_spectral_norm(
            module.weight,
            size,
            module.padding_mode,
            dilation=module.dilation,
            groups=module.groups,
            method=method,
            n_iter=n_iter or 6,
            padding_size=_padding_size(module),
        )
        for size in sorted(sizes)
    ]
    return torch.stack(bounds).amax()


_CONV_BOUNDS = {"input_size": _conv_input_size_bound, "spatial": _conv_spatial_bound}
