"""Deployable copies of networks: every layer with an ``export()`` replaced by the plain torch layers it returns.

Constrained layers compute their weights from free parameters at every call; ``export()`` copies the constrained
weights into plain ``nn.Linear`` / ``nn.Conv2d`` layers (residual layers into a plain
:class:`~stablenet.nn.skip.Residual`), so inference costs what the plain network costs.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["export_branch", "export_model"]


def export_model(model: nn.Module, example_input: Tensor | None = None) -> nn.Module:
    """A deployable copy of ``model``: every constrained layer replaced by the plain torch layers of its ``export()``.

    In eval mode the copy computes the same outputs (to float rounding) without any constraint cost. Certify the
    original model: the copy's layers are plain, so only the generic (looser) network bound applies to it.

    Args:
        model: the network.
        example_input: a batch run through ``model`` (eval mode, no gradient) before exporting; needed by layers
            whose export depends on the input size (``CayleyConv2d``) when they have not seen an input yet.

    Example:
        >>> from stablenet.models import create_model
        >>> net = create_model("lipconvnet", num_classes=10, in_channels=1, input_size=(8, 8)).eval()
        >>> x = torch.rand(2, 1, 8, 8)
        >>> torch.allclose(export_model(net).eval()(x), net(x), atol=1e-5)
        True
    """
    if example_input is not None:
        training = model.training
        with torch.no_grad():
            model.eval()(example_input)
        model.train(training)
    return export_branch(model)


def export_branch(module: nn.Module) -> nn.Module:
    """A copy of ``module`` in which every submodule with an ``export()`` method is replaced by its export.

    A module that has ``export()`` itself is exported; any other module is deep-copied and its children are
    exported recursively (modules without ``export()``, e.g. activations, are kept as copies).
    """
    export = getattr(module, "export", None)
    if callable(export):
        return export()
    clone = copy.deepcopy(module)
    _export_children(clone)
    return clone


def _export_children(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        export = getattr(child, "export", None)
        if callable(export):
            setattr(module, name, export())
        else:
            _export_children(child)
