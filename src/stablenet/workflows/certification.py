r"""Certify a data set with a trained model, one record per example, resumable and shardable.

Records go to a JSON Lines file through :class:`stablenet.certify.records.RecordWriter`: a rerun skips the
indices already in the file, and records are on disk (flushed and synced) as soon as their chunk is done, so a
killed run loses at most one chunk. The certifier is named by ``method``, a name registered in
:mod:`stablenet.workflows.certifiers` (:func:`register_certifier` adds one) or a ready certifier callable.

# Note [sharding]
Under ``torchrun`` (``WORLD_SIZE > 1``), rank ``r`` certifies every ``world_size``-th pending example starting at
``r`` into ``OUT.rank{r}.jsonl``; after a barrier, rank 0 appends every shard's records to ``OUT`` (skipping
indices already there) and removes the shards. A killed sharded run resumes like a single one: each rank skips
what its shard file or ``OUT`` already holds.

# Note [certified classifier]
LVM-RS and CPM certify a smoothed classifier that is not Cohen's hard-vote one: LVM-RS the average of a simplex
map (softmax or sparsemax) at an inverse temperature it chooses per example on its selection draws, CPM the
average softmax at its ``inverse_temperature`` when the model has a finite Lipschitz bound, else hard votes
(:mod:`stablenet.smoothing.soft`). Each of their records names it in ``simplex_map`` and
``inverse_temperature``, so that ``verify`` can attack the classifier that was certified: the choice cannot be
re-derived later, because the noise depends on the chunking (Note [smoothing seeds]).

# Note [grid runs]
With ``noise="grid"`` the randomized certifiers draw :class:`~stablenet.smoothing.grid_noise.GridNoise` (Note
[floating-point noise] in :mod:`stablenet.smoothing.sampling`): sound for any base model, but only for inputs on
the grid ``k / levels``, and about the grid classifier :math:`f(\mathrm{round}(L\,\cdot)/L)`. So every image to
certify is checked against the grid before anything is written (one off-grid value is a one-line error),
``levels`` defaults to the grid of a built-in data set (:data:`GRID_LEVELS`: scikit-learn's digits are 0..16
divided by 16, the others uint8 divided by 255) and must be given for any other, and the sidecar records
``noise`` (and ``levels``), which are :data:`~stablenet.certify.records.IDENTITY_KEYS`: ``verify`` reads them to
evaluate the same classifier, and a resumed file cannot mix noises. CPM's soft votes are not sound with grid
noise (Note [what L means] in :mod:`stablenet.smoothing.cpm`), so a grid CPM run uses hard votes.

# Note [smoothing seeds]
Randomized certifiers draw noise from a generator seeded by ``(seed, first index of the chunk)``: a rerun over
the same pending examples, with the same batch size and world size, gives the same records. Resuming or
sharding changes which examples share a chunk, and so the noise, but never the guarantee: each image's
certificate holds with probability at least 1 - alpha whatever the seed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from stablenet.certify.records import CertificationRecord, RecordWriter, read_metadata, read_records
from stablenet.models.persistence import load_run, read_model_metadata
from stablenet.smoothing.grid_noise import GridNoise
from stablenet.workflows.certifiers import (
    Certifier,
    CertifierFn,
    CertifierSettings,
    SmoothingParams,
    certifier,
    certifier_name,
    is_randomized,
    list_certifiers,
    register_certifier,
)

__all__ = [
    "CERTIFY_METHODS",
    "GRID_LEVELS",
    "SMOOTHING_METHODS",
    "Certifier",
    "CertifierSettings",
    "SmoothingParams",
    "certifier",
    "certify_dataset",
    "certify_run",
    "list_certifiers",
    "register_certifier",
]

logger = logging.getLogger(__name__)
#: The built-in randomized certifiers; :func:`list_certifiers` with ``randomized=True`` also names the user's.
SMOOTHING_METHODS = list_certifiers(randomized=True)
#: The built-in certifiers (registered names); :func:`list_certifiers` also names the user's.
CERTIFY_METHODS = list_certifiers()
#: The grid ``k / levels`` the pixels of each built-in data set lie on: the default ``levels`` of a grid-noise run
#: (Note [grid runs]).
GRID_LEVELS: dict[str, int] = {"digits": 16, "mnist": 255, "fashion-mnist": 255, "cifar10": 255, "cifar100": 255}


def _distributed() -> tuple[int, int]:
    """``(rank, world_size)``, initialising the default process group under torchrun (Note [sharding])."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def certify_dataset(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    out: str | os.PathLike,
    *,
    method: str | CertifierFn = "lipschitz",
    method_name: str | None = None,
    form: str = "auto",
    arithmetic: str = "float64",
    smoothing: SmoothingParams | None = None,
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
        method: a registered certifier (:func:`~stablenet.workflows.certifiers.list_certifiers`: the built-in
            :data:`CERTIFY_METHODS` and those added by :func:`register_certifier`), or a ready certifier callable
            ``x -> (prediction, radius)`` for this model (Note [certifier protocol] in
            :mod:`stablenet.workflows.certifiers`).
        method_name: what the records and the sidecar call the method; default: the registered name, or the
            callable's ``__name__``.
        form: Lipschitz certificate form (``auto``, ``generic``, ``lln``).
        arithmetic: what a Lipschitz certificate describes, ``"float64"`` or ``"native"`` (Note [certified
            arithmetic] in ``stablenet.certify.lipschitz``).
        smoothing: Monte-Carlo settings, required by the randomized methods. With ``noise="grid"`` its
            ``levels`` must be set and every image in ``indices`` must lie on that grid (Note [grid runs]).
        batch_size: rows per forward pass (images for ``lipschitz``, noisy samples for smoothing).
        indices: subset of example indices to certify (default: all).
        metadata: written beside the records (``OUT.meta.json``), e.g. the data set name.
        progress: show a tqdm bar.
    """
    name = certifier_name(method, method_name)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if images.dim() != 4 or len(images) != len(labels):
        raise ValueError(
            f"images must be (N, C, H, W) with one label each; got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    params = next(model.parameters(), None)
    device = params.device if params is not None else images.device
    settings: dict[str, Any] = {
        "input_shape": tuple(images.shape[1:]),
        "batch_size": batch_size,
        "form": form,
        "arithmetic": arithmetic,
        "smoothing": smoothing,
        "out": Path(out),
    }
    if is_randomized(method) and smoothing is not None:  # without smoothing, certifier() says what is missing
        _check_noise(smoothing, images, indices, out)
        settings["num_classes"] = int(model(images[:1].to(device)).shape[-1])
    run = certifier(method, model, **settings)
    meta: dict[str, Any] = {**(metadata or {}), "method": name, **run.metadata}

    rank, world = _distributed()
    out = Path(out)
    target = out if world == 1 else out.with_name(f"{out.name}.rank{rank}")
    done_in_main = {r.index for r in read_records(out)} if (world > 1 and out.exists()) else set()
    todo_all = list(range(len(images))) if indices is None else list(indices)
    todo_all = [i for i in todo_all if i not in done_in_main][rank::world]
    with RecordWriter(target, metadata=meta) as writer:
        todo = [i for i in todo_all if i not in writer.done]
        if len(todo) < len(todo_all):
            logger.info("%s: %d of %d examples already certified", target, len(todo_all) - len(todo), len(todo_all))
        bar = tqdm(total=len(todo), desc=f"certify ({name})", disable=not progress or rank != 0)
        for start in range(0, len(todo), run.chunk):
            idx = todo[start : start + run.chunk]
            t0 = time.perf_counter()
            pred, radius, choices = run.certify(images[idx].to(device), idx[0])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            per_example = (time.perf_counter() - t0) / len(idx)
            writer.write(
                CertificationRecord(
                    index=i,
                    label=int(y),
                    prediction=int(p),
                    radius=float(r),
                    correct=bool(int(p) == int(y)),
                    method=name,
                    norm="l2",
                    time_s=per_example,
                    simplex_map=c[0],
                    inverse_temperature=c[1],
                )
                for i, y, p, r, c in zip(
                    idx, labels[idx].tolist(), pred.tolist(), radius.tolist(), choices, strict=True
                )
            )
            bar.update(len(idx))
        bar.close()
    if world > 1:
        _merge_shards(out, world, rank, meta)
    return out


def _check_noise(params: SmoothingParams, images: Tensor, indices: list[int] | None, out: str | os.PathLike) -> None:
    """One-line errors, before anything is written, for a grid run that cannot be sound (Note [grid runs])."""
    earlier = read_metadata(out) if Path(out).exists() else {}
    if earlier.get("method") in list_certifiers(randomized=True) and "noise" not in earlier and params.noise != "float":
        raise ValueError(
            f"{out} holds records made before certificates named their noise (float noise); refusing to add "
            f"records for noise {params.noise!r} (use another file)"
        )
    if params.noise != "grid":
        return
    if params.levels is None:
        raise ValueError("noise 'grid' needs levels, the grid k / levels the pixels lie on")
    grid = GridNoise(params.sigma, params.levels)
    try:
        grid.to_grid(images if indices is None else images[list(indices)])
    except ValueError as e:
        raise ValueError(f"{e}; set levels to the grid the images are stored on") from None


def _merge_shards(out: Path, world: int, rank: int, meta: dict[str, Any]) -> None:
    import torch.distributed as dist

    dist.barrier()
    if rank == 0:
        with RecordWriter(out, metadata=meta) as writer:
            for r in range(world):
                shard = out.with_name(f"{out.name}.rank{r}")
                if shard.exists():
                    writer.write(rec for rec in read_records(shard) if rec.index not in writer.done)
        for r in range(world):
            for path in (out.with_name(f"{out.name}.rank{r}"), out.with_name(f"{out.name}.rank{r}.meta.json")):
                path.unlink(missing_ok=True)
    dist.barrier()


def certify_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: str = "lipschitz",
    form: str = "auto",
    arithmetic: str = "float64",
    smoothing: SmoothingParams | None = None,
    split: str = "test",
    data_root: str | None = None,
    batch_size: int = 256,
    max_examples: int | None = None,
    skip: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Path:
    """Certify the ``split`` of the data set a run was trained on, rebuilding the model from its checkpoint.

    ``method`` is a registered certifier (:func:`~stablenet.workflows.certifiers.list_certifiers`), built for the
    rebuilt model; the other arguments are those of :func:`certify_dataset`.
    """
    if skip < 0 or (max_examples is not None and max_examples < 1):
        raise ValueError(f"skip must be >= 0 and max_examples >= 1; got skip={skip}, max_examples={max_examples}")
    meta = read_model_metadata(run_dir)
    device = torch.device(device)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if smoothing is not None and smoothing.noise == "grid" and smoothing.levels is None:
        if meta["dataset"] not in GRID_LEVELS:
            known = ", ".join(f"{name} {levels}" for name, levels in GRID_LEVELS.items())
            raise ValueError(
                f"noise 'grid' needs levels for data set {meta['dataset']!r} (the grid k / levels its pixels lie "
                f"on; known for {known})"
            )
        smoothing = dataclasses.replace(smoothing, levels=GRID_LEVELS[meta["dataset"]])
    run = load_run(run_dir, split, data_root, map_location=device)
    model, images, labels = run.model, run.images, run.labels
    stop = len(images) if max_examples is None else min(len(images), skip + max_examples)
    return certify_dataset(
        model,
        images,
        labels,
        out,
        method=method,
        form=form,
        arithmetic=arithmetic,
        smoothing=smoothing,
        batch_size=batch_size,
        indices=list(range(skip, stop)),
        metadata={"dataset": meta["dataset"], "split": split, "run": str(run_dir), "model": meta["model"]},
        progress=progress,
    )
