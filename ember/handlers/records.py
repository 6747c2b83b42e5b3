"""A run's written record: ``metrics.jsonl`` (one line per evaluation) and ``summary.json``.

``metrics.jsonl`` grows by one JSON line after every evaluation, flushed at once, so
a run that dies keeps everything it measured; appending (never truncating) keeps the
lines of an earlier, resumed part of the run. ``summary.json`` is written whole at
the end, atomically. :class:`BestValue` is the one place where "the best value of a
metric so far" is decided; other handlers can use it too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from ember.errors import ConfigError
from ember.run_folder import write_text_atomic

__all__ = ["RunRecorder", "BestValue", "json_safe", "MODES"]

logger = logging.getLogger(__name__)

MODES = ("max", "min")


def json_safe(value: Any) -> Any:
    """``value`` with tensors, numpy values and paths made JSON types; NaN and inf become ``None``."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.detach().cpu().tolist())
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy arrays and scalars
        return json_safe(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"Argument `mode` should be 'max' or 'min', got {mode!r}")
    return mode


class BestValue:
    """The best value of one metric seen so far, and where it was seen.

    Args:
        mode: ``"max"`` (higher is better, e.g. accuracy) or ``"min"`` (e.g. loss).

    Example:
        >>> best = BestValue("min")
        >>> best.update(0.5, epoch=1), best.update(0.7, epoch=2), best.update(0.2, epoch=3)
        (True, False, True)
        >>> best.value, best.context["epoch"]
        (0.2, 3)
    """

    def __init__(self, mode: str = "max") -> None:
        self.mode = _check_mode(mode)
        self.value: float | None = None
        self.context: dict[str, Any] = {}

    def is_better(self, value: float) -> bool:
        """Whether ``value`` beats the best so far (NaN never does; ties do not)."""
        if value is None or math.isnan(value):
            return False
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value

    def update(self, value: float | torch.Tensor, **context: Any) -> bool:
        """Offer a value; keep it with ``context`` (epoch, iteration...) when it is better.

        Returns:
            Whether it was the new best.
        """
        number = float(value.item() if isinstance(value, torch.Tensor) else value)
        if not self.is_better(number):
            return False
        self.value, self.context = number, dict(context)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "value": self.value, "context": dict(self.context)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mode = _check_mode(state["mode"])
        self.value, self.context = state["value"], dict(state["context"])


