"""Devices and parallel wrappers: where a model runs and how to get the plain module back."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from ember.errors import ConfigError, DeviceError

__all__ = ["resolve_device", "prepare_model", "unwrap_model", "PARALLEL_MODES"]

logger = logging.getLogger(__name__)

PARALLEL_MODES = ("auto", "none", "dp", "ddp")


def _available_devices() -> str:
    count = torch.cuda.device_count()
    if count == 0:
        return "this machine has no CUDA GPU; use device='cpu' or 'auto' (trainer.device=cpu in a config)"
    names = ", ".join(f"cuda:{i}" for i in range(count))
    return f"available: cpu, {names}"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn a device spec into a ``torch.device`` that exists on this machine.

    Args:
        spec: ``"auto"`` (``cuda:0`` when a GPU is visible, else ``cpu``, as in the
            classic ``torch.device("cuda:0" if torch.cuda.is_available() else "cpu")``),
            or anything ``torch.device`` accepts (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    Returns:
        The device.

    Raises:
        DeviceError: the device does not exist here; the message lists what does.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(
            f"Unknown device {spec!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N' ({err})"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise DeviceError(f"Device {spec!r} was asked for, but {_available_devices()}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= count:
            raise DeviceError(f"Device {spec!r} does not exist: {_available_devices()}")
    elif device.type not in ("cpu", "mps", "meta"):
        raise DeviceError(f"Device type {device.type!r} is not supported: use 'cpu' or 'cuda'")
    return device


def _check_device_ids(device_ids: Sequence[int]) -> list[int]:
    count = torch.cuda.device_count()
    ids = [int(i) for i in device_ids]
    if not ids:
        raise ConfigError("Argument `device_ids` should list at least one GPU id, got []")
    if count == 0:
        raise DeviceError(
            f"DataParallel was asked to use device_ids={ids}, but {_available_devices()}"
        )
    bad = [i for i in ids if i < 0 or i >= count]
    if bad:
        raise DeviceError(
            f"device_ids {bad} do not exist: {count} GPU(s) visible "
            f"(valid ids 0..{count - 1})"
        )
    return ids


def _process_group_running() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _resolve_parallel(parallel: str, device: torch.device) -> str:
    if parallel not in PARALLEL_MODES:
        raise ConfigError(
            f"Argument `parallel` should be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}"
        )
    if parallel != "auto":
        return parallel
    if _process_group_running():
        return "ddp"
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        return "dp"
    return "none"


def prepare_model(
    model: nn.Module,
    *,
    device: str | torch.device | None = "auto",
    parallel: str = "auto",
    device_ids: Sequence[int] | None = None,
    sync_batchnorm: bool = False,
) -> nn.Module:
    """Move a model to its device and wrap it for parallel work.

    Args:
        model: the plain module.
        device: see :func:`resolve_device`. Under DataParallel the model lives on the
            first of ``device_ids`` (where outputs are gathered).
        parallel: ``"none"``; ``"dp"`` for ``nn.DataParallel`` (``device_ids`` default:
            every visible GPU, as in the classic recipe); ``"ddp"`` for
            DistributedDataParallel through ``ignite.distributed`` (a process group
            must be running); ``"auto"``: ddp when a process group runs, dp when
            this process sees more than one GPU, else none.
        device_ids: the GPUs DataParallel spreads the batch over.
        sync_batchnorm: convert BatchNorm layers to SyncBatchNorm (ddp only).

    Returns:
        The model, moved and possibly wrapped. :func:`unwrap_model` gives back the
        plain module.

    Example:
        >>> model = prepare_model(get_model("alexnet", num_classes=10))  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"Argument `model` should be a torch.nn.Module, got {type(model).__name__}")
    if device_ids is not None and parallel == "auto":
        parallel = "dp"
    resolved = resolve_device(device)
    mode = _resolve_parallel(parallel, resolved)
    if mode == "dp":
        return _data_parallel(model, resolved, device_ids)
    if mode == "ddp":
        return _distributed(model, sync_batchnorm)
    if device_ids is not None:
        raise ConfigError(
            f"Argument `device_ids` is only used with parallel='dp', got parallel={parallel!r}"
        )
    return model.to(resolved)


def _data_parallel(
    model: nn.Module, device: torch.device, device_ids: Sequence[int] | None
) -> nn.Module:
    if device_ids is not None:
        ids = _check_device_ids(device_ids)
    elif torch.cuda.device_count() > 0:
        ids = list(range(torch.cuda.device_count()))
    else:
        # No GPU: DataParallel runs the module directly, which keeps the `.module`
        # code paths (and checkpoints saved from them) identical to a GPU run.
        logger.info("parallel='dp' on a machine without GPUs: running on the CPU")
        return nn.DataParallel(model.to("cpu"))
    model = model.to(torch.device("cuda", ids[0]))
    logger.info("DataParallel over GPUs %s", ids)
    return nn.DataParallel(model, device_ids=ids, output_device=ids[0])


def _distributed(model: nn.Module, sync_batchnorm: bool) -> nn.Module:
    import ignite.distributed as idist

    if not _process_group_running():
        raise DeviceError(
            "parallel='ddp' needs a running process group: launch with torchrun, or "
            "use `ember train ... trainer.parallel=ddp distributed.nproc_per_node=N`"
        )
    if sync_batchnorm and idist.device().type != "cuda":
        raise ConfigError(
            "sync_batchnorm=True needs CUDA GPUs: torch's SyncBatchNorm works with GPU modules only; "
            "leave it off on the CPU"
        )
    if idist.get_world_size() > 1:
        # moves to this rank's device, converts BatchNorm when asked, wraps in DDP
        return idist.auto_model(model, sync_bn=sync_batchnorm)
    # auto_model leaves a one-process group unwrapped; ddp was asked for explicitly,
    # so wrap anyway: checkpoints and feature paths then match a multi-process run.
    device = idist.device()
    model = model.to(device)
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under any nesting of DataParallel, DDP and torch.compile.

    Args:
        model: a module, possibly wrapped.

    Returns:
        The innermost module whose ``state_dict`` keys carry no ``module.`` or
        ``_orig_mod.`` prefix.
    """
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model
