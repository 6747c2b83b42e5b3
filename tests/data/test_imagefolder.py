from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from ember.data import get_dataset
from ember.data.imagefolder import ImageFolderDataset
from ember.errors import ConfigError, DataError


def _load(root, split, **options):
    return get_dataset("imagefolder", split=split, root=root, **options)


def test_single_folder_is_split_80_10_10(image_root):
    splits = {s: _load(image_root, s) for s in ("train", "val", "test")}
    assert [len(ds) for ds in splits.values()] == [16, 2, 2]
    paths = [set(path for path, _ in ds.samples) for ds in splits.values()]
    assert set.union(*paths) == {str(p) for p in image_root.glob("*/*.png")}
    assert sum(len(p) for p in paths) == 20
    for ds in splits.values():  # stratified: both classes in every split
        assert sorted(set(ds.targets)) == [0, 1]
    assert splits["val"].samples == _load(image_root, "val").samples  # deterministic


def test_sample_format(image_root):
    ds = _load(image_root, "train")
    image, label = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert label == 0 and isinstance(label, int)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    assert ds.in_channels == 3 and ds.image_size == (64, 64)


def test_grey_and_size(image_root):
    ds = _load(image_root, "test", image_size=16, in_channels=1)
    assert ds[0][0].shape == (1, 16, 16) and ds.in_channels == 1


def test_presplit_folders(tmp_path, make_image_folder):
    make_image_folder(tmp_path / "train", {"a": 3, "b": 2, "c": 2})
    make_image_folder(tmp_path / "val", {"b": 2}, seed=1)
    make_image_folder(tmp_path / "test", {"a": 1, "c": 1}, seed=2)
    train, val, test = (_load(tmp_path, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (7, 2, 2)
    assert val.targets == [1, 1] and test.targets == [0, 2]  # labels follow train/
    assert val.classes == ["a", "b", "c"] and val.num_classes == 3


def test_presplit_unknown_class(tmp_path, make_image_folder):
    make_image_folder(tmp_path / "train", {"a": 1, "b": 1})
    make_image_folder(tmp_path / "val", {"a": 1, "z": 1})
    with pytest.raises(DataError, match=r"class folder\(s\) z in .*val are not in .*train"):
        _load(tmp_path, "val")


def test_presplit_missing_split_folder(tmp_path, make_image_folder):
    make_image_folder(tmp_path / "train", {"a": 1, "b": 1})
    with pytest.raises(DataError, match=r"has a 'train' folder but no 'test' folder"):
        _load(tmp_path, "test")


def test_corrupt_image_names_the_file(image_root):
    bad = image_root / "cat" / "img_00.png"
    bad.write_bytes(b"this is not a png")
    ds = _load(image_root, "train")
    index = [path for path, _ in ds.samples].index(str(bad))
    with pytest.raises(DataError, match=r"cannot read image file .*cat.img_00\.png"):
        ds[index]
    with pytest.raises(DataError, match=r"img_00\.png"):
        list(DataLoader(ds, batch_size=4))


def test_truncated_image_names_the_file(image_root):
    path = image_root / "dog" / "img_03.png"
    path.write_bytes(path.read_bytes()[:40])
    ds = ImageFolderDataset("train", root=image_root)
    with pytest.raises(DataError, match=r"img_03\.png"):
        [ds[i] for i in range(len(ds))]


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=rf"image folder {tmp_path / 'nope'} does not exist"):
        _load(tmp_path / "nope", "train")


def test_root_none():
    with pytest.raises(DataError, match=r"'imagefolder' needs a folder: set data.root"):
        get_dataset("imagefolder", split="train")


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match=rf"image folder {tmp_path} has no class sub-folders"):
        _load(tmp_path, "train")


def test_class_folders_without_images(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=rf"image folder {tmp_path}: Found no valid file"):
        _load(tmp_path, "train")


def test_too_few_images(tmp_path, make_image_folder):
    make_image_folder(tmp_path, {"a": 1, "b": 1})
    with pytest.raises(DataError, match=r"holds 2 image\(s\), too few to split"):
        _load(tmp_path, "train")


def test_bad_channels(image_root):
    with pytest.raises(ConfigError, match=r"`in_channels` should be 1 or 3, got 2"):
        _load(image_root, "train", in_channels=2)
