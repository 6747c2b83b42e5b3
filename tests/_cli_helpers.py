"""Running `ember` as a user does, and checking what it leaves on disk.

Shared by tests/test_bad_input.py and tests/test_faults.py: ``cli`` runs
``ember.cli.main`` in this process and returns what a terminal would show;
``ember_process`` starts the real command in a subprocess; ``tree_hashes`` and
``final_state`` say what a run folder holds.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ember.cli import main

# the cheapest run `ember train` makes: one epoch of digits, no TensorBoard
FAST = ["trainer.max_epochs=1", "tensorboard.enabled=false", "data.train_eval_size=64"]
TMP_SUFFIX = ".ember-tmp"  # ember's half-written files (ember.handlers._files.TMP_SUFFIX)


@dataclass
class Result:
    """What `ember ...` showed: exit code, stdout, stderr and its ``error:`` lines."""

    code: int
    out: str
    err: str

    @property
    def errors(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]

    @property
    def error(self) -> str:
        """The one ``error:`` line (the test fails if there is not exactly one)."""
        assert len(self.errors) == 1, f"expected one error: line, got stderr:\n{self.err}"
        return self.errors[0]


def cli(argv: Sequence[str], capsys: pytest.CaptureFixture) -> Result:
    """``ember <argv>`` in this process; argparse's exit becomes the exit code, as in a shell."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def assert_clean_error(result: Result, code: int, pattern: str) -> str:
    """Exit ``code``, exactly one ``error:`` line matching ``pattern``, no traceback."""
    assert result.code == code, f"exit code {result.code}, expected {code}; stderr:\n{result.err}"
    line = result.error
    assert re.search(pattern, line), f"{line!r} does not match {pattern!r}"
    assert "Traceback" not in result.err
    return line


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path; folders as ``<dir>``."""
    hashes = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        hashes[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return hashes


def run_dirs(output_dir: Path) -> list[Path]:
    """The run folders ``<output_dir>/<name>/<timestamp>`` there are."""
    return sorted(p for p in output_dir.glob("*/*") if p.is_dir())


def final_state(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Model and optimizer tensors of the newest ``last`` checkpoint of a run."""
    from ember.handlers.checkpoint import latest_checkpoint

    checkpoint = torch.load(latest_checkpoint(run_dir / "checkpoints"), weights_only=True)
    optimizer = {
        f"{param}.{name}": value
        for param, state in checkpoint["optimizer"]["state"].items()
        for name, value in state.items()
        if isinstance(value, torch.Tensor)
    }
    return {"model": checkpoint["model"], "optimizer": optimizer, "iteration": checkpoint["trainer"]["iteration"]}


def assert_same_state(expected: dict, actual: dict) -> None:
    """Bitwise the same weights and optimizer state, at the same iteration."""
    assert actual["iteration"] == expected["iteration"]
    for part in ("model", "optimizer"):
        assert expected[part].keys() == actual[part].keys(), part
        for key, value in expected[part].items():
            assert torch.equal(value, actual[part][key]), f"{part} {key} differs"


# ---------------------------------------------------------------- the real command, in a subprocess


def one_thread_env() -> dict[str, str]:
    """The environment of an `ember` subprocess: one thread, as the in-process reference runs."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class EmberProcess:
    """`python -m ember <args>` (or a script) with its stderr read line by line, as it comes."""

    def __init__(self, args: Sequence[str], *, cwd: Path, script: Path | None = None) -> None:
        command = [sys.executable, str(script)] if script else [sys.executable, "-m", "ember"]
        self.proc = subprocess.Popen(
            [*command, *map(str, args)], cwd=cwd, env=one_thread_env(), text=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, *, timeout: float = 60.0) -> re.Match | None:
        """The first new stderr line matching ``pattern``; None if the process ended first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                lines = "\n".join(self.lines)
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{lines}") from None
            if line is None:
                return None
            self.lines.append(line)
            found = re.search(pattern, line)
            if found:
                return found

    def finish(self, *, timeout: float = 60.0) -> int:
        """Wait for the exit (killing it after ``timeout``: a hang fails the test); the exit code."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"still running after {timeout} s (a hang):\n" + "\n".join(self.lines)) from None
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return code

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)
