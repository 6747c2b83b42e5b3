"""Data sets by name: an explicit registry of builders, and ``get_dataset``."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from ember.data._common import SPLITS, check_split, closest_hint
from ember.data.digits import DigitsDataset
from ember.data.info import DatasetInfo
from ember.data.shapes import ShapesDataset
from ember.errors import ConfigError

__all__ = ["SPLITS", "get_dataset", "list_datasets", "register_dataset"]

logger = logging.getLogger(__name__)



class _Lazy:
    """A builder whose module is imported when it is first used.

    The torchvision data sets and image folders need torchvision, which takes about
    0.7 s to import; digits and shapes (and ``ember train``'s default run) do not.
    Calling it, or ``inspect.signature`` of it, imports the module.
    """

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def resolve(self) -> Callable[..., Dataset]:
        return getattr(importlib.import_module(self.module), self.name)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.resolve())

    def __call__(self, *args: Any, **kwargs: Any) -> Dataset:
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self.module}.{self.name}, imported on first use>"


# name -> builder called as builder(split=..., [root=..., download=...,] **options)
_BUILDERS: dict[str, Callable[..., Dataset]] = {
    "digits": DigitsDataset,
    "shapes": ShapesDataset,
    "mnist": _Lazy("ember.data.torchvision_sets", "mnist"),
    "fashion_mnist": _Lazy("ember.data.torchvision_sets", "fashion_mnist"),
    "cifar10": _Lazy("ember.data.torchvision_sets", "cifar10"),
    "cifar100": _Lazy("ember.data.torchvision_sets", "cifar100"),
    "imagefolder": _Lazy("ember.data.imagefolder", "ImageFolderDataset"),
}


def list_datasets() -> list[str]:
    """Return the names :func:`get_dataset` accepts, sorted."""
    return sorted(_BUILDERS)


def register_dataset(name: str, builder: Callable[..., Dataset], *, overwrite: bool = False) -> None:
    """Make ``builder`` available to :func:`get_dataset` (and configs) as ``name``.

    Args:
        name: the data set's name (lower case, ``_`` between words).
        builder: called as ``builder(split=..., **options)``, plus ``root=`` and
            ``download=`` if it has parameters of those names; it returns a data set
            of ``(image tensor, int label)`` with ``num_classes``, ``in_channels``,
            ``image_size`` and ``classes`` attributes.
        overwrite: replace a builder already registered under ``name``.

    Raises:
        ConfigError: if ``name`` is taken and ``overwrite`` is False.
    """
    if name in _BUILDERS and not overwrite:
        raise ConfigError(f"data set {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(builder):
        raise ConfigError(f"Argument `builder` should be callable, got {builder!r}")
    _BUILDERS[name] = builder


def get_dataset(
    name: str,
    *,
    split: str,
    root: str | os.PathLike | None = None,
    download: bool = False,
    **kwargs: Any,
) -> Dataset:
    """Build one split of a registered data set.

    Every data set yields ``(image, label)`` pairs, ``image`` a float32 tensor of
    shape (C, H, W) and ``label`` an int, and has the attributes ``num_classes``,
    ``in_channels``, ``image_size`` and ``classes`` (see :class:`DatasetInfo`).

    Args:
        name: one of :func:`list_datasets` ("fashion-mnist" is read as "fashion_mnist").
        split: "train", "val" or "test".
        root: folder of the data set's files (torchvision sets, image folders);
            ignored, with a warning, by data sets that have no files.
        download: download missing files (torchvision sets).
        **kwargs: options of the data set, e.g. ``image_size`` for "shapes".

    Returns:
        The data set.

    Raises:
        ConfigError: unknown name, split or option, or a bad option value.
        DataError: the data cannot be found or read.

    Example:
        >>> ds = get_dataset("shapes", split="val", image_size=64)
        >>> len(ds), ds.num_classes
        (500, 8)
    """
    builder = _builder(name)
    split = check_split(split)
    params = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    options = set(params) - {"split", "root", "download"}
    unknown = sorted(set(kwargs) - options)
    if unknown and not takes_any:
        valid = ", ".join(sorted(options)) or "none"
        raise ConfigError(
            f"data set {name!r} has no option(s) {', '.join(unknown)}; its options are: {valid}"
        )
    for arg, value, default in (("root", root, None), ("download", download, False)):
        if arg in params or takes_any:
            kwargs[arg] = value
        elif value != default:
            logger.warning("data set %r has no files; %s=%r is ignored", name, arg, value)
    dataset = builder(split=split, **kwargs)
    DatasetInfo.from_dataset(dataset)  # fail here, not in a model, if attributes are missing
    return dataset


def _builder(name: str) -> Callable[..., Dataset]:
    key = name.lower().replace("-", "_") if isinstance(name, str) else name
    builder = _BUILDERS.get(key) if isinstance(key, str) else None
    if builder is None:
        names = list_datasets()
        raise ConfigError(
            f"Unknown data set {name!r}; expected one of {', '.join(names)}{closest_hint(key, names)}"
        )
    return builder
