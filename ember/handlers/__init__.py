"""Handlers attached to ignite events: checkpoints and resume, interruption, feature
extraction, TensorBoard, console progress and run records."""

from ember.handlers.checkpoint import (
    CheckpointManager,
    attach_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
)
from ember.handlers.feature_store import FeatureResult, export_projector
from ember.handlers.features import (
    FeatureExtractor,
    build_extractor,
    extract_features,
    get_submodule,
    list_layers,
)
from ember.handlers.interrupt import InterruptHandler, attach_interrupt
from ember.handlers.progress import attach_progress
from ember.handlers.records import BestValue, RunRecorder
from ember.handlers.tensorboard import attach_tensorboard, log_hparams

__all__ = [
    "BestValue",
    "CheckpointManager",
    "FeatureExtractor",
    "FeatureResult",
    "InterruptHandler",
    "RunRecorder",
    "attach_checkpoint",
    "attach_interrupt",
    "attach_progress",
    "attach_tensorboard",
    "build_extractor",
    "export_projector",
    "extract_features",
    "get_submodule",
    "latest_checkpoint",
    "list_layers",
    "load_checkpoint",
    "log_hparams",
    "read_checkpoint",
]
