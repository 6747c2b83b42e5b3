"""DataLoaders for the train, val and test splits of a data set, by name."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ignite.distributed as idist
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from ember.data._common import SPLITS, check_int
from ember.data.info import DatasetInfo
from ember.data.registry import get_dataset
from ember.errors import ConfigError, DataError

__all__ = ["Loaders", "get_loaders", "get_split_loader"]

logger = logging.getLogger(__name__)

# The training subset must be the same for every experiment seed, so that runs with
# different seeds are compared on the same data.
_SUBSET_SEED = 1234


@dataclass(frozen=True)
class Loaders:
    """The three loaders of a data set, and what a model needs to know about it.

    Attributes:
        train: shuffled training loader.
        val: validation loader, in data set order.
        test: test loader, in data set order.
        info: classes, channels and image size of the data set.
    """

    train: DataLoader
    val: DataLoader
    test: DataLoader
    info: DatasetInfo


def get_loaders(
    name: str,
    *,
    batch_size: int = 64,
    eval_batch_size: int | None = None,
    num_workers: int = 0,
    root: str | os.PathLike | None = None,
    download: bool = False,
    device: str | torch.device | None = None,
    seed: int = 0,
    model_num_classes: int | None = None,
    train_subset: int | None = None,
    distributed: bool = False,
    **dataset_kwargs: Any,
) -> Loaders:
    """Build the train, val and test loaders of a registered data set.

    The train loader reshuffles every epoch from a ``torch.Generator`` seeded with
    ``seed`` (the same seed gives the same order) and keeps the last, smaller batch.
    The eval loaders keep the data set's order. Memory is pinned only for a CUDA
    ``device``; worker processes persist across epochs when ``num_workers > 0``.

    Args:
        name: one of :func:`list_datasets`.
        batch_size: training samples per batch (per process when distributed).
        eval_batch_size: val/test samples per batch; default ``batch_size``.
        num_workers: loader worker processes; 0 loads in the main process.
        root: folder of the data set's files; see :func:`get_dataset`.
        download: download missing files; see :func:`get_dataset`.
        device: where batches will go ("cpu", "cuda:0", "auto", a torch.device).
        seed: seed of the training order (and of the distributed sampler).
        model_num_classes: outputs of the model; a data set with more classes is an
            error. (Not ``num_classes``: that is an option of some data sets, e.g. shapes.)
        train_subset: train on a fixed random subset of this many training samples.
        distributed: shard every split over the processes of ``ignite.distributed``
            with a ``DistributedSampler``. The trainer must call
            ``loaders.train.sampler.set_epoch(epoch)`` each epoch for a new order.
            Eval splits are sharded without padding (:class:`ShardSampler`), so metrics
            reduced over the ranks count every sample once.
        **dataset_kwargs: options of the data set, e.g. ``image_size``.

    Returns:
        :class:`Loaders`.

    Raises:
        ConfigError: a bad argument value, unknown data set or option.
        DataError: the data cannot be found or read, or does not fit ``model_num_classes``.

    Example:
        >>> loaders = get_loaders("digits", batch_size=32, model_num_classes=10)
        >>> images, labels = next(iter(loaders.train))
        >>> images.shape
        torch.Size([32, 1, 8, 8])
    """
    batch_size = check_int("batch_size", batch_size, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    eval_batch_size = check_int(
        "eval_batch_size", batch_size if eval_batch_size is None else eval_batch_size, minimum=1
    )
    common = _loader_options(num_workers, device)
    datasets = {
        split: get_dataset(name, split=split, root=root, download=download, **dataset_kwargs)
        for split in SPLITS
    }
    info = _check_info(name, datasets, model_num_classes)
    if train_subset is not None:
        datasets["train"] = _subset(datasets["train"], train_subset)
    generator = torch.Generator().manual_seed(seed)
    loaders = {
        split: _loader(
            dataset,
            train=split == "train",
            batch_size=batch_size if split == "train" else eval_batch_size,
            generator=generator,
            distributed=distributed,
            seed=seed,
            **common,
        )
        for split, dataset in datasets.items()
    }
    sizes = ", ".join(f"{split} {len(dataset)}" for split, dataset in datasets.items())
    logger.info("data set %r: %s samples, %d classes", name, sizes, info.num_classes)
    return Loaders(info=info, **loaders)


def get_split_loader(
    name: str,
    *,
    split: str,
    batch_size: int = 64,
    num_workers: int = 0,
    root: str | os.PathLike | None = None,
    download: bool = False,
    device: str | torch.device | None = None,
    model_num_classes: int | None = None,
    distributed: bool = False,
    **dataset_kwargs: Any,
) -> DataLoader:
    """Build an evaluation loader (data set order) of one split, e.g. to extract features.

    Args:
        name: one of :func:`list_datasets`.
        split: "train", "val" or "test".
        batch_size, num_workers, root, download, device, model_num_classes, distributed,
            **dataset_kwargs: as for :func:`get_loaders`.

    Returns:
        The loader; ``loader.dataset`` has the info attributes.
    """
    batch_size = check_int("batch_size", batch_size, minimum=1)
    common = _loader_options(num_workers, device)
    dataset = get_dataset(name, split=split, root=root, download=download, **dataset_kwargs)
    _check_info(name, {split: dataset}, model_num_classes)
    return _loader(
        dataset,
        train=False,
        batch_size=batch_size,
        generator=None,
        distributed=distributed,
        seed=0,
        **common,
    )


class ShardSampler(DistributedSampler):
    """A ``DistributedSampler`` for evaluation that does not pad.

    ``DistributedSampler`` repeats samples so that every rank gets as many; metrics
    reduced over the ranks would then count those samples twice. Here rank r gets
    samples r, r + world, r + 2 world, ... in order, and ranks may differ by one
    sample: metric sums over all ranks equal those of one process exactly.
    """

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


def _loader(
    dataset: Dataset,
    *,
    train: bool,
    batch_size: int,
    generator: torch.Generator | None,
    distributed: bool,
    seed: int,
    **common: Any,
) -> DataLoader:
    sampler = None
    if distributed:
        kind = DistributedSampler if train else ShardSampler
        world, rank = idist.get_world_size(), idist.get_rank()
        sampler = kind(dataset, num_replicas=world, rank=rank, shuffle=train, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        generator=generator if train else None,
        drop_last=False,
        **common,
    )


def _loader_options(num_workers: int, device: str | torch.device | None) -> dict[str, Any]:
    num_workers = check_int("num_workers", num_workers, minimum=0)
    return {
        "num_workers": num_workers,
        "pin_memory": _is_cuda(device),
        "persistent_workers": num_workers > 0,
    }


def _is_cuda(device: str | torch.device | None) -> bool:
    if device is None:
        return False
    if device == "auto":
        return torch.cuda.is_available()
    try:
        return torch.device(device).type == "cuda"
    except (RuntimeError, TypeError) as error:
        raise ConfigError(
            f"Argument `device` should be 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}"
        ) from error


def _check_info(name: str, datasets: dict[str, Dataset], num_classes: int | None) -> DatasetInfo:
    if num_classes is not None:
        check_int("model_num_classes", num_classes, minimum=1)
    infos = {split: DatasetInfo.from_dataset(dataset) for split, dataset in datasets.items()}
    info = next(iter(infos.values()))
    for split, other in infos.items():
        if other != info:
            raise DataError(f"data set {name!r}: split {split!r} differs from the others: {other}")
    if num_classes is not None and info.num_classes > num_classes:
        raise DataError(
            f"data set {name!r} has {info.num_classes} classes but model.num_classes is "
            f"{num_classes}; set model.num_classes to at least {info.num_classes}"
        )
    return info


def _subset(dataset: Dataset, size: int) -> Subset:
    size = check_int("train_subset", size, minimum=1, maximum=len(dataset))
    generator = torch.Generator().manual_seed(_SUBSET_SEED)
    indices = torch.randperm(len(dataset), generator=generator)[:size].sort().values
    return Subset(dataset, indices.tolist())
