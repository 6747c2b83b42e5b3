"""Data sets by name and the loaders a trainer needs.

Every data set yields ``(image, label)``: a float32 (C, H, W) tensor and an int,
and carries ``num_classes``, ``in_channels``, ``image_size`` and ``classes``.

* ``digits``: scikit-learn's 8x8 handwritten digits (no download).
* ``shapes``: procedural geometric shapes, any size and number, drawn on demand.
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``: through torchvision.
* ``imagefolder``: your images, one sub-folder per class.

Example:
    >>> from ember.data import get_loaders
    >>> loaders = get_loaders("digits", batch_size=64)
    >>> loaders.info.num_classes
    10
"""

from __future__ import annotations

from ember.data.info import DatasetInfo
from ember.data.loaders import Loaders, ShardSampler, get_loaders, get_split_loader
from ember.data.registry import SPLITS, get_dataset, list_datasets, register_dataset

__all__ = [
    "SPLITS",
    "DatasetInfo",
    "Loaders",
    "ShardSampler",
    "get_dataset",
    "get_loaders",
    "get_split_loader",
    "list_datasets",
    "register_dataset",
]
