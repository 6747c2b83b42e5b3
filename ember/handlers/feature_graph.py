"""What to compute for a layer: its path in the plain model, and a network pruned after it.

Layers are named by dotted paths in the plain model (``"features"``, ``"classifier.4"``)
under any wrapper. :func:`build_extractor` computes only what the layers need:
torchvision's FX ``create_feature_extractor`` prunes the network after them, and for
models FX cannot trace (data-dependent control flow) forward hooks stop the forward
once the last layer has run. Outputs are copied when anything runs after them, so an
in-place activation that follows a layer (AlexNet's ``ReLU(inplace=True)``) cannot
change what was recorded. Under DataParallel the pruned module is itself wrapped in
``nn.DataParallel`` with the model's ``device_ids``.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from ember.engine import unwrap_model
from ember.errors import ConfigError

__all__ = [
    "EXTRACT_METHODS",
    "POOL_MODES",
    "build_extractor",
    "check_layers",
    "check_pool",
    "find_data_parallel",
    "get_submodule",
    "list_layers",
    "modes_kept",
    "pooled",
]

logger = logging.getLogger(__name__)

POOL_MODES = (None, "flatten", "avg")
EXTRACT_METHODS = ("auto", "fx", "hooks")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def list_layers(model: nn.Module) -> list[str]:
    """Dotted paths of every sub-module of the plain model (under any wrapper), in order."""
    return [name for name, _ in unwrap_model(model).named_modules() if name]


def _canonical_layer(plain: nn.Module, path: Any) -> str:
    if not isinstance(path, str) or not path:
        raise ConfigError(
            f"A layer should be a dotted sub-module path such as 'features' or 'classifier.4', got {path!r}"
        )
    name = path
    while True:
        with contextlib.suppress(AttributeError):
            plain.get_submodule(name)
            if name != path:
                logger.info("layer %r: wrapper prefixes are not needed, using %r", path, name)
            return name
        prefix = next((p for p in _WRAPPER_PREFIXES if name.startswith(p)), None)
        if prefix is None:
            break
        name = name[len(prefix) :]
    names = list_layers(plain)
    close = difflib.get_close_matches(path, names, n=3, cutoff=0.4) or [n for n in names if "." not in n]
    raise ConfigError(
        f"Layer {path!r} is not a sub-module of {type(plain).__name__}. "
        f"Closest: {', '.join(map(repr, close[:3]))}. "
        f"Hint: `ember.handlers.list_layers(model)` lists all {len(names)}."
    )


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """The sub-module at a dotted path of the plain model, under any wrapper.

    ``get_submodule(nn.DataParallel(alexnet), "features")`` is ``alexnet.features``;
    the same holds under DDP and ``torch.compile``.

    Args:
        model: a module, possibly wrapped.
        path: dotted path as in ``named_modules()``: ``"features"``, ``"classifier.4"``.

    Raises:
        ConfigError: no such sub-module; the message names the closest ones.
    """
    plain = unwrap_model(model)
    return plain.get_submodule(_canonical_layer(plain, path))


def check_layers(plain: nn.Module, layers: str | Sequence[str]) -> list[str]:
    """The layer paths as a list, each checked to be a sub-module of ``plain``."""
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, Sequence) or not layers:
        raise ConfigError(f"Argument `layers` should be a layer path or a list of them, got {layers!r}")
    return list(dict.fromkeys(_canonical_layer(plain, layer) for layer in layers))


def check_pool(pool: str | None) -> str | None:
    """``pool`` if it is one of :data:`POOL_MODES`, else a ConfigError."""
    if pool not in POOL_MODES:
        raise ConfigError(f"Argument `pool` should be one of None, 'flatten', 'avg', got {pool!r}")
    return pool


def pooled(layer: str, value: Any, pool: str | None, *, copy: bool) -> torch.Tensor:
    """Check that a layer gave a tensor, pool it, and copy it when ``copy`` (unless pooling did)."""
    if not isinstance(value, torch.Tensor):
        raise ConfigError(
            f"Layer {layer!r} returns a {type(value).__name__}, not a tensor; pick a layer whose "
            "output is one tensor (`ember.handlers.list_layers(model)` lists them)"
        )
    if pool == "avg" and value.dim() == 4:
        return value.mean(dim=(2, 3))  # a new tensor: nothing later can change it
    if pool == "flatten" and value.dim() > 2:
        value = value.flatten(1)
    return value.clone() if copy else value


class _Untraceable(Exception):
    """FX cannot give this layer's output; forward hooks will."""


