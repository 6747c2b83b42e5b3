"""ember: training and evaluation of image classifiers on pytorch-ignite.

The public API is re-exported here lazily, so that ``import ember`` (and the
``ember --help`` command line) does not pay for importing torch until a name that
needs it is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "resolve_device": "ember.engine",
    "prepare_model": "ember.engine",
    "unwrap_model": "ember.engine",
    "train_step": "ember.engine",
    "eval_step": "ember.engine",
    "create_trainer": "ember.engine",
    "create_evaluator": "ember.engine",
    "get_model": "ember.models",
    "list_models": "ember.models",
    "get_dataset": "ember.data",
    "get_loaders": "ember.data",
    "list_datasets": "ember.data",
    "attach_checkpoint": "ember.handlers",
    "load_checkpoint": "ember.handlers",
    "read_checkpoint": "ember.handlers",
    "attach_interrupt": "ember.handlers",
    "extract_features": "ember.handlers",
    "FeatureExtractor": "ember.handlers",
    "FeatureResult": "ember.handlers",
    "export_projector": "ember.handlers",
    "get_submodule": "ember.handlers",
    "list_layers": "ember.handlers",
    "attach_tensorboard": "ember.handlers",
    "log_hparams": "ember.handlers",
    "attach_progress": "ember.handlers",
    "RunRecorder": "ember.handlers",
    "load_config": "ember.config",
    "Config": "ember.config",
    "run": "ember.experiment",
    "EmberError": "ember.errors",
    "ConfigError": "ember.errors",
    "DeviceError": "ember.errors",
    "DataError": "ember.errors",
    "CheckpointError": "ember.errors",
    "RunInterrupted": "ember.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ember' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
