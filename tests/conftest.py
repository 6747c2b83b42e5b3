"""Shared fixtures: tiny data sets and models that the tests make themselves."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_data() -> TensorDataset:
    """120 random 1x8x8 images with labels 0..9 (fixed seed)."""
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(120, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (120,), generator=gen)
    return TensorDataset(x, y)


@pytest.fixture
def tiny_loader(tiny_data) -> DataLoader:
    return DataLoader(tiny_data, batch_size=16, shuffle=False)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: the numerics of the subprocesses that train with
    OMP_NUM_THREADS=1 (bitwise comparisons), and no CPU oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
