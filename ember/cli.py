"""The ``ember`` command: parse, call the experiment, map errors to exit codes.

Exit codes: 0 success; 2 usage or config error; 1 runtime error; 128 + signal
number (130 for SIGINT, 143 for SIGTERM) when a run was interrupted after saving a
checkpoint. Errors print one ``error:`` line; ``--debug`` adds the traceback.
torch is imported only by the commands that need it, so ``--help`` and
``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from collections.abc import Sequence

from ember import __version__

__all__ = ["main", "build_parser"]

EXAMPLES = """\
examples:
  ember train                                   # small_cnn on digits (the built-in default)
  ember train configs/shapes_alexnet.yaml trainer.max_epochs=3 data.batch_size=32
  ember train --resume runs/digits-cnn/20261204-101500 trainer.max_epochs=20
  ember evaluate runs/digits-cnn/20261204-101500 --split test
  ember extract runs/digits-cnn/20261204-101500 --layer features --output feats.pt
  tensorboard --logdir runs
"""


class _Parser(argparse.ArgumentParser):
    """argparse with ember's error format: the usage, then one ``error:`` line; exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message} (`{self.prog} --help` shows the options)\n")


# written out rather than read from ember.config, so that --help imports nothing
TRAIN_KEYS = """\
config sections and keys (configs/digits.yaml has them all, with the defaults):
  name, seed, output_dir
  model:          name, num_classes, in_channels, kwargs
  data:           name, root, download, batch_size, eval_batch_size, num_workers,
                  train_eval_size, options
  optimizer:      name (adam|adamw|sgd), lr, weight_decay, momentum, nesterov, fused
  scheduler:      name (none|step|cosine|warmup_cosine|linear_warmup), step_size, gamma,
                  warmup_epochs, min_lr
  trainer:        max_epochs, device, parallel (auto|none|dp|ddp), device_ids,
                  amp (null|bf16|fp16), grad_accum, clip_grad_norm, deterministic,
                  log_every, label_smoothing, channels_last, compile, sync_batchnorm, threads
  checkpoint:     metric (accuracy|loss), n_saved, every_iters, resume
  early_stopping: patience
  tensorboard:    enabled, histograms
  features:       layer, split, pool
  distributed:    backend (null|gloo|nccl), nproc_per_node
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ember",
        description="Train and evaluate image classifiers on pytorch-ignite.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ember {__version__}")
    parser.add_argument("--debug", action="store_true", help="print full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    train = commands.add_parser(
        "train",
        help="train from a YAML config (default: small_cnn on digits)",
        description="Train from a YAML config with key=value overrides (dotted keys, YAML values).",
        epilog=TRAIN_KEYS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument(
        "args",
        nargs="*",
        metavar="[CONFIG] key=value",
        help="optional YAML config file, then overrides such as trainer.max_epochs=5",
    )
    train.add_argument("--resume", metavar="RUN_DIR", help="continue this run exactly where it stopped")

    evaluate = commands.add_parser("evaluate", help="evaluate a run folder or checkpoint on a split")
    evaluate.add_argument("target", metavar="RUN_DIR|CHECKPOINT")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.root=/data")
    evaluate.add_argument("--split", default="test", help="train, val or test (default: test)")

    extract = commands.add_parser("extract", help="write the features of a layer to a file")
    extract.add_argument("target", metavar="RUN_DIR|CHECKPOINT")
    extract.add_argument("overrides", nargs="*", metavar="key=value")
    extract.add_argument("--layer", required=True, help="dotted module path, e.g. features or classifier.4")
    extract.add_argument("--split", default="test", help="train, val or test (default: test)")
    extract.add_argument(
        "--output",
        required=True,
        help="a .pt file (tensors), or a folder: <layer>.npy, labels.npy, indices.npy, streamed",
    )
    extract.add_argument("--pool", default=None, choices=["avg", "flatten"], help="shrink each feature map")
    extract.add_argument("--overwrite", action="store_true", help="replace an existing output")

    commands.add_parser("models", help="list the models ember can build")
    commands.add_parser("datasets", help="list the data sets ember can load")
    return parser


def _split_config_and_overrides(args: Sequence[str]) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return None, list(args)


def _train(ns: argparse.Namespace) -> int:
    from ember import experiment

    config, overrides = _split_config_and_overrides(ns.args)
    if ns.resume and config is not None:
        from ember.errors import ConfigError

        raise ConfigError(
            f"--resume continues the run with its own config; got a CONFIG file {config!r} as well. "
            "Give only key=value overrides"
        )
    summary = experiment.run(config, overrides, resume=ns.resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, one report: rank 0's
        return 0
    print(f"run folder: {summary['run_dir']}")
    test = summary.get("test") or {}
    if test:
        print("test: " + "  ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float)))
    return 0


def _evaluate(ns: argparse.Namespace) -> int:
    from ember import from_checkpoint

    metrics = from_checkpoint.evaluate(ns.target, split=ns.split, overrides=ns.overrides)
    print(json.dumps(metrics, indent=2))
    return 0


def _extract(ns: argparse.Namespace) -> int:
    from ember import from_checkpoint

    path = from_checkpoint.extract(
        ns.target,
        layer=ns.layer,
        split=ns.split,
        output=ns.output,
        pool=ns.pool,
        overwrite=ns.overwrite,
        overrides=ns.overrides,
    )
    print(f"features: {path}")
    return 0


def _models(ns: argparse.Namespace) -> int:
    from ember.models import list_models

    print("\n".join(list_models()))
    return 0


def _datasets(ns: argparse.Namespace) -> int:
    from ember.data import list_datasets

    print("\n".join(list_datasets()))
    return 0


_COMMANDS = {
    "train": _train,
    "evaluate": _evaluate,
    "extract": _extract,
    "models": _models,
    "datasets": _datasets,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ember`` command; returns the exit code."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    from ember.logs import configure_logging

    configure_logging()
    from ember.errors import ConfigError, EmberError, RunInterrupted

    try:
        return _COMMANDS[ns.command](ns)
    except RunInterrupted as err:
        print(f"error: {err}", file=sys.stderr)
        return 128 + err.signum
    except ConfigError as err:
        _report(err, ns.debug)
        return 2
    except EmberError as err:
        _report(err, ns.debug)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a failure ember did not foresee: still one line, unless --debug
        _report(err, ns.debug, unexpected=True)
        return 1


# torch re-raises an error of a DataLoader worker as "Caught X in DataLoader worker process N.
# Original Traceback ...": keep the error itself, not the worker's traceback.
_WORKER_ERROR = re.compile(r"^Caught \w+ (in DataLoader worker process \d+)\.\s*Original Traceback")
_WORKER_DIED = re.compile(r"DataLoader worker \(pid")


def _worker_error(text: str) -> str | None:
    found = _WORKER_ERROR.match(text)
    if found is None:
        return None
    last = text.rsplit("Traceback (most recent call last):", 1)[-1]
    # frames are indented; the error line (and its continuation lines) are not
    lines = [line for line in last.splitlines() if line.strip() and not line[0].isspace()]
    error = re.sub(r"^(?:\w+\.)+(\w+: )", r"\1", " ".join(lines))  # ember.errors.DataError -> DataError
    return f"{error} ({found.group(1)})"


def _message(err: BaseException) -> tuple[str, bool]:
    """The message of ``err`` without tracebacks, and whether it is one ember foresaw."""
    from ember.errors import EmberError

    text = str(err)
    worker = _worker_error(text)
    if worker is not None:
        if isinstance(err, EmberError):  # ember's own message: the class name adds nothing
            worker = worker.removeprefix(f"{type(err).__name__}: ")
        return worker, isinstance(err, EmberError)
    if isinstance(err, RuntimeError) and _WORKER_DIED.search(text):
        return (
            f"A data loader worker process died ({text.strip()}): it was killed (out of memory?) or "
            "crashed in native code. With data.num_workers=0 the data loads in the main process, "
            "which shows the error",
            True,
        )
    return text, isinstance(err, EmberError)


def _report(err: BaseException, debug: bool, *, unexpected: bool = False) -> None:
    if debug:
        traceback.print_exc()
    text, foreseen = _message(err)
    message = " ".join(text.split()) or type(err).__name__
    if unexpected and not foreseen:
        message = f"{type(err).__name__}: {message} (run with --debug for the traceback)"
    print(f"error: {message}", file=sys.stderr)
