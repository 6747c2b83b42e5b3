"""Writing checkpoints: names, contents, rotation, atomicity, failures (ember/handlers/checkpoint.py)."""

from __future__ import annotations

import errno
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import DeterministicEngine, Engine, Events
from ignite.handlers import EarlyStopping
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import ember
from ember.errors import CheckpointError, ConfigError
from ember.handlers.checkpoint import SAFETENSORS_NAME, attach_checkpoint, load_checkpoint, read_checkpoint

DATA = [0, 1, 2, 3]  # four iterations per epoch


def _setup(tmp_path, scores=None, *, metric="accuracy", deterministic=False, **options):
    """A trainer that adds 1 to the weights each iteration; an evaluator reporting `scores`."""
    model = nn.Linear(3, 2)
    nn.init.zeros_(model.weight)  # whole numbers: the weights count the iterations exactly
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(engine, batch):
        with torch.no_grad():
            model.weight.add_(1.0)

    trainer = (DeterministicEngine if deterministic else Engine)(step)
    evaluator = Engine(lambda e, b: None)
    if scores is not None:
        evaluator.add_event_handler(
            Events.COMPLETED, lambda e: e.state.metrics.update({metric: scores[trainer.state.epoch - 1]})
        )
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda: evaluator.run([0]))
    to_save = {"model": model, "optimizer": optimizer, "trainer": trainer, "scaler": None}  # None: skipped
    manager = attach_checkpoint(
        trainer, to_save=to_save, dirname=tmp_path, evaluator=evaluator if scores is not None else None,
        metric=metric if scores is not None else None, **options,
    )
    return model, trainer, manager


def _names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_last_checkpoint_every_epoch_and_every_iters(tmp_path):
    _, trainer, manager = _setup(tmp_path / "new" / "folder", every_iters=2)
    lasts = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda: lasts.append(_names(manager.dirname)[:-1]))
    trainer.run(DATA, max_epochs=2)
    # 2 and 6 by every_iters; 4 and 8, epoch ends, at EPOCH_COMPLETED once the epoch's handlers ran
    assert lasts == [[], *[[f"last_iteration={i}.pt"] for i in (2, 2, 2, 4, 6, 6, 6)]]
    assert _names(manager.dirname) == ["last_iteration=8.pt", SAFETENSORS_NAME]
    assert manager.last_path == manager.dirname / "last_iteration=8.pt"
    assert manager.best_path is None


def test_checkpoint_holds_plain_data_loadable_with_weights_only(tmp_path):
    model, trainer, manager = _setup(tmp_path, extra={"config": {"lr": 0.1, "tags": ["a"]},
                                                       "model_spec": {"name": "linear", "num_classes": 2}},
                                     deterministic=True)
    trainer.run(DATA, max_epochs=1)
    checkpoint = torch.load(manager.last_path, weights_only=True)  # what anyone can do, safely
    assert set(checkpoint) == {"model", "optimizer", "trainer", "rng", "checkpoint_manager", "config",
                               "model_spec", "ember_version"}
    assert checkpoint["ember_version"] == ember.__version__
    assert checkpoint["config"] == {"lr": 0.1, "tags": ["a"]}
    assert checkpoint["trainer"]["iteration"] == 4 and checkpoint["trainer"]["epoch"] == 1
    assert isinstance(checkpoint["trainer"]["seed"], int)
    assert set(checkpoint["trainer"]["rng_states"]) == {"python", "torch", "numpy"}  # ignite's, as tensors
    assert set(checkpoint["rng"]) >= {"python", "numpy", "torch"}
    plain = nn.Linear(3, 2)
    plain.load_state_dict(checkpoint["model"])
    assert torch.equal(plain.weight, model.weight)


def test_rng_states_round_trip(tmp_path):
    _, trainer, manager = _setup(tmp_path)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    trainer.run(DATA, max_epochs=1)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    load_checkpoint(manager.last_path, {"trainer": Engine(lambda e, b: None)})
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_wrapped_model_is_saved_without_prefixes(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2))
    trainer = Engine(lambda e, b: None)
    manager = attach_checkpoint(trainer, to_save={"model": torch.compile(nn.DataParallel(model))},
                                dirname=tmp_path)
    trainer.run(DATA, max_epochs=1)
    assert set(read_checkpoint(manager.last_path)["model"]) == {"0.weight", "0.bias"}


