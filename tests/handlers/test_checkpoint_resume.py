"""Exact resume: a run stopped anywhere and resumed ends bitwise equal to one never stopped."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ckpt_train import EPOCH_LENGTH, EPOCHS, SPEC, make_run
from ignite.engine import DeterministicEngine, Events
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from ember.handlers.checkpoint import attach_checkpoint, latest_checkpoint, read_checkpoint

SCRIPT = Path(__file__).with_name("ckpt_train.py")
REPO = Path(__file__).resolve().parents[2]
TOTAL = EPOCHS * EPOCH_LENGTH


def _assert_same_weights(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


# one torch thread, as the subprocesses use (the fixture is in conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread):
    """The uninterrupted run, in this process."""
    run = make_run(tmp_path_factory.mktemp("reference"))
    run.trainer.run(run.loader, max_epochs=EPOCHS)
    return {
        "model": {k: v.clone() for k, v in run.model.state_dict().items()},
        "metrics": dict(run.evaluator.state.metrics),
        "seen": list(run.seen),
        "lr": run.optimizer.param_groups[0]["lr"],
    }


def test_reference_run_really_shuffles_and_uses_dropout(reference):
    orders = [tuple(i for _, batch in reference["seen"][e * EPOCH_LENGTH:(e + 1) * EPOCH_LENGTH] for i in batch)
              for e in range(EPOCHS)]
    assert len(set(orders)) == EPOCHS  # a new order every epoch
    assert all(sorted(order) == list(range(48)) for order in orders)


def _stop(run, *, iteration: int | None = None, epoch: int | None = None) -> None:
    if iteration is not None:
        run.trainer.add_event_handler(Events.ITERATION_COMPLETED(once=iteration), lambda e: e.terminate())
    else:
        run.trainer.add_event_handler(Events.EPOCH_COMPLETED(once=epoch), lambda e: e.terminate())


@pytest.mark.parametrize(
    ("stop", "resumed_at"),
    [({"iteration": 2}, 2), ({"iteration": 9}, 9), ({"iteration": 12}, 11), ({"epoch": 1}, 6)],
    ids=["mid-epoch-1", "mid-epoch-2", "last-iteration-of-epoch", "epoch-end"],
)
def test_resume_is_bitwise_exact(tmp_path, reference, stop, resumed_at):
    first = make_run(tmp_path)
    _stop(first, **stop)
    first.trainer.run(first.loader, max_epochs=EPOCHS)
    assert latest_checkpoint(tmp_path).name == f"last_iteration={resumed_at}.pt"

    torch.manual_seed(999)  # whatever the new process's RNGs are, the checkpoint's win
    second = make_run(tmp_path, model_seed=5)
    checkpoint = second.manager.resume(latest_checkpoint(tmp_path), expected_model=SPEC)
    assert checkpoint["trainer"]["iteration"] == resumed_at
    second.trainer.run(second.loader, max_epochs=EPOCHS)

    _assert_same_weights(reference["model"], second.model.state_dict())
    assert second.evaluator.state.metrics == reference["metrics"]
    assert second.optimizer.param_groups[0]["lr"] == reference["lr"]
    # no batch repeated, none skipped: the first run's batches up to the checkpoint,
    # then the resumed run's from the next iteration on, are the reference's
    assert second.seen[0][0] == resumed_at + 1
    assert first.seen[:resumed_at] + second.seen == reference["seen"]


# ---------------------------------------------------------------- real processes


def _spawn(tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, str(SCRIPT), "--dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out.pt"),
               "--log", str(tmp_path / "log.txt"), *args]
    with open(tmp_path / "stderr.txt", "a") as stderr:  # a file: a full pipe would block the child
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)


def _wait_for_iteration(proc: subprocess.Popen, iteration: int) -> None:
    for line in proc.stdout:
        if line.strip() == f"iteration {iteration}":
            return
    raise AssertionError(f"the run ended (code {proc.wait()}) before iteration {iteration}")


def _finish(proc: subprocess.Popen, expected_code: int = 0) -> str:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == expected_code, Path(proc.args[proc.args.index("--log") + 1]).with_name(
        "stderr.txt").read_text()[-3000:]
    return out


def _logged_sequence(log: Path) -> list[tuple[int, list[int]]]:
    """What trained, iteration by iteration, the later (resumed) line winning."""
    final: dict[int, list[int]] = {}
    for line in log.read_text().splitlines():
        iteration, *indices = map(int, line.split())
        final[iteration] = indices
    return sorted(final.items())


def _check_result(tmp_path: Path, reference: dict) -> None:
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    _assert_same_weights(reference["model"], result["model"])
    assert result["metrics"] == reference["metrics"]
    assert _logged_sequence(tmp_path / "log.txt") == reference["seen"]


def _every_checkpoint_readable(folder: Path) -> None:
    for path in folder.glob("*.pt"):  # nothing half-written under a final name
        read_checkpoint(path)
    if (folder / "model.safetensors").exists():
        load_file(folder / "model.safetensors")


@pytest.mark.slow
def test_sigkill_at_random_iterations_then_resume_is_bitwise_exact(tmp_path, reference):
    kills = sorted(random.Random(2024).sample(range(2, TOTAL - 1), 3))
    proc = _spawn(tmp_path, "--sleep", "0.02")
    for number, iteration in enumerate(kills):
        _wait_for_iteration(proc, iteration)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        proc.stdout.close()
        _every_checkpoint_readable(tmp_path / "ckpt")
        last = latest_checkpoint(tmp_path / "ckpt")
        saved = read_checkpoint(last)["trainer"]["iteration"]
        # every iteration is saved (an epoch's last one after its evaluation): at most one is lost
        assert saved >= iteration - 1
        proc = _spawn(tmp_path, "--sleep", "0.02", "--resume")
        assert proc.stdout.readline().strip() == f"resumed {saved}", number
    _finish(proc)
    _check_result(tmp_path, reference)


@pytest.mark.slow
def test_sigterm_saves_stops_cleanly_and_resumes_exactly(tmp_path, reference):
    proc = _spawn(tmp_path, "--interrupt", "--sleep", "0.05", "--every-iters", "4")
    _wait_for_iteration(proc, 3)
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc, expected_code=128 + signal.SIGTERM)
    stopped = int(out.split()[-1])  # the last "iteration N" printed
    checkpoint = read_checkpoint(latest_checkpoint(tmp_path / "ckpt"))
    assert checkpoint["trainer"]["iteration"] == stopped < TOTAL  # saved by the signal, where it stopped

    _finish(_spawn(tmp_path, "--resume"))
    _check_result(tmp_path, reference)


@pytest.mark.parametrize(("generator", "warned"), [(None, True), (7, False)])
def test_mid_epoch_resume_warns_when_the_order_cannot_be_replayed(tmp_path, caplog, generator, warned):
    def build():
        trainer = DeterministicEngine(lambda e, b: None)
        gen = None if generator is None else torch.Generator().manual_seed(generator)
        loader = DataLoader(list(range(8)), batch_size=2, shuffle=True, generator=gen)
        manager = attach_checkpoint(trainer, to_save={"trainer": trainer}, dirname=tmp_path, every_iters=1,
                                    safetensors=False)
        return trainer, loader, manager

    trainer, loader, manager = build()
    _stop(SimpleNamespace(trainer=trainer), iteration=1)
    trainer.run(loader, max_epochs=1)
    trainer, loader, second = build()
    second.resume(manager.last_path)
    trainer.run(loader, max_epochs=1)
    assert ("shuffles from the global RNG in the main process" in caplog.text) is warned
