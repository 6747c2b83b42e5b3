"""Helpers shared by the data set modules: split names, deterministic splits, views."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ember.errors import ConfigError

__all__ = [
    "SPLITS",
    "SplitView",
    "check_int",
    "check_split",
    "closest_hint",
    "stratified_split",
    "tail_split",
]

SPLITS = ("train", "val", "test")

# Splits of a data set must not move when an experiment's seed changes, so they are
# drawn from this fixed seed, never from the global or the experiment's RNG.
_SPLIT_SEED = 20240601


def check_split(split: Any) -> str:
    """Return ``split`` if it is one of :data:`SPLITS`, else raise ConfigError."""
    if split in SPLITS:
        return split
    raise ConfigError(
        f"Unknown split {split!r}; expected one of {', '.join(SPLITS)}{closest_hint(split, SPLITS)}"
    )


def closest_hint(value: Any, choices: Sequence[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest of ``choices``, or ``""``."""
    matches = difflib.get_close_matches(str(value), list(choices), n=1)
    return f"; did you mean {matches[0]!r}?" if matches else ""


def check_int(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> int:
    """Return ``value`` if it is an int in ``[minimum, maximum]``, else raise ConfigError."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if ok and value >= minimum and (maximum is None or value <= maximum):
        return int(value)
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    raise ConfigError(f"Argument `{name}` should be an integer {bound}, got {value!r}")


def stratified_split(
    labels: Sequence[int] | np.ndarray, fractions: tuple[float, float, float]
) -> dict[str, np.ndarray]:
    """Split sample indices into train/val/test, keeping class proportions.

    Each class is shuffled with a fixed seed and every sample gets a rank key
    ``(position in its class + 0.5) / class size``; sorting all samples by that key
    and cutting the order at the requested sizes gives each split nearly the same
    class mix, and exactly the requested total sizes.

    Args:
        labels: label of every sample.
        fractions: (train, val, test) fractions; val and test sizes are rounded and
            are at least 1 each when there are 3 or more samples.

    Returns:
        ``{"train": idx, "val": idx, "test": idx}``, each sorted ascending.
    """
    labels = np.asarray(labels)
    n = len(labels)
    rng = np.random.default_rng(_SPLIT_SEED)
    key = np.empty(n, dtype=np.float64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        key[members] = (np.arange(len(members)) + 0.5) / len(members)
    # tie-break equal keys (classes of equal size) by a fixed random order
    order = np.lexsort((rng.permutation(n), key))
    n_val, n_test = (_split_size(n, fraction) for fraction in fractions[1:])
    n_train = n - n_val - n_test
    return {
        "train": np.sort(order[:n_train]),
        "val": np.sort(order[n_train : n_train + n_val]),
        "test": np.sort(order[n_train + n_val :]),
    }


def tail_split(n: int, val_fraction: float) -> dict[str, range]:
    """Split ``range(n)`` into a train head and a val tail of ``val_fraction``."""
    n_val = _split_size(n, val_fraction)
    return {"train": range(n - n_val), "val": range(n - n_val, n)}


def _split_size(n: int, fraction: float) -> int:
    size = int(round(n * fraction))
    return max(size, 1) if n >= 3 else size


class SplitView(Dataset):
    """The samples ``indices`` of ``base``, with ember's info attributes.

    Args:
        base: data set returning ``(image tensor, int label)``.
        indices: indices into ``base`` that make up this split.
        num_classes: see :class:`~ember.data.DatasetInfo`.
        in_channels: see :class:`~ember.data.DatasetInfo`.
        image_size: see :class:`~ember.data.DatasetInfo`.
        classes: see :class:`~ember.data.DatasetInfo`.
    """

    def __init__(
        self,
        base: Dataset,
        indices: Sequence[int],
        *,
        num_classes: int,
        in_channels: int,
        image_size: tuple[int, int],
        classes: list[str],
    ) -> None:
        self.base = base
        self.indices = indices
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.classes = classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.base[int(self.indices[index])]
        return image, int(label)
