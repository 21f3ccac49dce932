"""Shared cases and checks for the weight-constrained layers (AOL, SR, spectral, orthogonal), ready or parametrized."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn

#: ``(in_features, out_features)``: row, column, square, wide, tall.
DENSE_SHAPES = [(1, 5), (5, 1), (6, 6), (4, 9), (9, 4)]
#: ``(c_in, c_out, kernel, padding, padding_mode, stride, groups, dilation, spatial size)``
CONV = [
    (1, 1, 1, 0, "zeros", 1, 1, 1, (5, 5)),
    (2, 3, 3, 1, "zeros", 1, 1, 1, (4, 6)),
    (3, 2, 3, "same", "circular", 1, 1, 1, (5, 5)),
    (2, 3, 5, 2, "zeros", 1, 1, 1, (1, 7)),
    (3, 2, 5, 2, "circular", 1, 1, 1, (4, 6)),
    (2, 3, 3, 0, "circular", 1, 1, 1, (5, 5)),
    (1, 1, 3, 1, "circular", 1, 1, 1, (1, 7)),
    (3, 2, 1, 2, "zeros", 1, 1, 1, (4, 6)),
    (2, 3, 3, 1, "zeros", 2, 1, 1, (5, 5)),
    (4, 2, 3, "same", "circular", 1, 2, 1, (4, 6)),
    (2, 3, 3, 2, "circular", 1, 1, 2, (5, 5)),
    (3, 2, 5, "same", "zeros", 1, 1, 1, (1, 7)),
]


def conv_kwargs(case) -> dict:
    """The ``nn.Conv2d`` keyword arguments of a :data:`CONV` case."""
    _, _, _, padding, padding_mode, stride, groups, dilation, _ = case
    return {"padding": padding, "padding_mode": padding_mode, "stride": stride, "groups": groups, "dilation": dilation}


def explicit_norm(conv: nn.Conv2d, size) -> float:
    """SVD norm of the module's own operator (float64), from the identity basis through ``conv.forward``."""
    d = conv.in_channels * size[0] * size[1]
    eye = torch.eye(d, dtype=torch.float64).reshape(d, conv.in_channels, *size)
    with torch.no_grad():
        out = conv(eye) - (conv.bias[:, None, None] if conv.bias is not None else 0)
    return float(torch.linalg.matrix_norm(out.reshape(d, -1), 2))


def check_linear_parametrization(
    register: Callable[[nn.Module], nn.Module],
    remove: Callable[[nn.Module], nn.Module],
    make_layer: Callable[[int, int], nn.Module],
    kind: str,
) -> None:
    """``register`` on an ``nn.Linear`` gives the ready layer's constrained weight (norm <= 1); ``remove`` keeps
    that value as a plain parameter, and a second ``remove`` raises naming ``kind``."""
    torch.manual_seed(0)
    plain = nn.Linear(5, 7).double()
    free = plain.weight.detach().clone()
    register(plain)
    reference = make_layer(5, 7).double()
    with torch.no_grad():
        reference.weight.copy_(free)
    torch.testing.assert_close(plain.weight, reference.constrained_weight())
    assert float(torch.linalg.matrix_norm(plain.weight.detach(), 2)) <= 1 + 1e-12
    value = plain.weight.detach().clone()
    remove(plain)
    assert type(plain.weight) is nn.Parameter
    torch.testing.assert_close(plain.weight.detach(), value)
    with pytest.raises(ValueError, match=f"no {kind}"):
        remove(plain)


def check_conv_parametrization(
    register: Callable[[nn.Module], nn.Module],
    remove: Callable[[nn.Module], nn.Module],
    make_layer: Callable[..., nn.Module],
) -> None:
    """``register`` on a dilated circular ``nn.Conv2d`` (``CONV[10]``) gives the ready layer's kernel; the exact
    norm is <= 1 with the parametrization and after ``remove``."""
    torch.manual_seed(1)
    kwargs = conv_kwargs(CONV[10])  # dilation 2, circular
    conv = nn.Conv2d(2, 3, 3, **kwargs).double()
    layer = make_layer(2, 3, 3, **kwargs).double()
    with torch.no_grad():
        layer.weight.copy_(conv.weight)
    register(conv)
    torch.testing.assert_close(conv.weight, layer.constrained_weight())
    assert explicit_norm(conv, (5, 5)) <= 1 + 1e-12
    remove(conv)
    assert explicit_norm(conv, (5, 5)) <= 1 + 1e-12


def check_bf16_constraint_math(
    layers: Sequence[nn.Module], inputs: Sequence[torch.Tensor], plain: nn.Module, constraint: nn.Module
) -> None:
    """Under CPU bf16 autocast the ready ``layers`` run in bf16 with their constrained weight computed in float32
    (equal to the one outside autocast) and finite gradients; the parametrized bf16 module ``plain`` holds
    ``constraint`` applied in float32."""
    for layer, x in zip(layers, inputs, strict=True):
        reference = layer.constrained_weight()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            inside = layer.constrained_weight()
        assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())
        assert inside.dtype == torch.float32
        torch.testing.assert_close(inside, reference, rtol=0, atol=0)
        y.float().sum().backward()
        assert bool(torch.isfinite(layer.weight.grad).all())
    expected = constraint.constrain(plain.parametrizations.weight.original.float()).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain.weight.dtype == torch.bfloat16
        torch.testing.assert_close(plain.weight, expected, rtol=0, atol=0)
