"""Errors ember raises for user mistakes.

Every message says what was wrong, what was expected and, where one exists, how to
fix it. The CLI maps :class:`ConfigError` to exit code 2 and every other
:class:`EmberError` to exit code 1.
"""

from __future__ import annotations

__all__ = ["EmberError", "ConfigError", "DeviceError", "DataError", "CheckpointError", "RunInterrupted"]


class EmberError(Exception):
    """Base class of every error ember raises for a user mistake or a failed run."""


class ConfigError(EmberError, ValueError):
    """A configuration or argument value is invalid (unknown key, wrong type, out of range)."""


class DeviceError(EmberError):
    """A device, GPU id or parallel mode was asked for that this machine does not have."""


class DataError(EmberError):
    """A data set could not be found, read or does not fit the model."""


class CheckpointError(EmberError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the model."""


class RunInterrupted(EmberError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint of the current iteration.

    Attributes:
        signum: the signal that stopped the run (the CLI exits with ``128 + signum``).
        run_dir: the run folder to resume, when there is one.
    """

    def __init__(self, message: str, *, signum: int, run_dir: str | None = None) -> None:
        super().__init__(message)
        self.signum = signum
        self.run_dir = run_dir
