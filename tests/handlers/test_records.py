import json
import math
import os
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember.engine import create_evaluator, create_trainer
from ember.errors import ConfigError
from ember.handlers.records import BestValue, RunRecorder, json_safe


def _data(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 4, (n,), generator=gen))


def _lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_one_line_per_evaluation_with_the_evaluators_metrics(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss())
    evaluators = {split: create_evaluator(model, loss_fn=nn.CrossEntropyLoss()) for split in ("train_eval", "val")}
    loaders = {"train_eval": DataLoader(_data(48, 1), batch_size=16), "val": DataLoader(_data(40, 2), batch_size=16)}
    seen = []
    for split, evaluator in evaluators.items():
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _, s=split: evaluators[s].run(loaders[s]))
        evaluator.add_event_handler(Events.COMPLETED, lambda e, s=split: seen.append(
            (trainer.state.epoch, trainer.state.iteration, s, dict(e.state.metrics))))
    recorder = RunRecorder(tmp_path / "run")
    recorder.attach(trainer, evaluators, best_metric="loss", mode="min")
    trainer.run(DataLoader(_data(48, 1), batch_size=8), max_epochs=2)

    lines = _lines(tmp_path / "run")
    assert [(r["epoch"], r["iteration"], r["split"]) for r in lines] == [s[:3] for s in seen]
    assert [(1, 6), (2, 12)] == sorted({(r["epoch"], r["iteration"]) for r in lines})
    for record, (_, _, _, metrics) in zip(lines, seen):
        assert record["metrics"] == pytest.approx(metrics)
        assert record["elapsed_s"] >= 0 and record["eval_s"] >= 0 and record["wall_time"] > 1e9
    summary = recorder.write_summary(last_checkpoint=tmp_path / "last.pt")
    val = [r for r in lines if r["split"] == "val"]
    best = min(val, key=lambda r: r["metrics"]["loss"])
    assert summary["best"]["val"] == {"metric": "loss", "mode": "min", "value": best["metrics"]["loss"],
                                      "epoch": best["epoch"], "iteration": best["iteration"]}
    assert summary["final"]["val"]["metrics"] == val[-1]["metrics"]
    assert summary["checkpoints"] == {"best": None, "last": str(tmp_path / "last.pt")}
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary


def _scripted(run_dir, values, *, metric, mode, recorder=None):
    """A trainer whose evaluator reports ``values[epoch - 1]`` for ``metric`` after each epoch."""
    trainer = Engine(lambda e, b: None)
    evaluator = Engine(lambda e, b: None)
    evaluator.add_event_handler(
        Events.EPOCH_COMPLETED,
        lambda e: e.state.metrics.update({metric: values[trainer.state.epoch - 1], "other": 1.0}))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run([0]))
    recorder = recorder or RunRecorder(run_dir)
    recorder.attach(trainer, {"val": evaluator}, best_metric=metric, mode=mode)
    trainer.run([0, 1], max_epochs=len(values))
    return recorder


@pytest.mark.parametrize(("mode", "values", "epoch", "best"), [
    ("max", [0.5, 0.8, 0.7, 0.8, float("nan")], 2, 0.8),  # a tie keeps the first; NaN never wins
    ("min", [0.9, 0.4, 0.6, 0.3, float("nan")], 4, 0.3),
])
def test_best_epoch_for_max_and_min(tmp_path, mode, values, epoch, best):
    recorder = _scripted(tmp_path, values, metric="score", mode=mode)
    summary = recorder.write_summary()
    assert summary["best"]["val"]["epoch"] == epoch and summary["best"]["val"]["value"] == best
    assert summary["best"]["val"]["iteration"] == 2 * epoch
    lines = _lines(tmp_path)
    assert [r["metrics"]["score"] for r in lines] == values[:4] + [None]  # NaN is written as null
    assert summary["final"]["val"] == {"epoch": 5, "iteration": 10, "metrics": {"score": None, "other": 1.0}}


def test_best_survives_a_resume_through_state_dict(tmp_path):
    first = _scripted(tmp_path, [0.5, 0.9], metric="accuracy", mode="max")
    state = torch.load(_save(first.state_dict(), tmp_path), weights_only=True)  # as a checkpoint holds it
    second = RunRecorder(tmp_path)
    second.load_state_dict(state)
    _scripted(tmp_path, [0.7, 0.8], metric="accuracy", mode="max", recorder=second)
    summary = second.write_summary()
    assert summary["best"]["val"]["value"] == 0.9 and summary["best"]["val"]["epoch"] == 2
    assert len(_lines(tmp_path)) == 4  # appended, never truncated


def _save(state, tmp_path):
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return path


def test_summary_is_written_atomically(tmp_path, monkeypatch):
    recorder = RunRecorder(tmp_path)
    recorder.write_summary(extra={"name": "first"})
    recorder.write_summary(test_metrics={"accuracy": torch.tensor(0.5)}, extra={"name": "second"})
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]  # no temporary file left
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["name"] == "second" and written["test"] == {"accuracy": 0.5}

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        recorder.write_summary(extra={"name": "third"})
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]
    assert json.loads((tmp_path / "summary.json").read_text())["name"] == "second"


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(idist, "get_rank", lambda: 1)
    trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    recorder = RunRecorder(tmp_path / "run")
    recorder.attach(trainer, {"val": evaluator})
    assert not evaluator._event_handlers[Events.COMPLETED]
    assert recorder.write_summary()["final"] == {}
    assert not (tmp_path / "run").exists()


def test_bad_arguments(tmp_path):
    recorder = RunRecorder(tmp_path)
    trainer = Engine(lambda e, b: None)
    with pytest.raises(ConfigError, match="`mode` should be 'max' or 'min', got 'best'"):
        recorder.attach(trainer, {"val": trainer}, mode="best")
    with pytest.raises(ConfigError, match="`evaluators` should map split names to engines"):
        recorder.attach(trainer, {})
    with pytest.raises(ConfigError, match=r"`extra` should not redefine the summary's own keys \['best'\]"):
        recorder.write_summary(extra={"best": 1})
    with pytest.raises(ConfigError, match="`mode` should be 'max' or 'min', got 'up'"):
        BestValue("up")


def test_json_safe():
    value = {"t": torch.tensor([1.5, float("inf")]), "n": np.float32(0.25), "i": np.int64(3),
             "p": Path("a/b"), "nan": math.nan, "nested": [(1, torch.tensor(2))], 3: True}
    assert json_safe(value) == {"t": [1.5, None], "n": 0.25, "i": 3, "p": "a/b", "nan": None,
                                "nested": [[1, 2]], "3": True}
    json.dumps(json_safe(value), allow_nan=False)
