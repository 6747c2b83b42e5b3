from __future__ import annotations

import time

import pytest
import torch

from ember.data import get_dataset
from ember.data.shapes import SHAPE_KINDS, ShapesDataset
from ember.errors import ConfigError


def test_same_index_same_image_across_objects():
    a = ShapesDataset("train", length=100)
    b = get_dataset("shapes", split="train", length=100)
    for index in (0, 7, 99):
        image_a, label_a = a[index]
        image_b, label_b = b[index]
        assert torch.equal(image_a, image_b) and label_a == label_b


def test_seed_changes_the_images():
    a, b = ShapesDataset("train", seed=0), ShapesDataset("train", seed=1)
    assert not torch.equal(a[3][0], b[3][0])


def test_splits_are_disjoint():
    images = {
        split: torch.stack([ShapesDataset(split, image_size=16)[i][0] for i in range(64)])
        for split in ("train", "val", "test")
    }
    for first, second in (("train", "val"), ("train", "test"), ("val", "test")):
        flat_a = images[first].flatten(1)
        flat_b = images[second].flatten(1)
        assert torch.cdist(flat_a, flat_b).min() > 0


@pytest.mark.parametrize(("size", "channels"), [(8, 1), (33, 3), (224, 3), (20, 5)])
def test_any_size_and_channels(size, channels):
    ds = ShapesDataset("val", image_size=size, in_channels=channels, length=3)
    image, label = ds[2]
    assert image.shape == (channels, size, size) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert (ds.in_channels, ds.image_size) == (channels, (size, size))
    assert 0 <= label < ds.num_classes


def test_a_million_samples_construct_instantly():
    start = time.perf_counter()
    ds = ShapesDataset("train", length=1_000_000)
    assert time.perf_counter() - start < 0.5
    assert len(ds) == 1_000_000
    assert ds[999_999][0].shape == (3, 32, 32)
    assert torch.equal(ds[-1][0], ds[999_999][0])
    with pytest.raises(IndexError):
        ds[1_000_000]


def test_classes_are_balanced():
    ds = ShapesDataset("test", length=60, num_classes=6)
    labels = torch.tensor([ds[i][1] for i in range(len(ds))])
    assert torch.bincount(labels).tolist() == [10] * 6
    assert ds.classes == list(SHAPE_KINDS[:6]) and ds.num_classes == 6


def test_default_lengths_and_mapping():
    assert [len(ShapesDataset(s)) for s in ("train", "val", "test")] == [2000, 500, 500]
    lengths = {"train": 10, "test": 3}
    assert [len(ShapesDataset(s, length=lengths)) for s in ("train", "val", "test")] == [10, 500, 3]


def test_kinds_choose_the_classes():
    ds = ShapesDataset("train", kinds=["ring", "circle"])
    assert ds.classes == ["ring", "circle"]


def test_classes_look_different():
    # the mean image of each class differs: the label is in the pixels, not only the index
    ds = ShapesDataset("train", image_size=16, in_channels=1, length=800)
    images = torch.stack([ds[i][0] for i in range(len(ds))]).flatten(1)
    labels = torch.arange(len(ds)) % ds.num_classes
    means = torch.stack([images[labels == k].mean(0) for k in range(ds.num_classes)])
    assert torch.pdist(means).min() > 0.1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"image_size": 4}, r"`image_size` should be an integer >= 8, got 4"),
        ({"in_channels": 0}, r"`in_channels` should be an integer >= 1, got 0"),
        ({"length": 0}, r"`length` should be an integer >= 1, got 0"),
        ({"length": {"training": 5}}, r"`length` has unknown split\(s\) 'training'"),
        ({"num_classes": 9}, r"`num_classes` should be an integer in \[2, 8\], got 9"),
        ({"kinds": ["circel", "square"]}, r"Unknown shape kind 'circel'.*'circle'"),
        ({"kinds": ["ring", "ring"]}, r"at least 2 different shapes"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        ShapesDataset("train", **options)
