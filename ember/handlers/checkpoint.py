"""Checkpoints that load anywhere, survive crashes, never run code and resume exactly.

:func:`attach_checkpoint` keeps, in one folder::

    last_iteration=1234.pt            the newest state: at every epoch end and every
                                      `every_iters` iterations; one file kept
    best_epoch=3_accuracy=0.9812.pt   the `n_saved` best by `metric` (trainer epoch, metric
                                      value to 4 decimals), judged after each evaluation
    model.safetensors                 the weights alone, of the best checkpoint (of the
                                      last one when no metric is tracked)

Every ``.pt`` file is one dict that ``torch.load(path, weights_only=True)`` reads,
holding only tensors and plain Python types: ``model`` (a plain state_dict: no
``module.`` / ``_orig_mod.`` prefixes), ``optimizer``, ``trainer`` (engine state with
``iteration``, ``epoch``, ``epoch_length``, ``max_epochs``, ``seed``, ``rng_states``), the
other objects of ``to_save``, ``rng`` (python, numpy, torch and CUDA generators),
``checkpoint_manager`` (the rotation, so that it survives a resume), the ``extra``
entries (``config``, ``model_spec``) and ``ember_version``.

A file is written to a temporary file in the same folder, flushed to disk and moved
into place with ``os.replace``; rotation deletes an old file only after the new one is
in place. A failed write raises :class:`~ember.errors.CheckpointError` and leaves every
earlier file as it was. The folder is created when missing; a run that starts in a
folder holding checkpoints it did not write (and did not resume from) is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, global_step_from_engine
from torch import nn

from ember import __version__
from ember.engine import unwrap_model
from ember.errors import CheckpointError, ConfigError
from ember.handlers._files import (
    TMP_SUFFIX,
    AtomicSaver,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    write_atomic,
)
from ember.handlers._state import EngineEntry, RNGEntry, to_plain
from ember.handlers.nonfinite import NonFiniteLossError

__all__ = [
    "attach_checkpoint",
    "CheckpointManager",
    "read_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "SAFETENSORS_NAME",
]

logger = logging.getLogger(__name__)

SAFETENSORS_NAME = "model.safetensors"
_CHECKPOINT_RE = re.compile(r"^(last|best)_.*\.pt$")
_RESERVED_KEYS = ("rng", "checkpoint_manager", "ember_version")


def _check_to_save(to_save: Any, extra: Mapping[str, Any] | None, safetensors: bool) -> None:
    if not isinstance(to_save, Mapping):
        raise ConfigError(
            f"Argument `to_save` should be a mapping of names to objects with state_dict, "
            f"got {type(to_save).__name__}"
        )
    for key, obj in to_save.items():
        if key in _RESERVED_KEYS:
            raise ConfigError(f"to_save key {key!r} is reserved for ember's own checkpoint entry: rename it")
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise ConfigError(f"to_save[{key!r}] (a {type(obj).__name__}) has no state_dict/load_state_dict")
    clash = sorted(set(extra or {}) & (set(to_save) | set(_RESERVED_KEYS)))
    if clash:
        raise ConfigError(f"`extra` keys {clash} clash with to_save or ember's own entries: rename them")
    if safetensors and not isinstance(to_save.get("model"), nn.Module):
        raise ConfigError("safetensors=True needs the model as to_save['model'] (an nn.Module)")


def _positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = "a positive integer" + (" or None" if allow_none else "")
        raise ConfigError(f"Argument `{name}` should be {expected}, got {value!r}")


class CheckpointManager:
    """The checkpoints of one training run: what :func:`attach_checkpoint` returns.

    Attributes:
        dirname: the checkpoint folder.
        metric: the evaluator metric that ranks ``best`` checkpoints (None: no ranking).
    """

    def __init__(
        self,
        trainer: Engine,
        *,
        to_save: Mapping[str, Any],
        dirname: str | Path,
        metric: str | None = None,
        mode: str | None = None,
        n_saved: int = 2,
        extra: Mapping[str, Any] | None = None,
        safetensors: bool = True,
    ) -> None:
        if isinstance(to_save, Mapping):  # None: an optional object this run does not have (a scaler)
            to_save = {key: obj for key, obj in to_save.items() if obj is not None}
        _check_to_save(to_save, extra, safetensors)
        _positive("n_saved", n_saved)
        if mode is not None and mode not in ("max", "min"):
            raise ConfigError(f"Argument `mode` should be 'max', 'min' or None, got {mode!r}")
        self.dirname = Path(dirname).expanduser()
        self.metric = metric
        self._mode = mode or ("min" if metric and "loss" in metric.lower() else "max")
        self._trainer = trainer
        self._objects = dict(to_save)
        model = to_save.get("model")
        self._model = unwrap_model(model) if isinstance(model, nn.Module) else None
        self._extra = to_plain(dict(extra or {}), "extra")
        self._safetensors = safetensors
        self._saver = AtomicSaver(self.dirname, self._finalize)
        if idist.get_rank() == 0:
            self._probe_writable()
        entries: dict[str, Any] = {key: self._entry(obj) for key, obj in to_save.items()}
        entries["rng"] = RNGEntry()
        entries["checkpoint_manager"] = self  # replaced by the updated state in _finalize
        self._last = Checkpoint(
            entries, self._saver, n_saved=1, filename_pattern="last_iteration={global_step}.{ext}",
            global_step_transform=lambda engine, _: engine.state.iteration, greater_or_equal=True,
        )
        self._best: Checkpoint | None = None
        if metric is not None:
            self._best = Checkpoint(
                entries, self._saver, n_saved=n_saved, score_name=metric, score_function=self._score,
                global_step_transform=global_step_from_engine(trainer),
            )
        self._last_iteration: int | None = None
        self._resumed = False
        self._wrote_safetensors = False

    @staticmethod
    def _entry(obj: Any) -> Any:
        if isinstance(obj, nn.Module):
            return unwrap_model(obj)  # plain keys whatever the wrapping (ignite unwraps only DP/DDP)
        if isinstance(obj, Engine):
            return EngineEntry(obj)
        return obj

    def _probe_writable(self) -> None:
        try:
            fd, name = tempfile.mkstemp(dir=self.dirname, prefix=".probe.", suffix=TMP_SUFFIX)
            os.close(fd)
            os.remove(name)
        except OSError as err:
            raise CheckpointError(
                f"Checkpoint folder '{self.dirname}' is not writable: {err.strerror or err}; "
                "choose another folder"
            ) from err

    # ------------------------------------------------------------ paths and state

    @property
    def last_path(self) -> Path | None:
        """The newest ``last_iteration=N.pt``, or None before the first save."""
        return self._last.last_checkpoint  # type: ignore[return-value]

    @property
    def best_path(self) -> Path | None:
        """The best checkpoint by ``metric`` so far (None without a metric or before the first)."""
        return None if self._best is None else self._best.last_checkpoint  # type: ignore[return-value]

    def state_dict(self) -> dict[str, Any]:
        """The rotation: which files are kept, with their priorities."""
        return {
            "last": self._last.state_dict(),
            "best": None if self._best is None else self._best.state_dict(),
            "metric": self.metric,
            "mode": self._mode,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the rotation of a resumed run, for the files still in this folder.

        Entries whose files are not in :attr:`dirname` (a run resumed from a file in
        another folder) are dropped: the rotation starts afresh here, and the other
        folder is never touched.
        """

        def present(saved: Mapping[str, Any] | None) -> list[tuple[Any, str]]:
            items = [] if saved is None else saved["_saved"]
            return [(p, f) for p, f in items if (self.dirname / f).is_file()]

        last = present(state.get("last"))
        self._last.load_state_dict({"_saved": last})
        best: list[tuple[Any, str]] = []
        if self._best is not None:
            if state.get("metric") == self.metric and state.get("mode") == self._mode:
                best = present(state.get("best"))
            elif state.get("best"):
                logger.warning("The resumed run ranked checkpoints by %r, this one by %r: new ranking",
                               state.get("metric"), self.metric)
            self._best.load_state_dict({"_saved": best})
        self._resumed = bool(last or best)

    def _finalize(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        checkpoint["checkpoint_manager"] = self.state_dict()
        checkpoint.update(self._extra)
        checkpoint["ember_version"] = __version__
        return to_plain(checkpoint)

    # ------------------------------------------------------------ saving

    def _save(self, checkpoint: Checkpoint, engine: Engine) -> None:
        before = checkpoint.state_dict()
        try:
            checkpoint(engine)
        except BaseException:
            checkpoint.load_state_dict(before)  # the rotation did not happen
            raise

    def _score(self, evaluator: Engine) -> float:
        value = float(evaluator.state.metrics[self.metric])
        return -value if self._mode == "min" else value

    def save_now(self) -> Path | None:
        """Write a ``last`` checkpoint of the trainer's current iteration now.

        Returns:
            Its path (rank 0 writes it in a distributed run).
        """
        self._trainer_last(self._trainer)
        return self.last_path

    def _check_finite(self) -> None:
        """Refuse to save weights that hold NaN or Inf (the step after a last finite loss can make them)."""
        if self._model is None:
            return
        state = {k: t for k, t in self._model.state_dict().items() if t.is_floating_point()}
        if not state or bool(torch.stack([torch.isfinite(t).all() for t in state.values()]).all()):
            return  # one host sync for the whole model
        bad = next(k for k, t in state.items() if not bool(torch.isfinite(t).all()))
        good = self.last_path
        kept = f"the last good checkpoint is kept: {good}" if good else "no checkpoint was written before it"
        engine = self._trainer.state
        raise NonFiniteLossError(
            f"Model weights became NaN or infinite (in '{bad}') at iteration {engine.iteration} "
            f"(epoch {engine.epoch}); they were not saved and training stopped, {kept}. "
            "Lower optimizer.lr or set trainer.clip_grad_norm"
        )

    def _trainer_last(self, trainer: Engine) -> None:
        self._check_finite()
        self._save(self._last, trainer)
        self._last_iteration = trainer.state.iteration
        logger.debug("Saved %s", self.last_path)
        if self._safetensors and self._best is None:
            self._write_safetensors()

    def _on_evaluated(self, evaluator: Engine) -> None:
        metrics = evaluator.state.metrics
        if self.metric not in metrics:
            raise ConfigError(
                f"Metric {self.metric!r} that ranks checkpoints is not among the evaluator's metrics "
                f"({', '.join(sorted(metrics)) or 'none'}): set `metric` to one of them"
            )
        value = float(metrics[self.metric])
        if not math.isfinite(value):
            logger.warning("Metric %r is %s: no best checkpoint for this evaluation", self.metric, value)
            return
        if self._best is None:  # attach() registers this handler only with a metric
            return
        self._check_finite()
        safe_name = re.sub(r"[^\w.-]", "_", self.metric)
        self._best.filename_pattern = f"best_epoch={{global_step}}_{safe_name}={value:.4f}.{{ext}}"
        before = self.best_path
        self._save(self._best, evaluator)
        if self._safetensors and self.best_path != before:
            self._write_safetensors()
        if self._last_iteration == self._trainer.state.iteration:
            # `last` was written before this evaluation: rewrite it with the new rotation
            # and whatever else the evaluation changed (early stopping, schedulers).
            self._trainer_last(self._trainer)

    def _write_safetensors(self) -> None:
        if idist.get_rank() != 0 or self._model is None:
            return
        from safetensors.torch import save

        tensors: dict[str, torch.Tensor] = {}
        storages: set[int] = set()
        for key, tensor in self._model.state_dict().items():
            tensor = tensor.detach().cpu()
            pointer = tensor.untyped_storage().data_ptr()
            if pointer in storages or not tensor.is_contiguous():  # safetensors refuses shared memory
                tensor = tensor.clone(memory_format=torch.contiguous_format)
            storages.add(pointer)
            tensors[key] = tensor
        metadata = {"format": "pt", "ember_version": __version__}
        if "model_spec" in self._extra:
            metadata["model_spec"] = json.dumps(self._extra["model_spec"])
        # serialized here and written by write_atomic rather than by save_file, whose
        # writer does not report a full disk (it "succeeds" on /dev/full)
        data = save(tensors, metadata=metadata)
        write_atomic(self.dirname / SAFETENSORS_NAME, lambda file: file.write(data))
        self._wrote_safetensors = True

    # ------------------------------------------------------------ run start

    def _on_started(self, _: Engine) -> None:
        if idist.get_rank() != 0:
            return
        try:
            names = os.listdir(self.dirname)
        except OSError as err:
            raise CheckpointError(f"Cannot read checkpoint folder '{self.dirname}': {err.strerror}") from err
        ours = {f for c in (self._last, self._best) if c is not None for _, f in c.state_dict()["_saved"]}
        if ours or self._resumed or self._wrote_safetensors:
            ours.add(SAFETENSORS_NAME)  # rewritten together with the checkpoints of this run
        ours_or_not = (n for n in names if _CHECKPOINT_RE.match(n) or n == SAFETENSORS_NAME)
        foreign = sorted(n for n in ours_or_not if n not in ours)
        if foreign and not self._resumed:
            raise CheckpointError(
                f"Checkpoint folder '{self.dirname}' already holds checkpoints of another run "
                f"({', '.join(foreign[:5])}): use a new folder, or resume from one of them "
                "(manager.resume(path)) to continue that run"
            )
        if foreign:
            logger.warning("Checkpoint folder '%s' also holds %s, which this run does not track: left alone",
                           self.dirname, ", ".join(foreign))
        for name in names:
            if name.endswith(TMP_SUFFIX):  # left by a run killed while writing
                with contextlib.suppress(OSError):
                    os.remove(self.dirname / name)
                    logger.info("Removed the half-written file '%s'", name)

    def attach(self, evaluator: Engine | None = None, *, every_iters: int | None = None) -> None:
        """Save ``last`` at epoch ends (and every ``every_iters``), ``best`` after ``evaluator`` runs."""
        trainer = self._trainer

        def every(engine: Engine, iteration: int) -> bool:
            # an epoch's last iteration is saved at EPOCH_COMPLETED, once its handlers ran
            length = engine.state.epoch_length
            return iteration % every_iters == 0 and (length is None or iteration % length != 0)

        trainer.add_event_handler(Events.STARTED, self._on_started)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._trainer_last)
        if every_iters is not None:
            trainer.add_event_handler(Events.ITERATION_COMPLETED(event_filter=every), self._trainer_last)
        if evaluator is not None and self._best is not None:
            evaluator.add_event_handler(Events.COMPLETED, self._on_evaluated)

    def resume(
        self, path: str | Path, *, strict: bool = True, expected_model: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Load ``path`` into every object of ``to_save`` and into this manager's rotation.

        Returns:
            The checkpoint dict (see :func:`load_checkpoint`).
        """
        checkpoint = load_checkpoint(path, self._objects, strict=strict, expected_model=expected_model)
        if "checkpoint_manager" in checkpoint:
            try:
                self.load_state_dict(checkpoint["checkpoint_manager"])
            except (KeyError, TypeError, ValueError) as err:
                raise CheckpointError(f"Could not load 'checkpoint_manager' from '{path}': {err!r}") from err
        trainer = checkpoint.get("trainer") if isinstance(checkpoint.get("trainer"), Mapping) else {}
        logger.info("Resuming from '%s' (epoch %s, iteration %s)", path, trainer.get("epoch"),
                    trainer.get("iteration"))
        return checkpoint


def attach_checkpoint(
    trainer: Engine,
    *,
    to_save: Mapping[str, Any],
    dirname: str | Path,
    evaluator: Engine | None = None,
    metric: str | None = None,
    n_saved: int = 2,
    every_iters: int | None = None,
    extra: Mapping[str, Any] | None = None,
    safetensors: bool = True,
    mode: str | None = None,
) -> CheckpointManager:
    """Keep ``last``, ``best`` and ``model.safetensors`` checkpoints of a training run.

    Args:
        trainer: the training engine (``deterministic=True`` for an exact resume).
        to_save: the stateful objects: ``model`` (wrapped or not; saved unwrapped),
            ``optimizer``, ``trainer``, and any of ``scheduler``, ``scaler``,
            ``early_stopping``, or anything with ``state_dict``/``load_state_dict``;
            None values (an optional object the run lacks) are skipped.
        dirname: the checkpoint folder (created when missing).
        evaluator: the engine whose ``state.metrics[metric]`` ranks ``best`` checkpoints,
            judged each time it completes a run.
        metric: the metric name; lower is better when it contains "loss", else higher.
        n_saved: how many ``best`` checkpoints to keep.
        every_iters: also save ``last`` every this many iterations (mid-epoch resume).
        extra: plain data copied into every file (``config``, ``model_spec``).
        safetensors: keep ``model.safetensors`` beside the best (or last) checkpoint.
        mode: ``"max"`` or ``"min"`` to override the direction guessed from ``metric``.

    Returns:
        The :class:`CheckpointManager`.

    Example:
        >>> manager = attach_checkpoint(trainer, to_save={"model": model, "optimizer": opt,
        ...     "trainer": trainer}, dirname="runs/x/checkpoints", evaluator=evaluator,
        ...     metric="accuracy")  # doctest: +SKIP
        >>> manager.resume(latest_checkpoint("runs/x/checkpoints"))  # doctest: +SKIP
    """
    _positive("every_iters", every_iters, allow_none=True)
    if metric is not None and evaluator is None:
        raise ConfigError("Argument `metric` ranks checkpoints by an evaluator's metric: pass `evaluator`")
    manager = CheckpointManager(
        trainer, to_save=to_save, dirname=dirname, metric=metric,
        mode=mode, n_saved=n_saved, extra=extra, safetensors=safetensors,
    )
    manager.attach(evaluator, every_iters=every_iters)
    return manager
