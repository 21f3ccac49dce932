"""What an audit looks at: a trained run, or a plain PyTorch classifier from a ``module:function`` factory.

Both become an :class:`AuditSubject`: the model in eval mode, the test split of its data set (pixels in [0, 1]),
and what the report says about them. A factory is imported and called with no arguments; it must return an
``nn.Module`` that takes the data set's images in [0, 1] and returns one logit per class (normalisation inside
the model, as every stablenet model does, so that radii are in pixel units).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stablenet.data import dataset_info, list_datasets, load_dataset
from stablenet.models.persistence import MODEL_FILE, load_run

__all__ = ["AuditSubject", "load_factory", "subject_from_factory", "subject_from_run"]


@dataclass
class AuditSubject:
    """A model and its test data, ready to audit.

    Attributes:
        model: the classifier in eval mode (pixels in [0, 1] to logits).
        images, labels: the test split, ``(N, C, H, W)`` and ``(N,)``.
        dataset: the data set's registered name.
        num_classes: logits per example.
        description: ``kind`` (``run`` or ``factory``), ``run`` / ``factory`` and ``model`` for the report.
    """

    model: nn.Module
    images: Tensor
    labels: Tensor
    dataset: str
    num_classes: int
    description: dict[str, Any]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])


def subject_from_run(
    run_dir: str | os.PathLike, data_root: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> AuditSubject:
    """The model of a stablenet run directory and its data set's test split."""
    if not (Path(run_dir) / MODEL_FILE).exists():
        raise FileNotFoundError(
            f"run directory {run_dir} has no checkpoint ({MODEL_FILE}); give a directory written by "
            "`stablenet train`, or a plain model with --model module:function and --data NAME"
        )
    run = load_run(run_dir, "test", data_root, map_location=device)
    meta = run.metadata
    description = {"kind": "run", "run": str(run_dir), "factory": None, "model": str(meta.get("model", "?"))}
    subject = AuditSubject(run.model.eval(), run.images, run.labels, meta["dataset"], 0, description)
    subject.num_classes = _check_output(subject)
    return subject


def load_factory(spec: str) -> nn.Module:
    """Import ``module:function`` and call the function with no arguments; it must return an ``nn.Module``."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"model must be given as module:function (e.g. torchvision.models:resnet18); got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a broken user module is reported with its own first line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot import module {module_name!r} of model factory {spec!r}: {first}") from e
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"model factory {spec!r}: module {module_name!r} has no callable {attribute!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module; it must build the "
            "classifier (pixels in [0, 1] to logits) and return it"
        )
    return model


def subject_from_factory(
    spec: str, dataset: str, data_root: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> AuditSubject:
    """A plain classifier built by ``spec`` (``module:function``) on the test split of ``dataset``."""
    if dataset not in list_datasets():
        raise ValueError(f"data must be one of {', '.join(list_datasets())}; got {dataset!r}")
    model = load_factory(spec).to(device).eval()
    data = load_dataset(dataset, "test", data_root)
    description = {"kind": "factory", "run": None, "factory": spec, "model": spec}
    subject = AuditSubject(model, data.images, data.labels, dataset, 0, description)
    subject.num_classes = _check_output(subject)
    return subject


def _check_output(subject: AuditSubject) -> int:
    """The number of classes, after one forward pass that must give one logit per class of the data set."""
    expected = dataset_info(subject.dataset).num_classes
    device = next((p.device for p in subject.model.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad():
            out = subject.model(subject.images[:2].to(device))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"the model does not accept {subject.dataset} images of shape {tuple(subject.images.shape[1:])} "
            f"(pixels in [0, 1]): {first}"
        ) from e
    if not isinstance(out, Tensor) or out.shape != (min(2, len(subject.images)), expected):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"the model must return logits of shape (batch, {expected}) for {subject.dataset}; got {shape}"
        )
    return expected
