"""Trainer and evaluator factories: ignite ``Engine``s built from ember's steps."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from ignite.engine import DeterministicEngine, Engine
from ignite.metrics import Accuracy, Loss, Metric, Precision, Recall, TopKCategoricalAccuracy
from torch import nn

from ember.engine.steps import PrepareBatch, eval_step, make_grad_scaler, model_device, train_step
from ember.errors import ConfigError

__all__ = ["create_trainer", "create_evaluator", "build_metrics", "METRIC_NAMES"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def create_trainer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    *,
    device: str | torch.device | None = None,
    deterministic: bool = False,
    amp: str | None = None,
    scaler: torch.amp.GradScaler | bool | None = None,
    grad_accum: int = 1,
    clip_grad_norm: float | None = None,
    non_blocking: bool = True,
    channels_last: bool = False,
    prepare_batch: PrepareBatch | None = None,
) -> Engine:
    """A training ``Engine`` whose output per iteration is ``{"y_pred", "y", "pred", "loss"}``.

    Args:
        model: the (possibly wrapped) model, already on its device.
        optimizer: its optimizer.
        loss_fn: ``loss_fn(logits, targets) -> scalar tensor``.
        device: where batches go; default: the model's device.
        deterministic: build on ignite's ``DeterministicEngine``: seeded, reproducible
            data order per epoch, so a run resumed mid-epoch continues exactly.
        amp: ``None``, ``"bf16"`` or ``"fp16"`` autocast.
        scaler: a GradScaler, or ``True``/``None`` to make one when ``amp="fp16"``
            (``False`` for none). It is kept as ``trainer.state.scaler`` for checkpoints.
        grad_accum: iterations whose gradients add up before one optimizer step.
        clip_grad_norm: clip the gradients' global L2 norm to this value.
        non_blocking: asynchronous host-to-device copies.
        channels_last: feed 4-D inputs in channels-last memory format.
        prepare_batch: ``(batch, device, non_blocking) -> (x, y)``.

    Returns:
        The trainer.

    Example:
        >>> trainer = create_trainer(model, Adam(model.parameters(), 1e-3, weight_decay=4e-4),
        ...                          nn.CrossEntropyLoss())  # doctest: +SKIP
        >>> trainer.run(train_loader, max_epochs=10)  # doctest: +SKIP
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"Argument `optimizer` should be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    resolved = model_device(model) if device is None else torch.device(device)
    if scaler is None or scaler is True:
        scaler = make_grad_scaler(amp, resolved)
    elif scaler is False:
        scaler = None
    step = train_step(
        model,
        optimizer,
        loss_fn,
        device=resolved,
        non_blocking=non_blocking,
        amp=amp,
        scaler=scaler,
        grad_accum=grad_accum,
        clip_grad_norm=clip_grad_norm,
        channels_last=channels_last,
        prepare_batch=prepare_batch,
    )
    trainer = DeterministicEngine(step) if deterministic else Engine(step)
    trainer.state.scaler = scaler
    return trainer


def _logits_and_targets(output: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return output["y_pred"], output["y"]


def _named_metric(name: str, loss_fn: LossFn | None, device: torch.device) -> Metric:
    if name == "loss":
        if loss_fn is None:
            raise ConfigError("Metric 'loss' needs `loss_fn`: pass create_evaluator(..., loss_fn=...)")
        return Loss(loss_fn, output_transform=_logits_and_targets, device=device)
    factory = METRIC_NAMES.get(name)
    if factory is None:
        raise ConfigError(
            f"Unknown metric {name!r}: expected an ignite Metric or one of "
            f"{', '.join(sorted([*METRIC_NAMES, 'loss']))}"
        )
    return factory(device)


# Metrics by name. Each reads the logits (``y_pred``), not the argmax: ignite's
# Accuracy would take (N,) argmax predictions for binary labels. Accumulators live
# on the evaluation device so that updating them never waits for the device.
METRIC_NAMES: dict[str, Callable[[torch.device], Metric]] = {
    "accuracy": lambda device: Accuracy(device=device),
    "top5": lambda device: TopKCategoricalAccuracy(k=5, device=device),
    "precision": lambda device: Precision(average=True, device=device),
    "recall": lambda device: Recall(average=True, device=device),
}


def build_metrics(
    metrics: Mapping[str, Metric | str] | Sequence[str] | None,
    *,
    loss_fn: LossFn | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Metric]:
    """Turn names and ``Metric`` objects into a ``{name: Metric}`` dict.

    ``None`` gives ``accuracy`` (and ``loss`` when ``loss_fn`` is given).
    """
    device = torch.device(device)
    if metrics is None:
        metrics = ["accuracy"] + (["loss"] if loss_fn is not None else [])
    if isinstance(metrics, str):
        metrics = [metrics]
    if not isinstance(metrics, Mapping):
        metrics = {name: name for name in metrics}
    built: dict[str, Metric] = {}
    for name, metric in metrics.items():
        if isinstance(metric, str):
            metric = _named_metric(metric, loss_fn, device)
        if not isinstance(metric, Metric):
            raise ConfigError(
                f"Metric {name!r} should be an ignite Metric or a metric name, "
                f"got {type(metric).__name__}"
            )
        built[name] = metric
    return built


def create_evaluator(
    model: nn.Module,
    *,
    metrics: Mapping[str, Metric | str] | Sequence[str] | None = None,
    loss_fn: LossFn | None = None,
    device: str | torch.device | None = None,
    amp: str | None = None,
    non_blocking: bool = True,
    channels_last: bool = False,
    prepare_batch: PrepareBatch | None = None,
) -> Engine:
    """An evaluation ``Engine`` (eval mode, no autograd) with metrics attached.

    Args:
        model: the (possibly wrapped) model, already on its device.
        metrics: ``{name: Metric or metric name}`` or a list of names; default
            ``accuracy`` plus ``loss`` when ``loss_fn`` is given. Names:
            accuracy, top5, precision, recall, loss.
        loss_fn: the loss for the ``loss`` metric and the step output.
        device: where batches go; default: the model's device.
        amp: ``None``, ``"bf16"`` or ``"fp16"`` autocast.
        non_blocking: asynchronous host-to-device copies.
        channels_last: feed 4-D inputs in channels-last memory format.
        prepare_batch: ``(batch, device, non_blocking) -> (x, y)``.

    Returns:
        The evaluator; after ``run`` its ``state.metrics`` holds the results.
    """
    resolved = model_device(model) if device is None else torch.device(device)
    step = eval_step(
        model,
        device=resolved,
        loss_fn=loss_fn,
        non_blocking=non_blocking,
        amp=amp,
        channels_last=channels_last,
        prepare_batch=prepare_batch,
    )
    evaluator = Engine(step)
    for name, metric in build_metrics(metrics, loss_fn=loss_fn, device=resolved).items():
        metric.attach(evaluator, name)
    return evaluator

