"""One experiment, top to bottom: config -> data -> model -> engines -> handlers -> run.

``run(config)`` is what ``ember train`` calls, and what a script or notebook calls
for sweeps. The objects come from :mod:`ember.build`; ``ember evaluate`` and
``ember extract`` live in :mod:`ember.from_checkpoint`. This is the only module that
wires engines and handlers together.
"""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import yaml
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping
from torch.utils.data import DataLoader, DistributedSampler

from ember.build import Experiment, build_experiment
from ember.config import Config, config_to_dict, load_config
from ember.distributed import launch, launched_by_torchrun, resolve_backend, wants_distributed
from ember.engine import create_evaluator
from ember.engine.optim import attach_lr_scheduler
from ember.errors import CheckpointError, ConfigError, RunInterrupted
from ember.handlers.checkpoint import attach_checkpoint, latest_checkpoint, load_checkpoint, read_checkpoint
from ember.handlers.feature_store import export_projector
from ember.handlers.features import extract_features
from ember.handlers.interrupt import attach_interrupt
from ember.handlers.nonfinite import attach_nonfinite_guard
from ember.handlers.progress import attach_progress
from ember.handlers.records import RunRecorder
from ember.handlers.tensorboard import attach_tensorboard, log_hparams
from ember.logs import configure_logging
from ember.run_folder import (
    CONFIG_FILE,
    checkpoint_dir,
    create_run_dir,
    is_run_dir,
    remove_failed_run_dir,
    write_text_atomic,
)

__all__ = ["run"]

logger = logging.getLogger(__name__)


def _is_loss_like(metric: str) -> bool:
    return "loss" in metric


def _attach_evaluation(exp: Experiment) -> None:
    """Run every evaluator on its loader after each training epoch."""

    def evaluate(trainer: Engine) -> None:
        for split, evaluator in exp.evaluators.items():
            evaluator.run(exp.eval_loaders[split])

    exp.trainer.add_event_handler(Events.EPOCH_COMPLETED, evaluate)


def _attach_early_stopping(exp: Experiment) -> EarlyStopping | None:
    patience = exp.config.early_stopping.patience
    if patience is None:
        return None
    metric = exp.config.checkpoint.metric
    sign = -1.0 if _is_loss_like(metric) else 1.0
    stopper = EarlyStopping(
        patience=patience,
        score_function=lambda engine: sign * engine.state.metrics[metric],
        trainer=exp.trainer,
    )
    exp.evaluators["val"].add_event_handler(Events.COMPLETED, stopper)
    return stopper


# schedules whose shape is laid out over the whole run when it starts
_RUN_LENGTH_SCHEDULES = ("cosine", "warmup_cosine")


def _resume_target(resume: str | Path, overrides: Sequence[str]) -> tuple[Config, Path, Path]:
    """The config, run folder and last checkpoint of a run to continue."""
    run_dir = Path(resume)
    if not is_run_dir(run_dir):
        raise ConfigError(
            f"--resume '{run_dir}' is not a run folder (no {CONFIG_FILE}): give the folder "
            "`ember train` printed, e.g. runs/<name>/<timestamp>"
        )
    saved = load_config(run_dir / CONFIG_FILE)
    config = load_config(run_dir / CONFIG_FILE, overrides)
    if saved.model != config.model:
        raise ConfigError(
            "Resuming with a config that changes the model is refused: "
            f"model was {config_to_dict(saved)['model']}, the overrides make it "
            f"{config_to_dict(config)['model']}"
        )
    if (
        saved.trainer.max_epochs != config.trainer.max_epochs
        and config.scheduler.name in _RUN_LENGTH_SCHEDULES
    ):
        raise ConfigError(
            f"trainer.max_epochs cannot change on resume with scheduler.name={config.scheduler.name}: "
            f"the schedule's length was fixed to {saved.trainer.max_epochs} epochs when the run started. "
            "Start a new run, or use scheduler.name=step or linear_warmup, whose shape does not depend on it"
        )
    config.checkpoint.resume = None  # the saved config describes the run, not how it was started
    last = latest_checkpoint(checkpoint_dir(run_dir))
    if last is None:
        raise CheckpointError(f"Run folder '{run_dir}' holds no last checkpoint to resume from")
    state = read_checkpoint(last)["trainer"]
    done = _trained_out(state["iteration"], state.get("epoch_length"), config.trainer.max_epochs)
    if done and not (run_dir / "summary.json").exists():
        logger.info("run %s finished training but has no summary: testing it now", run_dir)
    elif done:
        raise ConfigError(
            f"Run '{run_dir}' already finished: epoch {state['epoch']} of trainer.max_epochs="
            f"{config.trainer.max_epochs}. To train longer, resume with trainer.max_epochs="
            f"{state['epoch'] + 5} (or any value above {state['epoch']})"
        )
    return config, run_dir, last


