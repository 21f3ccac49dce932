r"""The measurements of ``stablenet audit``, one function per stage, each returning a JSON-ready dict.

Every stage reads the same examples (the first ``max_examples`` of the test split) so that the methods can be
compared example by example. The functions are pure measurements; :func:`stablenet.workflows.audit.audit`
runs them in order, caches each result in the output folder and assembles the audit.

* :func:`lipschitz_stage`: the certified upper bound of the whole network and of each layer
  (:func:`~stablenet.spectral.lipschitz_upper_bound`), or the list of modules the walker cannot bound, and the
  empirical lower bound (:func:`~stablenet.spectral.lipschitz_lower_bound`): the truth lies between them.
* :func:`certificate_summary`: per-example radii and correctness of one records file, its average certified
  radius and certified accuracy at the standard radii (the definitions of
  :mod:`stablenet.workflows.report`).
* :func:`attack_stage`: PGD (:func:`~stablenet.certify.attack.pgd_l2`) at each standard radius: the empirical
  robust accuracy, an upper bound on what a certificate of the model itself can show (not on smoothing's, which
  certifies the smoothed classifier).
* :func:`hessian_stage`, :func:`landscape_stage`: the loss's curvature at the weights.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablenet.certify.attack import pgd_l2
from stablenet.certify.records import CertificationRecord
from stablenet.curvature.hessian import Hessian
from stablenet.curvature.landscape import landscape_2d
from stablenet.spectral import lipschitz_lower_bound, lipschitz_upper_bound, unbounded_modules
from stablenet.spectral.network import layer_lipschitz_bounds

__all__ = [
    "attack_stage",
    "certificate_summary",
    "clean_stage",
    "disagreements",
    "hessian_stage",
    "landscape_stage",
    "lipschitz_stage",
]


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _batches(images: Tensor, labels: Tensor, batch_size: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    return [
        (images[i : i + batch_size].to(device), labels[i : i + batch_size].to(device))
        for i in range(0, len(images), batch_size)
    ]


def clean_stage(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> dict[str, Any]:
    """The model's predictions on the examples and its accuracy."""
    predictions = []
    with torch.no_grad():
        for x, _ in _batches(images, labels, batch_size, _device(model)):
            predictions += model(x).argmax(1).tolist()
    correct = [p == int(y) for p, y in zip(predictions, labels.tolist(), strict=True)]
    return {"predictions": predictions, "accuracy": sum(correct) / len(correct)}


def lipschitz_stage(
    model: nn.Module, input_shape: Sequence[int], inputs: Tensor, *, seed: int = 0, quick: bool = False
) -> dict[str, Any]:
    """Upper bound (total and per layer) or the unbounded modules, and the empirical lower bound at ``inputs``."""
    shape = tuple(input_shape)
    unbounded = unbounded_modules(model, shape)
    upper, layers = None, []
    if not unbounded:
        upper = lipschitz_upper_bound(model, shape)
        modules = dict(model.named_modules())
        layers = [
            {"name": name, "type": type(modules.get(name, model)).__name__, "bound": bound}
            for name, bound in layer_lipschitz_bounds(model, shape)
        ]
    options = {"n_iter": 20, "restarts": 1, "ascent_steps": 5} if quick else {}
    generator = torch.Generator().manual_seed(seed)
    lower = lipschitz_lower_bound(model, inputs.to(_device(model)), generator=generator, **options)
    return {
        "upper": upper,
        "lower": lower,
        "ratio": upper / lower if upper is not None and lower > 0 else None,
        "layers": layers,
        "unbounded": unbounded,
        "inputs": f"{len(inputs)} test images",
    }


