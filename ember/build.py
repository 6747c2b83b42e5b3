"""Objects from a config: seed, data, model on its device and wrapping, optimizer, loss,
trainer and evaluators. Nothing here attaches handlers or runs anything."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.utils import manual_seed
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from ember.config import Config
from ember.data import DatasetInfo, Loaders, ShardSampler, get_loaders
from ember.engine import create_evaluator, create_trainer, model_device, prepare_model, resolve_device
from ember.engine.optim import build_optimizer
from ember.errors import ConfigError
from ember.handlers.feature_graph import get_submodule
from ember.models import get_model

__all__ = ["Experiment", "build_experiment", "build_model", "model_spec_of"]


def model_spec_of(config: Config, num_classes: int, in_channels: int) -> dict[str, Any]:
    """What rebuilds the model: registry name and constructor arguments."""
    return {
        "name": config.model.name,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "kwargs": dict(config.model.kwargs),
    }


def build_model(spec: dict[str, Any]) -> nn.Module:
    """The plain model a ``model_spec`` (as stored in every checkpoint) describes."""
    return get_model(
        spec["name"],
        num_classes=spec["num_classes"],
        in_channels=spec["in_channels"],
        **spec.get("kwargs", {}),
    )


def _check_input_fits(model: nn.Module, spec: dict[str, Any], info: DatasetInfo, data_name: str) -> None:
    """One sample through the model, on the CPU, before anything is created: a model that
    cannot take the data set's images (too small for its pooling, wrong channels) is a
    clear error now rather than a torch error in the first iteration."""
    shape = (1, info.in_channels, *info.image_size)
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(shape))
    except RuntimeError as err:
        detail = str(err).splitlines()[0]
        raise ConfigError(
            f"Model {spec['name']!r} cannot take the {info.in_channels}x{info.image_size[0]}x"
            f"{info.image_size[1]} images of data set {data_name!r}: {detail}. "
            "Pick a model for this image size (e.g. small_cnn for small images) or resize the data "
            "(data.options.image_size)"
        ) from None
    finally:
        model.train(was_training)


@dataclass
class Experiment:
    """Everything a run is made of, built from the config but not yet run."""

    config: Config
    device: torch.device
    loaders: Loaders
    model: nn.Module
    model_spec: dict[str, Any]
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    trainer: Engine
    evaluators: dict[str, Engine]
    eval_loaders: dict[str, DataLoader]


def _seed(config: Config) -> None:
    # a different but deterministic seed per rank
    manual_seed(config.seed + idist.get_rank())


def _train_eval_loader(loaders: Loaders, size: int, batch_size: int) -> DataLoader | None:
    """A fixed subset of the train split, evaluated each epoch like val (sharded under DDP)."""
    dataset = loaders.train.dataset
    if size == 0:
        return None
    size = min(size, len(dataset))
    generator = torch.Generator().manual_seed(0)
    indices = torch.randperm(len(dataset), generator=generator)[:size].sort().values.tolist()
    subset = Subset(dataset, indices)
    world, rank = idist.get_world_size(), idist.get_rank()
    sampler = ShardSampler(subset, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
    return DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=False,
        sampler=sampler,
        num_workers=loaders.val.num_workers,
        pin_memory=loaders.val.pin_memory,
    )


def build_experiment(config: Config) -> Experiment:
    """Seed, data, model, device and wrapping, optimizer, loss, engines."""
    _seed(config)
    distributed = idist.get_world_size() > 1
    t = config.trainer
    device = idist.device() if distributed else resolve_device(t.device)
    if t.threads is not None:
        torch.set_num_threads(t.threads)
    # cuDNN's autotuner picks the fastest kernels, which may differ from run to run:
    # only when the run need not be reproducible
    torch.backends.cudnn.benchmark = device.type == "cuda" and not t.deterministic
    torch.backends.cudnn.deterministic = device.type == "cuda" and t.deterministic
    d = config.data
    loaders = get_loaders(
        d.name,
        batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size,
        num_workers=d.num_workers,
        root=d.root,
        download=d.download,
        device=device,
        seed=config.seed,
        model_num_classes=config.model.num_classes,
        distributed=distributed,
        **d.options,
    )
    num_classes = config.model.num_classes or loaders.info.num_classes
    in_channels = config.model.in_channels or loaders.info.in_channels
    spec = model_spec_of(config, num_classes, in_channels)
    model = build_model(spec)
    if config.features.layer is not None:
        get_submodule(model, config.features.layer)  # an unknown layer is refused before training
    _check_input_fits(model, spec, loaders.info, d.name)
    parallel = "ddp" if distributed else t.parallel
    model = prepare_model(
        model, device=device, parallel=parallel, device_ids=t.device_ids, sync_batchnorm=t.sync_batchnorm
    )
    device = model_device(model)  # DataParallel lives on its first GPU: batches and metrics go there
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if t.compile:
        model = torch.compile(model)
    o = config.optimizer
    optimizer = build_optimizer(
        o.name,
        model.parameters(),
        lr=o.lr,
        weight_decay=o.weight_decay,
        momentum=o.momentum,
        nesterov=o.nesterov,
        fused=o.fused,
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    trainer = create_trainer(
        model,
        optimizer,
        loss_fn,
        device=device,
        deterministic=t.deterministic,
        amp=t.amp,
        grad_accum=t.grad_accum,
        clip_grad_norm=t.clip_grad_norm,
        channels_last=t.channels_last,
    )
    sampler = loaders.train.sampler
    if isinstance(sampler, DistributedSampler):
        # a new shuffle each epoch, the same on every rank (ignite leaves this to the user)
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: sampler.set_epoch(e.state.epoch - 1))
    eval_loaders = {"val": loaders.val}
    train_eval = _train_eval_loader(loaders, d.train_eval_size, d.eval_batch_size)
    if train_eval is not None:
        eval_loaders = {"train": train_eval, **eval_loaders}
    evaluators = {
        split: create_evaluator(
            model, loss_fn=loss_fn, device=device, amp=t.amp, channels_last=t.channels_last
        )
        for split in eval_loaders
    }
    return Experiment(
        config=config,
        device=device,
        loaders=loaders,
        model=model,
        model_spec=spec,
        optimizer=optimizer,
        loss_fn=loss_fn,
        trainer=trainer,
        evaluators=evaluators,
        eval_loaders=eval_loaders,
    )
