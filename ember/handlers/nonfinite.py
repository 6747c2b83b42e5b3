"""Stop training at the first NaN or infinite loss, before anything saves it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from ember.errors import EmberError

__all__ = ["NonFiniteLossError", "attach_nonfinite_guard"]


class NonFiniteLossError(EmberError):
    """The training loss, or the weights a checkpoint would save, became NaN or infinite."""


def attach_nonfinite_guard(
    trainer: Engine,
    *,
    every: int = 1,
    last_checkpoint: Callable[[], Path | None] = lambda: None,
) -> None:
    """Raise :class:`NonFiniteLossError` at the first iteration whose loss is NaN/Inf.

    ignite's ``TerminateOnNan`` stops quietly after the iteration's other handlers
    ran, so a checkpoint handler of the same event could still save the broken
    weights; raising here, from a handler registered before the checkpoint
    handlers, stops the iteration at once and names it.

    Args:
        trainer: the training engine; its output has a ``loss`` tensor.
        every: check every this many iterations. Reading the loss on the host is
            free on the CPU (check every iteration); on a GPU it is a sync, so
            check where the loss is read for logging anyway.
        last_checkpoint: returns the newest good checkpoint, named in the message.
    """

    def check(engine: Engine) -> None:
        loss = engine.state.output["loss"]
        if bool(torch.isfinite(loss)):
            return
        good = last_checkpoint()
        kept = f"the last good checkpoint is kept: {good}" if good else "no checkpoint was written before it"
        raise NonFiniteLossError(
            f"Training loss became {loss.item()} at iteration {engine.state.iteration} "
            f"(epoch {engine.state.epoch}); training stopped, {kept}. "
            "Lower optimizer.lr or set trainer.clip_grad_norm"
        )

    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=every), check)