def test_safetensors_next_to_last_without_metric(tmp_path):
    model, trainer, manager = _setup(tmp_path)
    trainer.run(DATA, max_epochs=2)
    weights = load_file(tmp_path / SAFETENSORS_NAME)
    assert torch.equal(weights["weight"], model.weight) and torch.equal(weights["bias"], model.bias)


def test_safetensors_with_tied_weights_and_the_model_spec(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].weight = model[0].weight  # shared memory, which safetensors refuses unless copied
    trainer = Engine(lambda e, b: None)
    spec = {"name": "tied", "num_classes": 2, "in_channels": 2, "kwargs": {}}
    attach_checkpoint(trainer, to_save={"model": model}, dirname=tmp_path, extra={"model_spec": spec})
    trainer.run(DATA, max_epochs=1)
    weights = load_file(tmp_path / SAFETENSORS_NAME)
    assert torch.equal(weights["0.weight"], weights["1.weight"])
    with safe_open(tmp_path / SAFETENSORS_NAME, "pt") as file:
        assert json.loads(file.metadata()["model_spec"]) == spec


def test_safetensors_off(tmp_path):
    _, trainer, _ = _setup(tmp_path, safetensors=False)
    trainer.run(DATA, max_epochs=1)
    assert _names(tmp_path) == ["last_iteration=4.pt"]


@pytest.mark.parametrize(
    ("metric", "scores", "kept", "best"),
    [
        ("accuracy", [0.5, 0.7, 0.6, 0.9, 0.8], ["best_epoch=4_accuracy=0.9000.pt",
                                                  "best_epoch=5_accuracy=0.8000.pt"], 4),
        ("loss", [0.9, 0.5, 0.7, 0.4, 0.6], ["best_epoch=2_loss=0.5000.pt", "best_epoch=4_loss=0.4000.pt"], 4),
        ("val_loss", [0.3, 0.5, 0.2, 0.4, 0.1], ["best_epoch=3_val_loss=0.2000.pt",
                                                 "best_epoch=5_val_loss=0.1000.pt"], 5),
    ],
)
def test_best_n_rotation(tmp_path, metric, scores, kept, best):
    _, trainer, manager = _setup(tmp_path, scores, metric=metric, n_saved=2)
    trainer.run(DATA, max_epochs=5)
    assert _names(tmp_path) == sorted([*kept, "last_iteration=20.pt", SAFETENSORS_NAME])
    assert manager.best_path.name.startswith(f"best_epoch={best}_")
    best_weights = read_checkpoint(manager.best_path)["model"]["weight"]
    assert torch.equal(load_file(tmp_path / SAFETENSORS_NAME)["weight"], best_weights)
    assert best_weights[0, 0] == 4 * best and read_checkpoint(manager.last_path)["model"]["weight"][0, 0] == 20


def test_mode_overrides_the_direction(tmp_path):
    _, trainer, manager = _setup(tmp_path, [0.3, 0.1, 0.2], metric="error", n_saved=1, mode="min")
    trainer.run(DATA, max_epochs=3)
    assert manager.best_path.name == "best_epoch=2_error=0.1000.pt"


def test_nan_metric_saves_no_best(tmp_path, caplog):
    _, trainer, manager = _setup(tmp_path, [float("nan"), 0.5], n_saved=2)
    trainer.run(DATA, max_epochs=2)
    assert manager.best_path.name == "best_epoch=2_accuracy=0.5000.pt"
    assert "is nan: no best checkpoint" in caplog.text


def test_last_is_rewritten_when_the_evaluation_runs_after_it(tmp_path):
    trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    evaluator.add_event_handler(Events.COMPLETED, lambda e: e.state.metrics.update({"accuracy": 0.1 * e.state.t}))
    manager = attach_checkpoint(trainer, to_save={"model": nn.Linear(1, 1), "trainer": trainer}, dirname=tmp_path,
                                evaluator=evaluator, metric="accuracy", n_saved=3)

    @trainer.on(Events.EPOCH_COMPLETED)  # after the checkpoint's own EPOCH_COMPLETED handler
    def evaluate(engine):
        evaluator.state.t = engine.state.epoch
        evaluator.run([0])

    trainer.run(DATA, max_epochs=2)
    tracked = read_checkpoint(manager.last_path)["checkpoint_manager"]["best"]["_saved"]
    assert [name for _, name in tracked] == ["best_epoch=1_accuracy=0.1000.pt", "best_epoch=2_accuracy=0.2000.pt"]


