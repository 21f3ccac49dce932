"""Certify a data set with a trained model, one record per example, resumable.

Records go to a JSON Lines file through :class:`stablenet.certify.records.RecordWriter`: a rerun skips the
indices already in the file, and a record is on disk (flushed and synced) as soon as its batch is done,
so a killed run loses at most one batch.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from stablenet.certify.lipschitz import LipschitzCertifier
from stablenet.certify.records import CertificationRecord, RecordWriter

__all__ = ["CERTIFY_METHODS", "certify_dataset", "certify_run"]

logger = logging.getLogger(__name__)
CERTIFY_METHODS = ("lipschitz",)


def certify_dataset(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    out: str | os.PathLike,
    *,
    method: str = "lipschitz",
    form: str = "auto",
    batch_size: int = 256,
    indices: list[int] | None = None,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Certify ``images`` (pixels in [0, 1]) and append one record per example to ``out``.

    Args:
        model: the classifier, used as it is (call ``.eval()`` first).
        images, labels: the data set, ``(N, C, H, W)`` and ``(N,)``.
        out: JSON Lines file; indices already present are skipped.
        method: certification method; one of :data:`CERTIFY_METHODS`.
        form: Lipschitz certificate form (``auto``, ``generic``, ``lln``).
        batch_size: examples per forward pass.
        indices: subset of example indices to certify (default: all).
        metadata: written beside the records (``OUT.meta.json``), e.g. the data set name.
        progress: show a tqdm bar.
    """
    if method not in CERTIFY_METHODS:
        raise ValueError(f"method must be one of {', '.join(CERTIFY_METHODS)}; got {method!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if images.dim() != 4 or len(images) != len(labels):
        raise ValueError(
            f"images must be (N, C, H, W) with one label each; got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    device = next(model.parameters()).device
    certifier = LipschitzCertifier(model, form)
    meta = {**(metadata or {}), "method": method, "form": certifier.form, "lipschitz": certifier.lipschitz}
    todo_all = list(range(len(images))) if indices is None else list(indices)
    with RecordWriter(out, metadata=meta) as writer:
        todo = [i for i in todo_all if i not in writer.done]
        if len(todo) < len(todo_all):
            logger.info("%s: %d of %d examples already certified", out, len(todo_all) - len(todo), len(todo_all))
        bar = tqdm(total=len(todo), desc=f"certify ({method})", disable=not progress)
        for start in range(0, len(todo), batch_size):
            idx = todo[start : start + batch_size]
            t0 = time.perf_counter()
            x = images[idx].to(device)
            pred, radius = certifier(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            per_example = (time.perf_counter() - t0) / len(idx)
            records = [
                CertificationRecord(
                    index=i,
                    label=int(y),
                    prediction=int(p),
                    radius=float(r),
                    correct=bool(int(p) == int(y)),
                    method=method,
                    norm="l2",
                    time_s=per_example,
                )
                for i, y, p, r in zip(idx, labels[idx].tolist(), pred.tolist(), radius.tolist(), strict=True)
            ]
            writer.write(records)
            bar.update(len(idx))
        bar.close()
    return Path(out)


def certify_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: str = "lipschitz",
    form: str = "auto",
    split: str = "test",
    data_root: str | None = None,
    batch_size: int = 256,
    max_examples: int | None = None,
    skip: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Path:
    """Certify the ``split`` of the data set a run was trained on, rebuilding the model from its checkpoint."""
    from stablenet.data import load_dataset
    from stablenet.train.checkpoint import load_model, read_model_metadata

    if skip < 0 or (max_examples is not None and max_examples < 1):
        raise ValueError(f"skip must be >= 0 and max_examples >= 1; got skip={skip}, max_examples={max_examples}")
    meta = read_model_metadata(run_dir)
    model = load_model(run_dir, map_location=device)
    images, labels = load_dataset(meta["dataset"], split, data_root)
    stop = len(images) if max_examples is None else min(len(images), skip + max_examples)
    return certify_dataset(
        model,
        images,
        labels,
        out,
        method=method,
        form=form,
        batch_size=batch_size,
        indices=list(range(skip, stop)),
        metadata={"dataset": meta["dataset"], "split": split, "run": str(run_dir), "model": meta["model"]},
        progress=progress,
    )
