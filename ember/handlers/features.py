"""Features from any sub-module of a model, wrapped for parallel work or not.

The classic recipe reaches AlexNet's convolutional part as ``model.features(x)``, and
under DataParallel as ``model.module.features(x)``, which silently runs on one GPU.
Here a layer is named by its dotted path in the plain model, whatever wraps it:

- :func:`extract_features` runs a network pruned after the layers (see
  :func:`~ember.handlers.feature_graph.build_extractor`) over a loader, on all the
  GPUs of a DataParallel model, gathering every rank's shard under DDP, and keeps
  the rows in memory or streams them to ``.npy`` files.
- :class:`FeatureExtractor` attaches to an evaluation engine that runs the whole
  model anyway (ember's ``create_evaluator``) and records the layers with hooks.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from ember.engine import (
    amp_dtype,
    autocast,
    default_prepare_batch,
    model_device,
    resolve_device,
    unwrap_model,
)
from ember.errors import ConfigError
from ember.handlers.feature_graph import (
    build_extractor,
    check_layers,
    check_pool,
    find_data_parallel,
    get_submodule,
    list_layers,
    modes_kept,
    pooled,
)
from ember.handlers.feature_sink import FeatureSink, sampler_indices
from ember.handlers.feature_store import FeatureResult, export_projector

__all__ = [
    "FeatureExtractor",
    "FeatureResult",
    "build_extractor",
    "export_projector",
    "extract_features",
    "get_submodule",
    "list_layers",
]

logger = logging.getLogger(__name__)

PrepareBatch = Callable[[Any, torch.device, bool], tuple[torch.Tensor, torch.Tensor]]


def _check_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    where = model_device(model)
    if device is None:
        return where
    resolved = resolve_device(device)
    has_tensors = any(True for _ in model.parameters()) or any(True for _ in model.buffers())
    if has_tensors and where != resolved:
        raise ConfigError(
            f"The model is on {where} but `device` is {resolved}: move it first, e.g. "
            f"prepare_model(model, device={str(resolved)!r})"
        )
    return resolved


def extract_features(
    model: nn.Module,
    loader: Any,
    layers: str | Sequence[str],
    *,
    device: str | torch.device | None = None,
    pool: str | None = None,
    output: str | Path | None = None,
    overwrite: bool = False,
    amp: str | None = None,
    method: str = "auto",
    prepare_batch: PrepareBatch | None = None,
    non_blocking: bool = True,
) -> FeatureResult | None:
    """Outputs of one or more layers for every sample of a loader, in dataset order.

    Layer ``"features"`` gives what ``unwrap_model(model).features(x)`` gives, for a
    plain, DataParallel, DDP or compiled model, but only the network up to the layers
    runs, and under DataParallel it runs on all the model's GPUs.

    Args:
        model: the (possibly wrapped) model, already on its device.
        loader: a DataLoader with a known order: ``shuffle=False``, or a
            ``DistributedSampler`` (one shard per rank).
        layers: dotted sub-module paths (``"features"``, ``"classifier.4"``).
        device: where batches go; must be the model's device (default).
        pool: None, ``"flatten"`` or ``"avg"`` (see :func:`build_extractor`).
        output: a folder (whose parent exists) to stream rows into as they are made:
            ``<layer>.npy`` per layer, ``labels.npy``, ``indices.npy``; memory stays
            flat however large the data set. None keeps the rows in memory.
        overwrite: replace an existing ``output`` (only once the new one is complete).
        amp: None, ``"bf16"`` or ``"fp16"`` autocast. bfloat16 rows are stored as float32.
        method: ``"auto"``, ``"fx"`` or ``"hooks"`` (see :func:`build_extractor`).
        prepare_batch: ``(batch, device, non_blocking) -> (inputs, labels)``.
        non_blocking: asynchronous host-to-device copies.

    Returns:
        A :class:`FeatureResult`: ``features[layer]`` with one row per sample (tensors,
        or read-only memmaps when streamed), ``labels``, and ``indices``: each row's
        dataset index as the loader's sampler gives it (with ``shuffle=False``, the
        running count 0, 1, 2, ...), rows sorted by it. Under
        ``torch.distributed`` every rank gets the whole result (rank 0 writes
        ``output``; a rank that cannot see that folder gets None).

    Example:
        >>> result = extract_features(model, test_loader, "features", pool="avg")  # doctest: +SKIP
        >>> result.save("features.pt")  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"Argument `model` should be a torch.nn.Module, got {type(model).__name__}")
    plain = unwrap_model(model)
    names = check_layers(plain, layers)
    pool = check_pool(pool)
    dtype = amp_dtype(amp)
    resolved = _check_device(model, device)
    indices = sampler_indices(loader)
    meta = {"model": type(plain).__name__, "pool": pool}
    sink = FeatureSink(names, output=output, overwrite=overwrite, meta=meta)
    extractor = build_extractor(model, names, pool=pool, method=method)
    how = unwrap_model(extractor).method
    logger.info("extracting %s from %s (%s)", ", ".join(names), type(plain).__name__, how)
    prepare = prepare_batch or default_prepare_batch
    engine = Engine(_extract_step(extractor, resolved, prepare, non_blocking, dtype))
    engine.add_event_handler(Events.STARTED, lambda _: sink.start(indices))
    engine.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: sink.write(e.state.output["features"], e.state.output["y"])
    )
    try:
        with modes_kept(plain):
            extractor.eval()
            engine.run(loader, max_epochs=1)
        return sink.finish()
    except BaseException:
        sink.abort()
        raise


