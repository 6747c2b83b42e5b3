"""Checkpoint files: atomic writes, safe reads, and loading into live objects.

:mod:`ember.handlers.checkpoint` re-exports the public functions of this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import stat
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from ignite.engine import Engine
from ignite.handlers import DiskSaver
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from ember.engine import unwrap_model
from ember.errors import CheckpointError, ConfigError
from ember.handlers._state import load_engine_state, set_rng_states

__all__ = [
    "AtomicSaver",
    "write_atomic",
    "TMP_SUFFIX",
    "read_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
]

logger = logging.getLogger(__name__)

TMP_SUFFIX = ".ember-tmp"  # half-written files: never matched by a checkpoint name
_LAST_RE = re.compile(r"^last_iteration=(\d+)\.pt$")
_UNSAFE_GLOBAL_RE = re.compile(r"GLOBAL\s+(\S+)", re.IGNORECASE)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
_MAX_LISTED = 5  # keys named in a mismatch message, per kind


# ---------------------------------------------------------------- writing


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` through ``write(file)`` so that it is the old file or the whole new one.

    Raises:
        CheckpointError: the write failed (disk full, read-only folder...); ``path`` is untouched.
    """
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())  # on disk before the rename makes it visible
        os.chmod(tmp, os.stat(tmp).st_mode | stat.S_IRGRP | stat.S_IROTH)  # as ignite's DiskSaver
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as err:
        # torch.save's zip writer turns an OSError of the file (a full disk) into a RuntimeError
        # ("unexpected pos ..."): the OSError is still in the chain, and says what happened
        cause = _os_error_in(err)
        if cause is None and not isinstance(err, OSError):
            raise
        cause = cause or err
        raise CheckpointError(
            f"Could not write checkpoint '{path}': {cause.strerror or cause}; the earlier checkpoints in "
            f"'{path.parent}' are kept"
        ) from err
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def _os_error_in(err: BaseException) -> OSError | None:
    """The first OSError in ``err``'s chain of causes and contexts, or None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class AtomicSaver(DiskSaver):
    """ignite's DiskSaver made safe for the files it already wrote.

    ignite's ``Checkpoint`` asks its saver to remove the file that rotates out
    *before* writing the new one, and DiskSaver neither flushes to disk nor says
    which file failed. Here removals wait until the new file is in place, writes go
    through :func:`write_atomic`, and ``finalize`` completes each checkpoint with
    what is known only once ignite has updated its rotation.
    """

    def __init__(self, dirname: Path, finalize: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        try:
            super().__init__(dirname, atomic=True, create_dir=True, require_empty=False)
        except OSError as err:
            raise CheckpointError(
                f"Could not create checkpoint folder '{dirname}': {err.strerror or err}"
            ) from err
        self._finalize = finalize
        self._pending_removals: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        pending, self._pending_removals = self._pending_removals, []
        super().__call__(self._finalize(dict(checkpoint)), filename, metadata)
        for name in pending:
            if name == filename:  # the same name was just replaced in place
                continue
            try:
                super().remove(name)
            except FileNotFoundError:
                pass
            except OSError as err:  # the new checkpoint is in place: not worth failing the run
                logger.warning("Could not remove the old checkpoint '%s': %s", name, err.strerror or err)

    def remove(self, filename: str) -> None:
        self._pending_removals.append(filename)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        write_atomic(path, lambda file: func(checkpoint, file, **self.kwargs))


# ---------------------------------------------------------------- reading


def latest_checkpoint(dirname: str | Path) -> Path | None:
    """The ``last_iteration=N.pt`` with the largest N in ``dirname``, or None."""
    folder = Path(dirname).expanduser()
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), folder / n) for n in os.listdir(folder) if (m := _LAST_RE.match(n))]
    return max(found)[1] if found else None


def _unreadable(path: Path, err: BaseException) -> CheckpointError:
    reason = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
    reason = reason.split(". ")[0]  # torch goes on with advice that does not apply (weights_only=False...)
    return CheckpointError(f"'{path}' is not a readable checkpoint (truncated or corrupt?): {reason[:200]}")


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6
_PICKLE_MAGIC = b"\x80"  # the legacy format: a pickle, protocol 2 or later


def _check_file(path: Path) -> None:
    """Refuse a file that is empty, not a checkpoint format, truncated or corrupt, before unpickling.

    torch.load checks neither a zip archive's directory nor the CRC-32 of its entries, so
    a damaged tensor would load as wrong weights without a word; the CRCs are checked
    here (reading the file once more, at disk speed).
    """

    def unreadable(reason: str) -> CheckpointError:
        return CheckpointError(f"'{path}' is not a readable checkpoint (truncated or corrupt?): {reason}")

    try:
        with path.open("rb") as file:
            head = file.read(4)
        if not head:
            raise unreadable("the file is empty (0 bytes)")
        if head != _ZIP_MAGIC:
            if not head.startswith(_PICKLE_MAGIC):
                raise unreadable(f"it is neither a zip archive nor a pickle, as PyTorch files are "
                                 f"(it starts with {head!r})")
            return  # the legacy format has no checksums; torch.load says what is wrong with it
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as err:
        raise unreadable(f"its zip archive cannot be read ({err})") from None
    except (OSError, EOFError, RuntimeError, ValueError) as err:  # zlib/zipfile raise more than BadZipFile
        raise unreadable(str(getattr(err, "strerror", None) or err)) from None
    if bad is not None:
        raise unreadable(f"the data of its entry '{bad}' fails its CRC-32 check (the file changed after "
                         "it was written)")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file safely: ``weights_only=True`` (no code runs), onto the CPU.

    Args:
        path: the file.

    Returns:
        Its dict.

    Raises:
        CheckpointError: missing, unreadable, corrupt, or needing code to unpickle.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        latest = latest_checkpoint(path)
        hint = f"; its newest checkpoint is '{latest}'" if latest else ""
        raise CheckpointError(f"'{path}' is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file '{path}' does not exist")
    _check_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _UNSAFE_GLOBAL_RE.search(str(err))
        if unsafe:
            raise CheckpointError(
                f"Checkpoint '{path}' was not loaded: unpickling it would run code ({unsafe.group(1)}), "
                "which ember refuses for safety. If you trust its source, load it with "
                "torch.load(path, weights_only=False) and save its tensors again"
            ) from None
        raise _unreadable(path, err) from None
    except Exception as err:  # a damaged file breaks the unpickler in any way (IndexError, KeyError...)
        raise _unreadable(path, err) from None
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"'{path}' holds a {type(checkpoint).__name__}, not a checkpoint (a dict)")
    return dict(checkpoint)


# ---------------------------------------------------------------- model state


def describe_spec(spec: Mapping[str, Any] | None) -> str:
    """``small_cnn(num_classes=10, in_channels=1, width=8)`` for a model_spec dict."""
    if not spec:
        return "an unnamed model"
    args = {k: v for k, v in spec.items() if k not in ("name", "kwargs")}
    args.update(spec.get("kwargs") or {})
    return f"{spec.get('name', '?')}({', '.join(f'{k}={v!r}' for k, v in args.items())})"


def _same_spec(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    def norm(spec: Mapping[str, Any]) -> dict[str, Any]:
        return {**spec, "kwargs": dict(spec.get("kwargs") or {})}

    return norm(a) == norm(b)


def _strip_wrapper_prefixes(state: Mapping[str, Any], model_keys: set[str]) -> OrderedDict:
    """Drop ``module.`` / ``_orig_mod.`` prefixes, in any nesting, that the model's keys lack."""
    metadata = getattr(state, "_metadata", None)
    state = OrderedDict(state)
    if metadata is not None:  # per-module versions; consume_prefix_... renames them too
        state._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    while state and set(state) != model_keys:
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not all(k.startswith(prefix) for k in model_keys):
                consume_prefix_in_state_dict_if_present(state, prefix)
                break
        else:
            break
    return state


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" (and {len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _load_model_state(
    model: nn.Module, state: Any, *, strict: bool, source: Path, spec: Mapping[str, Any] | None
) -> None:
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"Checkpoint '{source}': its model entry is not a state_dict of tensors")
    own = model.state_dict()
    state = _strip_wrapper_prefixes(state, set(own))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        shown = [f"{k} (file {list(state[k].shape)}, model {list(own[k].shape)})" for k in shapes]
        kinds = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shown))
        details = "; ".join(f"{kind}: {_listed(keys)}" for kind, keys in kinds if keys)
        matching = [k for k in state if k in own and k not in shapes]
        if strict or not matching:
            raise CheckpointError(
                f"Checkpoint '{source}' holds {describe_spec(spec)}, which does not fit the model given "
                f"({type(model).__name__}): {details}. Build the model the checkpoint was saved from "
                "(its model_spec), or pass strict=False to load only the matching tensors"
            )
        logger.warning("Loading %d of %d tensors from '%s'; %s", len(matching), len(own), source, details)
        for key in unexpected + shapes:
            del state[key]
    model.load_state_dict(state, strict=strict)


