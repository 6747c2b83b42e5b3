"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 through torchvision, by name."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from torchvision import datasets, transforms

from ember.data._common import SplitView, check_int, check_split, tail_split
from ember.errors import DataError

__all__ = ["cifar10", "cifar100", "fashion_mnist", "mnist"]

logger = logging.getLogger(__name__)

# "val" is the last tenth of the official training set; "train" is the rest.
_VAL_FRACTION = 0.1


def _exists_only(files: list[list[str]]) -> list[list[str | None]]:
    return [[name, None] for name, _md5 in files]


# torchvision checks the md5 sum of every extracted CIFAR file each time a split is
# opened. The archive's md5 (``tgz_md5``) is still verified when it is downloaded,
# so checking that the extracted files exist is enough here, and it lets tests (and
# users) use small files in the real on-disk pickle format. ``check_integrity(path,
# None)`` checks existence only.
class _CIFAR10(datasets.CIFAR10):
    train_list = _exists_only(datasets.CIFAR10.train_list)
    test_list = _exists_only(datasets.CIFAR10.test_list)
    meta = {**datasets.CIFAR10.meta, "md5": None}


class _CIFAR100(datasets.CIFAR100):
    train_list = _exists_only(datasets.CIFAR100.train_list)
    test_list = _exists_only(datasets.CIFAR100.test_list)
    meta = {**datasets.CIFAR100.meta, "md5": None}


@dataclass(frozen=True)
class _Spec:
    name: str
    cls: type
    folder: str  # where torchvision keeps the files under root, for messages
    in_channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_SPECS = {
    spec.name: spec
    for spec in (
        _Spec("mnist", datasets.MNIST, "MNIST/raw", 1, 28, (0.1307,), (0.3081,)),
        _Spec("fashion_mnist", datasets.FashionMNIST, "FashionMNIST/raw", 1, 28, (0.2860,), (0.3530,)),
        _Spec(
            "cifar10",
            _CIFAR10,
            "cifar-10-batches-py",
            3,
            32,
            (0.4914, 0.4822, 0.4465),
            (0.2470, 0.2435, 0.2616),
        ),
        _Spec(
            "cifar100",
            _CIFAR100,
            "cifar-100-python",
            3,
            32,
            (0.5071, 0.4865, 0.4409),
            (0.2673, 0.2564, 0.2762),
        ),
    )
}


def mnist(
    split: str,
    *,
    root: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
) -> SplitView:
    """MNIST handwritten digits (1x28x28, 10 classes); see :func:`_build`."""
    return _build("mnist", split, root=root, download=download, image_size=image_size)


def fashion_mnist(
    split: str,
    *,
    root: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
) -> SplitView:
    """Fashion-MNIST clothing images (1x28x28, 10 classes); see :func:`_build`."""
    return _build("fashion_mnist", split, root=root, download=download, image_size=image_size)


def cifar10(
    split: str,
    *,
    root: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
) -> SplitView:
    """CIFAR-10 colour images (3x32x32, 10 classes); see :func:`_build`."""
    return _build("cifar10", split, root=root, download=download, image_size=image_size)


def cifar100(
    split: str,
    *,
    root: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
) -> SplitView:
    """CIFAR-100 colour images (3x32x32, 100 fine classes); see :func:`_build`."""
    return _build("cifar100", split, root=root, download=download, image_size=image_size)


def _build(
    name: str,
    split: str,
    *,
    root: str | os.PathLike | None,
    download: bool,
    image_size: int | None,
) -> SplitView:
    """Open one split of a torchvision data set as tensors with ember's info attributes.

    "train" and "val" come from the official training set ("val" is its last 10%),
    "test" is the official test set. Images become tensors (``ToTensor``, resized
    to ``image_size`` first when given) normalised with the data set's mean and std.

    Args:
        name: key of ``_SPECS``.
        split: "train", "val" or "test".
        root: folder that holds (or will hold) the files, as for torchvision.
        download: download the files when they are missing.
        image_size: resize images to ``image_size`` x ``image_size`` pixels.

    Raises:
        DataError: if ``root`` is None, the files are missing and ``download`` is
            False, or the download fails.
    """
    split = check_split(split)
    spec = _SPECS[name]
    if root is None:
        raise DataError(
            f"data set {name!r} needs a folder: set data.root to where its files are "
            "(or should be downloaded, with data.download=true)"
        )
    steps = []
    if image_size is not None:
        steps.append(transforms.Resize((check_int("image_size", image_size, minimum=1),) * 2))
    steps += [transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)]
    transform = transforms.Compose(steps)
    base = _open(spec, Path(root), train=split != "test", download=download, transform=transform)
    indices = range(len(base)) if split == "test" else tail_split(len(base), _VAL_FRACTION)[split]
    size = image_size or spec.size
    logger.debug("%s/%s: %d samples from %s", name, split, len(indices), root)
    return SplitView(
        base,
        indices,
        num_classes=len(base.classes),
        in_channels=spec.in_channels,
        image_size=(size, size),
        classes=list(base.classes),
    )


def _open(
    spec: _Spec, root: Path, *, train: bool, download: bool, transform: transforms.Compose
) -> datasets.VisionDataset:
    try:
        return spec.cls(str(root), train=train, download=download, transform=transform)
    except RuntimeError as error:
        if download:
            raise DataError(f"could not download data set {spec.name!r} to {root}: {error}") from error
        raise DataError(
            f"data set {spec.name!r} not found under {root} (looked in "
            f"{root / spec.folder}): set data.download=true to download it, or data.root "
            f"to the folder that holds it ({error})"
        ) from error
    except OSError as error:  # network failures and unreadable files
        action = "download" if download else "read"
        raise DataError(f"could not {action} data set {spec.name!r} under {root}: {error}") from error