def run(
    config: Config | Mapping[str, Any] | str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    resume: str | Path | None = None,
) -> dict[str, Any]:
    """Run a whole experiment and return its summary (also written to ``summary.json``).

    Args:
        config: a :class:`~ember.config.Config`, a dict, a YAML path, or ``None`` for
            the built-in default (small_cnn on digits).
        overrides: ``key=value`` strings applied on top (``trainer.max_epochs=3``).
        resume: a run folder to continue exactly where its last checkpoint stopped
            (``config`` must then be ``None``; overrides may change non-model keys).

    Returns:
        The summary dict: ``run_dir``, ``final``, ``best``, ``test`` metrics,
        ``checkpoints`` and ``wall_time_s``.

    Example:
        >>> for lr in (1e-3, 3e-3):  # doctest: +SKIP
        ...     summary = run("configs/digits.yaml", [f"optimizer.lr={lr}"])
    """
    if resume is not None:
        if config is not None:
            raise ConfigError("Give either `config` or `resume`: a resumed run keeps its own config")
        cfg, run_dir, last = _resume_target(resume, overrides)
    else:
        cfg, run_dir, last = load_config(config, overrides), None, None
        if cfg.checkpoint.resume is not None:  # the config's way of saying --resume RUN_DIR
            cfg, run_dir, last = _resume_target(cfg.checkpoint.resume, overrides)
    if wants_distributed(cfg):
        return _train_distributed(cfg, run_dir=run_dir, resume_from=last)
    return _train(cfg, run_dir=run_dir, resume_from=last)


def _train_distributed(config: Config, *, run_dir: Path | None, resume_from: Path | None) -> dict[str, Any]:
    """Spawn (or, under torchrun, join) the processes; rank 0 writes the summary."""
    resolve_backend(config)  # a wrong backend is refused before any folder or process exists
    if launched_by_torchrun():
        result: dict[str, Any] = {}
        launch(_rank_worker, config, run_dir, resume_from, result)
        return result
    created = run_dir is None
    if created:
        run_dir = create_run_dir(config.output_dir, config.name)
    # Ctrl-C reaches every process of the terminal: the ranks save a checkpoint and stop;
    # the parent waits for them instead of dying first. (A Python handler, not SIG_IGN:
    # an ignored signal would stay ignored in the spawned ranks.)
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        launch(_rank_worker, config, run_dir, resume_from, None)
    except BaseException:
        if created:
            remove_failed_run_dir(run_dir)
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return summary


def _rank_worker(
    local_rank: int, config: Config, run_dir: Path | None, resume_from: Path | None, result: dict | None
) -> None:
    configure_logging(rank=idist.get_rank())  # a spawned process starts unconfigured
    summary = _train(config, run_dir=run_dir, resume_from=resume_from)
    if result is not None:
        result.update(summary)


@dataclass
class _Handlers:
    manager: Any
    interrupt: Any
    recorder: RunRecorder
    tensorboard: Any


