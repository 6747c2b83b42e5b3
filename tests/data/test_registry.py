from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from ember.data import DatasetInfo, get_dataset, list_datasets, register_dataset, registry
from ember.errors import ConfigError, DataError

_BUILTIN = ["cifar10", "cifar100", "digits", "fashion_mnist", "imagefolder", "mnist", "shapes"]

# what each built-in data set needs: a fixture that writes its files (or None), options
_NEEDS = {
    "digits": (None, {}),
    "shapes": (None, {"length": 4}),
    "mnist": ("mnist_data", {}),
    "fashion_mnist": ("fashion_data", {}),
    "cifar10": ("cifar10_data", {}),
    "cifar100": ("cifar100_data", {}),
    "imagefolder": ("image_root", {"image_size": 12}),
}


class _Tiny(Dataset):
    num_classes, in_channels, image_size, classes = 2, 1, (2, 2), ["no", "yes"]

    def __init__(self, split: str, *, scale: float = 1.0) -> None:
        self.split, self.scale = split, scale

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.full((1, 2, 2), self.scale * index), index % 2


@pytest.fixture
def tiny_registered():
    register_dataset("tiny", _Tiny)
    yield "tiny"
    del registry._BUILDERS["tiny"]


def test_list_datasets():
    assert list_datasets() == _BUILTIN


@pytest.mark.parametrize("name", _BUILTIN)
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_every_data_set_keeps_the_contract(name, split, request):
    fixture, options = _NEEDS[name]
    if fixture is not None:
        data = request.getfixturevalue(fixture)
        options = {**options, "root": data if isinstance(data, Path) else data.root}
    ds = get_dataset(name, split=split, **options)
    info = DatasetInfo.from_dataset(ds)
    image, label = ds[len(ds) - 1]
    assert image.dtype == torch.float32
    assert image.shape == (info.in_channels, *info.image_size)
    assert isinstance(label, int) and 0 <= label < info.num_classes
    assert len(info.classes) == info.num_classes


def test_unknown_name_lists_names_and_closest():
    with pytest.raises(ConfigError, match=r"Unknown data set 'cifar'; expected one of cifar10, .*"):
        get_dataset("cifar", split="train")
    with pytest.raises(ConfigError, match=r"Unknown data set 'digit'.*did you mean 'digits'\?"):
        get_dataset("digit", split="train")


def test_names_are_normalised():
    with pytest.raises(DataError, match=r"'fashion_mnist' needs a folder"):
        get_dataset("Fashion-MNIST", split="train")


def test_unknown_split():
    with pytest.raises(ConfigError, match=r"Unknown split 'valid'; expected one of train, val, test"):
        get_dataset("shapes", split="valid")


def test_unknown_option():
    with pytest.raises(ConfigError, match=r"'shapes' has no option\(s\) size; its options are: "):
        get_dataset("shapes", split="train", size=3)
    with pytest.raises(ConfigError, match=r"'digits' has no option\(s\) image_size; .*: none"):
        get_dataset("digits", split="train", image_size=3)


def test_root_for_data_set_without_files_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="ember.data.registry"):
        get_dataset("digits", split="val", root="/somewhere")
    assert "root='/somewhere' is ignored" in caplog.text


def test_register_dataset(tiny_registered):
    ds = get_dataset(tiny_registered, split="val", scale=2.0)
    assert ds.split == "val" and ds[1][0][0, 0, 0] == 2.0
    assert tiny_registered in list_datasets()
    with pytest.raises(ConfigError, match=r"'tiny' is already registered; pass overwrite=True"):
        register_dataset("tiny", _Tiny)
    register_dataset("tiny", _Tiny, overwrite=True)


def test_builder_without_info_attributes():
    register_dataset("bare", lambda split: [(torch.zeros(1, 2, 2), 0)])
    try:
        with pytest.raises(DataError, match=r"list lacks the attribute\(s\) num_classes, in_ch"):
            get_dataset("bare", split="train")
    finally:
        del registry._BUILDERS["bare"]


def test_register_needs_a_callable():
    with pytest.raises(ConfigError, match=r"`builder` should be callable, got 3"):
        register_dataset("three", 3)
