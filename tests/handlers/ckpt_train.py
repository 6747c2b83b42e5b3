"""A tiny, fully deterministic training run for the checkpoint tests.

Imported by the tests (``make_run``), and run as a script by the ones that kill a
real process (``python ckpt_train.py --dir D --out W.pt [--resume] [--interrupt]``):
each completed iteration prints ``iteration N`` and appends the sample indices it
trained on to ``--log``; a finished run saves its final weights and metrics to
``--out``; a run stopped by SIGINT/SIGTERM exits with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from ignite.engine import Events
from ignite.handlers import EarlyStopping, PiecewiseLinear
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember.engine import create_evaluator, create_trainer
from ember.handlers.checkpoint import attach_checkpoint, latest_checkpoint
from ember.handlers.interrupt import attach_interrupt
from ember.models import get_model

N_SAMPLES, BATCH_SIZE, EPOCHS = 48, 8, 3
EPOCH_LENGTH = N_SAMPLES // BATCH_SIZE  # 6 iterations
SPEC = {"name": "small_cnn", "num_classes": 3, "in_channels": 1, "kwargs": {"width": 4, "dropout": 0.5}}


def make_run(dirname: Path | str, *, every_iters: int | None = 1, model_seed: int = 0) -> SimpleNamespace:
    """Model with dropout, Adam, LR schedule, early stopping, evaluator, checkpoints."""
    torch.manual_seed(model_seed)
    data_gen = torch.Generator().manual_seed(1)
    x = torch.randn(N_SAMPLES, 1, 8, 8, generator=data_gen)
    y = torch.randint(0, 3, (N_SAMPLES,), generator=data_gen)
    train = TensorDataset(x, y, torch.arange(N_SAMPLES))  # the index is recorded, not trained on
    loader = DataLoader(train, batch_size=BATCH_SIZE, shuffle=True, generator=torch.Generator().manual_seed(7))
    model = get_model(SPEC["name"], num_classes=3, in_channels=1, **SPEC["kwargs"])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=4e-4)
    loss_fn = nn.CrossEntropyLoss()
    trainer = create_trainer(model, optimizer, loss_fn, deterministic=True)
    scheduler = PiecewiseLinear(optimizer, "lr", milestones_values=[(0, 1e-2), (EPOCHS * EPOCH_LENGTH, 1e-3)])
    trainer.add_event_handler(Events.ITERATION_STARTED, scheduler)
    evaluator = create_evaluator(model, loss_fn=loss_fn)
    eval_loader = DataLoader(TensorDataset(x, y), batch_size=16)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda: evaluator.run(eval_loader))
    stopper = EarlyStopping(patience=100, score_function=lambda e: e.state.metrics["accuracy"], trainer=trainer)
    evaluator.add_event_handler(Events.COMPLETED, stopper)
    seen: list[tuple[int, list[int]]] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.append((e.state.iteration, e.state.batch[2].tolist()))
    )
    to_save = {"model": model, "optimizer": optimizer, "trainer": trainer, "scheduler": scheduler,
               "early_stopping": stopper}
    manager = attach_checkpoint(
        trainer, to_save=to_save, dirname=dirname, evaluator=evaluator, metric="accuracy",
        every_iters=every_iters, extra={"model_spec": SPEC, "config": {"seed": model_seed}},
    )
    return SimpleNamespace(model=model, optimizer=optimizer, trainer=trainer, evaluator=evaluator,
                           loader=loader, manager=manager, seen=seen, to_save=to_save)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--log")
    parser.add_argument("--every-iters", type=int, default=1)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per iteration")
    parser.add_argument("--resume", action="store_true", help="from the newest last_* in --dir")
    parser.add_argument("--interrupt", action="store_true", help="attach ember's SIGINT/SIGTERM handler")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as the tests' in-process reference run: the same float reductions

    run = make_run(args.dir, every_iters=args.every_iters)
    if args.resume:
        path = latest_checkpoint(args.dir)
        checkpoint = run.manager.resume(path, expected_model=SPEC)
        print(f"resumed {checkpoint['trainer']['iteration']}", flush=True)
    stop = attach_interrupt(run.trainer, run.manager) if args.interrupt else None
    log = open(args.log, "a") if args.log else None  # noqa: SIM115 - open for the whole run

    @run.trainer.on(Events.ITERATION_COMPLETED)
    def report(engine):
        if log is not None:
            log.write(f"{engine.state.iteration} {' '.join(map(str, engine.state.batch[2].tolist()))}\n")
            log.flush()
        print(f"iteration {engine.state.iteration}", flush=True)
        time.sleep(args.sleep)

    run.trainer.run(run.loader, max_epochs=EPOCHS)
    if stop is not None and stop.signum is not None:
        return 128 + stop.signum
    torch.save({"model": run.model.state_dict(), "metrics": dict(run.evaluator.state.metrics)}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
