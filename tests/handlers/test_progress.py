import io
import logging
import re

import ignite.distributed as idist
import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember.engine import create_evaluator, create_trainer
from ember.errors import ConfigError
from ember.handlers.progress import attach_progress, format_metrics

LINE = re.compile(r"^epoch (\d+) \| val \| accuracy (\d\.\d{4}) loss (\d+\.\d{4}) \| (\d+\.\d\d) s, (\d+) samples/s$")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _data(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 4, (n,), generator=gen))


def _engines():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss())
    evaluator = create_evaluator(model, loss_fn=nn.CrossEntropyLoss())
    val = DataLoader(_data(40, 2), batch_size=16)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run(val))
    losses, metrics = {}, []
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: losses.__setitem__(e.state.iteration, e.state.output["loss"].item()))
    evaluator.add_event_handler(
        Events.COMPLETED, lambda e: metrics.append((dict(e.state.metrics), e.state.times["COMPLETED"])))
    return trainer, evaluator, losses, metrics


def _messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "ember.handlers.progress"]


def test_log_lines_when_not_a_terminal(caplog):
    trainer, evaluator, losses, metrics = _engines()
    stream = io.StringIO()
    attach_progress(trainer, {"val": evaluator}, log_every=2, stream=stream)
    with caplog.at_level(logging.INFO, logger="ember.handlers.progress"):
        trainer.run(DataLoader(_data(48, 1), batch_size=8), max_epochs=2)  # 6 iterations per epoch
    assert stream.getvalue() == ""  # no bar, no carriage return
    messages = _messages(caplog)
    iteration_lines = [m for m in messages if m.startswith("epoch") and " iter " in m]
    expected = [f"epoch {1 + (i - 1) // 6} iter {(i - 1) % 6 + 1}/6 loss {losses[i]:.4f}" for i in range(2, 13, 2)]
    assert iteration_lines == expected
    eval_lines = [m for m in messages if "| val |" in m]
    assert len(eval_lines) == 2 and not any("\r" in m for m in messages)
    for epoch, (line, (values, seconds)) in enumerate(zip(eval_lines, metrics), start=1):
        match = LINE.match(line)
        assert match, line
        assert int(match[1]) == epoch
        assert match[2] == f"{values['accuracy']:.4f}" and match[3] == f"{values['loss']:.4f}"
        assert match[4] == f"{seconds:.2f}" and match[5] == f"{40 / seconds:.0f}"  # 40 validation samples


def test_progress_bars_on_a_terminal(caplog):
    trainer, evaluator, _, _ = _engines()
    stream = _Terminal()
    attach_progress(trainer, {"val": evaluator}, log_every=3, stream=stream)
    for engine in (trainer, evaluator):
        handlers = engine._event_handlers[Events.ITERATION_COMPLETED]
        assert any(isinstance(arg, ProgressBar) for _, args, _ in handlers for arg in args)
    with caplog.at_level(logging.DEBUG, logger="ember.handlers.progress"):
        trainer.run(DataLoader(_data(48, 1), batch_size=8), max_epochs=2)
    output = stream.getvalue()
    assert "\r" in output and "loss=" in output and "6/6" in output
    iteration_records = [r for r in caplog.records if " iter " in r.getMessage()]
    # the bar replaces the INFO lines; DEBUG keeps them for a log file (iterations 1, 3, 6, 9, 12)
    assert [r.getMessage()[:15] for r in iteration_records] == [
        "epoch 1 iter 1/", "epoch 1 iter 3/", "epoch 1 iter 6/", "epoch 2 iter 3/", "epoch 2 iter 6/"]
    assert {r.levelno for r in iteration_records} == {logging.DEBUG}
    assert sum(bool(LINE.match(m)) for m in _messages(caplog)) == 2  # the evaluation lines stay at INFO


def test_terminal_bar_reads_the_loss_only_every_log_every_iterations():
    class Loss(torch.Tensor):
        reads = 0

        def __float__(self):
            type(self).reads += 1
            return super().__float__()

        def item(self):
            type(self).reads += 1
            return super().item()

    trainer = Engine(lambda e, b: {"loss": torch.tensor(0.5).as_subclass(Loss)})
    attach_progress(trainer, log_every=5, stream=_Terminal())
    trainer.run(range(10), max_epochs=1)
    assert Loss.reads == 3  # iterations 1, 5 and 10


def test_only_rank_zero_reports(monkeypatch):
    monkeypatch.setattr(idist, "get_rank", lambda: 2)
    trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    attach_progress(trainer, {"val": evaluator}, stream=_Terminal())
    assert not trainer._event_handlers[Events.ITERATION_COMPLETED]
    assert not evaluator._event_handlers[Events.COMPLETED]


def test_bad_arguments():
    with pytest.raises(ConfigError, match="`log_every` should be a positive integer, got -1"):
        attach_progress(Engine(lambda e, b: None), log_every=-1)
    with pytest.raises(ConfigError, match="`evaluators` should map split names to engines"):
        attach_progress(Engine(lambda e, b: None), [Engine(lambda e, b: None)])


def test_format_metrics():
    metrics = {"accuracy": 0.98154, "n": 12, "loss": torch.tensor(0.07123), "cm": torch.eye(2)}
    assert format_metrics(metrics) == "accuracy 0.9815 n 12 loss 0.0712"
