"""Extracted features as a result: saved to ``.pt`` / ``.npy``, loaded back, shown in TensorBoard.

:class:`FeatureResult` holds one row per sample, in dataset order. The folder layout
of a streamed result and of ``result.save("x.npy")`` is the same: ``<layer>.npy`` per
layer, ``labels.npy``, ``indices.npy`` and ``features.json``. :func:`export_projector`
writes an embedding for TensorBoard's projector.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ember.errors import ConfigError, EmberError

__all__ = [
    "RESERVED_NAMES",
    "FeatureResult",
    "check_output_path",
    "export_projector",
    "move_into_place",
    "numpy_ready",
    "temp_sibling",
    "write_meta",
]

logger = logging.getLogger(__name__)

RESERVED_NAMES = ("labels", "indices")
_META_FILE = "features.json"
_TORCH_SUFFIXES = (".pt", ".pth")

Array = torch.Tensor | np.ndarray


@dataclass
class FeatureResult:
    """Outputs of one or more layers, one row per sample, in dataset order.

    Attributes:
        features: layer path -> ``(N, ...)`` rows; tensors when kept in memory,
            read-only numpy memmaps when streamed to disk (or loaded from a folder).
        labels: ``(N, ...)`` labels of the rows.
        indices: ``(N,)`` dataset index of each row, ascending.
        path: the folder holding the ``.npy`` files when streamed, else None.
        meta: facts from ``features.json`` (model class, pool) for a folder.
    """

    features: dict[str, Array]
    labels: Array
    indices: Array
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        """The layer paths, in the order they were asked for."""
        return list(self.features)

    def __len__(self) -> int:
        return len(self.indices)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the result to one ``.pt`` file or a folder of ``.npy`` files.

        Args:
            path: ``*.pt`` / ``*.pth``: ``torch.save`` of plain tensors (``{"layers",
                "features": {layer: tensor}, "labels", "indices"}``, loadable with
                ``torch.load(path, weights_only=True)``); ``*.npy`` or no suffix: a
                folder with ``<layer>.npy``, ``labels.npy``, ``indices.npy``.
            overwrite: replace what exists at ``path``; otherwise that is an error.

        Returns:
            The path written. The write is atomic: a failure leaves nothing behind.
        """
        target = check_output_path(path, overwrite=overwrite, argument="path")
        if target.suffix in _TORCH_SUFFIXES:
            payload = {
                "layers": self.layers,
                "features": {name: _as_tensor(rows) for name, rows in self.features.items()},
                "labels": _as_tensor(self.labels),
                "indices": _as_tensor(self.indices),
            }
            tmp = temp_sibling(target, folder=False)
            try:
                torch.save(payload, tmp)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        elif target.suffix in ("", ".npy"):
            tmp = temp_sibling(target, folder=True)
            try:
                for name, rows in self.features.items():
                    np.save(tmp / f"{name}.npy", _as_numpy(rows))
                np.save(tmp / "labels.npy", _as_numpy(self.labels))
                np.save(tmp / "indices.npy", _as_numpy(self.indices))
                write_meta(tmp, {**self.meta, "layers": self.layers, "num_rows": len(self)})
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        else:
            raise ConfigError(
                f"Argument `path` should end in .pt, .pth or .npy (a folder of .npy files), "
                f"got {str(path)!r}"
            )
        move_into_place(tmp, target)
        logger.info("saved features of %d rows (%s) to %s", len(self), ", ".join(self.layers), target)
        return target

    @classmethod
    def load(cls, path: str | Path) -> FeatureResult:
        """Read a result written by :meth:`save` or streamed with ``output=``.

        ``.npy`` folders open as read-only memmaps (nothing is read until used).
        """
        path = Path(path)
        if not path.exists():
            raise EmberError(f"No features at {str(path)!r}: the file or folder does not exist")
        if path.is_file():
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
                features = {name: data["features"][name] for name in data["layers"]}
                return cls(features, data["labels"], data["indices"])
            except Exception as err:  # torch.load raises many types for a file it cannot read
                raise EmberError(
                    f"{str(path)!r} is not a features file saved by FeatureResult.save: {err}"
                ) from None
        meta = json.loads((path / _META_FILE).read_text()) if (path / _META_FILE).exists() else {}
        layers = meta.get("layers") or sorted(
            p.stem for p in path.glob("*.npy") if p.stem not in RESERVED_NAMES
        )
        features = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in layers}
        labels = np.load(path / "labels.npy", mmap_mode="r")
        indices = np.load(path / "indices.npy", mmap_mode="r")
        return cls(features, labels, indices, path=path, meta=meta)


