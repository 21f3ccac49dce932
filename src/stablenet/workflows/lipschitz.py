r"""Both sides of a model's l2 Lipschitz constant: the certified upper bound and an empirical lower bound.

.. math::

    \max_{x} \|J_f(x)\|_2 \;\le\; L(f) \;\le\; \prod_{l} L(f_l),

the upper bound the product of per-layer bounds (:func:`stablenet.spectral.lipschitz_upper_bound`, listed
layer by layer), the lower bound the largest Jacobian norm and difference quotient found near sample inputs
(:func:`stablenet.spectral.lipschitz_lower_bound`). :func:`lipschitz_report` bounds a trained run (inputs: its
test images) or an untrained registry model (inputs: uniform in :math:`[0, 1]`); it is what
``stablenet lipschitz`` runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from stablenet.models import create_model
from stablenet.models.persistence import load_run, read_model_metadata
from stablenet.spectral import layer_lipschitz_bounds, lipschitz_lower_bound, lipschitz_upper_bound

__all__ = ["LipschitzReport", "lipschitz_report"]


@dataclass(frozen=True)
class LipschitzReport:
    """The bounds of :func:`lipschitz_report`.

    Attributes:
        upper: the certified upper bound.
        lower: the empirical lower bound.
        layers: ``(name, bound)`` of each top-level layer, whose product the upper bound is at least.
        input_shape: ``(C, H, W)`` of one input.
        inputs: what the lower bound was measured at, e.g. ``"64 digits test images"``.
    """

    upper: float
    lower: float
    layers: list[tuple[str, float]]
    input_shape: tuple[int, ...]
    inputs: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: ``upper``, ``lower``, ``layers`` (``name``, ``bound``) and ``input_shape``."""
        return {
            "upper": self.upper,
            "lower": self.lower,
            "layers": [{"name": name, "bound": bound} for name, bound in self.layers],
            "input_shape": list(self.input_shape),
        }


def lipschitz_report(
    run_dir: str | os.PathLike | None = None,
    *,
    model: str | None = None,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
    num_inputs: int = 64,
    data_root: str | None = None,
    seed: int = 0,
) -> LipschitzReport:
    """Bound the Lipschitz constant of a trained run or of an untrained registry model (give exactly one).

    Args:
        run_dir: a run directory; the lower bound is taken at its first ``num_inputs`` test images.
        model: a registry model name, built with ``num_classes``, ``in_channels`` and ``input_size`` (height
            and width) and weights drawn after ``torch.manual_seed(seed)``; the lower bound is taken at
            ``num_inputs`` uniform random inputs.
        data_root: the directory holding the run's data set files.
        seed: seeds the untrained weights, the random inputs and the lower bound's starting vectors.
    """
    if (run_dir is None) == (model is None):
        raise ValueError(f"give exactly one of run_dir and model; got run_dir={run_dir!r}, model={model!r}")
    if num_inputs < 1:
        raise ValueError(f"num_inputs must be >= 1; got {num_inputs}")
    generator = torch.Generator().manual_seed(seed)
    if run_dir is not None:
        if "dataset" not in read_model_metadata(run_dir):
            raise ValueError(f"checkpoint {run_dir} does not name its data set; pass model for random inputs")
        run = load_run(run_dir, "test", data_root)
        net = run.model
        input_shape = (int(run.metadata["in_channels"]), *(int(s) for s in run.metadata["input_size"]))
        inputs = run.images[:num_inputs]
        source = f"{len(inputs)} {run.metadata['dataset']} test images"
    else:
        input_shape = (in_channels, input_size, input_size)
        torch.manual_seed(seed)  # the untrained model's weights
        net = create_model(model, num_classes, in_channels, input_size).eval()
        inputs = torch.rand((num_inputs, *input_shape), generator=generator)
        source = f"{len(inputs)} uniform random inputs in [0, 1]"
    layers = layer_lipschitz_bounds(net, input_shape)
    upper = lipschitz_upper_bound(net, input_shape)
    lower = lipschitz_lower_bound(net, inputs, generator=generator)
    return LipschitzReport(upper=upper, lower=lower, layers=layers, input_shape=input_shape, inputs=source)
