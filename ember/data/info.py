"""What a model needs to know about a data set: classes, channels and image size."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

from ember.errors import DataError

__all__ = ["DatasetInfo"]

_ATTRIBUTES = ("num_classes", "in_channels", "image_size", "classes")


@dataclass(frozen=True)
class DatasetInfo:
    """Shape of the samples and names of the labels of a data set.

    Every ember data set carries these four values as attributes of the same names,
    so that a model can be built for it and metrics can be shown with class names.

    Attributes:
        num_classes: number of labels; labels are ``0 .. num_classes - 1``.
        in_channels: channels of each image tensor (1 grey, 3 RGB).
        image_size: ``(height, width)`` of each image tensor, in pixels.
        classes: one name per label, in label order.
    """

    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    classes: tuple[str, ...]

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> DatasetInfo:
        """Read the info attributes of ``dataset``.

        Args:
            dataset: any data set that has ``num_classes``, ``in_channels``,
                ``image_size`` and ``classes`` attributes (every ember data set has).

        Returns:
            The data set's :class:`DatasetInfo`.

        Raises:
            DataError: if an attribute is missing.
        """
        missing = [name for name in _ATTRIBUTES if not hasattr(dataset, name)]
        if missing:
            raise DataError(
                f"data set of type {type(dataset).__name__} lacks the attribute(s) "
                f"{', '.join(missing)}; an ember data set must have num_classes, "
                "in_channels, image_size and classes"
            )
        height, width = dataset.image_size
        return cls(
            num_classes=int(dataset.num_classes),
            in_channels=int(dataset.in_channels),
            image_size=(int(height), int(width)),
            classes=tuple(str(name) for name in dataset.classes),
        )
