from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler

from ember.data import Loaders, get_loaders, get_split_loader
from ember.errors import ConfigError, DataError


def _epoch_images(loader) -> torch.Tensor:
    return torch.cat([images for images, _ in loader])


@pytest.fixture(scope="module")
def digits() -> Loaders:
    return get_loaders("digits", batch_size=100, eval_batch_size=64)


def test_loaders_and_info(digits):
    assert digits.info.num_classes == 10 and digits.info.image_size == (8, 8)
    assert digits.train.batch_size == 100 and digits.val.batch_size == 64
    assert not digits.train.drop_last
    assert sum(len(images) for images, _ in digits.train) == 1257  # last batch kept
    assert get_loaders("digits", batch_size=7).test.batch_size == 7  # eval default


def test_pin_memory_only_for_cuda(digits):
    assert not digits.train.pin_memory and not digits.test.pin_memory
    assert not get_loaders("digits", device="cpu").train.pin_memory
    assert not get_loaders("digits", device=torch.device("cpu")).val.pin_memory
    cuda = get_loaders("digits", device="cuda:0")  # not iterated: no GPU needed
    assert cuda.train.pin_memory and cuda.test.pin_memory


def test_shuffle_reproducible_per_seed():
    first = _epoch_images(get_loaders("digits", batch_size=64, seed=3).train)
    again = _epoch_images(get_loaders("digits", batch_size=64, seed=3).train)
    other = _epoch_images(get_loaders("digits", batch_size=64, seed=4).train)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_train_reshuffles_each_epoch_eval_keeps_order(digits):
    assert not torch.equal(_epoch_images(digits.train), _epoch_images(digits.train))
    assert torch.equal(_epoch_images(digits.val), digits.val.dataset.images)


def test_workers_persist():
    loaders = get_loaders("shapes", batch_size=8, num_workers=1, length=16, image_size=8)
    assert loaders.train.persistent_workers and loaders.train.num_workers == 1
    assert loaders.val.persistent_workers
    images, labels = next(iter(loaders.val))
    assert images.shape == (8, 3, 8, 8) and labels.tolist() == [i % 8 for i in range(8)]
    assert not get_loaders("digits").train.persistent_workers


def test_dataset_options_are_passed():
    loaders = get_loaders("shapes", length={"train": 10, "val": 4, "test": 6}, in_channels=1)
    assert [len(ld.dataset) for ld in (loaders.train, loaders.val, loaders.test)] == [10, 4, 6]
    assert loaders.info.in_channels == 1


def test_train_subset():
    loaders = get_loaders("digits", train_subset=100)
    again = get_loaders("digits", train_subset=100, seed=9)
    assert len(loaders.train.dataset) == 100
    assert loaders.train.dataset.indices == again.train.dataset.indices  # same for every seed
    assert len(loaders.val.dataset) == 270
    with pytest.raises(ConfigError, match=r"`train_subset` should be an integer in \[1, 1257\]"):
        get_loaders("digits", train_subset=5000)


def test_num_classes_must_fit():
    assert get_loaders("digits", model_num_classes=12).info.num_classes == 10
    with pytest.raises(DataError, match=r"'shapes' has 8 classes but model.num_classes is 5"):
        get_loaders("shapes", model_num_classes=5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, r"`batch_size` should be an integer >= 1, got 0"),
        ({"eval_batch_size": 0}, r"`eval_batch_size` should be an integer >= 1, got 0"),
        ({"num_workers": -1}, r"`num_workers` should be an integer >= 0, got -1"),
        ({"seed": -2}, r"`seed` should be an integer >= 0, got -2"),
        ({"model_num_classes": 0}, r"`model_num_classes` should be an integer >= 1, got 0"),
        ({"device": "gpu7"}, r"`device` should be 'auto', 'cpu', .*got 'gpu7'"),
    ],
)
def test_bad_arguments(options, message):
    with pytest.raises(ConfigError, match=message):
        get_loaders("digits", **options)


def test_missing_files_suggest_download(tmp_path):
    with pytest.raises(DataError, match=r"'cifar10' not found .*data.download=true"):
        get_loaders("cifar10", root=tmp_path)


def test_distributed_samplers_in_one_process():
    loaders = get_loaders("digits", distributed=True, seed=5)
    train, val = loaders.train.sampler, loaders.val.sampler
    assert isinstance(train, DistributedSampler) and isinstance(val, DistributedSampler)
    assert train.shuffle and train.seed == 5 and not val.shuffle
    assert list(val) == list(range(270))
    assert sorted(train) == list(range(1257)) and list(train) != list(range(1257))


def test_split_loader(mnist_data):
    loader = get_split_loader("mnist", split="test", root=mnist_data.root, batch_size=4)
    labels = torch.cat([y for _, y in loader])
    assert labels.tolist() == mnist_data.test_labels.tolist()
    assert loader.dataset.num_classes == 10
    with pytest.raises(DataError, match=r"'mnist' has 10 classes but model.num_classes is 2"):
        get_split_loader("mnist", split="test", root=mnist_data.root, model_num_classes=2)
    with pytest.raises(ConfigError, match=r"`batch_size` should be an integer >= 1, got 0"):
        get_split_loader("mnist", split="test", root=mnist_data.root, batch_size=0)
