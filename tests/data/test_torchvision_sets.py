from __future__ import annotations

import numpy as np
import pytest
import torch

from ember.data import get_dataset
from ember.errors import DataError

_MNIST_NORM = {"mnist": (0.1307, 0.3081), "fashion_mnist": (0.2860, 0.3530)}
_CIFAR10_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
_CIFAR10_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)


@pytest.mark.parametrize(("name", "data"), [("mnist", "mnist_data"), ("fashion_mnist", "fashion_data")])
def test_mnist_idx_files(name, data, request):
    data = request.getfixturevalue(data)
    splits = {s: get_dataset(name, split=s, root=data.root) for s in ("train", "val", "test")}
    assert [len(ds) for ds in splits.values()] == [27, 3, 10]  # val: last 10% of train
    mean, std = _MNIST_NORM[name]
    image, label = splits["val"][0]  # train sample 27
    expected = (torch.from_numpy(data.train_images[27]).float() / 255 - mean) / std
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert torch.allclose(image[0], expected, atol=1e-5)
    assert label == data.train_labels[27] and isinstance(label, int)
    assert splits["test"][9][1] == data.test_labels[9]
    ds = splits["train"]
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 1, (28, 28))
    assert len(ds.classes) == 10


def test_cifar10_pickles(cifar10_data):
    data = cifar10_data
    splits = {s: get_dataset("cifar10", split=s, root=data.root) for s in ("train", "val", "test")}
    assert [len(ds) for ds in splits.values()] == [18, 2, 6]
    image, label = splits["train"][5]  # the second sample of data_batch_2
    expected = torch.from_numpy(data.train_images[5]).permute(2, 0, 1).float() / 255
    assert image.shape == (3, 32, 32)
    assert torch.allclose(image, (expected - _CIFAR10_MEAN) / _CIFAR10_STD, atol=1e-5)
    assert label == data.train_labels[5]
    assert [splits["test"][i][1] for i in range(6)] == data.test_labels.tolist()
    assert splits["test"].classes == data.classes and splits["test"].num_classes == 10


def test_cifar100_pickles(cifar100_data):
    data = cifar100_data
    train = get_dataset("cifar100", split="train", root=data.root)
    test = get_dataset("cifar100", split="test", root=data.root)
    assert (len(train), len(test)) == (18, 6)
    assert [train[i][1] for i in range(18)] == data.train_labels[:18].tolist()
    assert train.num_classes == 100 and train.classes == data.classes
    assert train.in_channels == 3 and train.image_size == (32, 32)


def test_resize(cifar10_data):
    ds = get_dataset("cifar10", split="test", root=cifar10_data.root, image_size=64)
    assert ds[0][0].shape == (3, 64, 64) and ds.image_size == (64, 64)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_missing_files_suggest_download(name, tmp_path):
    with pytest.raises(DataError, match=rf"'{name}' not found under {tmp_path}.*data.download=true"):
        get_dataset(name, split="train", root=tmp_path)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_root_none(name):
    with pytest.raises(DataError, match=rf"'{name}' needs a folder: set data.root"):
        get_dataset(name, split="test")


def test_mnist_partial_files(mnist_data):
    (mnist_data.root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="data.download=true"):
        get_dataset("mnist", split="test", root=mnist_data.root)


def test_splits_do_not_overlap(mnist_data):
    train = get_dataset("mnist", split="train", root=mnist_data.root)
    val = get_dataset("mnist", split="val", root=mnist_data.root)
    assert set(train.indices).isdisjoint(val.indices)
    assert sorted([*train.indices, *val.indices]) == list(np.arange(30))


@pytest.mark.parametrize(("name", "data"), [("mnist", "mnist_data"), ("cifar10", "cifar10_data")])
def test_download_skips_files_present(name, data, request):
    # no network here: this passes only if present files are not downloaded again
    root = request.getfixturevalue(data).root
    assert len(get_dataset(name, split="test", root=root, download=True)) > 0
