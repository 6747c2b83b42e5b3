"""No fault loses a run: NaN loss, kill -9 at any moment, a full disk, SIGTERM, a dying loader worker.

Each fault hits a real `ember train` (the installed module in a subprocess where a
process must die, ``ember.cli.main`` in this process where the fault is simulated),
and the run must stop with one clear `error:` line, keep its last good checkpoint,
and, where it can continue, ``ember train --resume`` must end with weights and
optimizer state bitwise equal to those of a run that was never interrupted.
"""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from _cli_helpers import (
    TMP_SUFFIX,
    EmberProcess,
    assert_clean_error,
    assert_same_state,
    cli,
    final_state,
    run_dirs,
)

from ember.cli import main
from ember.handlers import _files

# 1257 digits in batches of 128: 10 iterations an epoch, 20 in all, a checkpoint after each
EPOCH_LENGTH, EPOCHS = 10, 2
RUN = [
    f"trainer.max_epochs={EPOCHS}", "data.batch_size=128", "checkpoint.every_iters=1", "trainer.deterministic=true",
    "tensorboard.enabled=false", "data.train_eval_size=0", "trainer.log_every=1", "name=fault",
]
ITERATION_LINE = r"^epoch (\d+) iter (\d+)/\d+ loss"  # ember's progress line, one per iteration (log_every=1)
KILL_TRIALS = 10


# one torch thread, as the subprocesses use (the fixture is in conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The final state of the run never interrupted, trained in this process."""
    out = tmp_path_factory.mktemp("reference")
    assert main(["train", f"output_dir={out}", *RUN]) == 0
    (run_dir,) = run_dirs(out)
    state = final_state(run_dir)
    assert state["iteration"] == EPOCHS * EPOCH_LENGTH
    return state


def _resume(run_dir: Path, capsys) -> None:
    result = cli(["train", "--resume", run_dir], capsys)
    assert result.code == 0, result.err
    assert not [n for n in os.listdir(run_dir / "checkpoints") if n.endswith(TMP_SUFFIX)], "half-written file kept"
    assert (run_dir / "summary.json").is_file()


def _iteration(found: re.Match) -> int:
    return (int(found.group(1)) - 1) * EPOCH_LENGTH + int(found.group(2))


# ---------------------------------------------------------------- NaN / Inf loss


def test_nan_loss_stops_at_its_iteration_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    result = cli(["train", f"output_dir={tmp_path}", *RUN, "optimizer.name=sgd", "optimizer.lr=1e6"], capsys)
    # the loss is checked after each step, the weights before each save: a step that
    # blows up is caught by whichever comes first, never saved
    line = assert_clean_error(
        result, 1,
        r"^error: (Training loss became (nan|inf|-inf)|Model weights became NaN or infinite \(in '[\w.]+'\)) "
        r"at iteration \d+ \(epoch 1\); (they were not saved and )?training stopped, the last good checkpoint "
        r"is kept: \S+\. Lower optimizer\.lr or set trainer\.clip_grad_norm$",
    )
    found = re.search(r"at iteration (\d+) .* kept: (\S+)\. Lower", line)
    bad, kept = int(found.group(1)), Path(found.group(2))
    assert bad >= 2, "the loss must blow up after a first good checkpoint for this test to mean anything"
    assert kept.name == f"last_iteration={bad - 1}.pt" and kept.is_file()
    names = os.listdir(kept.parent)
    assert not [n for n in names if n.startswith("last_") and n != kept.name]  # nothing saved the NaN weights
    weights = torch.load(kept, weights_only=True)["model"]
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_nan_loss_before_any_checkpoint_says_so(tmp_path, capsys):
    overrides = [o for o in RUN if not o.startswith("checkpoint.")]
    result = cli(["train", f"output_dir={tmp_path}", *overrides, "optimizer.name=sgd", "optimizer.lr=1e6"], capsys)
    assert_clean_error(result, 1, r"Training loss became (nan|inf|-inf) at iteration \d+ \(epoch 1\); training "
                                  r"stopped, no checkpoint was written before it")


# ---------------------------------------------------------------- disk full while saving