def certificate_summary(
    records: Sequence[CertificationRecord], indices: Sequence[int], radii: Sequence[float]
) -> dict[str, Any]:
    """Per-example radii and correctness aligned with ``indices``, the ACR and certified accuracy at ``radii``.

    A record counts at radius ``r`` when its prediction is correct (an abstention never is) and its radius is at
    least ``r``; the average certified radius counts a wrong prediction as 0 (Cohen et al. 2019).
    """
    by_index = {r.index: r for r in records}
    missing = [i for i in indices if i not in by_index]
    if missing:
        raise ValueError(f"the records lack {len(missing)} of the audited examples (first: {missing[0]})")
    chosen = [by_index[i] for i in indices]
    correct = [bool(r.correct) for r in chosen]
    radius = [float(r.radius) for r in chosen]
    effective = [r if c else 0.0 for r, c in zip(radius, correct, strict=True)]
    n = len(chosen)
    return {
        "radii": radius,
        "correct": correct,
        "acr": sum(effective) / n,
        "certified_accuracy": [sum(c and r >= t for r, c in zip(radius, correct, strict=True)) / n for t in radii],
    }


def disagreements(methods: dict[str, dict[str, Any]], indices: Sequence[int], labels: Sequence[int], top: int = 8):
    """The examples whose effective radii (0 when wrong) differ most across methods, most first."""
    if len(methods) < 2:
        return []
    spread = []
    for k, index in enumerate(indices):
        values = [m["radii"][k] if m["correct"][k] else 0.0 for m in methods.values()]
        spread.append((max(values) - min(values), k, index))
    chosen = sorted((s for s in spread if s[0] > 0), key=lambda s: (-s[0], s[2]))[:top]
    return [
        {
            "index": index,
            "label": int(labels[k]),
            "radii": {key: m["radii"][k] for key, m in methods.items()},
            "correct": {key: m["correct"][k] for key, m in methods.items()},
        }
        for _, k, index in chosen
    ]


def attack_stage(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    predictions: Sequence[int],
    radii: Sequence[float],
    *,
    steps: int,
    restarts: int,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Robust accuracy under PGD at each radius: correct and not flipped inside the l2 ball (not clipped)."""
    device = _device(model)
    correct = torch.tensor([p == int(y) for p, y in zip(predictions, labels.tolist(), strict=True)])
    robust = []
    for radius in radii:
        generator = torch.Generator().manual_seed(seed)
        survived = correct.clone()
        for start in range(0, len(images), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(images)))
            rows = rows[correct[rows]]
            if len(rows) == 0:
                continue
            x, y = images[rows].to(device), labels[rows].to(device)
            _, flipped = pgd_l2(model, x, y, radius, steps=steps, restarts=restarts, generator=generator)
            survived[rows] = ~flipped.cpu()
        robust.append(int(survived.sum()) / len(survived))
    return {"radii": list(radii), "robust_accuracy": robust, "steps": steps, "restarts": restarts}


def hessian_stage(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    top_k: int,
    trace_samples: int,
    max_iter: int,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Top eigenvalues (Lanczos) and Hutchinson's trace ± standard error of the cross-entropy's Hessian."""
    hessian = Hessian(model, F.cross_entropy, _batches(images, labels, batch_size, _device(model)))
    generator = torch.Generator().manual_seed(seed)
    values, _ = hessian.eigenvalues(k=top_k, method="lanczos", max_iter=max_iter, tol=1e-3, generator=generator)
    estimate, se = hessian.trace(num_samples=trace_samples, generator=generator)
    return {
        "top_eigenvalues": [float(v) for v in values],
        "trace": {"estimate": float(estimate), "standard_error": float(se), "num_samples": trace_samples},
        "num_examples": len(images),
        "num_parameters": hessian.dim,
    }


def landscape_stage(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    resolution: int,
    span: float,
    checkpoint: str | os.PathLike,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """The loss and accuracy on a filter-normalised random plane through the weights (resumable grid)."""
    result = landscape_2d(
        model,
        nn.CrossEntropyLoss(),
        _batches(images, labels, batch_size, _device(model)),
        resolution=resolution,
        span=(-span, span),
        generator=torch.Generator().manual_seed(seed),
        checkpoint=checkpoint,
        progress=progress,
    )

    def finite(a: np.ndarray) -> list:
        return [[float(v) if math.isfinite(v) else None for v in row] for row in np.asarray(a, dtype=float)]

    return {
        "alphas": [float(a) for a in result.alphas],
        "betas": [float(b) for b in result.betas],
        "loss": finite(result.loss),
        "accuracy": finite(result.accuracy),
    }
