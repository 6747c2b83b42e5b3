"""The model registry: ember's own models by name, and torchvision's classifiers."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from ember.errors import ConfigError
from ember.models.alexnet import alexnet
from ember.models.small_cnn import small_cnn

__all__ = ["get_model", "list_models", "register_model"]

logger = logging.getLogger(__name__)

ModelBuilder = Callable[..., nn.Module]

# ember's own models; every torchvision classification model is reachable by name too.
_REGISTRY: dict[str, ModelBuilder] = {
    "alexnet": alexnet,
    "small_cnn": small_cnn,
}


def register_model(name: str, builder: ModelBuilder) -> ModelBuilder:
    """Add a builder ``builder(*, num_classes, in_channels, **kwargs) -> nn.Module``."""
    if name in _REGISTRY:
        raise ConfigError(f"Model {name!r} is already registered")
    _REGISTRY[name] = builder
    return builder


def _torchvision_names() -> list[str]:
    import torchvision.models

    return list(torchvision.models.list_models(module=torchvision.models))


def list_models() -> list[str]:
    """ember's models, then torchvision's classification models (not already listed)."""
    own = sorted(_REGISTRY)
    return own + [name for name in _torchvision_names() if name not in _REGISTRY]


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Give a torchvision model ``in_channels`` inputs by rebuilding its first Conv2d."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_channels:
                    setattr(
                        parent,
                        child_name,
                        nn.Conv2d(
                            in_channels,
                            child.out_channels,
                            kernel_size=child.kernel_size,
                            stride=child.stride,
                            padding=child.padding,
                            dilation=child.dilation,
                            groups=1 if child.groups == 1 else in_channels,
                            bias=child.bias is not None,
                        ),
                    )
                return
    raise ConfigError(f"Cannot set in_channels={in_channels}: the model has no Conv2d layer")


def _torchvision_model(name: str, *, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
    import torchvision.models

    if kwargs.get("weights") is not None:
        raise ConfigError(
            f"Model {name!r}: pretrained `weights` are not downloaded by ember; build with "
            "weights=None and load a checkpoint file with `checkpoint.resume` or load_checkpoint"
        )
    kwargs["weights"] = None
    model = torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def get_model(name: str, *, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build a model by registry name.

    Args:
        name: ``alexnet``, ``small_cnn``, or any torchvision classification model
            (``resnet18``, ``mobilenet_v3_small``, ...), always without downloaded weights.
        num_classes: number of outputs.
        in_channels: input channels (torchvision models get their first conv rebuilt).
        **kwargs: passed to the builder (e.g. ``dropout``, ``width``).

    Returns:
        The model, on the CPU.

    Raises:
        ConfigError: unknown name (the message lists the closest ones) or bad argument.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ConfigError(f"Argument `num_classes` should be a positive integer, got {num_classes!r}")
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ConfigError(f"Argument `in_channels` should be a positive integer, got {in_channels!r}")
    builder = _REGISTRY.get(name)
    if builder is not None:
        try:
            return builder(num_classes=num_classes, in_channels=in_channels, **kwargs)
        except TypeError as err:
            raise ConfigError(f"Model {name!r} does not take these arguments: {err}") from None
        except (ValueError, RuntimeError) as err:  # e.g. a negative width: torch refuses the layer
            raise ConfigError(f"Model {name!r} could not be built with {kwargs}: {err}") from None
    if name in _torchvision_names():
        try:
            return _torchvision_model(name, num_classes=num_classes, in_channels=in_channels, **kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"Model {name!r} could not be built with {kwargs}: {err}") from None
    close = difflib.get_close_matches(str(name), list_models(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(
        f"Unknown model {name!r}.{hint} `ember models` lists all {len(list_models())} models."
    )