def _attach_handlers(exp: Experiment, run_dir: Path) -> _Handlers:
    """Evaluation, early stopping, NaN guard, checkpoints, records, TensorBoard, progress."""
    c = exp.config
    trainer = exp.trainer
    holder: dict[str, Any] = {}
    # first: it must run before the checkpoint handlers of the same iteration
    every = 1 if exp.device.type == "cpu" else c.trainer.log_every
    attach_nonfinite_guard(trainer, every=every, last_checkpoint=lambda: holder["manager"].last_path)
    _attach_evaluation(exp)
    scheduler = attach_lr_scheduler(
        trainer,
        exp.optimizer,
        c.scheduler.name,
        max_epochs=c.trainer.max_epochs,
        epoch_length=len(exp.loaders.train),
        step_size=c.scheduler.step_size,
        gamma=c.scheduler.gamma,
        warmup_epochs=c.scheduler.warmup_epochs,
        min_lr=c.scheduler.min_lr,
    )
    stopper = _attach_early_stopping(exp)
    mode = "min" if _is_loss_like(c.checkpoint.metric) else "max"
    recorder = RunRecorder(run_dir)
    recorder.attach(trainer, exp.evaluators, best_metric=c.checkpoint.metric, mode=mode)
    to_save: dict[str, Any] = {
        "model": exp.model,
        "optimizer": exp.optimizer,
        "trainer": trainer,
        "recorder": recorder,
    }
    optional = {"scheduler": scheduler, "scaler": trainer.state.scaler, "early_stopping": stopper}
    to_save.update({k: v for k, v in optional.items() if v is not None})
    manager = attach_checkpoint(
        trainer,
        to_save=to_save,
        dirname=checkpoint_dir(run_dir),
        evaluator=exp.evaluators["val"],
        metric=c.checkpoint.metric,
        n_saved=c.checkpoint.n_saved,
        every_iters=c.checkpoint.every_iters,
        extra={"config": config_to_dict(c), "model_spec": exp.model_spec},
        mode=mode,
    )
    holder["manager"] = manager
    interrupt = attach_interrupt(trainer, manager, every=c.trainer.log_every)
    tb = None
    if c.tensorboard.enabled:
        tb = attach_tensorboard(
            run_dir / "tensorboard",
            trainer,
            optimizer=exp.optimizer,
            evaluators=exp.evaluators,
            model=exp.model,
            log_every=c.trainer.log_every,
            class_names=exp.loaders.info.classes,
            histograms=c.tensorboard.histograms,
        )
    attach_progress(trainer, exp.evaluators, log_every=c.trainer.log_every)
    return _Handlers(manager=manager, interrupt=interrupt, recorder=recorder, tensorboard=tb)


def _write_config(config: Config, run_dir: Path) -> None:
    if idist.get_rank() != 0:
        return
    write_text_atomic(run_dir / CONFIG_FILE, yaml.safe_dump(config_to_dict(config), sort_keys=False))


def _log_to_file(run_dir: Path) -> logging.Handler | None:
    if idist.get_rank() != 0:
        return None
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("ember").addHandler(handler)
    return handler


def _test_with_best(exp: Experiment, handlers: _Handlers) -> dict[str, float]:
    """Evaluate the test split with the best checkpoint's weights."""
    best = handlers.manager.best_path
    if best is not None:
        load_checkpoint(best, {"model": exp.model})
    evaluator = create_evaluator(
        exp.model,
        loss_fn=exp.loss_fn,
        device=exp.device,
        amp=exp.config.trainer.amp,
        channels_last=exp.config.trainer.channels_last,
    )
    attach_progress(evaluator, {"test": evaluator}, log_every=exp.config.trainer.log_every)
    evaluator.run(exp.loaders.test)
    return dict(evaluator.state.metrics)


def _extract_features(exp: Experiment, run_dir: Path, tb_dir: Path | None) -> str | None:
    f = exp.config.features
    if f.layer is None:
        return None
    dataset = {"train": exp.loaders.train, "val": exp.loaders.val, "test": exp.loaders.test}[f.split].dataset
    # in dataset order; under DDP each rank extracts a DistributedSampler shard (padded to
    # equal shards, which extraction gathers and de-duplicates) and every rank gets all rows
    sampler = DistributedSampler(dataset, shuffle=False) if idist.get_world_size() > 1 else None
    loader = DataLoader(dataset, batch_size=exp.config.data.eval_batch_size, shuffle=False, sampler=sampler)
    output = run_dir / "features"
    result = extract_features(exp.model, loader, f.layer, device=exp.device, pool=f.pool, output=output)
    if tb_dir is not None and idist.get_rank() == 0 and result is not None:
        export_projector(
            result, tb_dir, layer=f.layer, images=loader.dataset, class_names=exp.loaders.info.classes
        )
    return str(output)