class RunRecorder:
    """Write ``metrics.jsonl`` during a run and ``summary.json`` at its end.

    Only the process of rank 0 records and writes; on other ranks :meth:`attach`
    does nothing and :meth:`write_summary` writes nothing.

    Save it with the checkpoint (it has ``state_dict``/``load_state_dict``) for the
    best values to survive a resumed run.

    Args:
        run_dir: the run's folder (created if needed).

    Example:
        >>> recorder = RunRecorder("runs/digits/2024-01-01T00-00-00")  # doctest: +SKIP
        >>> recorder.attach(trainer, {"val": evaluator}, best_metric="accuracy")  # doctest: +SKIP
        >>> trainer.run(loader, max_epochs=10)  # doctest: +SKIP
        >>> recorder.write_summary(best_checkpoint="checkpoints/best.pt")  # doctest: +SKIP
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.summary_path = self.run_dir / "summary.json"
        self.best_metric = "accuracy"
        self.mode = "max"
        self.best: dict[str, BestValue] = {}
        self.final: dict[str, dict[str, Any]] = {}
        self._trainer: Engine | None = None
        self._started = time.time()

    def attach(
        self,
        trainer: Engine,
        evaluators: Mapping[str, Engine],
        *,
        best_metric: str = "accuracy",
        mode: str = "max",
    ) -> None:
        """Record every run of every evaluator, and the best ``best_metric`` of each split.

        Each evaluation appends ``{"epoch", "iteration", "split", "metrics",
        "wall_time", "elapsed_s", "eval_s"}`` to ``metrics.jsonl``: epoch and
        iteration are the trainer's, ``wall_time`` is Unix time, ``elapsed_s`` the
        seconds since the trainer started (in this process: a resumed run starts
        again from 0) and ``eval_s`` the evaluation's duration in seconds.

        Args:
            trainer: the training engine (epoch and iteration of each record).
            evaluators: ``{split: evaluator}``.
            best_metric: the metric whose best value per split the summary reports.
            mode: ``"max"`` when higher ``best_metric`` is better, ``"min"`` otherwise.
        """
        _check_mode(mode)
        if not isinstance(evaluators, Mapping) or not evaluators:
            raise ConfigError(
                "Argument `evaluators` should map split names to engines, e.g. {'val': evaluator}, "
                f"got {evaluators!r}"
            )
        self.best_metric, self.mode = best_metric, mode
        self._trainer = trainer
        if idist.get_rank() != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        trainer.add_event_handler(Events.STARTED, self._trainer_started)
        for split, evaluator in evaluators.items():
            evaluator.add_event_handler(Events.COMPLETED, self._record, split)

    def _trainer_started(self, _: Engine) -> None:
        self._started = time.time()

    def _record(self, evaluator: Engine, split: str) -> None:
        trainer = self._trainer
        metrics = json_safe(dict(evaluator.state.metrics))
        now = time.time()
        record = {
            "epoch": trainer.state.epoch,
            "iteration": trainer.state.iteration,
            "split": split,
            "metrics": metrics,
            "wall_time": now,
            "elapsed_s": now - self._started,
            "eval_s": evaluator.state.times.get(Events.COMPLETED.name),
        }
        with self.metrics_path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(record, allow_nan=False) + "\n")
            file.flush()
        self.final[split] = {"epoch": record["epoch"], "iteration": record["iteration"], "metrics": metrics}
        value = metrics.get(self.best_metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            best = self.best.setdefault(split, BestValue(self.mode))
            if best.update(value, epoch=record["epoch"], iteration=record["iteration"]):
                logger.debug("new best %s %s %.6g at epoch %d",
                             split, self.best_metric, value, record["epoch"])

    def summary(
        self,
        *,
        test_metrics: Mapping[str, Any] | None = None,
        best_checkpoint: str | Path | None = None,
        last_checkpoint: str | Path | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The summary :meth:`write_summary` writes, without writing it."""
        summary: dict[str, Any] = {
            "final": self.final,
            "best": {
                split: {"metric": self.best_metric, "mode": best.mode, "value": best.value, **best.context}
                for split, best in self.best.items()
            },
            "test": dict(test_metrics) if test_metrics is not None else None,
            "checkpoints": {"best": best_checkpoint, "last": last_checkpoint},
            "wall_time_s": time.time() - self._started,
        }
        clash = sorted(set(extra or {}) & set(summary))
        if clash:
            raise ConfigError(
                f"Argument `extra` should not redefine the summary's own keys {clash}; rename them"
            )
        summary.update(extra or {})
        return json_safe(summary)

    def write_summary(
        self,
        *,
        test_metrics: Mapping[str, Any] | None = None,
        best_checkpoint: str | Path | None = None,
        last_checkpoint: str | Path | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write ``summary.json`` atomically (a whole old file or a whole new one, never half).

        The summary holds ``final`` (last metrics, epoch and iteration per split),
        ``best`` (per split: metric, mode, value, epoch, iteration), ``test``,
        ``checkpoints`` (``best``, ``last``), ``wall_time_s`` and the keys of ``extra``.

        Args:
            test_metrics: metrics of the final test evaluation.
            best_checkpoint: path of the best checkpoint.
            last_checkpoint: path of the last checkpoint.
            extra: more top-level keys (they may not reuse the names above).

        Returns:
            The summary, as written (JSON types only: NaN became ``None``).
        """
        summary = self.summary(test_metrics=test_metrics, best_checkpoint=best_checkpoint,
                               last_checkpoint=last_checkpoint, extra=extra)
        if idist.get_rank() == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.summary_path, json.dumps(summary, indent=2, allow_nan=False) + "\n")
        return summary

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_metric": self.best_metric,
            "mode": self.mode,
            "best": {split: best.state_dict() for split, best in self.best.items()},
            "final": self.final,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_metric, self.mode = state["best_metric"], _check_mode(state["mode"])
        self.best = {}
        for split, best_state in state["best"].items():
            self.best[split] = BestValue(best_state["mode"])
            self.best[split].load_state_dict(best_state)
        self.final = dict(state["final"])
