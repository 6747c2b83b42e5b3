"""Tiny data sets in the real on-disk formats, written under ``tmp_path``."""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@dataclass
class FakeData:
    """What a fixture wrote: the root to pass to ember and the arrays it holds."""

    root: Path
    train_images: np.ndarray  # uint8, N x H x W (grey) or N x H x W x 3 (colour)
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]


def _write_idx_images(path: Path, images: np.ndarray) -> None:
    # idx3: big-endian magic 2051, count, rows, columns, then uint8 pixels
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">iiii", 2051, n, rows, cols) + images.tobytes())


def _write_idx_labels(path: Path, labels: np.ndarray) -> None:
    # idx1: big-endian magic 2049, count, then uint8 labels
    path.write_bytes(struct.pack(">ii", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str, *, n_train: int = 30, n_test: int = 10) -> FakeData:
    """Write MNIST-format idx files to ``root/folder/raw``, un-gzipped as torchvision keeps them."""
    rng = np.random.default_rng(0)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.int64)
        _write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
        data[prefix] = (images, labels)
    return FakeData(root, *data["train"], *data["t10k"], classes=[])


def write_cifar(root: Path, *, hundred: bool, per_batch: int = 4, n_test: int = 6) -> FakeData:
    """Write CIFAR-10 (5 train batches) or CIFAR-100 pickles in torchvision's layout."""
    rng = np.random.default_rng(1)
    num_classes = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    label_key = "fine_labels" if hundred else "labels"
    if hundred:
        files = {"train": 5 * per_batch, "test": n_test}
    else:
        files = {f"data_batch_{i}": per_batch for i in range(1, 6)} | {"test_batch": n_test}
    arrays = {}
    for name, n in files.items():
        flat = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)  # channel-major rows
        labels = rng.integers(0, num_classes, size=n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": flat, label_key: labels, "filenames": [b"x"] * n}, f)
        arrays[name] = (flat.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1), np.array(labels))
    classes = [f"class_{i}" for i in range(num_classes)]
    meta_name, meta_key = ("meta", "fine_label_names") if hundred else ("batches.meta", "label_names")
    with open(folder / meta_name, "wb") as f:
        pickle.dump({meta_key: classes}, f)
    train = [arrays[name] for name in files if name not in ("test", "test_batch")]
    test = arrays["test" if hundred else "test_batch"]
    return FakeData(
        root,
        np.concatenate([images for images, _ in train]),
        np.concatenate([labels for _, labels in train]),
        *test,
        classes=classes,
    )


def write_image_folder(folder: Path, classes: dict[str, int], *, seed: int = 0) -> list[Path]:
    """Write ``count`` tiny PNGs of random colour into ``folder/<class>/`` for each class."""
    rng = np.random.default_rng(seed)
    paths = []
    for name, count in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
            path = folder / name / f"img_{i:02d}.png"
            Image.fromarray(pixels).save(path)
            paths.append(path)
    return paths


@pytest.fixture
def mnist_data(tmp_path: Path) -> FakeData:
    return write_mnist(tmp_path, "MNIST")


@pytest.fixture
def fashion_data(tmp_path: Path) -> FakeData:
    return write_mnist(tmp_path, "FashionMNIST")


@pytest.fixture
def cifar10_data(tmp_path: Path) -> FakeData:
    return write_cifar(tmp_path, hundred=False)


@pytest.fixture
def cifar100_data(tmp_path: Path) -> FakeData:
    return write_cifar(tmp_path, hundred=True)


@pytest.fixture
def make_image_folder():
    """:func:`write_image_folder`, for tests that build their own layout."""
    return write_image_folder


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """``root/cat`` and ``root/dog`` with 10 tiny PNGs each."""
    root = tmp_path / "images"
    write_image_folder(root, {"cat": 10, "dog": 10})
    return root
