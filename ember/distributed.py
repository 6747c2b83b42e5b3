"""Many processes through ``ignite.distributed``: spawn them, or join a torchrun launch.

``ember train trainer.parallel=ddp distributed.nproc_per_node=N`` spawns N processes
on this machine through ``idist.Parallel``; under ``torchrun`` (one or many machines)
every process joins the process group described by the environment instead. Errors
are found before anything is spawned where possible, and a rank that fails ends the
whole run with that rank's message (torch's process context terminates the others).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from typing import Any

import ignite.distributed as idist
import torch
import torch.multiprocessing as mp

from ember.config import Config
from ember.errors import ConfigError, DeviceError, EmberError, RunInterrupted

__all__ = ["launch", "wants_distributed", "launched_by_torchrun", "resolve_backend"]

def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (which sets TORCHELASTIC_RUN_ID).

    Processes that ember spawns itself get RANK/WORLD_SIZE too, but not this variable.
    """
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def wants_distributed(config: Config) -> bool:
    """Whether the config asks for several processes (or this process is one of them)."""
    if launched_by_torchrun():
        return True
    return config.distributed.nproc_per_node > 1 or config.trainer.parallel == "ddp"


def resolve_backend(config: Config) -> str:
    """``distributed.backend``, or nccl with GPUs and gloo without; checked before spawning."""
    backend = config.distributed.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    nproc = config.distributed.nproc_per_node
    if backend == "nccl":
        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise DeviceError(
                "distributed.backend=nccl needs CUDA GPUs and this machine has none; "
                "use distributed.backend=gloo to run processes on the CPU"
            )
        if not launched_by_torchrun() and nproc > gpus:
            raise DeviceError(
                f"distributed.nproc_per_node={nproc} processes with nccl need one GPU each, "
                f"but {gpus} GPU(s) are visible; lower nproc_per_node or use gloo"
            )
    if config.trainer.parallel == "dp":
        raise ConfigError(
            "trainer.parallel=dp is the single-process multi-GPU mode; with several processes "
            "use trainer.parallel=ddp (or auto)"
        )
    return backend


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(fn: Callable[..., Any], config: Config, *args: Any) -> None:
    """Run ``fn(local_rank, config, *args)`` on every process of the run.

    Spawns ``distributed.nproc_per_node`` processes, or, under torchrun, runs in this
    process as its rank. A failing rank's error is raised here as an EmberError
    (ConfigError for configuration mistakes) that names the rank.
    """
    backend = resolve_backend(config)
    if launched_by_torchrun():
        with idist.Parallel(backend=backend) as parallel:
            parallel.run(fn, config, *args)
        return
    spawn = {"nproc_per_node": config.distributed.nproc_per_node, "master_port": _free_port()}
    try:
        with idist.Parallel(backend=backend, **spawn) as parallel:
            parallel.run(fn, config, *args)
    except mp.ProcessRaisedException as err:
        raise _rank_error(err) from None
    except mp.ProcessExitedException as err:
        raise EmberError(
            f"rank {err.error_index} (pid {err.pid}) died with exit code {err.exit_code}"
            f"{f' (signal {err.signal_name})' if err.signal_name else ''}; the other ranks were stopped"
        ) from None


# the last line of a child's traceback: "package.module.ErrorClass: message"
_LAST_LINE = re.compile(r"^(?P<cls>[\w.]+): (?P<message>.*)$")


def _rank_error(err: mp.ProcessRaisedException) -> EmberError:
    lines = [line for line in str(err).splitlines() if line.strip()]
    match = next((m for line in reversed(lines) if (m := _LAST_LINE.match(line))), None)
    rank = err.error_index
    if match is None:
        return EmberError(f"rank {rank} failed: {lines[-1] if lines else 'unknown error'}")
    cls, message = match["cls"].rsplit(".", 1)[-1], match["message"]
    if cls == "RunInterrupted":
        signum = 15 if "SIGTERM" in message else 2
        return RunInterrupted(message, signum=signum)
    if cls == "ConfigError":
        return ConfigError(f"rank {rank}: {message}")
    known = {"EmberError", "DeviceError", "DataError", "CheckpointError", "NonFiniteLossError"}
    if cls in known:
        return EmberError(f"rank {rank}: {message}")
    return EmberError(f"rank {rank} failed: {cls}: {message}")