class _StopForward(BaseException):
    """Raised by the last hook: nothing after the requested layers needs computing.

    A BaseException, so that a model's own ``except Exception`` cannot swallow it.
    """


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Give every sub-module back its own train/eval mode (``model.train(mode)`` sets them all)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _copy_if_tensor(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


@functools.cache
def _output_tracer() -> type:
    """torchvision's tracer, also recording what each target module returns (first call).

    Built on first use: importing torchvision costs most of a second that a run
    without feature extraction need not pay.
    """
    from torchvision.models import feature_extraction

    class OutputTracer(feature_extraction.NodePathTracer):
        def __init__(self, targets: Sequence[str], **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.targets = set(targets)
            self.outputs: dict[str, Any] = {}

        def call_module(self, m: nn.Module, forward: Callable, args: Any, kwargs: Any) -> Any:
            out = super().call_module(m, forward, args, kwargs)
            name = self.path_of_module(m)
            if name in self.targets:
                self.outputs.setdefault(name, out)
            return out

    return OutputTracer


def _tracer_kwargs() -> dict[str, Any]:
    # torchvision's own defaults (torchvision.ops as leaves), so that our trace names
    # nodes exactly as create_feature_extractor's does
    from torchvision.models import feature_extraction

    defaults = getattr(feature_extraction, "_set_default_tracer_kwargs", None)
    return defaults(None) if defaults is not None else {}


def _node_names(plain: nn.Module, layers: Sequence[str]) -> dict[str, str]:
    """Each layer's FX node name: the node its forward returns (not just its last op)."""
    tracer = _output_tracer()(layers, **_tracer_kwargs())
    try:
        tracer.trace(plain.eval())
    except Exception as err:  # FX raises TraceError, TypeError, NotImplementedError, ...
        raise _Untraceable(f"{type(err).__name__}: {err}") from err
    names = {}
    for layer in layers:
        out = tracer.outputs.get(layer)
        if out is None:
            raise _Untraceable(f"layer {layer!r} is not a node of the traced graph")
        if not isinstance(out, fx.Proxy):
            pooled(layer, out, None, copy=False)  # raises: not a tensor
        names[layer] = tracer.node_to_qualname[out.node]
    return names


def _copy_outputs_used_later(graph: fx.Graph) -> None:
    """Clone each returned node that is followed by other ops (they may write in place)."""
    nodes = list(graph.nodes)
    output = next(node for node in nodes if node.op == "output")
    position = {node: i for i, node in enumerate(nodes)}
    ops = [i for i, node in enumerate(nodes) if node.op in ("call_module", "call_function", "call_method")]
    last = max(ops, default=-1)
    copies: dict[fx.Node, fx.Node] = {}
    returned = output.args[0]
    for node in returned.values():
        if position[node] < last and node not in copies:
            with graph.inserting_after(node):
                copies[node] = graph.call_function(_copy_if_tensor, (node,))
    output.args = ({key: copies.get(node, node) for key, node in returned.items()},)
    graph.lint()


class _FxExtractor(nn.Module):
    """The network pruned after the requested layers: ``x -> {layer: output}``."""

    method = "fx"

    def __init__(self, body: fx.GraphModule, nodes: Mapping[str, str], pool: str | None) -> None:
        super().__init__()
        self.body = body
        self.nodes = dict(nodes)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.body(x)
        return {layer: pooled(layer, out[node], self.pool, copy=False) for layer, node in self.nodes.items()}


def _fx_extractor(plain: nn.Module, layers: Sequence[str], pool: str | None) -> _FxExtractor:
    nodes = _node_names(plain, layers)
    try:
        from torchvision.models.feature_extraction import create_feature_extractor

        body = create_feature_extractor(
            plain,
            return_nodes=sorted(set(nodes.values())),
            tracer_kwargs=_tracer_kwargs(),
            suppress_diff_warning=True,
        )
    except Exception as err:  # tracing errors come in many types, as above
        raise _Untraceable(f"{type(err).__name__}: {err}") from err
    body.eval()
    for graph in (body.train_graph, body.eval_graph):
        _copy_outputs_used_later(graph)
    body.recompile()
    return _FxExtractor(body, nodes, pool)


class _HookState:
    """Shared by a hook extractor and its DataParallel replicas (one thread each)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.handles: list[Any] = []
        self.local = threading.local()  # each thread's capture: replicas keep their chunks apart


class _HookExtractor(nn.Module):
    """Runs the whole model with forward hooks on the layers, stopping after the last one.

    The hooks are on the model only while this module's forward runs, so nothing is
    left on it afterwards and the model's own forward calls are never affected.
    """

    method = "hooks"

    def __init__(self, plain: nn.Module, layers: Sequence[str], pool: str | None) -> None:
        super().__init__()
        self.model = plain
        self.layers = list(layers)
        self.pool = pool
        self._state = _HookState()

    def _record(self, layer: str, module: nn.Module, args: Any, output: Any) -> None:
        capture = getattr(self._state.local, "capture", None)
        if capture is None or layer in capture:
            return
        last = len(capture) == len(self.layers) - 1
        capture[layer] = pooled(layer, output, self.pool, copy=not last)
        if last:
            raise _StopForward

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self._state
        with state.lock:
            if state.running == 0:
                modules = [self.model.get_submodule(layer) for layer in self.layers]
                state.handles = [
                    module.register_forward_hook(functools.partial(self._record, layer))
                    for module, layer in zip(modules, self.layers)
                ]
            state.running += 1
        state.local.capture = capture = {}
        try:
            self.model(x)
        except _StopForward:
            pass
        finally:
            state.local.capture = None
            with state.lock:
                state.running -= 1
                if state.running == 0:
                    for handle in state.handles:
                        handle.remove()
        missing = [layer for layer in self.layers if layer not in capture]
        if missing:
            raise ConfigError(
                f"Layer(s) {', '.join(map(repr, missing))} gave no output: "
                f"{type(self.model).__name__}.forward never calls them"
            )
        return {layer: capture[layer] for layer in self.layers}


def find_data_parallel(model: nn.Module) -> nn.DataParallel | None:
    """The DataParallel wrapper in a nest of wrappers (DDP, torch.compile), if any."""
    while True:
        if isinstance(model, nn.DataParallel):
            return model
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return None


def _parallel_like(model: nn.Module, extractor: nn.Module) -> nn.Module:
    # Under DDP each rank extracts its own shard (nothing to sync, so no DDP wrapper);
    # a compiled model's extractor is not recompiled: one pass rarely pays for compiling.
    wrapper = find_data_parallel(model)
    if wrapper is None:
        return extractor
    # Split the pruned module over the model's GPUs, rather than calling it through
    # `.module` on the first GPU only.
    return nn.DataParallel(
        extractor,
        device_ids=list(wrapper.device_ids) or None,
        output_device=getattr(wrapper, "output_device", None),
        dim=getattr(wrapper, "dim", 0),
    )


def build_extractor(
    model: nn.Module,
    layers: str | Sequence[str],
    *,
    pool: str | None = None,
    method: str = "auto",
) -> nn.Module:
    """A module that computes only what the layers need: ``x -> {layer: output}``.

    Args:
        model: a module, plain or wrapped (DataParallel, DDP, ``torch.compile``).
        layers: dotted sub-module paths of the plain model.
        pool: None, ``"flatten"`` (``(N, -1)``) or ``"avg"`` (mean over H and W of 4-D
            outputs; other outputs unchanged).
        method: ``"fx"`` (prune with torchvision's ``create_feature_extractor``),
            ``"hooks"`` (run the model, stop after the last layer) or ``"auto"`` (FX,
            hooks when the model cannot be traced, e.g. data-dependent ``if``). A
            module called more than once per forward gives its first call's output.

    Returns:
        The extractor, sharing the model's parameters; ``nn.DataParallel`` with the
        model's ``device_ids`` when the model is. Its plain module has ``method``:
        "fx" or "hooks" (hooks are on the model only while the extractor runs).
    """
    plain = unwrap_model(model)
    names = check_layers(plain, layers)
    pool = check_pool(pool)
    if method not in EXTRACT_METHODS:
        raise ConfigError(f"Argument `method` should be one of auto, fx, hooks, got {method!r}")
    extractor: nn.Module | None = None
    if method != "hooks":
        try:
            with modes_kept(plain):
                extractor = _fx_extractor(plain, names, pool)
        except _Untraceable as err:
            if method == "fx":
                raise ConfigError(
                    f"FX cannot trace {type(plain).__name__} ({err}); use method='hooks' or 'auto'"
                ) from None
            logger.info("FX cannot trace %s (%s): using forward hooks", type(plain).__name__, err)
    if extractor is None:
        extractor = _HookExtractor(plain, names, pool)
    return _parallel_like(model, extractor)