def _train(config: Config, *, run_dir: Path | None, resume_from: Path | None) -> dict[str, Any]:
    exp = build_experiment(config)  # a mistake found here leaves no run folder behind
    if resume_from is not None:
        # refuse a checkpoint that does not fit (model, optimizer) before anything is written
        load_checkpoint(
            resume_from, {"model": exp.model, "optimizer": exp.optimizer}, expected_model=exp.model_spec
        )
    created = run_dir is None
    if created:
        run_dir = _new_run_dir(config)
    log_handler = handlers = None
    try:
        _write_config(config, run_dir)
        log_handler = _log_to_file(run_dir)
        handlers = _attach_handlers(exp, run_dir)
        if resume_from is not None:
            handlers.manager.resume(resume_from, expected_model=exp.model_spec)
        _log_start(exp, run_dir)
        state = exp.trainer.state
        if not _trained_out(state.iteration, state.epoch_length, config.trainer.max_epochs):
            exp.trainer.run(exp.loaders.train, max_epochs=config.trainer.max_epochs)
        if handlers.interrupt.signum is not None:
            raise _interrupted(handlers, run_dir)
        idist.barrier()  # rank 0 has written the best checkpoint every rank loads next
        test_metrics = _test_with_best(exp, handlers)
        tb_dir = run_dir / "tensorboard" if handlers.tensorboard is not None else None
        features = _extract_features(exp, run_dir, tb_dir)
        best_val = handlers.recorder.best.get("val")
        log_hparams(
            handlers.tensorboard,
            config_to_dict(config),
            {
                "best/val_" + config.checkpoint.metric: best_val.value if best_val else None,
                **{f"test/{k}": v for k, v in test_metrics.items()},
            },
        )
        summary = handlers.recorder.write_summary(
            test_metrics=test_metrics,
            best_checkpoint=handlers.manager.best_path,
            last_checkpoint=handlers.manager.last_path,
            extra={"run_dir": str(run_dir), "features": features},
        )
        return summary
    except BaseException:
        if created and idist.get_rank() == 0:
            remove_failed_run_dir(run_dir)  # keeps a folder that holds a checkpoint
        raise
    finally:
        if handlers is not None and handlers.tensorboard is not None:
            handlers.tensorboard.close()
        if log_handler is not None:
            logging.getLogger("ember").removeHandler(log_handler)
            log_handler.close()


def _trained_out(iteration: int, epoch_length: int | None, max_epochs: int) -> bool:
    """Whether a (resumed) run has already trained all ``max_epochs`` epochs."""
    return bool(epoch_length) and iteration >= epoch_length * max_epochs


def _new_run_dir(config: Config) -> Path:
    """A new run folder; with several processes rank 0 makes it and tells the others."""
    if idist.get_world_size() == 1:
        return create_run_dir(config.output_dir, config.name)
    path = str(create_run_dir(config.output_dir, config.name)) if idist.get_rank() == 0 else ""
    return Path(idist.broadcast(path, src=0))


def _log_start(exp: Experiment, run_dir: Path) -> None:
    c = exp.config
    world = idist.get_world_size()
    logger.info("run folder: %s", run_dir)
    logger.info(
        "model %s (%s parameters) on %s%s | data %s | batch %d per process, %d global",
        c.model.name,
        f"{sum(p.numel() for p in exp.model.parameters()):,}",
        exp.device,
        f" x{world} processes" if world > 1 else "",
        c.data.name,
        c.data.batch_size,
        c.data.batch_size * world,
    )


def _interrupted(handlers: _Handlers, run_dir: Path) -> RunInterrupted:
    signum = handlers.interrupt.signum
    name = signal.Signals(signum).name
    return RunInterrupted(
        f"Interrupted by {name}: checkpoint saved to {handlers.manager.last_path}. "
        f"Continue with: ember train --resume {run_dir}",
        signum=signum,
        run_dir=str(run_dir),
    )
