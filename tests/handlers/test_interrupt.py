"""SIGINT / SIGTERM: checkpoint, clean stop, handlers restored (ember/handlers/interrupt.py)."""

from __future__ import annotations

import os
import signal
import threading
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

from ember.handlers import interrupt
from ember.handlers.checkpoint import attach_checkpoint, read_checkpoint
from ember.handlers.interrupt import attach_interrupt

DATA = [0, 1, 2, 3]  # four iterations per epoch


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield before
    for signum, handler in before.items():
        signal.signal(signum, handler)


def _setup(tmp_path, send: dict[int, list[int]], *, step=None):
    """A trainer that sends itself the signals of `send` ({iteration: [signals]}) as it runs."""
    model = nn.Linear(2, 2)
    trainer = Engine(step or (lambda e, b: None))
    completed = []
    trainer.add_event_handler(Events.COMPLETED, lambda: completed.append(True))

    @trainer.on(Events.ITERATION_COMPLETED)
    def send_signals(engine):
        for signum in send.get(engine.state.iteration, []):
            os.kill(os.getpid(), signum)

    manager = attach_checkpoint(trainer, to_save={"model": model, "trainer": trainer}, dirname=tmp_path)
    handler = attach_interrupt(trainer, manager)
    return trainer, manager, handler, completed


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_saves_this_iteration_and_stops_cleanly(tmp_path, keep_signal_handlers, signum):
    trainer, manager, handler, completed = _setup(tmp_path, {6: [signum]})
    seen_during_run = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1),
                              lambda: seen_during_run.append(signal.getsignal(signum)))
    trainer.run(DATA, max_epochs=3)
    assert seen_during_run == [handler._on_signal]
    assert handler.signum == signum and 128 + handler.signum in (130, 143)
    assert trainer.state.iteration == 6 and completed == [True]
    assert manager.last_path.name == "last_iteration=6.pt"
    assert read_checkpoint(manager.last_path)["trainer"]["iteration"] == 6
    assert signal.getsignal(signum) == keep_signal_handlers[signum]  # restored
    assert not handler.installed


def test_signal_at_an_epoch_end_stops_after_the_epoch_handlers(tmp_path):
    trainer, manager, handler, _ = _setup(tmp_path, {4: [signal.SIGTERM]})
    epochs_completed = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epochs_completed.append(e.state.epoch))
    trainer.run(DATA, max_epochs=3)
    assert epochs_completed == [1] and trainer.state.iteration == 4
    assert manager.last_path.name == "last_iteration=4.pt"


def test_no_signal(tmp_path, keep_signal_handlers):
    trainer, manager, handler, _ = _setup(tmp_path, {})
    trainer.run(DATA, max_epochs=2)
    assert handler.signum is None and trainer.state.iteration == 8
    assert signal.getsignal(signal.SIGINT) == keep_signal_handlers[signal.SIGINT]


def test_second_sigint_stops_at_once(tmp_path, keep_signal_handlers):
    trainer, manager, handler, completed = _setup(tmp_path, {2: [signal.SIGINT, signal.SIGINT]})
    with pytest.raises(KeyboardInterrupt):
        trainer.run(DATA, max_epochs=3)
    assert trainer.state.iteration == 2 and completed == []
    assert manager.last_path is None  # stopped before the checkpoint of iteration 2
    assert signal.getsignal(signal.SIGINT) == keep_signal_handlers[signal.SIGINT]


def test_second_signal_goes_to_the_previous_python_handler(tmp_path):
    calls = []
    signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    trainer, _, handler, _ = _setup(tmp_path, {2: [signal.SIGTERM, signal.SIGTERM]})
    trainer.run(DATA, max_epochs=3)
    assert calls == [signal.SIGTERM] and handler.signum == signal.SIGTERM


def test_second_sigterm_with_the_default_handler_dies_by_it(tmp_path, monkeypatch):
    killed = []
    monkeypatch.setattr(interrupt, "os", SimpleNamespace(kill=lambda pid, s: killed.append((pid, s)),
                                                         getpid=os.getpid))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    trainer, _, handler, _ = _setup(tmp_path, {})
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=2),
                              lambda: [handler._on_signal(signal.SIGTERM, None) for _ in range(2)])
    trainer.run(DATA, max_epochs=3)
    assert killed == [(os.getpid(), signal.SIGTERM)]  # re-raised with the default action back in place
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_an_ignored_signal_stays_ignored(tmp_path):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    trainer, _, handler, _ = _setup(tmp_path, {2: [signal.SIGINT]})
    during = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda: during.append(signal.getsignal(signal.SIGINT)))
    trainer.run(DATA, max_epochs=1)
    assert during == [signal.SIG_IGN] and handler.signum is None and trainer.state.iteration == 4


def test_handlers_are_restored_when_the_run_fails(tmp_path, keep_signal_handlers):
    def step(engine, batch):
        if engine.state.iteration == 3:
            raise ValueError("boom")

    trainer, _, handler, _ = _setup(tmp_path, {}, step=step)
    with pytest.raises(ValueError, match="boom"):
        trainer.run(DATA, max_epochs=2)
    assert signal.getsignal(signal.SIGINT) == keep_signal_handlers[signal.SIGINT]
    assert not handler.installed


def test_outside_the_main_thread_it_logs_and_skips(tmp_path, caplog, keep_signal_handlers):
    trainer, _, handler, _ = _setup(tmp_path, {})
    errors = []

    def run():
        try:
            trainer.run(DATA, max_epochs=1)
        except BaseException as err:  # reported below, in the test's thread
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert errors == [] and trainer.state.iteration == 4
    assert "outside the main thread: SIGINT/SIGTERM will not save a checkpoint" in caplog.text
    assert signal.getsignal(signal.SIGINT) == keep_signal_handlers[signal.SIGINT]


def test_resume_after_interrupt_continues_where_it_stopped(tmp_path, caplog):
    torch.manual_seed(0)
    trainer, manager, handler, _ = _setup(tmp_path, {5: [signal.SIGINT]})
    trainer.run(DATA, max_epochs=3)
    trainer, manager2, handler, _ = _setup(tmp_path, {})
    manager2.resume(manager.last_path)
    iterations = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: iterations.append(e.state.iteration))
    trainer.run(DATA, max_epochs=3)
    assert iterations == list(range(6, 13)) and handler.signum is None
    assert "Resuming a plain Engine mid-epoch (iteration 5) restarts the data of that epoch" in caplog.text
