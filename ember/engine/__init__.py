"""Engines from process functions, devices and parallel wrappers."""

from ember.engine.device import PARALLEL_MODES, prepare_model, resolve_device, unwrap_model
from ember.engine.engines import METRIC_NAMES, build_metrics, create_evaluator, create_trainer
from ember.engine.steps import (
    AMP_MODES,
    amp_dtype,
    autocast,
    default_prepare_batch,
    eval_step,
    make_grad_scaler,
    model_device,
    train_step,
)

__all__ = [
    "AMP_MODES",
    "amp_dtype",
    "autocast",
    "default_prepare_batch",
    "METRIC_NAMES",
    "PARALLEL_MODES",
    "build_metrics",
    "create_evaluator",
    "create_trainer",
    "eval_step",
    "make_grad_scaler",
    "model_device",
    "prepare_model",
    "resolve_device",
    "train_step",
    "unwrap_model",
]
