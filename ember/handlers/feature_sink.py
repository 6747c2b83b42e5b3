"""Rows in dataset order from per-batch layer outputs, kept in memory or streamed to disk.

:class:`FeatureSink` places each batch's rows by dataset index, so the result is in
dataset order whatever order the batches came in, and under ``torch.distributed``
every rank's shard lands in one result with the sampler's padding removed.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, SequentialSampler

from ember.errors import ConfigError, EmberError
from ember.handlers.feature_store import (
    RESERVED_NAMES,
    FeatureResult,
    check_output_path,
    move_into_place,
    numpy_ready,
    temp_sibling,
    write_meta,
)

__all__ = ["FeatureSink", "sampler_indices"]

logger = logging.getLogger(__name__)

_NO_PROBLEM = "ok"


def sampler_indices(loader: Any, *, max_batches: int | None = None) -> np.ndarray:
    """The dataset indices a DataLoader yields, in order, without loading any sample.

    Only samplers whose order is known before the loop runs are accepted:
    ``SequentialSampler`` (``shuffle=False``; the indices are the running count
    0, 1, 2, ...) and ``DistributedSampler`` (its order depends only on its seed and
    epoch). A shuffling loader draws its order as it runs, so features could not be
    put back in dataset order.

    Args:
        loader: a batching ``torch.utils.data.DataLoader``.
        max_batches: only the first this many batches (an engine's ``epoch_length``).

    Returns:
        ``int64`` indices, one per sample the loop will see.
    """
    if not isinstance(loader, DataLoader):
        raise ConfigError(
            f"Feature extraction needs a torch DataLoader (to know each row's dataset index), "
            f"got {type(loader).__name__}"
        )
    sampler, batch_sampler = loader.sampler, loader.batch_sampler
    if not isinstance(sampler, (SequentialSampler, DistributedSampler)) or not isinstance(
        batch_sampler, BatchSampler
    ):
        raise ConfigError(
            "Feature extraction needs a loader whose order is known in advance: use "
            "DataLoader(..., shuffle=False) (or a DistributedSampler), got sampler "
            f"{type(sampler).__name__} with batch sampler {type(batch_sampler).__name__}"
        )
    if isinstance(sampler, SequentialSampler):
        order = np.arange(len(sampler), dtype=np.int64)
    else:
        order = np.fromiter(iter(sampler), dtype=np.int64, count=len(sampler))
    size = batch_sampler.batch_size
    count = (len(order) // size) * size if batch_sampler.drop_last else len(order)
    if max_batches is not None:
        count = min(count, max_batches * size)
    return order[:count]


class FeatureSink:
    """Collects per-batch layer outputs as rows in dataset order, in memory or on disk.

    Call :meth:`start` with this process's sample order, :meth:`write` once per
    batch, then :meth:`finish` (or :meth:`abort` on failure). Rows are placed by
    dataset index, so the result is in dataset order and a sample seen twice (the
    padding ``DistributedSampler`` adds) is stored once.

    Under ``torch.distributed`` with more than one process every call is collective:
    each rank passes its own shard and batches, ``ignite.distributed.all_gather``
    brings them together, and every rank gets the whole result. With ``output``,
    rank 0 alone writes the files and the other ranks open them once written (they
    get None where the folder is not on a file system they share).

    Args:
        layers: layer paths, the keys of each batch's features.
        output: folder to stream ``.npy`` files into; None keeps rows in memory.
        overwrite: replace an existing ``output``.
        meta: extra facts written to ``features.json`` (pool, model class, ...).
    """

    def __init__(
        self,
        layers: Sequence[str],
        *,
        output: str | Path | None = None,
        overwrite: bool = False,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self.layers = list(layers)
        reserved = [name for name in self.layers if name in RESERVED_NAMES]
        if reserved:
            raise ConfigError(f"Layer name {reserved[0]!r} is reserved for the {reserved[0]}.npy file")
        self.meta = dict(meta or {})
        self.output = None if output is None else _checked_on_all_ranks(output, overwrite)
        self._overwrite = overwrite
        self._produced = False  # an output this sink wrote may be replaced by its next pass
        self._world = 1
        self._tmp: Path | None = None
        self._files: dict[str, tuple[Any, int, int]] = {}
        self._buffers: dict[str, torch.Tensor] = {}

    @property
    def _writes_files(self) -> bool:
        return self.output is not None and idist.get_rank() == 0

    def start(self, indices: Sequence[int] | np.ndarray) -> None:
        """Begin a pass over the data; ``indices`` is this process's sample order."""
        self.abort()
        local = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        self._world = idist.get_world_size()
        if self._world > 1:
            lengths = idist.all_gather(torch.tensor([len(local)]))
            if len(set(lengths.tolist())) != 1:
                raise ConfigError(
                    f"Every process should see as many samples (use a DistributedSampler), "
                    f"got {lengths.tolist()}"
                )
            local = idist.all_gather(local)
        self._shards = local.reshape(self._world, -1).numpy()
        if self._world > 1 and (self._shards == self._shards[0]).all():
            logger.warning(
                "every process extracted the whole data set: give the loader a "
                "DistributedSampler to split the work"
            )
        self._order = np.unique(self._shards)
        if len(self._order) == 0:
            raise ConfigError("The loader yields no samples: nothing to extract")
        self._offset = 0
        self._written = np.zeros(len(self._order), dtype=bool)
        if self._writes_files:
            self._tmp = temp_sibling(self.output, folder=True)
            np.save(self._tmp / "indices.npy", self._order)

    def write(self, features: Mapping[str, torch.Tensor], labels: torch.Tensor) -> None:
        """Add one batch: ``features[layer]`` and ``labels`` have one row per sample."""
        labels = torch.as_tensor(labels)
        rows = labels.shape[0]
        for name in self.layers:
            if features[name].shape[0] != rows:
                raise EmberError(
                    f"Layer {name!r} gave {features[name].shape[0]} rows for a batch of {rows} "
                    "samples; pick a layer whose output keeps the batch dimension first"
                )
        stop = self._offset + rows
        if stop > self._shards.shape[1]:
            raise EmberError(
                f"The loader gave more samples than its sampler lists ({self._shards.shape[1]}); "
                "was it changed during extraction?"
            )
        indices = self._shards[:, self._offset : stop].reshape(-1)
        self._offset = stop
        if self._world > 1:
            features = {name: idist.all_gather(value.contiguous()) for name, value in features.items()}
            labels = idist.all_gather(labels.contiguous())
        positions = np.searchsorted(self._order, indices)
        # sort rows by position, keep the first of repeated samples (sampler padding)
        positions, first = np.unique(positions, return_index=True)
        keep = torch.from_numpy(first)
        arrays = {name: numpy_ready(features[name])[keep] for name in self.layers}
        arrays["labels"] = numpy_ready(labels)[keep]
        if not self._files and not self._buffers:
            self._allocate(arrays)
        for name, values in arrays.items():
            self._put(name, positions, values)
        self._written[positions] = True

    def _allocate(self, arrays: Mapping[str, torch.Tensor]) -> None:
        total = len(self._order)
        for name, first in arrays.items():
            shape = (total, *first.shape[1:])
            if self.output is None:
                self._buffers[name] = torch.empty(shape, dtype=first.dtype)
            elif self._writes_files:
                path = self._tmp / f"{name}.npy"
                header = np.lib.format.open_memmap(
                    path, mode="w+", dtype=first.numpy().dtype, shape=shape
                )
                offset, row_bytes = header.offset, int(np.prod(shape[1:], dtype=np.int64)) * header.itemsize
                del header
                # Rows are written through a plain file, not the memmap: pages written
                # through a mapping stay resident and count in the process's RSS, so
                # peak memory would grow with the data set instead of staying flat.
                self._files[name] = (open(path, "r+b"), offset, row_bytes)  # noqa: SIM115

    def _put(self, name: str, positions: np.ndarray, values: torch.Tensor) -> None:
        if self.output is None:
            buffer = self._buffers[name]
            if positions[-1] - positions[0] + 1 == len(positions):
                buffer[positions[0] : positions[-1] + 1] = values
            else:
                buffer[torch.from_numpy(positions)] = values
            return
        if not self._writes_files:
            return
        handle, offset, row_bytes = self._files[name]
        data = np.ascontiguousarray(values.numpy())
        # one write per run of consecutive positions
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(positions)]):
            handle.seek(offset + int(positions[start]) * row_bytes)
            handle.write(memoryview(data[start:stop]).cast("B"))

    def finish(self) -> FeatureResult | None:
        """End the pass: every row must have been written. Returns the result."""
        missing = int((~self._written).sum())
        if missing:
            self.abort()
            raise EmberError(
                f"Feature extraction stopped early: {missing} of {len(self._order)} rows were "
                "never computed (was the engine terminated?); nothing was saved"
            )
        indices = torch.from_numpy(self._order)
        if self.output is None:
            labels = self._buffers.pop("labels")
            result = FeatureResult(dict(self._buffers), labels, indices, meta=dict(self.meta))
            self._buffers = {}
            return result
        if self._writes_files:
            self._close_files()
            write_meta(self._tmp, {**self.meta, "layers": self.layers, "num_rows": len(self._order)})
            if self.output.exists() and not (self._overwrite or self._produced):
                self.abort()
                raise ConfigError(
                    f"Argument `output`: {str(self.output)!r} appeared during extraction; "
                    "pass overwrite=True to replace it"
                )
            move_into_place(self._tmp, self.output)
            self._tmp = None
            self._produced = True
            logger.info("features of %d rows streamed to %s", len(self._order), self.output)
        if self._world > 1:
            idist.barrier()
        if not self.output.exists():
            logger.warning("features were written by rank 0 to %s, not visible here", self.output)
            return None
        return FeatureResult.load(self.output)

    def abort(self) -> None:
        """Drop what was written so far; the output path is left as it was."""
        self._close_files()
        self._buffers = {}
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _close_files(self) -> None:
        for handle, _, _ in self._files.values():
            handle.close()
        self._files = {}


def _checked_on_all_ranks(output: str | Path, overwrite: bool) -> Path:
    # Under torch.distributed rank 0 decides and tells the others, so that every
    # rank raises the same error (or none) and no rank waits forever in a collective.
    if idist.get_world_size() == 1:
        return check_output_path(output, overwrite=overwrite)
    problem = _NO_PROBLEM
    if idist.get_rank() == 0:
        try:
            check_output_path(output, overwrite=overwrite)
        except ConfigError as err:
            problem = str(err)
    problem = idist.broadcast(problem, src=0)
    if problem != _NO_PROBLEM:
        raise ConfigError(problem)
    return Path(output).expanduser()
