"""Procedural images of geometric shapes: any number, any size, drawn on demand."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ember.data._common import SPLITS, check_int, check_split, closest_hint
from ember.errors import ConfigError

__all__ = ["SHAPE_KINDS", "ShapesDataset"]

logger = logging.getLogger(__name__)

_Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]

# Each shape is a mask over coordinates (u, v) measured in units of the shape's
# half-size from its centre, so one formula draws it at any size and position.
_MASKS: dict[str, _Mask] = {
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(abs(u), abs(v)) <= 0.8,
    "triangle": lambda u, v: (v <= 0.8) & (abs(u) <= (v + 1.0) / 1.8),
    "cross": lambda u, v: (np.minimum(abs(u), abs(v)) <= 0.3) & (np.maximum(abs(u), abs(v)) <= 1),
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.55**2),
    "bar": lambda u, v: (abs(u) <= 1.0) & (abs(v) <= 0.28),
    "diamond": lambda u, v: abs(u) + abs(v) <= 1.0,
    "frame": lambda u, v: (np.maximum(abs(u), abs(v)) <= 0.85) & (np.maximum(abs(u), abs(v)) >= 0.5),
}
SHAPE_KINDS: tuple[str, ...] = tuple(_MASKS)

_DEFAULT_LENGTH = {"train": 2000, "val": 500, "test": 500}
_SPLIT_IDS = {split: number for number, split in enumerate(SPLITS)}
_SIZE_RANGE = (0.2, 0.4)  # half-size of a shape, as a fraction of the image side
_MAX_TILT_DEG = 15.0  # small enough that a tilted square never looks like a diamond
_NOISE_STD = 0.06


class ShapesDataset(Dataset):
    """Images of one shape each (circle, square, triangle, ...), drawn on demand.

    Sample ``i`` of a split has label ``i % num_classes`` (so classes are balanced)
    and is drawn from ``numpy.random.default_rng([seed, split_id, i])``: the same
    (seed, split, index) always gives the same image, the splits draw from separate
    random streams, and nothing is stored, so a million samples cost no memory.
    A shape of random size, position, small tilt and bright colour is drawn over a
    darker random background with Gaussian noise; pixel values are in [0, 1].

    Args:
        split: "train", "val" or "test".
        image_size: side of the square images, in pixels (>= 8).
        in_channels: channels of each image (1 grey, 3 colour; any number >= 1).
        length: samples in this split: an int, or a mapping split -> int; default
            2000 train, 500 val, 500 test.
        num_classes: use the first ``num_classes`` of ``kinds`` (default all).
        kinds: names of the shapes to draw, in label order; default
            :data:`SHAPE_KINDS`.
        seed: selects a different, equally deterministic, data set.

    Example:
        >>> ds = ShapesDataset("train", image_size=64, length=1_000_000)
        >>> image, label = ds[123_456]
        >>> image.shape, ds.classes[label]
        (torch.Size([3, 64, 64]), 'circle')
    """

    def __init__(
        self,
        split: str,
        *,
        image_size: int = 32,
        in_channels: int = 3,
        length: int | Mapping[str, int] | None = None,
        num_classes: int | None = None,
        kinds: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        self.split = check_split(split)
        size = check_int("image_size", image_size, minimum=8)
        self.in_channels = check_int("in_channels", in_channels, minimum=1)
        self.length = _check_length(length, self.split)
        kinds = _check_kinds(kinds)
        if num_classes is not None:
            kinds = kinds[: check_int("num_classes", num_classes, minimum=2, maximum=len(kinds))]
        self.seed = check_int("seed", seed, minimum=0)
        self.kinds = kinds
        self.classes = list(kinds)
        self.num_classes = len(kinds)
        self.image_size = (size, size)
        # pixel-centre coordinates, shared by every sample
        self._grid = np.arange(size, dtype=np.float32) + 0.5
        logger.debug("shapes/%s: %d samples of %d px", split, self.length, size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        index %= self.length
        label = index % self.num_classes
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])
        image = _draw(rng, self.kinds[label], self._grid, self.in_channels)
        return torch.from_numpy(image), label


def _draw(rng: np.random.Generator, kind: str, grid: np.ndarray, channels: int) -> np.ndarray:
    """Render one ``kind`` shape as a float32 (channels, size, size) array in [0, 1]."""
    side = len(grid)
    half = rng.uniform(*_SIZE_RANGE) * side
    margin = 1.15 * half  # a tilted square's corner reaches 0.8 * sqrt(2) half-sizes
    centre_y, centre_x = rng.uniform(margin, side - margin, size=2)
    angle = np.deg2rad(rng.uniform(-_MAX_TILT_DEG, _MAX_TILT_DEG) + 90.0 * rng.integers(2))
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    x = ((grid - centre_x) / half)[None, :]
    y = ((grid - centre_y) / half)[:, None]
    mask = _MASKS[kind](cos * x + sin * y, cos * y - sin * x)
    background = rng.uniform(0.0, 0.35, size=(channels, 1, 1)).astype(np.float32)
    foreground = rng.uniform(0.6, 1.0, size=(channels, 1, 1)).astype(np.float32)
    image = np.where(mask[None], foreground, background)
    image += _NOISE_STD * rng.standard_normal((channels, side, side), dtype=np.float32)
    return np.clip(image, 0.0, 1.0, out=image)


def _check_length(length: int | Mapping[str, int] | None, split: str) -> int:
    if isinstance(length, Mapping):
        unknown = sorted(set(length) - set(SPLITS))
        if unknown:
            raise ConfigError(
                f"Argument `length` has unknown split(s) {', '.join(map(repr, unknown))}; "
                f"expected keys among {', '.join(SPLITS)}"
            )
        length = length.get(split)
    if length is None:
        return _DEFAULT_LENGTH[split]
    return check_int("length", length, minimum=1)


def _check_kinds(kinds: Sequence[str] | None) -> tuple[str, ...]:
    if kinds is None:
        return SHAPE_KINDS
    if isinstance(kinds, str):
        kinds = [kinds]
    for kind in kinds:
        if kind not in _MASKS:
            raise ConfigError(
                f"Unknown shape kind {kind!r}; expected some of {', '.join(SHAPE_KINDS)}"
                f"{closest_hint(kind, SHAPE_KINDS)}"
            )
    if len(set(kinds)) != len(kinds) or len(kinds) < 2:
        raise ConfigError(f"Argument `kinds` should name at least 2 different shapes, got {list(kinds)}")
    return tuple(kinds)
