"""Image data sets by name, and batches from them: held whole on the device, or streamed from files.

* :func:`load_dataset` (``digits``, ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100`` and any
  :func:`register_dataset` adds) returns float32 images in ``[0, 1]`` and int64 labels; files are found under
  ``root``, ``$STABLENET_DATA``, ``./data`` or ``~/.cache/stablenet/data`` (see :mod:`stablenet.data.builtin`)
  and decoded once into a uint8 cache under ``$STABLENET_CACHE`` or ``~/.cache/stablenet/cache``.
* :func:`dataset_info` gives classes, shape and normalisation statistics without loading anything.
* :data:`STANDARD_RADII`: the l2 radii certified accuracy is reported at, per data set, and
  :data:`HEADLINE_RADIUS` the one a summary quotes.
* :class:`DeviceLoader` yields shuffled, augmented batches from a data set held whole on one device.
* :class:`StreamingLoader` yields the same batches from a data set decoded on demand by worker processes
  (:func:`streaming_dataset`, :class:`ImageFolderDataset`, :class:`ImageTarDataset`, :class:`ArrayDataset`),
  sharded across ranks; :func:`use_streaming` chooses between the two by the decoded size.

Example:
    >>> from stablenet.data import DeviceLoader, load_dataset
    >>> data = load_dataset("digits", "train")
    >>> loader = DeviceLoader(data.images, data.labels, batch_size=128, shuffle=True, crop_padding=1)
    >>> x, y = next(iter(loader))
    >>> x.shape, y.shape
    (torch.Size([128, 1, 8, 8]), torch.Size([128]))
"""

from stablenet.data import builtin as _builtin  # noqa: F401  (registers the built-in data sets)
from stablenet.data.datasets import (
    DatasetInfo,
    ImageData,
    dataset_info,
    list_datasets,
    load_dataset,
    register_dataset,
)
from stablenet.data.loader import DeviceLoader
from stablenet.data.ondemand import ArrayDataset, ImageFolderDataset, ImageTarDataset, streaming_dataset
from stablenet.data.radii import HEADLINE_RADIUS, STANDARD_RADII
from stablenet.data.sizing import STREAMING_MODES, decoded_bytes, loader_throughput, memory_budget, use_streaming
from stablenet.data.streaming import ShardedBatchSampler, StreamingLoader

__all__ = [
    "HEADLINE_RADIUS",
    "STANDARD_RADII",
    "STREAMING_MODES",
    "ArrayDataset",
    "DatasetInfo",
    "DeviceLoader",
    "ImageData",
    "ImageFolderDataset",
    "ImageTarDataset",
    "ShardedBatchSampler",
    "StreamingLoader",
    "dataset_info",
    "decoded_bytes",
    "list_datasets",
    "load_dataset",
    "loader_throughput",
    "memory_budget",
    "register_dataset",
    "streaming_dataset",
    "use_streaming",
]