def test_rotation_survives_resume_in_the_same_folder(tmp_path):
    scores = [0.5, 0.9, 0.7, 0.8, 0.6]
    _, trainer, first = _setup(tmp_path, scores, n_saved=2)
    trainer.run(DATA, max_epochs=3)
    assert _names(tmp_path) == ["best_epoch=2_accuracy=0.9000.pt", "best_epoch=3_accuracy=0.7000.pt",
                                "last_iteration=12.pt", SAFETENSORS_NAME]
    model, trainer, second = _setup(tmp_path, scores, n_saved=2)
    second.resume(first.last_path)
    assert second.best_path == first.best_path and second.last_path == first.last_path
    trainer.run(DATA, max_epochs=5)
    # epoch 4 (0.8) pushes out epoch 3 (0.7), tracked from before the resume; 5 (0.6) is not kept
    assert _names(tmp_path) == ["best_epoch=2_accuracy=0.9000.pt", "best_epoch=4_accuracy=0.8000.pt",
                                "last_iteration=20.pt", SAFETENSORS_NAME]
    assert torch.equal(load_file(tmp_path / SAFETENSORS_NAME)["weight"],
                       read_checkpoint(tmp_path / "best_epoch=2_accuracy=0.9000.pt")["model"]["weight"])


def test_resume_with_a_damaged_rotation_state(tmp_path):
    _, trainer, manager = _setup(tmp_path / "a")
    trainer.run(DATA, max_epochs=1)
    checkpoint = read_checkpoint(manager.last_path)
    checkpoint["checkpoint_manager"] = {"last": {"saved": []}}
    torch.save(checkpoint, tmp_path / "damaged.pt")
    _, _, other = _setup(tmp_path / "b")
    with pytest.raises(CheckpointError, match=r"Could not load 'checkpoint_manager' from '.*damaged.pt': "
                                              r"KeyError\('_saved'\)"):
        other.resume(tmp_path / "damaged.pt")


def test_resume_from_another_folder_starts_a_new_rotation_and_leaves_it_alone(tmp_path):
    _, trainer, first = _setup(tmp_path / "a", [0.9, 0.1, 0.1], n_saved=1)
    trainer.run(DATA, max_epochs=2)
    before = {name: (tmp_path / "a" / name).read_bytes() for name in _names(tmp_path / "a")}
    _, trainer, second = _setup(tmp_path / "b", [0.9, 0.1, 0.1], n_saved=1)
    second.resume(first.last_path)
    assert second.best_path is None
    trainer.run(DATA, max_epochs=3)
    assert _names(tmp_path / "b") == ["best_epoch=3_accuracy=0.1000.pt", "last_iteration=12.pt",
                                      SAFETENSORS_NAME]
    assert {name: (tmp_path / "a" / name).read_bytes() for name in _names(tmp_path / "a")} == before


def test_folder_of_another_run_is_not_clobbered(tmp_path):
    _, trainer, _ = _setup(tmp_path)
    trainer.run(DATA, max_epochs=1)
    before = (tmp_path / "last_iteration=4.pt").read_bytes()
    _, trainer, _ = _setup(tmp_path)
    with pytest.raises(CheckpointError, match=r"already holds checkpoints of another run \(last_iteration=4.pt, "
                                              r"model.safetensors\): use a new folder, or resume"):
        trainer.run(DATA, max_epochs=1)
    assert _names(tmp_path) == ["last_iteration=4.pt", SAFETENSORS_NAME]
    assert (tmp_path / "last_iteration=4.pt").read_bytes() == before


def test_a_second_run_of_the_same_trainer_reuses_its_folder(tmp_path):
    _, trainer, manager = _setup(tmp_path)
    trainer.run(DATA, max_epochs=1)
    trainer.run(DATA, max_epochs=2)
    assert _names(tmp_path) == ["last_iteration=8.pt", SAFETENSORS_NAME]


