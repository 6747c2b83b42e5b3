"""Run folders: ``<output_dir>/<name>/<timestamp>/`` and finding what is inside them."""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
from pathlib import Path

from ember.errors import CheckpointError, ConfigError, EmberError

__all__ = [
    "CONFIG_FILE",
    "create_run_dir",
    "remove_failed_run_dir",
    "is_run_dir",
    "checkpoint_dir",
    "find_checkpoint",
    "write_text_atomic",
]

CONFIG_FILE = "config.yaml"
_CHECKPOINTS = "checkpoints"


def _check_output_dir(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir '{output_dir}' is a file, not a folder; choose another output_dir")
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"output_dir '{output_dir}' cannot be created: '{existing}' is a file, not a folder; "
            "choose another output_dir"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EmberError(f"output_dir '{output_dir}' is not writable ('{existing}' is read-only)")


def create_run_dir(output_dir: str | Path, name: str) -> Path:
    """Make a new, empty ``<output_dir>/<name>/<timestamp>/`` folder.

    A second run started in the same second gets a ``-1``, ``-2``... suffix: an
    existing run folder is never reused or overwritten.
    """
    output_dir = Path(output_dir)
    _check_output_dir(output_dir)
    parent = output_dir / name
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EmberError(f"Cannot create run folder under '{parent}': {err.strerror}") from None
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        run_dir = parent / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        except OSError as err:
            raise EmberError(f"Cannot create run folder '{run_dir}': {err.strerror}") from None
        return run_dir
    raise EmberError(f"Cannot create a new run folder under '{parent}': too many runs this second")


def remove_failed_run_dir(run_dir: Path) -> None:
    """Remove a run folder made by this process when the run failed before any checkpoint."""
    ckpts = run_dir / _CHECKPOINTS
    if ckpts.is_dir() and any(ckpts.iterdir()):
        return  # something worth keeping was written
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / _CHECKPOINTS


def _newest(paths: list[Path]) -> Path | None:
    return max(paths, key=lambda p: p.stat().st_mtime_ns) if paths else None


def find_checkpoint(path: str | Path, *, prefer: str = "best") -> Path:
    """The checkpoint a path names: the file itself, or from a run folder the
    newest ``best`` (``prefer="best"``) or ``last`` checkpoint.

    Raises:
        ConfigError: the path does not exist, or the folder is not a run folder
            (mistakes in the command line).
        CheckpointError: the run folder holds no checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"'{path}' does not exist: give a run folder or a checkpoint file")
    if path.is_file():
        return path
    if not is_run_dir(path):
        raise ConfigError(
            f"'{path}' is not a run folder (no {CONFIG_FILE}): give the folder `ember train` printed, "
            "e.g. runs/<name>/<timestamp>, or a checkpoint file"
        )
    files = sorted(checkpoint_dir(path).glob("*.pt"))
    order = ("best", "last") if prefer == "best" else ("last",)
    for kind in order:
        found = _newest([f for f in files if f.name.startswith(kind)])
        if found is not None:
            return found
    raise CheckpointError(f"Run folder '{path}' holds no {'/'.join(order)} checkpoint in {_CHECKPOINTS}/")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file beside which a crash leaves the old file or the whole new one.

    The text goes to a temporary file in the same folder, is flushed to disk, and is
    renamed over ``path``.
    """
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
