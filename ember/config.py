"""The typed experiment config: dataclasses, loaded from YAML and ``key=value`` overrides.

``Config()`` itself is the built-in default experiment (small_cnn on digits);
``configs/digits.yaml`` spells out the same values. Unknown keys, wrong types and
out-of-range values are rejected before any work starts, with the full dotted key in
the message. Only omegaconf and yaml are imported here: the CLI's ``--help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ember.errors import ConfigError

__all__ = [
    "Config",
    "ModelConfig",
    "DataConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "TrainerConfig",
    "CheckpointConfig",
    "EarlyStoppingConfig",
    "TensorboardConfig",
    "FeaturesConfig",
    "DistributedConfig",
    "load_config",
    "config_to_dict",
    "OPTIMIZERS",
    "SCHEDULERS",
]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "step", "cosine", "warmup_cosine", "linear_warmup")
AMP = (None, "bf16", "fp16")
PARALLEL = ("auto", "none", "dp", "ddp")
SPLITS = ("train", "val", "test")
BACKENDS = (None, "gloo", "nccl")
POOLS = (None, "avg", "flatten")
METRICS = ("accuracy", "loss")  # what the evaluators compute; checkpoint.metric picks one


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    num_classes: int | None = 10  # null: take it from the data set
    in_channels: int | None = None  # null: take it from the data set
    kwargs: dict[str, Any] = field(default_factory=dict)  # builder options (dropout, width, ...)


@dataclass
class DataConfig:
    name: str = "digits"
    root: str | None = None
    download: bool = False
    batch_size: int = 64  # per process
    eval_batch_size: int = 256
    num_workers: int = 0
    train_eval_size: int = 1000  # samples of the train split evaluated each epoch (0: none)
    options: dict[str, Any] = field(default_factory=dict)  # data-set options (image_size, length, ...)


@dataclass
class OptimizerConfig:
    name: str = "adam"
    lr: float = 1.0e-3
    weight_decay: float = 4.0e-4
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    fused: bool = False  # fused Adam/AdamW kernel: faster steps, not bitwise equal to the plain one


@dataclass
class SchedulerConfig:
    name: str = "none"
    step_size: int = 10  # epochs between decays (step)
    gamma: float = 0.1  # decay factor (step)
    warmup_epochs: int = 0  # linear warm-up length (warmup_cosine, linear_warmup)
    min_lr: float = 0.0  # final lr (cosine, warmup_cosine)


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    device: str = "auto"
    parallel: str = "auto"
    device_ids: list[int] | None = None
    amp: str | None = None
    grad_accum: int = 1
    clip_grad_norm: float | None = None
    deterministic: bool = True
    log_every: int = 50
    label_smoothing: float = 0.0
    channels_last: bool = False
    compile: bool = False
    sync_batchnorm: bool = False
    threads: int | None = None  # torch CPU threads per process (null: torch's default)


@dataclass
class CheckpointConfig:
    metric: str = "accuracy"
    n_saved: int = 2
    every_iters: int | None = None
    resume: str | None = None


@dataclass
class EarlyStoppingConfig:
    patience: int | None = None  # evaluations without improvement of checkpoint.metric


@dataclass
class TensorboardConfig:
    enabled: bool = True
    histograms: bool = False


@dataclass
class FeaturesConfig:
    layer: str | None = None
    split: str = "test"
    pool: str | None = "avg"


@dataclass
class DistributedConfig:
    backend: str | None = None  # null: nccl with GPUs, gloo without
    nproc_per_node: int = 1


@dataclass
class Config:
    name: str = "digits-cnn"
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    tensorboard: TensorboardConfig = field(default_factory=TensorboardConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            full = f"{prefix}{key}"
            keys.append(full)
            keys.extend(_all_keys(node._get_node(key), f"{full}."))
    return keys


def _unknown_key_error(err: ConfigKeyError, source: str) -> ConfigError:
    key = err.full_key or str(getattr(err, "key", "?"))
    close = difflib.get_close_matches(key, _all_keys(OmegaConf.structured(Config)), n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else " `ember train --help` shows the sections."
    return ConfigError(f"Unknown config key '{key}' ({source}).{hint}")


def _type_error(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = err.full_key or "?"
    detail = str(getattr(err, "msg", "") or err).splitlines()[0]
    if detail.startswith("Incompatible value 'None'"):  # `name=` reads as null
        detail = "it cannot be null (an empty value after '=' reads as null)"
    return ConfigError(f"Invalid value for config key '{key}' ({source}): {detail}")


def _section_fields(node: Any) -> list[str] | None:
    """The keys of a config section (a dataclass node), or None for any other node."""
    kind = getattr(getattr(node, "_metadata", None), "object_type", None)
    if isinstance(node, DictConfig) and dataclasses.is_dataclass(kind):
        return [f.name for f in dataclasses.fields(kind)]
    return None


def _check_sections(base: DictConfig, layer: Any, source: str, prefix: str = "") -> None:
    """Refuse a plain value given where a section belongs (``trainer=3``, ``model=alexnet``)."""
    if not isinstance(layer, DictConfig):
        return
    for key in layer.keys():
        if key not in base:
            continue  # an unknown key: the merge names it
        fields = _section_fields(base._get_node(key))
        value = layer._get_node(key)
        if fields is None:
            continue
        if isinstance(value, DictConfig):
            _check_sections(base._get_node(key), value, source, f"{prefix}{key}.")
            continue
        shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value._value()
        full = f"{prefix}{key}"
        hint = f" Did you mean {full}.name={shown}?" if "name" in fields and isinstance(shown, str) else ""
        raise ConfigError(
            f"Invalid config ({source}): config key '{full}' is a section ({', '.join(fields)}), "
            f"not a value; got {shown!r}. Set its keys one by one, e.g. {full}.{fields[0]}=<value>.{hint}"
        )


def _merge(base: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    _check_sections(base, layer, source)
    try:
        return OmegaConf.merge(base, layer)
    except ConfigKeyError as err:
        raise _unknown_key_error(err, source) from None
    except OmegaConfBaseException as err:
        if err.full_key is None:  # e.g. `trainer=3`: a section replaced by a scalar
            raise ConfigError(f"Invalid config ({source}): {str(err).splitlines()[0]}") from None
        raise _type_error(err, source) from None


def _read_yaml(path: Path) -> DictConfig:
    if not path.exists():
        raise ConfigError(f"Config file '{path}' does not exist")
    if path.is_dir():
        raise ConfigError(f"Config file '{path}' is a folder; give a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)  # safe loader: no Python objects from YAML tags
    except UnicodeDecodeError:
        raise ConfigError(f"Config file '{path}' is not a text (YAML) file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"YAML syntax error in '{path}'{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config file '{path}' should hold a mapping of sections (model:, data:, ...), "
            f"got a YAML {type(data).__name__}"
        )
    return _to_omegaconf(data, f"file '{path}'")


def _to_omegaconf(data: Mapping[str, Any], source: str) -> DictConfig:
    try:
        return OmegaConf.create(dict(data))
    except OmegaConfBaseException as err:
        raise ConfigError(f"Invalid config ({source}): {str(err).splitlines()[0]}") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    return str(getattr(err, "problem", None) or str(err).splitlines()[0])


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    layer = OmegaConf.create({})
    for item in overrides:
        if not isinstance(item, str) or "=" not in item or item.startswith("="):
            raise ConfigError(f"Override {item!r} should be written key=value (e.g. trainer.max_epochs=5)")
        key = item.split("=", 1)[0]
        if any(not part.strip() for part in key.split(".")):
            raise ConfigError(
                f"Override {item!r}: key {key!r} has an empty part; write dotted keys (trainer.max_epochs)"
            )
        try:
            layer = OmegaConf.merge(layer, OmegaConf.from_dotlist([item]))
        except yaml.YAMLError as err:  # the value is read as YAML
            raise ConfigError(
                f"Override {item!r}: its value is not valid YAML ({_yaml_problem(err)}); quote a string "
                "value, write lists as [0,1]"
            ) from None
        except (OmegaConfBaseException, TypeError) as err:  # e.g. a list given keys by a later override
            raise ConfigError(f"Invalid override {item!r}: {str(err).splitlines()[0]}") from None
    return layer


def load_config(
    source: str | Path | Mapping[str, Any] | Config | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """Build a validated :class:`Config`.

    Args:
        source: a YAML path, a (nested) dict, a ``Config``, or ``None`` for the
            built-in default (small_cnn on digits).
        overrides: ``key=value`` strings with dotted keys; values are YAML
            (``trainer.device_ids=[0,1]``, ``trainer.amp=null``).

    Returns:
        The config, every value type-checked and range-checked.

    Raises:
        ConfigError: unknown key (with the nearest valid one), wrong type, value out
            of range, unreadable YAML (with file and line).
    """
    merged = OmegaConf.structured(Config)
    if isinstance(source, Config):
        merged = _merge(merged, OmegaConf.structured(source), "config object")
    elif isinstance(source, Mapping):
        merged = _merge(merged, _to_omegaconf(source, "dict"), "dict")
    elif source is not None:
        path = Path(source)
        merged = _merge(merged, _read_yaml(path), f"file '{path}'")
    if overrides:
        merged = _merge(merged, _parse_overrides(overrides), "command line")
    config: Config = OmegaConf.to_object(merged)
    validate(config)
    return config


def config_to_dict(config: Config) -> dict[str, Any]:
    """The config as plain nested dicts/lists/scalars (for YAML, JSON and checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"Config key '{key}' should be {expected}, got {value!r}")