def _as_tensor(rows: Array) -> torch.Tensor:
    return rows if isinstance(rows, torch.Tensor) else torch.from_numpy(np.array(rows))


def _as_numpy(rows: Array) -> np.ndarray:
    if isinstance(rows, torch.Tensor):
        return numpy_ready(rows).numpy()
    return np.asarray(rows)


def numpy_ready(rows: torch.Tensor) -> torch.Tensor:
    """Rows on the CPU in a dtype numpy has (bfloat16 becomes float32)."""
    rows = rows.detach().cpu()
    return rows.float() if rows.dtype == torch.bfloat16 else rows


def check_output_path(path: str | Path, *, overwrite: bool, argument: str = "output") -> Path:
    """Check that ``path`` can be written: its folder exists, and it does not (or may be replaced).

    Raises:
        ConfigError: the parent folder is missing, or ``path`` exists and ``overwrite`` is False.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ConfigError(f"Argument `{argument}` should be a file or folder path, got {path!r}")
    target = Path(path).expanduser()
    if not target.parent.is_dir():
        raise ConfigError(
            f"Argument `{argument}`: folder {str(target.parent)!r} does not exist; create it first"
        )
    if target.exists() and not overwrite:
        raise ConfigError(
            f"Argument `{argument}`: {str(target)!r} already exists; pass overwrite=True to replace it "
            "(`--overwrite` for `ember extract`)"
        )
    return target


def temp_sibling(target: Path, *, folder: bool) -> Path:
    """A new temporary file or folder beside ``target``, to be moved into place when complete."""
    prefix = f".{target.name}.partial-"
    if folder:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    handle, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
    os.close(handle)
    return Path(name)


def move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``, replacing what is there only once ``tmp`` is complete."""
    if target.is_dir() and not target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.rename(old / target.name)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    elif tmp.is_dir() and target.exists():
        target.unlink()
        tmp.rename(target)
    else:
        os.replace(tmp, target)


