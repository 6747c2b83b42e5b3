from __future__ import annotations

import numpy as np
import pytest
import torch

from ember.data import get_dataset
from ember.data._common import stratified_split
from ember.data.digits import DigitsDataset
from ember.errors import ConfigError


@pytest.fixture(scope="module")
def splits() -> dict[str, DigitsDataset]:
    return {split: DigitsDataset(split) for split in ("train", "val", "test")}


def test_split_sizes_sum_to_1797(splits):
    sizes = {split: len(ds) for split, ds in splits.items()}
    assert sum(sizes.values()) == 1797
    assert sizes == {"train": 1257, "val": 270, "test": 270}


def test_splits_are_stratified(splits):
    for ds in splits.values():
        counts = torch.bincount(ds.targets, minlength=10)
        share = counts.float() / len(ds)
        assert torch.all((share - 0.1).abs() < 0.02), counts


def test_deterministic_across_objects(splits):
    again = get_dataset("digits", split="test")
    assert torch.equal(again.images, splits["test"].images)
    assert torch.equal(again.targets, splits["test"].targets)


def test_sample_format(splits):
    image, label = splits["train"][0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    assert isinstance(label, int)
    labels = {int(y) for y in splits["train"].targets}
    assert labels == set(range(10))
    ds = splits["train"]
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 1, (8, 8))
    assert ds.classes == [str(i) for i in range(10)]


def test_normalised(splits):
    images = splits["train"].images
    assert abs(images.mean().item()) < 0.05
    assert abs(images.std().item() - 1.0) < 0.05


def test_split_indices_partition_the_data():
    from sklearn.datasets import load_digits

    parts = stratified_split(load_digits().target, (0.7, 0.15, 0.15))
    together = np.concatenate(list(parts.values()))
    assert np.array_equal(np.sort(together), np.arange(1797))


def test_unknown_split():
    with pytest.raises(ConfigError, match=r"Unknown split 'tst'.*train, val, test.*'test'"):
        DigitsDataset("tst")