# ---------------------------------------------------------------- loading


def _is_bare_state_dict(checkpoint: Mapping[str, Any]) -> bool:
    values = checkpoint.values()
    return "model" not in checkpoint and bool(checkpoint) and all(isinstance(v, torch.Tensor) for v in values)


def load_checkpoint(
    path: str | Path,
    to_load: Mapping[str, Any],
    *,
    strict: bool = True,
    expected_model: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Load a checkpoint into live objects, whatever wrapping saved or receives the model.

    Args:
        path: an ember checkpoint, or a bare state_dict file (torchvision's format)
            when ``to_load`` is ``{"model": model}``.
        to_load: objects by checkpoint key, like ``to_save`` of ``attach_checkpoint``
            (a ``CheckpointManager`` continues its rotation). Models may be plain,
            DataParallel, DDP or compiled; the file's keys may carry ``module.`` /
            ``_orig_mod.`` prefixes in any combination.
        strict: refuse a model state that does not fit; ``False`` loads the tensors
            whose names and shapes match and logs the others.
        expected_model: the model_spec the caller builds; a file whose model_spec
            differs is refused.

    Returns:
        The whole checkpoint dict. The global RNG states are restored when
        ``to_load`` holds an engine (a resume).

    Raises:
        CheckpointError: the file is unreadable or does not fit ``to_load``.
    """
    if not isinstance(to_load, Mapping):
        raise ConfigError(
            f"Argument `to_load` should be a mapping of names to objects, got {type(to_load).__name__}"
        )
    path = Path(path).expanduser()
    checkpoint = read_checkpoint(path)
    if _is_bare_state_dict(checkpoint):
        if set(to_load) != {"model"}:
            raise CheckpointError(
                f"'{path}' holds model weights alone (a bare state_dict): load it with "
                f"to_load={{'model': model}}, not {sorted(to_load)}"
            )
        checkpoint = {"model": checkpoint}
    spec = checkpoint.get("model_spec") if isinstance(checkpoint.get("model_spec"), Mapping) else None
    if expected_model is not None and spec is not None and not _same_spec(spec, expected_model):
        raise CheckpointError(
            f"Resuming with a config that changes the model is refused: file has {describe_spec(spec)}, "
            f"config asks {describe_spec(expected_model)} ('{path}')"
        )
    missing = [key for key in to_load if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"Checkpoint '{path}' has no {missing[0]!r} entry; it holds: {', '.join(sorted(checkpoint))}"
        )
    rng = checkpoint.get("rng") if isinstance(checkpoint.get("rng"), Mapping) else {}
    for key, obj in to_load.items():
        _load_one(key, obj, checkpoint[key], path=path, strict=strict, spec=spec, cuda_rng=rng.get("cuda"))
    if rng and any(isinstance(obj, Engine) for obj in to_load.values()):
        set_rng_states(rng)
    return checkpoint


def _load_one(key: str, obj: Any, state: Any, *, path: Path, strict: bool, spec: Any, cuda_rng: Any) -> None:
    # ignite's Checkpoint.load_objects runs this loop too, but unwraps only DP/DDP and
    # reports a bad entry without naming the file: done here with ember's messages.
    if isinstance(obj, nn.Module):
        _load_model_state(unwrap_model(obj), state, strict=strict, source=path, spec=spec)
        return
    try:
        if isinstance(obj, Engine):
            load_engine_state(obj, state, cuda_rng)
        else:
            obj.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as err:
        raise CheckpointError(f"Could not load {key!r} from '{path}': {err}") from err
    if isinstance(obj, torch.optim.Optimizer):
        _check_optimizer_settings(key, obj, path)


def _check_optimizer_settings(key: str, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Refuse the state of another kind of optimizer, before its first step fails on a missing setting.

    ``Optimizer.load_state_dict`` checks only the parameter counts and takes the saved
    settings of each group; after it, every group must have each setting the optimizer
    has defaults for (torch fills in the ones newer than the file itself).
    """
    for group in optimizer.param_groups:
        missing = sorted(set(optimizer.defaults) - set(group))
        if missing:
            raise CheckpointError(
                f"Could not load {key!r} from '{path}': it was saved from another kind of optimizer than "
                f"{type(optimizer).__name__} (its settings lack {', '.join(missing)}). Resume with the "
                "optimizer the run was started with (optimizer.name)"
            )
