"""Images in class folders on disk (``root/<class>/<image>``), split by folder or by rule."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from ember.data._common import SPLITS, check_int, check_split, stratified_split
from ember.errors import ConfigError, DataError

__all__ = ["ImageFolderDataset"]

logger = logging.getLogger(__name__)

_FRACTIONS = (0.8, 0.1, 0.1)
_MODES = {1: "L", 3: "RGB"}
# ImageNet statistics, the usual choice for photographs (and pretrained models)
_MEAN = {1: (0.449,), 3: (0.485, 0.456, 0.406)}
_STD = {1: (0.226,), 3: (0.229, 0.224, 0.225)}


class ImageFolderDataset(Dataset):
    """One split of a folder of images sorted into one sub-folder per class.

    Two layouts are understood:

    * ``root/train/<class>/...``, ``root/val/<class>/...``, ``root/test/<class>/...``:
      each split is its folder; the classes are those of ``train/``.
    * ``root/<class>/...``: the images are split 80/10/10 into train/val/test,
      stratified by class, with a fixed permutation that no experiment seed changes.

    Images are read when a sample is asked for, converted to RGB (3 channels) or
    grey (1 channel), resized to ``image_size`` x ``image_size`` pixels and
    normalised with ImageNet's mean and standard deviation.

    Args:
        split: "train", "val" or "test".
        root: the folder described above.
        image_size: side of the square images, in pixels.
        in_channels: 3 (RGB) or 1 (grey).

    Raises:
        DataError: if ``root`` is missing, holds no class folders or no images;
            a file that cannot be read as an image raises it when it is read.
    """

    def __init__(
        self,
        split: str,
        *,
        root: str | os.PathLike | None,
        image_size: int = 64,
        in_channels: int = 3,
    ) -> None:
        split = check_split(split)
        size = check_int("image_size", image_size, minimum=1)
        if in_channels not in _MODES:
            raise ConfigError(f"Argument `in_channels` should be 1 or 3, got {in_channels!r}")
        if root is None:
            raise DataError("data set 'imagefolder' needs a folder: set data.root to it")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist (data.root)")
        self.root = root
        self.classes, self.samples = _find_samples(root, split)
        self.targets = [label for _path, label in self.samples]
        self.num_classes = len(self.classes)
        self.in_channels = in_channels
        self.image_size = (size, size)
        self._mode = _MODES[in_channels]
        self._transform = transforms.Compose(
            [
                transforms.Resize(self.image_size),
                transforms.ToTensor(),
                transforms.Normalize(_MEAN[in_channels], _STD[in_channels]),
            ]
        )
        logger.debug("imagefolder/%s: %d images from %s", split, len(self.samples), root)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert(self._mode)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise DataError(f"cannot read image file {path}: {error}") from error
        return self._transform(image), label


def _find_samples(root: Path, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Return the class names and the (path, label) samples of ``split`` under ``root``."""
    if (root / "train").is_dir():
        classes, class_to_idx = _classes(root / "train")
        folder = root / split
        if not folder.is_dir():
            raise DataError(
                f"image folder {root} has a 'train' folder but no {split!r} folder; put the "
                f"class folders in {', '.join(SPLITS)} sub-folders, or all directly in "
                f"{root} to have them split {_percentages()}"
            )
        unknown = sorted(set(_classes(folder)[0]) - set(classes)) if split != "train" else []
        if unknown:
            raise DataError(f"class folder(s) {', '.join(unknown)} in {folder} are not in {root / 'train'}")
        return classes, _samples(folder, class_to_idx, allow_empty=split != "train")
    classes, class_to_idx = _classes(root)
    samples = _samples(root, class_to_idx, allow_empty=False)
    if len(samples) < len(SPLITS):
        raise DataError(
            f"image folder {root} holds {len(samples)} image(s), too few to split into {', '.join(SPLITS)}"
        )
    indices = stratified_split([label for _path, label in samples], _FRACTIONS)[split]
    return classes, [samples[i] for i in indices]


def _classes(folder: Path) -> tuple[list[str], dict[str, int]]:
    try:
        return find_classes(folder)
    except FileNotFoundError as error:
        raise DataError(
            f"image folder {folder} has no class sub-folders; expected {folder}/<class>/<image>"
        ) from error


def _samples(folder: Path, class_to_idx: dict[str, int], *, allow_empty: bool) -> list:
    try:
        samples = make_dataset(folder, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=allow_empty)
    except FileNotFoundError as error:
        raise DataError(f"image folder {folder}: {error}") from error
    if not samples:
        raise DataError(f"image folder {folder} holds no images")
    return samples


def _percentages() -> str:
    return "/".join(f"{round(100 * fraction)}" for fraction in _FRACTIONS)