def _extract_step(
    extractor: nn.Module,
    device: torch.device,
    prepare: PrepareBatch,
    non_blocking: bool,
    dtype: torch.dtype | None,
) -> Callable[[Engine, Any], dict[str, Any]]:
    def step(engine: Engine, batch: Any) -> dict[str, Any]:
        with torch.inference_mode(), autocast(device, dtype):
            x, y = prepare(batch, device, non_blocking)
            return {"features": extractor(x), "y": y}

    return step


class FeatureExtractor:
    """Records layer outputs on every iteration of an evaluation engine.

    Attach it to an engine that runs the whole model (ember's ``create_evaluator`` or
    ``eval_step``): forward hooks on the plain model's layers record their outputs
    (copied, so a later in-place op cannot change them) with the batch's labels
    (``output["y"]``, else ``batch[1]``) and dataset indices: the loader's sampler
    order, which for a loader with ``shuffle=False`` is the running count 0, 1, 2, ...
    Under DataParallel each GPU's chunk is put back in batch order; under
    ``torch.distributed`` shards are gathered (see :class:`FeatureSink`). After each
    epoch ``result`` holds a :class:`FeatureResult` in dataset order.

    Args:
        model: the engine's model, plain or wrapped.
        layers: dotted sub-module paths.
        pool: None, ``"flatten"`` or ``"avg"``.
        output: folder to stream rows into (see :func:`extract_features`).
        overwrite: replace an existing ``output``.

    Example:
        >>> evaluator = create_evaluator(model)  # doctest: +SKIP
        >>> features = FeatureExtractor(model, "features", pool="avg")  # doctest: +SKIP
        >>> features.attach(evaluator)  # doctest: +SKIP
        >>> evaluator.run(test_loader); features.result.save("features.pt")  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str],
        *,
        pool: str | None = None,
        output: str | Path | None = None,
        overwrite: bool = False,
    ) -> None:
        self.model = model
        plain = unwrap_model(model)
        self.layers = check_layers(plain, layers)
        self.pool = check_pool(pool)
        meta = {"model": type(plain).__name__, "pool": pool}
        self._sink = FeatureSink(self.layers, output=output, overwrite=overwrite, meta=meta)
        self.result: FeatureResult | None = None
        self._device_ids = _data_parallel_ids(model)
        self._chunks: dict[str, dict[torch.device, torch.Tensor]] = {}
        self._recording = False
        self._hooks: list[Any] = []
        self._handlers: list[Any] = []

    def attach(self, engine: Engine) -> None:
        """Hook the layers and record on every iteration of ``engine``."""
        plain = unwrap_model(self.model)
        self._hooks = [
            plain.get_submodule(layer).register_forward_hook(functools.partial(self._record, layer))
            for layer in self.layers
        ]
        for event, handler in (
            (Events.EPOCH_STARTED, self._epoch_started),
            (Events.ITERATION_STARTED, self._iteration_started),
            (Events.ITERATION_COMPLETED, self._iteration_completed),
            (Events.EPOCH_COMPLETED, self._epoch_completed),
            (Events.TERMINATE, self._terminated),
            (Events.EXCEPTION_RAISED, self._failed),
        ):
            self._handlers.append(engine.add_event_handler(event, handler))

    def detach(self) -> None:
        """Remove the hooks and event handlers ``attach`` added."""
        for handle in [*self._hooks, *self._handlers]:
            handle.remove()
        self._hooks, self._handlers = [], []

    def _record(self, layer: str, module: nn.Module, args: Any, output: Any) -> None:
        if self._recording:
            value = pooled(layer, output, self.pool, copy=True)
            self._chunks.setdefault(layer, {}).setdefault(value.device, value)  # first call per GPU

    def _epoch_started(self, engine: Engine) -> None:
        self.result = None
        self._sink.start(sampler_indices(engine.state.dataloader, max_batches=engine.state.epoch_length))

    def _iteration_started(self, engine: Engine) -> None:
        self._chunks = {}
        self._recording = True

    def _iteration_completed(self, engine: Engine) -> None:
        self._recording = False
        features = {}
        for layer in self.layers:
            chunks = self._chunks.get(layer)
            if not chunks:
                raise ConfigError(
                    f"Layer {layer!r} gave no output: {type(unwrap_model(self.model)).__name__}.forward "
                    "never calls it"
                )
            # DataParallel scatters a batch over device_ids in order
            parts = [chunks[d] for d in sorted(chunks, key=self._device_rank)]
            features[layer] = parts[0] if len(parts) == 1 else torch.cat([p.cpu() for p in parts])
        self._chunks = {}
        self._sink.write(features, _labels(engine))

    def _device_rank(self, device: torch.device) -> int:
        index = -1 if device.index is None else device.index
        return self._device_ids.index(index) if index in self._device_ids else index

    def _epoch_completed(self, engine: Engine) -> None:
        self.result = self._sink.finish()

    def _terminated(self, engine: Engine) -> None:
        self._recording = False
        self._sink.abort()

    def _failed(self, engine: Engine, error: BaseException) -> None:
        self._terminated(engine)
        raise error  # handling EXCEPTION_RAISED must not swallow the engine's error


def _data_parallel_ids(model: nn.Module) -> list[int]:
    wrapper = find_data_parallel(model)
    return [] if wrapper is None else [int(i) for i in wrapper.device_ids]


def _labels(engine: Engine) -> torch.Tensor:
    output, batch = engine.state.output, engine.state.batch
    if isinstance(output, Mapping) and "y" in output:
        return output["y"]
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[1]
    raise ConfigError(
        "FeatureExtractor needs labels: the engine's output should have 'y' (as ember's "
        f"eval_step gives) or its batches be (inputs, labels) pairs, got {type(batch).__name__}"
    )
