"""Optimizers and learning-rate schedules by name, on torch.optim and ignite's param schedulers."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from ignite.engine import Engine, Events
from ignite.handlers import (
    CosineAnnealingScheduler,
    LRScheduler,
    ParamScheduler,
    PiecewiseLinear,
    create_lr_scheduler_with_warmup,
)

from ember.config import OPTIMIZERS, SCHEDULERS
from ember.errors import ConfigError

__all__ = ["build_optimizer", "attach_lr_scheduler", "OPTIMIZER_NAMES", "SCHEDULER_NAMES"]

# the names are defined with the config, which must not import torch
OPTIMIZER_NAMES = OPTIMIZERS
SCHEDULER_NAMES = SCHEDULERS

# learning rate at the start of a warm-up, as a fraction of the base rate
_WARMUP_START = 0.01


def build_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """``adam`` (the recipe's ``Adam(lr, weight_decay=4e-4)``), ``adamw`` or ``sgd``.

    ``fused=True`` uses torch's fused Adam/AdamW kernel (one kernel for all parameters):
    much faster optimizer steps, but not bitwise equal to the plain implementation.
    """
    if fused and name not in ("adam", "adamw"):
        raise ConfigError(f"optimizer.fused=true is for adam and adamw, got optimizer {name!r}")
    extra = {"fused": True} if fused else {}
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **extra)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **extra)
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, weight_decay=weight_decay
        )
    raise ConfigError(f"Unknown optimizer {name!r}: expected one of {', '.join(OPTIMIZER_NAMES)}")


def attach_lr_scheduler(
    trainer: Engine,
    optimizer: torch.optim.Optimizer,
    name: str,
    *,
    max_epochs: int,
    epoch_length: int,
    step_size: int = 10,
    gamma: float = 0.1,
    warmup_epochs: int = 0,
    min_lr: float = 0.0,
) -> ParamScheduler | LRScheduler | None:
    """Attach a per-iteration learning-rate schedule to the trainer.

    Args:
        trainer: the training engine.
        optimizer: its optimizer; the base rate is its first group's ``lr``.
        name: ``none``; ``step`` (multiply by ``gamma`` every ``step_size`` epochs);
            ``cosine`` (to ``min_lr`` over the run); ``warmup_cosine`` (linear
            warm-up over ``warmup_epochs``, then cosine); ``linear_warmup``
            (linear warm-up, then constant).
        max_epochs: epochs of the whole run.
        epoch_length: iterations per epoch.

    Returns:
        The scheduler (stateful: checkpoint it), or ``None`` for ``none``.
    """
    if name == "none":
        return None
    base_lr = optimizer.param_groups[0]["lr"]
    total = max_epochs * epoch_length
    warmup = max(1, warmup_epochs * epoch_length)
    if name == "step":
        torch_scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=step_size * epoch_length, gamma=gamma
        )
        scheduler: ParamScheduler | LRScheduler = LRScheduler(torch_scheduler)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, scheduler)
        return scheduler
    if name == "cosine":
        scheduler = CosineAnnealingScheduler(
            optimizer, "lr", start_value=base_lr, end_value=min_lr, cycle_size=total + 1
        )
    elif name == "warmup_cosine":
        cosine = CosineAnnealingScheduler(
            optimizer, "lr", start_value=base_lr, end_value=min_lr, cycle_size=max(2, total - warmup + 1)
        )
        scheduler = create_lr_scheduler_with_warmup(
            cosine, warmup_start_value=base_lr * _WARMUP_START, warmup_duration=warmup
        )
    elif name == "linear_warmup":
        scheduler = PiecewiseLinear(
            optimizer, "lr", milestones_values=[(0, base_lr * _WARMUP_START), (warmup, base_lr)]
        )
    else:
        raise ConfigError(f"Unknown scheduler {name!r}: expected one of {', '.join(SCHEDULER_NAMES)}")
    trainer.add_event_handler(Events.ITERATION_STARTED, scheduler)
    return scheduler
