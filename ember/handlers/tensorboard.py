"""TensorBoard monitoring of a run, built on ignite's ``TensorboardLogger``.

:func:`attach_tensorboard` logs the training loss and learning rates, every
evaluator's metrics on the trainer's iteration axis, pictures of chosen evaluations
(see :mod:`ember.handlers.tb_figures`), and on request weight/gradient histograms
and the model graph. :func:`log_hparams` writes hyper-parameters with final metrics
for TensorBoard's HParams dashboard. Open the dashboard with
``tensorboard --logdir runs``.

Only the process of rank 0 writes; on other ranks both functions do nothing
(:func:`attach_tensorboard` returns ``None`` there, and :func:`log_hparams` accepts
that ``None``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers.tensorboard_logger import (
    GradsHistHandler,
    TensorboardLogger,
    WeightsHistHandler,
    global_step_from_engine,
)
from torch import nn
from torch.optim import Optimizer
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from ember.engine.device import unwrap_model
from ember.engine.steps import model_device
from ember.errors import ConfigError
from ember.handlers.tb_figures import EvaluationFigures

__all__ = ["attach_tensorboard", "log_hparams", "FIGURE_SPLITS", "HPARAM_METRIC_PREFIX"]

logger = logging.getLogger(__name__)

FIGURE_SPLITS = ("val", "test")
"""Evaluators that get pictures by default (confusion matrix, PR curves, misclassified)."""

HPARAM_METRIC_PREFIX = "hparam/"
"""Tag prefix of the metrics :func:`log_hparams` writes, kept apart from the training curves."""


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"Argument `{name}` should be a positive integer, got {value!r}")


def _check_evaluators(evaluators: Mapping[str, Engine] | None) -> dict[str, Engine]:
    if evaluators is None:
        return {}
    if not isinstance(evaluators, Mapping):
        raise ConfigError(
            "Argument `evaluators` should map split names to engines, e.g. {'val': evaluator}, "
            f"got {type(evaluators).__name__}"
        )
    for split, engine in evaluators.items():
        if not isinstance(split, str) or not split or "/" in split:
            raise ConfigError(f"Evaluator names should be non-empty strings without '/', got {split!r}")
        if not isinstance(engine, Engine):
            raise ConfigError(f"Evaluator {split!r} should be an ignite Engine, got {type(engine).__name__}")
    return dict(evaluators)


def _train_loss(output: Any) -> dict[str, Any]:
    # Called only on logged iterations: ignite's OutputHandler calls .item() on the
    # 0-d tensor there, and nowhere else, so other iterations never wait for the device.
    return {"loss": output["loss"] if isinstance(output, Mapping) else output}


def attach_tensorboard(
    log_dir: str | Path,
    trainer: Engine,
    *,
    optimizer: Optimizer | None = None,
    evaluators: Mapping[str, Engine] | None = None,
    model: nn.Module | None = None,
    log_every: int = 50,
    class_names: Sequence[str] | None = None,
    histograms: bool = False,
    graph_input: torch.Tensor | None = None,
    figures: Sequence[str] | None = None,
    max_pr_samples: int = 10_000,
    max_examples: int = 32,
) -> TensorboardLogger | None:
    """Log a run to TensorBoard event files in ``log_dir``.

    What is written (every step is the trainer's iteration, so training and
    evaluation curves share one axis):

    * ``train/loss`` every ``log_every`` iterations (the only iterations that read
      the loss back from the device);
    * ``lr/group_<i>``, the learning rate of each parameter group, on the same
      iterations, when ``optimizer`` is given;
    * ``<split>/<metric>`` for every metric of every evaluator, after each of its runs;
    * for the evaluators named in ``figures``: ``<split>/confusion_matrix`` and
      ``<split>/misclassified`` images and ``<split>/pr_curve/<class>`` PR curves;
    * ``weights/<name>`` and ``grads/<name>`` histograms after each epoch when
      ``histograms=True``, named as in the unwrapped model (no ``module.``);
    * the model graph once, when ``graph_input`` is given and the model traces.

    Args:
        log_dir: the folder of the event files (created if needed).
        trainer: the training engine; its output is a dict with ``loss``.
        optimizer: whose learning rates to log.
        evaluators: ``{split: evaluator}``, e.g. ``{"val": evaluator}``.
        model: the (possibly wrapped) model, for histograms and the graph.
        log_every: iterations between two training-loss points.
        class_names: class names, indexed by class, for the figures.
        histograms: log weight and gradient histograms (costly: off by default).
        graph_input: an example input batch for ``add_graph``; a model that does not
            trace logs a warning and training goes on.
        figures: splits that get figures; default ``("val", "test")``, ``()`` for none.
        max_pr_samples: samples per evaluation kept for the PR curves.
        max_examples: misclassified inputs shown per evaluation.

    Returns:
        The ``TensorboardLogger`` (close it at the end of the run), or ``None`` on a
        process whose rank is not 0.

    Example:
        >>> tb = attach_tensorboard("runs/x/tensorboard", trainer, optimizer=optimizer,
        ...                         evaluators={"val": evaluator}, model=model)  # doctest: +SKIP
        >>> trainer.run(train_loader, max_epochs=10); tb.close()  # doctest: +SKIP
    """
    _check_positive_int("log_every", log_every)
    _check_positive_int("max_examples", max_examples)
    _check_positive_int("max_pr_samples", max_pr_samples)
    splits = _check_evaluators(evaluators)
    if (histograms or graph_input is not None) and model is None:
        raise ConfigError(
            "Histograms and the model graph need the model: pass attach_tensorboard(..., model=)"
        )
    if idist.get_rank() != 0:
        return None

    tb = TensorboardLogger(log_dir=str(log_dir))
    every = Events.ITERATION_COMPLETED(every=log_every)
    tb.attach_output_handler(trainer, every, tag="train", output_transform=_train_loss)
    if optimizer is not None:
        # ITERATION_STARTED: the rate the iteration uses, after schedulers attached before this.
        tb.attach_opt_params_handler(trainer, Events.ITERATION_STARTED(every=log_every),
                                     optimizer=optimizer, param_name="lr")
    trainer_step = global_step_from_engine(trainer, Events.ITERATION_COMPLETED)
    figure_splits = FIGURE_SPLITS if figures is None else tuple(figures)
    for split, evaluator in splits.items():
        tb.attach_output_handler(evaluator, Events.COMPLETED, tag=split, metric_names="all",
                                 global_step_transform=trainer_step)
        if split in figure_splits:
            EvaluationFigures(tb.writer, split, global_step=lambda: trainer.state.iteration,
                              class_names=class_names, max_pr_samples=max_pr_samples,
                              max_examples=max_examples).attach(evaluator)
        evaluator.add_event_handler(Events.COMPLETED, _flush, tb)
    if histograms:
        _attach_histograms(tb, trainer, unwrap_model(model))
    if graph_input is not None:
        _add_graph(tb, model, graph_input)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, _flush, tb)
    trainer.add_event_handler(Events.COMPLETED, _flush, tb)
    logger.info("TensorBoard events in %s (view: tensorboard --logdir %s)", log_dir, log_dir)
    return tb


def _flush(_: Engine, tb: TensorboardLogger) -> None:
    tb.writer.flush()


def _attach_histograms(tb: TensorboardLogger, trainer: Engine, plain: nn.Module) -> None:
    # ignite's histogram handlers take their step from the event they are called
    # with; run them after each epoch but hand them ITERATION_COMPLETED so that the
    # step is the trainer's iteration, the axis of every other plot.
    for handler in (WeightsHistHandler(plain), GradsHistHandler(plain)):
        trainer.add_event_handler(Events.EPOCH_COMPLETED, handler, tb, Events.ITERATION_COMPLETED)


def _add_graph(tb: TensorboardLogger, model: nn.Module, graph_input: torch.Tensor) -> None:
    plain = unwrap_model(model)
    was_training = plain.training
    plain.eval()  # tracing runs the model once: in train mode it would move BatchNorm statistics
    try:
        with warnings.catch_warnings():
            # add_graph is built on torch.jit.trace, which warns that it is deprecated:
            # a note to torch's own code, not something the user can act on.
            warnings.simplefilter("ignore", FutureWarning)
            tb.writer.add_graph(plain, graph_input.to(model_device(plain)))
    except Exception as err:  # tracing fails for many reasons (data-dependent control flow, ...)
        first_line = str(err).splitlines()[0] if str(err) else ""
        logger.warning("The model graph was not written to TensorBoard: tracing failed (%s: %s)",
                       type(err).__name__, first_line)
    finally:
        plain.train(was_training)


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    flat: dict[str, bool | int | float | str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            flat[name] = value.item()
        else:
            flat[name] = str(value)  # lists, None, paths: shown as text in the dashboard
    return flat


def _writer_of(target: TensorboardLogger | SummaryWriter | str | Path) -> tuple[SummaryWriter, bool]:
    """The writer for ``target`` and whether this call opened it (and so must close it)."""
    if isinstance(target, TensorboardLogger):
        return target.writer, False
    if isinstance(target, SummaryWriter):
        return target, False
    if isinstance(target, (str, Path)):
        return SummaryWriter(log_dir=str(target)), True
    raise ConfigError(
        "Argument `logger_or_log_dir` should be a TensorboardLogger, a SummaryWriter or a folder, "
        f"got {type(target).__name__}"
    )


def log_hparams(
    logger_or_log_dir: TensorboardLogger | SummaryWriter | str | Path | None,
    hparams: Mapping[str, Any],
    metrics: Mapping[str, float | torch.Tensor | None],
    *,
    step: int = 0,
) -> None:
    """Write hyper-parameters and final metrics for TensorBoard's HParams dashboard.

    Nested mappings are flattened with dotted keys (``{"optimizer": {"lr": 0.1}}``
    gives ``optimizer.lr``); values other than bool, int, float and str are shown as
    text. Each metric is also written as a scalar tagged ``hparam/<name>`` (the
    dashboard reads metric values from scalars; the prefix keeps them off the
    training curves). Metrics that are ``None`` are left out.

    Args:
        logger_or_log_dir: where to write: the run's ``TensorboardLogger`` or
            ``SummaryWriter``, or an event folder; ``None`` (what
            :func:`attach_tensorboard` returns on ranks other than 0) does nothing.
        hparams: the hyper-parameters, e.g. the resolved config as a dict.
        metrics: ``{name: value}``, e.g. ``{"val/accuracy": 0.98, "test/accuracy": 0.97}``.
        step: the step of the metric scalars.

    Example:
        >>> log_hparams(tb, {"optimizer": {"lr": 1e-3}}, {"val/accuracy": 0.98})  # doctest: +SKIP
    """
    if logger_or_log_dir is None or idist.get_rank() != 0:
        return
    if not isinstance(hparams, Mapping) or not isinstance(metrics, Mapping):
        raise ConfigError(
            f"Arguments `hparams` and `metrics` should be mappings, got {type(hparams).__name__} "
            f"and {type(metrics).__name__}"
        )
    values = {_metric_tag(k): _as_float(v) for k, v in metrics.items() if v is not None}
    writer, opened = _writer_of(logger_or_log_dir)
    try:
        # Only the session summaries, not the experiment one (SummaryWriter.add_hparams
        # writes all three, into a new sub-run). With several runs under one logdir,
        # TensorBoard takes the first experiment summary it finds as the whole table,
        # hiding hyper-parameters that run lacks; without one it builds the table from
        # every run's session, so runs with different settings compare side by side.
        _, start, end = hparams_summaries(_flatten(hparams), values)
        for summary in (start, end):
            writer.file_writer.add_summary(summary, step)
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)
        writer.flush()
    finally:
        if opened:
            writer.close()


def _metric_tag(name: str) -> str:
    return name if name.startswith(HPARAM_METRIC_PREFIX) else HPARAM_METRIC_PREFIX + name


def _as_float(value: float | torch.Tensor) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)