def write_meta(folder: Path, meta: Mapping[str, Any]) -> None:
    """Write ``features.json`` (how the features were made) into ``folder``."""
    (folder / _META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")


_SPRITE_SIDE = 8192  # pixels: the largest sprite image TensorBoard's projector shows
_UNSAFE_TAG = ("/", "\\", "%")


def export_projector(
    result: FeatureResult,
    log_dir: str | Path,
    *,
    layer: str | None = None,
    images: torch.Tensor | Dataset | None = None,
    class_names: Sequence[str] | None = None,
    max_points: int = 5000,
    tag: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write one layer's rows as an embedding for TensorBoard's projector.

    Goes through ``SummaryWriter.add_embedding``: ``tensors.tsv`` (rows flattened),
    ``metadata.tsv`` (columns index, label and, with ``class_names``, class) and, with
    ``images``, a sprite of thumbnails. Embeddings already in ``log_dir`` are kept.

    Args:
        result: what :func:`~ember.handlers.features.extract_features` returned.
        log_dir: the TensorBoard log folder (``tensorboard --logdir`` shows it).
        layer: which layer; may be omitted when the result has one.
        images: the samples' images, indexed by dataset index: a ``(N, C, H, W)``
            tensor, or a data set whose items are images or ``(image, label)``.
            Thumbnails are shrunk to fit the projector's sprite.
        class_names: label -> name, added as a metadata column.
        max_points: at most this many rows, evenly spaced over the result.
        tag: the embedding's name (default: the layer path).
        overwrite: replace an embedding of the same tag in ``log_dir``.

    Returns:
        The embedding's folder, ``log_dir/00000/<tag>``.
    """
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig
    from torch.utils.tensorboard import SummaryWriter

    layer = _one_layer(result, layer)
    if not isinstance(max_points, int) or isinstance(max_points, bool) or max_points < 1:
        raise ConfigError(f"Argument `max_points` should be a positive integer, got {max_points!r}")
    tag = layer if tag is None else tag
    if not tag or any(char in tag for char in _UNSAFE_TAG):
        raise ConfigError(f"Argument `tag` should be a name without '/', '\\\\' or '%', got {tag!r}")
    log_dir = Path(log_dir)
    folder = log_dir / "00000" / tag
    if folder.exists() and not overwrite:
        raise ConfigError(
            f"An embedding {tag!r} already exists in {str(log_dir)!r}; pass overwrite=True or another tag"
        )
    rows = np.unique(np.linspace(0, len(result) - 1, num=min(len(result), max_points)).round().astype(int))
    matrix = np.asarray(_as_numpy(result.features[layer])[rows], dtype=np.float32).reshape(len(rows), -1)
    indices = _as_numpy(result.indices)[rows]
    metadata, header = _metadata(indices, _as_numpy(result.labels)[rows], class_names)
    thumbnails = None if images is None else _thumbnails(images, indices)
    config_path = log_dir / "projector_config.pbtxt"
    previous = ProjectorConfig()
    if config_path.exists():
        text_format.Parse(config_path.read_text(), previous)
    if folder.exists():
        shutil.rmtree(folder)
    with SummaryWriter(log_dir=str(log_dir)) as writer:
        writer.add_embedding(
            matrix, metadata=metadata, label_img=thumbnails, global_step=0, tag=tag, metadata_header=header
        )
    # A SummaryWriter rewrites projector_config.pbtxt with its own embeddings only:
    # put back those that were there before, so that no earlier export is lost.
    written = text_format.Parse(config_path.read_text(), ProjectorConfig())
    names = {embedding.tensor_name for embedding in written.embeddings}
    merged = ProjectorConfig()
    merged.embeddings.extend(e for e in previous.embeddings if e.tensor_name not in names)
    merged.embeddings.extend(written.embeddings)
    config_path.write_text(text_format.MessageToString(merged))
    logger.info("projector embedding %r (%d points) written to %s", tag, len(rows), folder)
    return folder


def _one_layer(result: FeatureResult, layer: str | None) -> str:
    if layer is None and len(result.layers) == 1:
        return result.layers[0]
    if layer not in result.features:
        raise ConfigError(
            f"Argument `layer` should be one of {', '.join(map(repr, result.layers))}, got {layer!r}"
        )
    return layer


def _metadata(
    indices: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None
) -> tuple[list[list[Any]], list[str]]:
    rows = [[int(index), label.tolist()] for index, label in zip(indices, labels)]
    if class_names is None:
        return rows, ["index", "label"]
    for row in rows:
        label = row[1]
        if not isinstance(label, int) or not 0 <= label < len(class_names):
            raise ConfigError(
                f"Label {label!r} has no name: `class_names` lists {len(class_names)} classes"
            )
        row.append(class_names[label])
    return rows, ["index", "label", "class"]


def _thumbnails(images: torch.Tensor | Dataset, indices: np.ndarray) -> torch.Tensor:
    picked = []
    for index in indices:
        item = images[int(index)]
        if isinstance(item, (tuple, list)):
            item = item[0]
        if not isinstance(item, torch.Tensor) or item.dim() != 3 or item.shape[0] not in (1, 3):
            raise ConfigError(
                "Argument `images` should give (C, H, W) tensors with 1 or 3 channels, got "
                f"{type(item).__name__} {tuple(getattr(item, 'shape', ()))}"
            )
        picked.append(item.float())
    batch = torch.stack(picked).expand(-1, 3, -1, -1)
    if batch.min() < 0 or batch.max() > 1:  # normalized images: rescale each to [0, 1]
        low = batch.amin(dim=(1, 2, 3), keepdim=True)
        batch = (batch - low) / (batch.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-12)
    side = _SPRITE_SIDE // math.ceil(math.sqrt(len(batch)))
    height, width = batch.shape[2:]
    if max(height, width) > side:
        scale = side / max(height, width)
        size = (max(1, int(height * scale)), max(1, int(width * scale)))
        batch = torch.nn.functional.interpolate(batch, size=size, mode="bilinear", antialias=True)
    return batch.clamp(0, 1)
