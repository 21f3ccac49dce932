"""Shared grids and checks for the residual layers (SLL, CPL): the explicit conv operator, export, cache, bf16."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from stablenet.nn.base import LAYER_ROUNDING_SLACK
from stablenet.nn.relu_residual import _conv_same
from stablenet.nn.skip import Residual

#: ``(features, inner_features)``
DENSE = [(1, 1), (1, 5), (5, 1), (6, 6), (4, 9), (9, 4)]
#: ``(channels, inner_channels)``
CHANNELS = [(1, 1), (2, 3), (3, 2), (3, 3)]
KERNELS = [1, 3, 5]
PADDINGS = ["zeros", "circular"]
SIZES = [(5, 5), (4, 6), (1, 7)]
CONV_GRID = [(c, i, k, p) for c, i in CHANNELS for k in KERNELS for p in PADDINGS]


def spatial_size(index: int, kernel: int, padding_mode: str) -> tuple[int, int]:
    """Cycle through SIZES; torch's circular padding cannot wrap a height-1 input around a 5x5 kernel."""
    size = SIZES[index % len(SIZES)]
    return (5, 5) if padding_mode == "circular" and min(size) < kernel // 2 else size


def explicit_conv(weight: torch.Tensor, size: tuple[int, int], padding_mode: str) -> torch.Tensor:
    """The layer's own convolution as a matrix (rows: flattened outputs), from the identity basis."""
    c, (kh, kw) = weight.shape[1], weight.shape[-2:]
    d = c * size[0] * size[1]
    eye = torch.eye(d, dtype=weight.dtype).reshape(d, c, *size)
    return _conv_same(eye, weight, None, (kh // 2, kw // 2), padding_mode).reshape(d, -1).T


def check_export_matches(layers: Sequence[tuple[nn.Module, Sequence[int]]]) -> None:
    """Each ``(layer, input shape)``: ``export()`` is a plain-torch ``Residual`` equal to the layer in eval mode,
    to 1e-5 in float32 and 1e-12 in float64."""
    for layer, shape in layers:
        for dtype, tol in [(torch.float32, 1e-5), (torch.float64, 1e-12)]:
            layer = layer.to(dtype).eval()
            x = torch.randn(*shape, dtype=dtype) * 3
            exported = layer.export()
            assert isinstance(exported, Residual) and not exported.training
            assert all(type(m).__module__.startswith("torch.nn") for m in exported.branch.modules())
            with torch.no_grad():
                torch.testing.assert_close(exported(x), layer(x), rtol=tol, atol=tol)


def check_eval_cache_and_bound(factory: Callable[[], nn.Module], shape: Sequence[int], tol: float) -> None:
    """The bound is ``1 + LAYER_ROUNDING_SLACK``; eval equals train (to ``tol``), reuses its cached second factor,
    and a ``load_state_dict`` (an in-place copy) invalidates the cache."""
    torch.manual_seed(0)
    layer = factory()
    assert layer.lipschitz_bound() == 1 + LAYER_ROUNDING_SLACK
    x = torch.randn(*shape)
    train_out = layer(x)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), train_out, rtol=tol, atol=tol)
        first = layer._cache._value
        layer(x)
        assert layer._cache._value is first
        other = factory()
        layer.load_state_dict(other.state_dict())  # an in-place copy invalidates the cache
        torch.testing.assert_close(layer(x), other.eval()(x))


def check_bf16_autocast(
    layer: nn.Module, x: torch.Tensor, scaling: Callable[[], torch.Tensor], scaling_dtype: torch.dtype
) -> None:
    """Under CPU bf16 autocast ``scaling()`` keeps ``scaling_dtype``, train and eval outputs and the weight's
    gradient are finite, and the output is within bf16 rounding of the float32 one."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert scaling().dtype == scaling_dtype
        out = layer(x)
        out.float().pow(2).sum().backward()
        layer.eval()
        with torch.no_grad():
            assert torch.isfinite(layer(x)).all()
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    torch.testing.assert_close(out.float(), layer.train()(x), rtol=0.05, atol=0.05)
