"""The scikit-learn digits: 1797 grey 8x8 images of handwritten digits, no download."""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
from torch.utils.data import Dataset

from ember.data._common import check_split, stratified_split

__all__ = ["DigitsDataset"]

logger = logging.getLogger(__name__)

# Mean and standard deviation of all 1797 images after scaling to [0, 1].
_MEAN = 0.3053
_STD = 0.3760
_FRACTIONS = (0.70, 0.15, 0.15)


class DigitsDataset(Dataset):
    """One split of :func:`sklearn.datasets.load_digits`, held in memory.

    Pixels (0..16) are scaled to [0, 1], then normalised with the data set's mean and
    standard deviation. The 1797 images are split 70/15/15 into train/val/test,
    stratified by label, with a fixed permutation that no experiment seed changes.

    Args:
        split: "train", "val" or "test".

    Example:
        >>> ds = DigitsDataset("test")
        >>> image, label = ds[0]
        >>> image.shape, ds.num_classes
        (torch.Size([1, 8, 8]), 10)
    """

    def __init__(self, split: str) -> None:
        split = check_split(split)
        images, labels = _load()
        indices = torch.from_numpy(stratified_split(labels.numpy(), _FRACTIONS)[split])
        self.images = images[indices]
        self.targets = labels[indices]
        self.num_classes = 10
        self.in_channels = 1
        self.image_size = (8, 8)
        self.classes = [str(digit) for digit in range(10)]
        logger.debug("digits/%s: %d samples", split, len(self.targets))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])


@functools.lru_cache(maxsize=1)
def _load() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # scikit-learn is slow to import

    bunch = load_digits()
    pixels = np.asarray(bunch.data, dtype=np.float32).reshape(-1, 1, 8, 8) / 16.0
    images = torch.from_numpy((pixels - _MEAN) / _STD)
    return images, torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
