"""Which loader a data set needs, and how fast the loader delivers.

* :func:`decoded_bytes`: what a data set takes decoded in memory.
* :func:`use_streaming`: the rule behind ``data_streaming: true | false | "auto"``: hold the data on the device
  (:class:`~stablenet.data.loader.DeviceLoader`) unless it is larger than a memory budget, else stream it
  (:class:`~stablenet.data.streaming.StreamingLoader`); :func:`memory_budget` is the default budget.
* :func:`loader_throughput`: images per second of either loader on its own, for ``bench train``.

Example:
    >>> import torch
    >>> from stablenet.data import ArrayDataset
    >>> n = 50_000
    >>> dataset = ArrayDataset(torch.zeros(n, 3, 32, 32, dtype=torch.uint8), torch.zeros(n, dtype=torch.int64))
    >>> decoded_bytes(dataset)  # CIFAR-10's train split as float32: 614 MB
    614400000
    >>> use_streaming("auto", decoded_bytes(dataset), budget_bytes=10**9)
    False
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["STREAMING_MODES", "decoded_bytes", "loader_throughput", "memory_budget", "use_streaming"]

logger = logging.getLogger(__name__)

STREAMING_MODES = (False, True, "auto")
"""The accepted values of ``data_streaming`` (see :func:`use_streaming`)."""


def decoded_bytes(dataset: Dataset, bytes_per_value: int = 4) -> int:
    """Bytes that ``dataset`` takes decoded in memory: ``N·C·H·W·bytes_per_value`` (float32 by default).

    Uses the data set's ``image_shape`` when it has one, else decodes item 0.
    """
    shape = getattr(dataset, "image_shape", None)
    if shape is None:
        shape = tuple(dataset[0][0].shape) if len(dataset) else (0,)
    return len(dataset) * int(np.prod(shape)) * bytes_per_value


def memory_budget(device: torch.device | str = "cpu", fraction: float = 0.25) -> int:
    """``fraction`` of the memory of ``device`` (host memory for CPU), in bytes.

    The default quarter leaves the rest of an accelerator to the model, its activations and optimiser state,
    and on the host to the copies loading makes (the uint8 cache and the float32 tensors).
    """
    device = torch.device(device)
    total = _TOTAL_MEMORY.get(device.type, _host_memory)(device)
    return int(total * fraction)


def _host_memory(device: torch.device) -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError) as exc:
        raise ValueError(f"cannot read the size of host memory ({exc}); pass budget_bytes explicitly") from exc


_TOTAL_MEMORY = {"cuda": lambda device: torch.cuda.get_device_properties(device).total_memory}


def use_streaming(
    mode: bool | str, data_bytes: int, *, budget_bytes: int | None = None, device: torch.device | str = "cpu"
) -> bool:
    """Whether to stream the data (:class:`StreamingLoader`) rather than hold it on the device (``DeviceLoader``).

    Args:
        mode: ``True`` or ``False`` decide; ``"auto"`` streams when ``data_bytes > budget_bytes``.
        data_bytes: What the in-memory path would hold, e.g. the train and test splits' :func:`decoded_bytes`
            summed.
        budget_bytes: The memory the data may take; default :func:`memory_budget` of ``device``.
        device: The training device.
    """
    if mode is True or mode is False:
        return mode
    if mode != "auto":
        raise ValueError(f"data_streaming must be one of true, false, 'auto'; got {mode!r}")
    budget = memory_budget(device) if budget_bytes is None else budget_bytes
    stream = data_bytes > budget
    logger.info(
        "data: %.3g GB decoded vs a budget of %.3g GB: %s",
        data_bytes / 1e9,
        budget / 1e9,
        "streaming" if stream else "held in memory",
    )
    return stream


def loader_throughput(loader: Iterable[tuple[Tensor, Tensor]], *, max_batches: int | None = None) -> dict[str, float]:
    """Images per second of one pass (or its first ``max_batches`` batches) of a loader, with nothing else running.

    The clock runs from the creation of the iterator (worker start-up included, as every epoch pays it) to the
    last batch on its device (an accelerator is synchronised).

    Returns:
        ``images``, ``batches``, ``seconds``, ``first_batch_s`` (the latency to the first batch) and
        ``images_per_s``.
    """
    t0 = time.perf_counter()
    images = batches = 0
    first = last = None
    iterator = iter(loader)
    try:
        for last in iterator:
            images, batches = images + len(last[1]), batches + 1
            if first is None:
                _synchronize(last[0])
                first = time.perf_counter() - t0
            if max_batches is not None and batches >= max_batches:
                break
    finally:
        getattr(iterator, "close", lambda: None)()  # stop the workers of an unfinished pass now
    if last is not None:
        _synchronize(last[0])
    seconds = time.perf_counter() - t0
    return {
        "images": images,
        "batches": batches,
        "seconds": seconds,
        "first_batch_s": first if first is not None else seconds,
        "images_per_s": images / seconds if seconds > 0 else float("inf"),
    }


def _synchronize(x: Tensor) -> None:
    if x.device.type != "cpu":
        torch.accelerator.synchronize(x.device)