def test_half_written_files_of_a_killed_run_are_cleaned_on_resume(tmp_path):
    _, trainer, first = _setup(tmp_path)
    trainer.run(DATA, max_epochs=1)
    (tmp_path / ".last_iteration=6.pt.x1y2.ember-tmp").write_bytes(b"half")
    _, trainer, second = _setup(tmp_path)
    second.resume(first.last_path)
    trainer.run(DATA, max_epochs=2)
    assert _names(tmp_path) == ["last_iteration=8.pt", SAFETENSORS_NAME]


def test_rotation_removes_the_old_file_only_once_the_new_one_is_in_place(tmp_path, monkeypatch):
    _, trainer, manager = _setup(tmp_path, every_iters=1)
    present_at_replace = []
    real_replace = os.replace

    def spy(src, dst):
        present_at_replace.append((Path(dst).name, _names(tmp_path)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    trainer.run(DATA, max_epochs=2)
    lasts = [(name, [n for n in names if n.startswith("last_")]) for name, names in present_at_replace
             if name.startswith("last_")]
    assert [name for name, _ in lasts] == [f"last_iteration={i}.pt" for i in range(1, 9)]
    assert lasts[0][1] == []
    # when each new file moves into place, the one it replaces is still there
    assert all(there == [previous] for (previous, _), (_, there) in zip(lasts, lasts[1:]))
    assert _names(tmp_path) == ["last_iteration=8.pt", SAFETENSORS_NAME]


def _full_disk(obj, file, *args, **kwargs):
    file.write(b"\x00" * 100)  # part of the file made it, then the disk was full
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_keeps_earlier_checkpoints_byte_for_byte(tmp_path, monkeypatch):
    _, trainer, manager = _setup(tmp_path, [0.5, 0.9, 0.7], n_saved=2)
    trainer.add_event_handler(Events.EPOCH_STARTED(once=3), lambda: monkeypatch.setattr(torch, "save", _full_disk))
    trainer.run(DATA, max_epochs=2)
    before = {name: (tmp_path / name).read_bytes() for name in _names(tmp_path)}
    with pytest.raises(CheckpointError, match=r"Could not write checkpoint '.*best_epoch=3_accuracy=0.7000.pt': "
                                              r"No space left on device; the earlier checkpoints in .* are kept"):
        trainer.run(DATA, max_epochs=3)
    assert {name: (tmp_path / name).read_bytes() for name in _names(tmp_path)} == before
    # the rotation did not move: it still tracks the files that are there
    assert manager.state_dict()["best"]["_saved"] == [(0.5, "best_epoch=1_accuracy=0.5000.pt"),
                                                      (0.9, "best_epoch=2_accuracy=0.9000.pt")]
    monkeypatch.undo()  # the disk has room again
    manager.save_now()
    assert _names(tmp_path) == ["best_epoch=1_accuracy=0.5000.pt", "best_epoch=2_accuracy=0.9000.pt",
                                "last_iteration=12.pt", SAFETENSORS_NAME]


def _read_only(monkeypatch, folder: Path) -> None:
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: fail the way the OS fails for anyone else
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", refuse)


def test_read_only_folder_is_refused_when_attaching(tmp_path, monkeypatch):
    _read_only(monkeypatch, tmp_path)
    try:
        with pytest.raises(CheckpointError, match=r"Checkpoint folder '.*' is not writable: Permission denied"):
            _setup(tmp_path)
    finally:
        tmp_path.chmod(0o755)


def test_folder_turning_read_only_fails_the_save_and_keeps_files(tmp_path, monkeypatch):
    _, trainer, manager = _setup(tmp_path)
    trainer.run(DATA, max_epochs=1)
    before = {name: (tmp_path / name).read_bytes() for name in _names(tmp_path)}
    _read_only(monkeypatch, tmp_path)
    try:
        with pytest.raises(CheckpointError, match=r"Could not write checkpoint '.*last_iteration=8.pt': "
                                                  r"Permission denied"):
            trainer.run(DATA, max_epochs=2)
    finally:
        tmp_path.chmod(0o755)
    assert {name: (tmp_path / name).read_bytes() for name in _names(tmp_path)} == before
    assert manager.last_path.name == "last_iteration=4.pt"


def test_folder_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CheckpointError, match=r"Could not create checkpoint folder '.*file/sub'"):
        _setup(tmp_path / "file" / "sub")


def test_other_stateful_objects_are_saved(tmp_path):
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = Engine(lambda e, b: optimizer.step())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda: scheduler.step())
    stopper = EarlyStopping(patience=3, score_function=lambda e: 0.0, trainer=trainer)
    stopper.counter, stopper.best_score = 2, np.float64(0.25)  # a numpy score, as metrics may give
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    to_save = {"model": model, "optimizer": optimizer, "trainer": trainer, "scheduler": scheduler,
               "early_stopping": stopper, "scaler": scaler}
    manager = attach_checkpoint(trainer, to_save=to_save, dirname=tmp_path)
    trainer.run(DATA, max_epochs=2)

    fresh = nn.Linear(2, 2)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=1.0)
    loaded = {"model": fresh, "optimizer": fresh_optimizer,
              "scheduler": torch.optim.lr_scheduler.StepLR(fresh_optimizer, step_size=1, gamma=0.5),
              "early_stopping": EarlyStopping(patience=3, score_function=lambda e: 0.0, trainer=trainer),
              "scaler": torch.amp.GradScaler("cpu")}
    load_checkpoint(manager.last_path, loaded)
    assert loaded["scheduler"].last_epoch == 2 and fresh_optimizer.param_groups[0]["lr"] == 0.25
    assert loaded["early_stopping"].counter == 2 and loaded["early_stopping"].best_score == 0.25
    assert loaded["scaler"].get_scale() == 1024.0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"to_save": [1]}, ConfigError, r"Argument `to_save` should be a mapping of names to objects .* got list"),
        ({"to_save": {"model": nn.Linear(1, 1), "x": 3}}, ConfigError,
         r"to_save\['x'\] \(a int\) has no state_dict/load_state_dict"),
        ({"to_save": {"model": nn.Linear(1, 1), "rng": nn.Linear(1, 1)}}, ConfigError,
         r"to_save key 'rng' is reserved for ember's own checkpoint entry: rename it"),
        ({"extra": {"model": 1}}, ConfigError, r"`extra` keys \['model'\] clash with to_save"),
        ({"extra": {"fn": len}}, CheckpointError,
         r"Checkpoint entry 'extra.fn' is a builtin_function_or_method, which torch.load\(weights_only=True\)"),
        ({"to_save": {"optimizer": torch.optim.SGD([torch.zeros(1)], lr=1)}}, ConfigError,
         r"safetensors=True needs the model as to_save\['model'\]"),
        ({"n_saved": 0}, ConfigError, r"Argument `n_saved` should be a positive integer, got 0"),
        ({"every_iters": 0}, ConfigError, r"Argument `every_iters` should be a positive integer or None, got 0"),
        ({"metric": "accuracy"}, ConfigError, r"Argument `metric` ranks checkpoints .*: pass `evaluator`"),
        ({"mode": "up", "metric": "acc", "evaluator": Engine(lambda e, b: None)}, ConfigError,
         r"Argument `mode` should be 'max', 'min' or None, got 'up'"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error, message):
    kwargs = {"to_save": {"model": nn.Linear(1, 1)}, "dirname": tmp_path, **kwargs}
    with pytest.raises(error, match=message):
        attach_checkpoint(Engine(lambda e, b: None), **kwargs)


def test_unknown_metric_names_the_ones_there(tmp_path):
    evaluator = Engine(lambda e, b: None)
    evaluator.add_event_handler(Events.COMPLETED, lambda e: e.state.metrics.update({"accuracy": 0.5}))
    attach_checkpoint(Engine(lambda e, b: None), to_save={"model": nn.Linear(1, 1)}, dirname=tmp_path,
                      evaluator=evaluator, metric="acc")
    with pytest.raises(ConfigError, match=r"Metric 'acc' that ranks checkpoints is not among the evaluator's "
                                          r"metrics \(accuracy\): set `metric` to one of them"):
        evaluator.run([0])
