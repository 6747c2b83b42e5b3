"""Logging set-up for the command line and for every process of a distributed run."""

from __future__ import annotations

import logging
import sys

__all__ = ["configure_logging"]

# ignite creates these with their own INFO handlers through `setup_logger`, which keeps a
# logger that already exists as it is: creating them first, at WARNING, keeps start-up
# chatter ("Initialized distributed launcher ...") out of the console.
_CHATTY = (
    "ignite",
    "ignite.distributed.launcher.Parallel",
    "ignite.distributed.auto.auto_model",
    "ignite.distributed.auto.auto_dataloader",
    "ignite.distributed.auto.auto_optim",
)


# the loggers of the engines ember builds (ignite names them after the engine's class)
_ENGINE_LOGGERS = ("ignite.engine.engine.Engine", "ignite.engine.engine.DeterministicEngine")


class _NoExceptionEcho(logging.Filter):
    """Drop ignite's "... terminating due to exception: X" lines: the CLI reports X once, as `error:`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "terminating due to exception" not in record.getMessage()


def configure_logging(*, rank: int = 0) -> None:
    """INFO lines from ember on stderr (rank 0; warnings only on other ranks)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("ember").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in _ENGINE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoExceptionEcho) for f in logger.filters):
            logger.addFilter(_NoExceptionEcho())
