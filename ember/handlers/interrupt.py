"""Stop a training run on SIGINT / SIGTERM with a checkpoint to resume from.

The first signal lets the current iteration finish, writes a ``last`` checkpoint of
it and terminates the trainer cleanly (its COMPLETED handlers run). A second signal
stops at once: ``KeyboardInterrupt`` for SIGINT, the default action for SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from ember.handlers.checkpoint import CheckpointManager

__all__ = ["attach_interrupt", "InterruptHandler"]

logger = logging.getLogger(__name__)


class InterruptHandler:
    """Signal handlers installed while the trainer runs (see :func:`attach_interrupt`).

    Attributes:
        signum: the first signal received during the last run, or None. A command
            line exits with ``128 + signum`` (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(
        self,
        trainer: Engine,
        manager: CheckpointManager,
        *,
        signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM),
        every: int = 1,
    ) -> None:
        self.trainer = trainer
        self.manager = manager
        self.signals = tuple(signals)
        self.every = every
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def installed(self) -> bool:
        """Whether ember's signal handlers are in place now."""
        return bool(self._previous)

    def install(self, _: Engine | None = None) -> None:
        """Take over the signals (main thread only: elsewhere Python forbids it, so skip)."""
        self.restore()  # never record ember's own handler as the one to go back to
        self.signum = None
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Training runs outside the main thread: SIGINT/SIGTERM will not save a checkpoint")
            return
        for signum in self.signals:
            if signal.getsignal(signum) == signal.SIG_IGN:
                continue  # ignored on purpose (e.g. SIGINT of a background job): keep it so
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def restore(self, _: Engine | None = None) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _restore_and_reraise(self, engine: Engine, error: BaseException) -> None:
        self.restore()
        raise error

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            logger.warning("%s received: stopping after this iteration with a checkpoint; send it again to "
                           "stop at once", signal.Signals(signum).name)
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.restore()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_IGN:
            return
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            os.kill(os.getpid(), signum)  # the default action, now that it is back

    def _agree(self) -> None:
        """Under DDP every rank must stop at the same iteration, or one would wait forever in
        the next all-reduce: the ranks share what they received (one all-reduce)."""
        if idist.get_world_size() == 1:
            return
        received = torch.tensor(self.signum or 0, device=idist.device())
        agreed = int(idist.all_reduce(received, op="MAX").item())
        if agreed and self.signum is None:
            self.signum = agreed

    def _on_iteration(self, engine: Engine) -> None:
        length = engine.state.epoch_length
        if length is not None and engine.state.iteration % length == 0:
            return  # the epoch's own handlers run first; stop at EPOCH_COMPLETED
        if idist.get_world_size() > 1:
            if engine.state.iteration % self.every != 0:
                return
            self._agree()
        if self.signum is None:
            return
        path = self.manager.save_now()
        logger.warning("Stopped at iteration %d; resume from '%s'", engine.state.iteration, path)
        engine.terminate()

    def _on_epoch(self, engine: Engine) -> None:
        self._agree()
        if self.signum is not None:
            # the manager writes `last` at every EPOCH_COMPLETED, whatever the order of handlers
            logger.warning("Stopped at the end of epoch %d", engine.state.epoch)
            engine.terminate()


def attach_interrupt(trainer: Engine, manager: CheckpointManager, *, every: int = 1) -> InterruptHandler:
    """Save a checkpoint and stop cleanly on the first SIGINT/SIGTERM; stop at once on the second.

    Attach it after the other handlers: its EXCEPTION_RAISED handler restores the
    signals and re-raises, so it must come after any handler that swallows errors.

    Args:
        trainer: the training engine.
        manager: what :func:`~ember.handlers.checkpoint.attach_checkpoint` returned.
        every: under DDP, the ranks agree on a stop every this many iterations (and at
            epoch ends): a signal stops the run at the next such point. Each agreement is
            one small all-reduce, a host/device sync on GPUs: use the logging interval.

    Returns:
        The handler; after ``trainer.run`` its ``signum`` says which signal stopped it.

    Example:
        >>> stop = attach_interrupt(trainer, manager)  # doctest: +SKIP
        >>> trainer.run(loader, max_epochs=10)  # doctest: +SKIP
        >>> sys.exit(128 + stop.signum if stop.signum else 0)  # doctest: +SKIP
    """
    handler = InterruptHandler(trainer, manager, every=every)
    trainer.add_event_handler(Events.STARTED, handler.install)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, handler._on_iteration)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, handler._on_epoch)
    trainer.add_event_handler(Events.COMPLETED, handler.restore)
    trainer.add_event_handler(Events.EXCEPTION_RAISED, handler._restore_and_reraise)
    return handler