class _FullDisk:
    """A file on a disk that fills up after ``room`` bytes: its writes then fail with ENOSPC."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def test_disk_full_keeps_earlier_checkpoints_and_the_run_resumes(tmp_path, monkeypatch, capsys, reference):
    real_write = _files.write_atomic
    written: dict[str, bytes] = {}

    def disk_fills_after_the_first_checkpoint(path, write):
        if written:  # torch.save's zip writer gets the error part-way through the file
            return real_write(path, lambda file: write(_FullDisk(file, room=4096)))
        real_write(path, write)
        written[path.name] = path.read_bytes()

    monkeypatch.setattr(_files, "write_atomic", disk_fills_after_the_first_checkpoint)
    result = cli(["train", f"output_dir={tmp_path}", *RUN], capsys)
    line = assert_clean_error(
        result, 1,
        r"^error: Could not write checkpoint '(\S+/checkpoints/last_iteration=2\.pt)': No space left on device; "
        r"the earlier checkpoints in '\S+/checkpoints' are kept$",
    )
    (run_dir,) = run_dirs(tmp_path)
    folder = run_dir / "checkpoints"
    assert str(folder / "last_iteration=2.pt") in line
    assert sorted(os.listdir(folder)) == ["last_iteration=1.pt"]  # no half-written file either
    assert (folder / "last_iteration=1.pt").read_bytes() == written["last_iteration=1.pt"]

    monkeypatch.undo()  # room on the disk again
    _resume(run_dir, capsys)
    assert_same_state(reference, final_state(run_dir))


# ---------------------------------------------------------------- processes that die


def _next_iteration(proc: EmberProcess) -> int:
    found = proc.wait_for(ITERATION_LINE)
    assert found, f"the run ended before it was killed:\n{proc.stderr}"
    return _iteration(found)


def _kill_during_run(proc: EmberProcess, out: Path, rng: random.Random, how: str, *, first: int = 1,
                     last: int = EPOCHS * EPOCH_LENGTH - 2) -> int:
    """Kill -9 the run at a random iteration in [first, last] (plus a random part of the next one), or
    in the middle of writing a random one of its checkpoint files. Iterations after ``last`` are
    not killed in: once the final checkpoint is written the run is finished, and nothing is left
    to resume."""
    if how == "iteration":
        target = rng.randint(first, last)
        while _next_iteration(proc) < target:
            pass
        time.sleep(rng.uniform(0.0, 0.04))
    else:  # when the n-th checkpoint file after the first one is being written
        _next_iteration(proc)  # the first checkpoint is there
        (run_dir,) = run_dirs(out)
        writes, seen = rng.randint(1, 12), set()
        while proc.proc.poll() is None and len(seen) < writes:
            seen.update(n for n in os.listdir(run_dir / "checkpoints") if n.endswith(TMP_SUFFIX))
        assert len(seen) == writes, "the run ended before the write to kill it in"
    proc.proc.send_signal(signal.SIGKILL)
    return proc.finish()


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(KILL_TRIALS))
def test_kill_9_anywhere_then_resume_is_bitwise_exact(tmp_path, capsys, reference, trial):
    rng = random.Random(1000 + trial)
    how = "write" if trial % 3 == 2 else "iteration"
    twice = trial == KILL_TRIALS - 1  # kill the resumed run too
    train = EmberProcess(["train", f"output_dir={tmp_path}", *RUN], cwd=tmp_path)
    code = _kill_during_run(train, tmp_path, rng, how, last=EPOCH_LENGTH - 2 if twice else EPOCHS * EPOCH_LENGTH - 2)
    assert code == -signal.SIGKILL
    (run_dir,) = run_dirs(tmp_path)
    if twice:
        resumed = EmberProcess(["train", "--resume", run_dir], cwd=tmp_path)
        code = _kill_during_run(resumed, tmp_path, rng, "iteration", first=EPOCH_LENGTH + 1)
        assert code == -signal.SIGKILL
    _resume(run_dir, capsys)
    assert_same_state(reference, final_state(run_dir))


@pytest.mark.slow
def test_sigterm_saves_exits_143_and_resumes_exactly(tmp_path, capsys, reference):
    proc = EmberProcess(["train", f"output_dir={tmp_path}", *RUN], cwd=tmp_path)
    while _next_iteration(proc) < 7:
        pass
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.finish() == 128 + signal.SIGTERM
    errors = [line for line in proc.lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    found = re.fullmatch(r"error: Interrupted by SIGTERM: checkpoint saved to (\S+/last_iteration=(\d+)\.pt)\. "
                         r"Continue with: ember train --resume (\S+)", errors[0])
    assert found, errors[0]
    assert Path(found.group(1)).is_file() and int(found.group(2)) >= 7
    _resume(Path(found.group(3)), capsys)
    assert_same_state(reference, final_state(Path(found.group(3))))


DYING_DATASET = '''
import os, signal, sys
import torch
from torch.utils.data import Dataset, get_worker_info
from ember.cli import main
from ember.data import register_dataset


class Dying(Dataset):
    """A data set whose loader worker is killed (as the OOM killer would) when it reads."""

    num_classes, in_channels, image_size, classes = 2, 1, (8, 8), ["a", "b"]

    def __init__(self, split):
        self.split = split

    def __len__(self):
        return 64

    def __getitem__(self, index):
        if get_worker_info() is not None and self.split == "train":
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(1, 8, 8), index % 2


register_dataset("dying", Dying)
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow
def test_dead_loader_worker_is_a_clear_error_not_a_hang(tmp_path):
    script = tmp_path / "dying.py"
    script.write_text(DYING_DATASET)
    proc = EmberProcess(["train", f"output_dir={tmp_path / 'runs'}", "data.name=dying", "model.num_classes=null",
                         "data.num_workers=1", "trainer.max_epochs=1", "tensorboard.enabled=false",
                         "data.train_eval_size=0"], cwd=tmp_path, script=script)
    assert proc.finish(timeout=60) == 1
    errors = [line for line in proc.lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.fullmatch(r"error: A data loader worker process died \(DataLoader worker \(pid\(s\) \d+\) exited "
                        r"unexpectedly\): it was killed \(out of memory\?\) or crashed in native code\. "
                        r"With data\.num_workers=0 .*", errors[0]), errors[0]
    assert "terminating due to exception" not in proc.stderr  # ignite's echo of the same error
    assert run_dirs(tmp_path / "runs") == []  # it failed in the first iteration: no run folder
