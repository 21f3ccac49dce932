r"""CUDA graphs for the layers' weight maps: the constraint costs two graph launches per training step.

# Note [captured weight maps]
A constrained layer maps its free parameters to constrained weights at every training step (Note [eval cache] in
``stablenet.nn.base``). The arithmetic is small (a Gram kernel, a few rescalings), but it is tens of kernels
forward and backward, and on a GPU a training step of a 64-channel layer spends more time launching them than
convolving. :func:`capture_weight_maps` records each layer's map once as a pair of CUDA graphs, forward and
backward (``torch.cuda.make_graphed_callables``); every later step copies the parameters into the graph's
inputs and replays it. The values are those of the eager map (the same kernels run), so the guarantee and the
eval-mode equality are unchanged.

It is opt-in (``train.cuda_graphs`` in a training config) because graphs have limits that eager code has not:

* only maps without host synchronisation are captured: AOL, SLL and SR layers, CPL layers (unless
  ``method="cholesky"``), and spectral layers with a fixed ``n_iter`` or the size-independent bound (the
  adaptive Gram iteration reads its stopping test on the host, the Cholesky verification its results); other
  layers keep eager. The fixed-step Gram maximum selects its argmax on the device
  (``stablenet.spectral.dense.gram_iteration_amax``). That CPL and spectral maps capture has been checked on
  CPUs only (tests/nn/test_cuda_graphs.py: no host reads, same values); ``benchmarks/gpu_zoo_check.py`` compares them
  with eager training on a GPU (not run yet);
* a graphed map cannot be differentiated twice (no ``create_graph=True`` through it: Hessian-vector products
  and gradient penalties in train mode need it off); eval mode, ``torch.func`` transforms, ``torch.compile``
  and CPU tensors use the eager map;
* a parameter whose shape, dtype, device or ``requires_grad`` changes is captured again;
* measured on single GPUs only (``benchmarks/gpu_zoo_check.py``: graphed and eager training agree); under DDP
  the parameters' gradient hooks still fire after the graphed backward, but no multi-GPU run has checked it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from stablenet.nn.base import WeightCache

__all__ = ["CapturedWeightMap", "capturable", "capture_weight_maps"]


class CapturedWeightMap:
    """A weight map recorded as CUDA graphs, captured again when its parameters' layout changes."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._graphed: Callable[..., Tensor] | None = None

    @staticmethod
    def applies(params: Sequence[Tensor]) -> bool:
        """Whether this call can use the graphs (see Note [captured weight maps])."""
        return (
            torch.is_grad_enabled()
            and all(p.is_cuda for p in params)
            and any(p.requires_grad for p in params)
            and not torch._C._are_functorch_transforms_active()
            and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing()
        )

    def __call__(self, module: nn.Module, params: Sequence[Tensor], compute: Callable[[], Tensor]) -> Tensor:
        key = tuple((tuple(p.shape), p.dtype, p.device, p.requires_grad) for p in params)
        if key != self._key or self._graphed is None:
            self._graphed = _capture(module, params, compute)
            self._key = key
        return self._graphed(*params)


def _slots(module: nn.Module, params: Sequence[Tensor]) -> list[tuple[nn.Module, str]]:
    """``(owner, name)`` of each parameter, found by identity among the module's own parameters."""
    where = {id(p): (owner, name) for owner in module.modules() for name, p in owner._parameters.items()}
    missing = [i for i, p in enumerate(params) if id(p) not in where]
    if missing:
        raise ValueError(f"the weight map of {type(module).__name__} reads tensors that are not its parameters")
    return [where[id(p)] for p in params]


def _capture(module: nn.Module, params: Sequence[Tensor], compute: Callable[[], Tensor]) -> Callable[..., Tensor]:
    slots = _slots(module, params)

    def pure(*tensors: Tensor) -> Tensor:
        # The map reads the module's parameters; during capture they are the graph's static inputs.
        saved = [owner._parameters[name] for owner, name in slots]
        try:
            for (owner, name), t in zip(slots, tensors, strict=True):
                owner._parameters[name] = t
            return compute()
        finally:
            for (owner, name), p in zip(slots, saved, strict=True):
                owner._parameters[name] = p

    samples = tuple(p.detach().clone().requires_grad_(p.requires_grad) for p in params)
    with torch.autocast("cuda", enabled=False):  # capture refuses autocast's weight cache
        return torch.cuda.make_graphed_callables(pure, samples)


def capturable(module: nn.Module) -> bool:
    """Whether ``module`` has a weight map that :func:`capture_weight_maps` can record (no host synchronisation)."""
    from stablenet.nn.constrained import ConstrainedConv2d, ConstrainedLinear
    from stablenet.nn.cpl import CPLConv2d, CPLLinear
    from stablenet.nn.sll import SLLConv2d, SLLLinear

    if isinstance(module, (CPLLinear, CPLConv2d)) and module.train_estimate:
        return False  # trains with a power step, not the map (Note [training estimate])
    if isinstance(module, (SLLConv2d, SLLLinear, CPLLinear)):
        return True
    if isinstance(module, CPLConv2d):
        return module.method != "cholesky"
    if isinstance(module, (ConstrainedLinear, ConstrainedConv2d)):
        if getattr(module, "train_estimate", False):  # trains with a power step, not the map (Note [training estimate])
            return False
        return bool(getattr(module.constraint, "capturable", False))
    return False


def capture_weight_maps(model: nn.Module, enabled: bool = True) -> int:
    """Record the weight maps of ``model``'s capturable layers as CUDA graphs (Note [captured weight maps]).

    The capture happens at each layer's first training step on a GPU; on a CPU nothing changes.

    Args:
        model: any module; its stablenet layers are found among ``model.modules()``.
        enabled: ``False`` turns the graphs off again (eager maps).

    Returns:
        The number of layers whose maps are (or, with ``enabled=False``, were) captured.
    """
    count = 0
    for module in model.modules():
        cache = getattr(module, "_cache", None)
        if isinstance(cache, WeightCache) and capturable(module):
            cache.graphs = CapturedWeightMap() if enabled else None
            count += 1
    return count