def _one_of(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        shown = ", ".join("null" if c is None else str(c) for c in choices)
        close = difflib.get_close_matches(str(value), [str(c) for c in choices if c], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"Config key '{key}' should be one of {shown}, got {value!r}.{hint}")


def validate(config: Config) -> None:
    """Range and choice checks that types alone cannot express."""
    c = config
    separators = {"/", "\0", os.sep} | ({os.altsep} if os.altsep else set())
    _check(  # the run folder is <output_dir>/<name>/...: a name must not leave output_dir
        bool(c.name.strip()) and not separators & set(c.name) and c.name not in (".", ".."),
        "name",
        "a non-empty run name without '/' (a single folder name, not a path)",
        c.name,
    )
    _check(c.seed >= 0, "seed", "a non-negative integer", c.seed)
    _check(bool(c.output_dir.strip()), "output_dir", "a folder path", c.output_dir)
    _check(
        c.model.num_classes is None or c.model.num_classes >= 1,
        "model.num_classes",
        "a positive integer or null",
        c.model.num_classes,
    )
    _check(
        c.model.in_channels is None or c.model.in_channels >= 1,
        "model.in_channels",
        "a positive integer or null",
        c.model.in_channels,
    )
    _check(c.data.batch_size >= 1, "data.batch_size", "at least 1", c.data.batch_size)
    _check(c.data.eval_batch_size >= 1, "data.eval_batch_size", "at least 1", c.data.eval_batch_size)
    _check(c.data.num_workers >= 0, "data.num_workers", "at least 0", c.data.num_workers)
    _check(c.data.train_eval_size >= 0, "data.train_eval_size", "at least 0", c.data.train_eval_size)
    _one_of("optimizer.name", c.optimizer.name, OPTIMIZERS)
    _check(c.optimizer.lr > 0, "optimizer.lr", "a positive number", c.optimizer.lr)
    _check(c.optimizer.weight_decay >= 0, "optimizer.weight_decay", "at least 0", c.optimizer.weight_decay)
    _check(c.optimizer.momentum >= 0, "optimizer.momentum", "at least 0", c.optimizer.momentum)
    _one_of("scheduler.name", c.scheduler.name, SCHEDULERS)
    _check(c.scheduler.step_size >= 1, "scheduler.step_size", "at least 1", c.scheduler.step_size)
    _check(0 < c.scheduler.gamma <= 1, "scheduler.gamma", "in (0, 1]", c.scheduler.gamma)
    _check(c.scheduler.warmup_epochs >= 0, "scheduler.warmup_epochs", "at least 0", c.scheduler.warmup_epochs)
    _check(c.scheduler.min_lr >= 0, "scheduler.min_lr", "at least 0", c.scheduler.min_lr)
    t = c.trainer
    _check(t.max_epochs >= 1, "trainer.max_epochs", "at least 1", t.max_epochs)
    _one_of("trainer.parallel", t.parallel, PARALLEL)
    _one_of("trainer.amp", t.amp, AMP)
    _check(t.grad_accum >= 1, "trainer.grad_accum", "at least 1", t.grad_accum)
    _check(
        t.clip_grad_norm is None or t.clip_grad_norm > 0,
        "trainer.clip_grad_norm",
        "a positive number or null",
        t.clip_grad_norm,
    )
    _check(t.threads is None or t.threads >= 1, "trainer.threads", "a positive integer or null", t.threads)
    _check(t.log_every >= 1, "trainer.log_every", "at least 1", t.log_every)
    _check(0 <= t.label_smoothing < 1, "trainer.label_smoothing", "in [0, 1)", t.label_smoothing)
    _check(
        t.device_ids is None or (len(t.device_ids) > 0 and min(t.device_ids) >= 0),
        "trainer.device_ids",
        "a non-empty list of GPU ids or null",
        t.device_ids,
    )
    _one_of("checkpoint.metric", c.checkpoint.metric, METRICS)
    _check(c.checkpoint.n_saved >= 1, "checkpoint.n_saved", "at least 1", c.checkpoint.n_saved)
    _check(
        c.checkpoint.every_iters is None or c.checkpoint.every_iters >= 1,
        "checkpoint.every_iters",
        "a positive integer or null",
        c.checkpoint.every_iters,
    )
    _check(
        c.early_stopping.patience is None or c.early_stopping.patience >= 1,
        "early_stopping.patience",
        "a positive integer or null",
        c.early_stopping.patience,
    )
    _one_of("features.split", c.features.split, SPLITS)
    _one_of("features.pool", c.features.pool, POOLS)
    _one_of("distributed.backend", c.distributed.backend, BACKENDS)
    _check(
        c.distributed.nproc_per_node >= 1,
        "distributed.nproc_per_node",
        "at least 1",
        c.distributed.nproc_per_node,
    )
