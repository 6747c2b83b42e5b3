"""Console feedback: progress bars on a terminal, plain log lines everywhere else.

On a terminal, ignite's ``ProgressBar`` (tqdm) shows training and evaluation
progress. Elsewhere (CI logs, files, ``nohup``) carriage-return bars would fill the
log, so training progress is a log line every ``log_every`` iterations instead::

    epoch 2 iter 140/300 loss 0.4123

Either way each evaluation ends with one log line per split::

    epoch 3 | val | accuracy 0.9815 loss 0.0712 | 0.42 s, 6400 samples/s
"""

from __future__ import annotations

import logging
import numbers
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar

from ember.errors import ConfigError

__all__ = ["attach_progress", "format_metrics"]

logger = logging.getLogger(__name__)


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (ValueError, OSError):  # a closed or detached stream
        return False


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """``"accuracy 0.9815 loss 0.0712"``: scalar metrics in order, floats with 4 decimals.

    Values that are not scalars (a confusion matrix, a per-class vector) are left out.
    """
    parts = []
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, bool) or isinstance(value, numbers.Integral):
            parts.append(f"{name} {int(value)}")
        elif isinstance(value, numbers.Real):
            parts.append(f"{name} {float(value):.4f}")
    return " ".join(parts)


def _loss_of(output: Any) -> Any:
    return output["loss"] if isinstance(output, Mapping) else output


class _IterationReport:
    """Every ``log_every`` iterations: read the loss back from the device and log it.

    Those are the only iterations that wait for the device. A progress bar refreshed
    every iteration shows the last value read (:meth:`__call__` is its output
    transform) instead of reading the loss itself at every step.

    Args:
        level: the logging level of the ``epoch E iter I/N loss L`` line: INFO when it
            is the console's only feedback, DEBUG under a bar (a log file still has it).
    """

    def __init__(self, level: int) -> None:
        self.level = level
        self.loss: float | None = None

    def read(self, trainer: Engine) -> None:
        state = trainer.state
        self.loss = float(_loss_of(state.output))
        length = state.epoch_length
        position = f"iter {state.iteration}"
        if length:
            position = f"iter {(state.iteration - 1) % length + 1}/{length}"
        logger.log(self.level, "epoch %d %s loss %.4f", state.epoch, position, self.loss)

    def __call__(self, _: Any) -> dict[str, float]:
        return {} if self.loss is None else {"loss": self.loss}


class _EvaluationLine:
    """Counts the samples of one evaluator run and logs its one summary line."""

    def __init__(self, trainer: Engine, split: str) -> None:
        self.trainer = trainer
        self.split = split
        self.samples = 0

    def attach(self, evaluator: Engine) -> None:
        evaluator.add_event_handler(Events.STARTED, self._reset)
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, self._count)
        evaluator.add_event_handler(Events.COMPLETED, self._log)

    def _reset(self, _: Engine) -> None:
        self.samples = 0

    def _count(self, evaluator: Engine) -> None:
        output = evaluator.state.output
        y = output.get("y") if isinstance(output, Mapping) else None
        if y is None and isinstance(evaluator.state.batch, (list, tuple)) and len(evaluator.state.batch) > 1:
            y = evaluator.state.batch[1]
        self.samples += len(y) if y is not None else 0  # a shape, not a value: no device wait

    def _log(self, evaluator: Engine) -> None:
        seconds = evaluator.state.times.get(Events.COMPLETED.name) or 0.0
        rate = f", {self.samples / seconds:.0f} samples/s" if seconds > 0 and self.samples else ""
        # a stand-alone evaluation (its own "trainer") has no training epoch to show
        when = f"epoch {self.trainer.state.epoch} | " if self.trainer is not evaluator else ""
        metrics = format_metrics(evaluator.state.metrics)
        logger.info("%s%s | %s | %.2f s%s", when, self.split, metrics, seconds, rate)


def attach_progress(
    trainer: Engine,
    evaluators: Mapping[str, Engine] | None = None,
    *,
    log_every: int = 50,
    stream: TextIO | None = None,
) -> None:
    """Show how training goes, on a terminal or in a log.

    When ``stream`` is a terminal, training and each evaluation get a tqdm progress
    bar (ignite's ``ProgressBar``) written to ``stream``; the training bar shows the
    loss, refreshed every ``log_every`` iterations. Otherwise training logs
    ``epoch E iter I/N loss L`` every ``log_every`` iterations through ``logging``
    (under a bar that line is logged at DEBUG level, for log files).
    After each evaluation, one line per split goes through ``logging``:
    ``epoch 3 | val | accuracy 0.9815 loss 0.0712 | 0.42 s, 6400 samples/s``.

    Only the process of rank 0 reports; on other ranks this does nothing.

    Args:
        trainer: the training engine; its output is a dict with ``loss``.
        evaluators: ``{split: evaluator}``.
        log_every: iterations between two loss reports.
        stream: where bars go and whose ``isatty()`` decides between bars and log
            lines; default ``sys.stderr``.

    Example:
        >>> attach_progress(trainer, {"val": evaluator}, log_every=100)  # doctest: +SKIP
    """
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ConfigError(f"Argument `log_every` should be a positive integer, got {log_every!r}")
    if evaluators is not None and not isinstance(evaluators, Mapping):
        raise ConfigError(
            "Argument `evaluators` should map split names to engines, e.g. {'val': evaluator}, "
            f"got {type(evaluators).__name__}"
        )
    if idist.get_rank() != 0:
        return
    stream = sys.stderr if stream is None else stream
    bars = _is_terminal(stream)
    report = _IterationReport(logging.DEBUG if bars else logging.INFO)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=log_every), report.read)
    if bars:
        if log_every > 1:  # a loss on the bar from the first iteration on
            trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), report.read)
        ProgressBar(persist=True, file=stream).attach(trainer, output_transform=report)
    for split, evaluator in (evaluators or {}).items():
        if bars:
            ProgressBar(persist=False, desc=split, file=stream).attach(evaluator)
        _EvaluationLine(trainer, split).attach(evaluator)
