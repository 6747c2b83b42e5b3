"""Checkpoint state conversion: RNG states, engine state and plain data.

Everything saved goes through here so that a checkpoint holds only tensors and plain
Python types, which ``torch.load(path, weights_only=True)`` reads without running
code; everything loaded comes back through here into the live objects.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from ignite.engine import DeterministicEngine, Engine, Events
from torch.utils.data import RandomSampler

from ember.errors import CheckpointError

__all__ = [
    "EngineEntry",
    "RNGEntry",
    "get_rng_states",
    "set_rng_states",
    "load_engine_state",
    "to_plain",
]

logger = logging.getLogger(__name__)

_PLAIN_TYPES = (bool, int, float, str, bytes, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device)


# ---------------------------------------------------------------- RNG states


def _python_to_plain(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_from_plain(plain: Mapping[str, Any]) -> tuple:
    return (int(plain["version"]), tuple(int(v) for v in plain["state"].tolist()), plain["gauss"])


def _numpy_to_plain(state: tuple) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = state
    return {
        "kind": str(kind),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _numpy_from_plain(plain: Mapping[str, Any]) -> tuple:
    keys = plain["keys"].numpy().astype(np.uint32)
    return (plain["kind"], keys, plain["pos"], plain["has_gauss"], plain["cached_gaussian"])


def get_rng_states() -> dict[str, Any]:
    """Python, numpy, torch CPU and (when CUDA was used) every CUDA device's RNG state."""
    states: dict[str, Any] = {
        "python": _python_to_plain(random.getstate()),
        "numpy": _numpy_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    # An uninitialized CUDA RNG was never drawn from; reading it would create a
    # context on every GPU for nothing.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_cuda_states(states: list[torch.Tensor]) -> None:
    if not torch.cuda.is_available():
        logger.info("Checkpoint has CUDA RNG states but this machine has no GPU: not restored")
        return
    count = torch.cuda.device_count()
    if len(states) != count:
        logger.warning("Checkpoint has CUDA RNG states of %d GPUs, %d visible: restoring the common ones",
                       len(states), count)
    for index, state in enumerate(states[:count]):
        torch.cuda.set_rng_state(state, index)


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_states` returned."""
    if "python" in states:
        random.setstate(_python_from_plain(states["python"]))
    if "numpy" in states:
        np.random.set_state(_numpy_from_plain(states["numpy"]))
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if states.get("cuda"):
        _set_cuda_states(states["cuda"])


class RNGEntry:
    """The ``rng`` entry of a checkpoint, as a stateful object ignite's Checkpoint can save."""

    def state_dict(self) -> dict[str, Any]:
        return get_rng_states()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        set_rng_states(state)


# ---------------------------------------------------------------- engine state

# ignite's DeterministicEngine keeps [python, torch, numpy] states, the numpy one an
# ndarray that weights_only loading refuses: they are stored as a dict of tensors.
_IGNITE_RNG_ORDER = ("python", "torch", "numpy")


def _ignite_rng_to_plain(states: list[Any]) -> dict[str, Any]:
    plain: dict[str, Any] = {"python": _python_to_plain(states[0]), "torch": states[1]}
    if len(states) > 2:
        plain["numpy"] = _numpy_to_plain(states[2])
    return plain


def _ignite_rng_from_plain(plain: Mapping[str, Any]) -> list[Any]:
    states = [_python_from_plain(plain["python"]), plain["torch"]]
    if "numpy" in plain:
        states.append(_numpy_from_plain(plain["numpy"]))
    return states


def _loader_parts(data: Any) -> list[Any]:
    """A DataLoader, its sampler and batch sampler, and the samplers they wrap, in a fixed order."""
    parts: list[Any] = []
    queue = [data]
    while queue:
        obj = queue.pop(0)
        if obj is not None and all(obj is not p for p in parts):
            parts.append(obj)
            queue += [getattr(obj, "sampler", None), getattr(obj, "batch_sampler", None)]
    return parts


def _data_generators(data: Any) -> list[torch.Generator]:
    """The torch.Generators a DataLoader and its (batch) samplers shuffle with."""
    found: list[torch.Generator] = []
    for part in _loader_parts(data):
        generator = getattr(part, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def _shuffles_with_global_rng(data: Any) -> bool:
    """Whether the order is drawn from the global RNG lazily, at the first batch."""
    if getattr(data, "num_workers", 1) > 0:
        return False  # drawn in iter(), before ignite restores the RNG: replayed exactly
    return any(isinstance(p, RandomSampler) and p.generator is None for p in _loader_parts(data))


# Keys ember adds to an engine's state_dict; Engine.load_state_dict must not see them
# (it refuses "epoch" next to "iteration").
_ENGINE_EXTRA_KEYS = ("epoch", "seed", "dataloader_rng")


class EngineEntry:
    """An engine's state as plain data, plus what an exact mid-epoch resume needs.

    Beyond ``engine.state_dict()`` it keeps the epoch (for people reading the file),
    DeterministicEngine's seed (ignite draws a new one at every ``run``), and the
    state of the data loader's shuffling generator at the start of the current
    epoch: DeterministicEngine replays an epoch's order from the loader, and a loader
    with its own ``torch.Generator`` draws that order from the generator, not from
    the global RNG that ignite reseeds.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._epoch_start: list[torch.Tensor] = []
        engine.add_event_handler(Events.EPOCH_STARTED, self._snapshot)

    def _snapshot(self, engine: Engine) -> None:
        self._epoch_start = [g.get_state() for g in _data_generators(engine.state.dataloader)]

    def state_dict(self) -> dict[str, Any]:
        engine = self.engine
        state = dict(engine.state_dict())
        if state.get("rng_states") is not None:
            state["rng_states"] = _ignite_rng_to_plain(state["rng_states"])
        state["epoch"] = engine.state.epoch
        if getattr(engine.state, "seed", None) is not None:
            state["seed"] = int(engine.state.seed)
        length = engine.state.epoch_length
        at_epoch_end = length is not None and engine.state.iteration % length == 0
        if at_epoch_end or not self._epoch_start:
            # the next epoch draws its order from the generators as they are now
            state["dataloader_rng"] = [g.get_state() for g in _data_generators(engine.state.dataloader)]
        else:
            state["dataloader_rng"] = list(self._epoch_start)
        return state


class _ResumeHooks:
    """Finish restoring an engine once ``run`` has set it up (ignite resets some state there)."""

    def __init__(self, engine: Engine, seed: int | None, data_rng: list[torch.Tensor] | None,
                 mid_epoch: bool) -> None:
        self.seed, self.data_rng, self.mid_epoch, self.done = seed, data_rng, mid_epoch, False
        # after DeterministicEngine's own STARTED handler, which draws a new seed
        engine.add_event_handler(Events.STARTED, self._on_started)

    def _on_started(self, engine: Engine) -> None:
        if self.done:
            return
        self.done = True
        if self.seed is not None and isinstance(engine, DeterministicEngine):
            engine.state.seed = self.seed
        if self.data_rng:
            generators = _data_generators(engine.state.dataloader)
            if len(generators) != len(self.data_rng):
                logger.warning("Checkpoint has %d data loader generator states, the loader has %d: the "
                               "data order after resuming may differ", len(self.data_rng), len(generators))
            for generator, state in zip(generators, self.data_rng):
                generator.set_state(state)
        if self.mid_epoch and _shuffles_with_global_rng(engine.state.dataloader):
            logger.warning(
                "Resuming mid-epoch with a DataLoader that shuffles from the global RNG in the main "
                "process: ignite cannot replay that epoch's order exactly. Give the DataLoader "
                "generator=torch.Generator().manual_seed(seed) (or num_workers > 0)"
            )


def load_engine_state(engine: Engine, state: Mapping[str, Any], cuda_rng: list[torch.Tensor] | None) -> None:
    """Load an :class:`EngineEntry` state into ``engine`` so that ``engine.run(data)`` resumes exactly.

    Raises:
        ValueError: ignite refuses the state.
    """
    state = dict(state)
    extras = {key: state.pop(key, None) for key in _ENGINE_EXTRA_KEYS}
    if isinstance(state.get("rng_states"), Mapping):
        state["rng_states"] = _ignite_rng_from_plain(state["rng_states"])
    for key in engine.state_dict_user_keys:
        state.setdefault(key, None)
    engine.load_state_dict(state)
    length = engine.state.epoch_length
    mid_epoch = length is not None and engine.state.iteration % length != 0
    _ResumeHooks(engine, extras["seed"], extras["dataloader_rng"], mid_epoch)
    if mid_epoch and not isinstance(engine, DeterministicEngine):
        logger.warning(
            "Resuming a plain Engine mid-epoch (iteration %d) restarts the data of that epoch: build the "
            "trainer with deterministic=True for an exact resume", engine.state.iteration,
        )
    if mid_epoch and cuda_rng and torch.cuda.is_available():
        # DeterministicEngine restores the CPU RNGs mid-epoch, not CUDA's, and its
        # reseeding at the epoch start resets CUDA's: restore it right before the step.
        event = Events.ITERATION_STARTED(once=engine.state.iteration + 1)
        engine.add_event_handler(event, lambda _: _set_cuda_states(cuda_rng))


# ---------------------------------------------------------------- plain data


def to_plain(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` with numpy arrays as tensors and numpy scalars as Python numbers.

    Raises:
        CheckpointError: something else that ``weights_only`` loading cannot read.
    """
    if isinstance(obj, np.generic):  # before the plain types: np.float64 is a float subclass
        return obj.item()
    if isinstance(obj, _PLAIN_TYPES):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, Mapping):
        out = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for key, value in obj.items():
            out[key] = to_plain(value, f"{where}.{key}")
        if hasattr(obj, "_metadata"):  # module state_dict versions, used by load_state_dict
            out._metadata = obj._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(obj, (list, tuple)):
        items = [to_plain(value, f"{where}[{i}]") for i, value in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise CheckpointError(
        f"Checkpoint entry '{where}' is a {type(obj).__name__}, which torch.load(weights_only=True) "
        "cannot read: keep only tensors, numbers, strings, lists and dicts in state_dicts and `extra`"
    )
