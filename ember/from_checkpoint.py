"""Evaluate and extract features from a finished run: the model is rebuilt from the
checkpoint alone (its ``model_spec`` and ``config``), on whatever machine reads it."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ember.build import build_model
from ember.config import SPLITS, Config, load_config
from ember.data import get_split_loader
from ember.engine import create_evaluator, prepare_model
from ember.errors import CheckpointError, ConfigError
from ember.handlers.checkpoint import load_checkpoint, read_checkpoint
from ember.handlers.feature_store import check_output_path
from ember.handlers.features import extract_features
from ember.handlers.progress import attach_progress
from ember.run_folder import find_checkpoint, is_run_dir, write_text_atomic

__all__ = ["evaluate", "extract", "rebuild"]

logger = logging.getLogger(__name__)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"Unknown split {split!r}: expected one of {', '.join(SPLITS)}")


def rebuild(target: str | os.PathLike, overrides: Sequence[str] = ()) -> tuple[nn.Module, Config, Path]:
    """The model of a run folder's best checkpoint (or of a checkpoint file), ready to use.

    Args:
        target: a run folder (its best checkpoint, else its last) or a checkpoint file.
        overrides: ``key=value`` changes to the stored config (e.g. ``data.root=...``,
            ``trainer.device=cpu``); the model itself always comes from the file.

    Returns:
        ``(model, config, checkpoint_path)``: the model on its device, in eval mode.
    """
    path = find_checkpoint(target, prefer="best")
    checkpoint = read_checkpoint(path)
    spec, stored = checkpoint.get("model_spec"), checkpoint.get("config")
    if not isinstance(spec, dict) or not isinstance(stored, dict):
        raise CheckpointError(
            f"'{path}' has no model_spec/config: it was not written by `ember train`, so the model "
            "cannot be rebuilt from it. Load it into your own model with ember.handlers.load_checkpoint"
        )
    # where the run trained (say, three GPUs) need not exist here: pick this machine's device
    # unless the overrides say otherwise
    here = ["trainer.device=auto", "trainer.parallel=auto", "trainer.device_ids=null"]
    here.append("distributed.nproc_per_node=1")
    config = load_config(stored, [*here, *overrides])
    model = build_model(spec)
    load_checkpoint(path, {"model": model})
    parallel = "none" if config.trainer.parallel == "ddp" else config.trainer.parallel
    model = prepare_model(
        model, device=config.trainer.device, parallel=parallel, device_ids=config.trainer.device_ids
    )
    return model.eval(), config, path


def _split_loader(config: Config, split: str, num_classes: int | None) -> Any:
    d = config.data
    return get_split_loader(
        d.name,
        split=split,
        batch_size=d.eval_batch_size,
        num_workers=d.num_workers,
        root=d.root,
        download=d.download,
        device=config.trainer.device,
        model_num_classes=num_classes,
        **d.options,
    )


def _result_path(target: Path, checkpoint: Path, split: str) -> Path:
    if is_run_dir(target):
        return target / f"evaluation_{split}.json"
    return checkpoint.with_name(f"{checkpoint.stem}.evaluation_{split}.json")


def evaluate(
    target: str | os.PathLike, *, split: str = "test", overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Evaluate a run folder or checkpoint on a split; write and return the metrics.

    The metrics go to ``<run>/evaluation_<split>.json`` (or beside a checkpoint file).
    """
    _check_split(split)
    model, config, path = rebuild(target, overrides)
    loader = _split_loader(config, split, config.model.num_classes)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.trainer.label_smoothing)  # the run's own loss
    evaluator = create_evaluator(model, loss_fn=loss_fn, amp=config.trainer.amp)
    attach_progress(evaluator, {split: evaluator}, log_every=config.trainer.log_every)
    evaluator.run(loader)
    result = {
        "checkpoint": str(path),
        "split": split,
        "samples": len(loader.dataset),
        "metrics": {k: float(v) for k, v in evaluator.state.metrics.items()},
    }
    out = _result_path(Path(target), path, split)
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    logger.info("metrics written to %s", out)
    return result


def extract(
    target: str | os.PathLike,
    *,
    layer: str,
    output: str | os.PathLike,
    split: str = "test",
    pool: str | None = None,
    overwrite: bool = False,
    overrides: Sequence[str] = (),
) -> Path:
    """Write the features of ``layer`` for a split to ``output``.

    ``output`` ending in ``.pt``: one file of tensors (``torch.load(weights_only=True)``);
    otherwise a folder of ``<layer>.npy`` memmaps, ``labels.npy`` and ``indices.npy``,
    streamed as they are computed (memory stays flat however large the split).
    An existing output is refused unless ``overwrite``.
    """
    _check_split(split)
    output = check_output_path(output, overwrite=overwrite)  # before any work
    model, config, _ = rebuild(target, overrides)
    loader = _split_loader(config, split, config.model.num_classes)
    amp = config.trainer.amp
    if output.suffix in (".pt", ".pth"):
        result = extract_features(model, loader, layer, pool=pool, amp=amp)
        return result.save(output, overwrite=overwrite)
    extract_features(model, loader, layer, pool=pool, amp=amp, output=output, overwrite=overwrite)
    return output
