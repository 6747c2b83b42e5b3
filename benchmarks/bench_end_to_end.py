"""A whole ``ember train`` run: wall time and test accuracy, against a hand-written script.

Candidates, each a fresh process, output in a temporary folder:

* ``ember train`` with its defaults (small_cnn on digits, 10 epochs, evaluation of
  val and a train subset each epoch, checkpoints, TensorBoard, test with the best
  checkpoint); its test accuracy is read from the run's ``summary.json``.
  Target: test accuracy >= 0.98.
* ``ember train`` lean: the same without TensorBoard and the train-subset evaluation
  (``tensorboard.enabled=false data.train_eval_size=0``).
* the hand-written recipe script: the same data split, model, optimizer, seed and
  epochs, the classic loop, a val pass each epoch under ``inference_mode``, a test
  pass at the end; no checkpoints, no logs. The baseline for the wall-time ratio.

Wall time includes start-up (imports). ``--repeats`` rounds run the candidates
interleaved; medians. ``--threads N`` sets ``OMP_NUM_THREADS`` for the runs (on a
loaded machine torch's default of one thread per core can be several times slower,
its threads spinning while their partners wait for a core; ``--quick`` uses 1).

Usage::

    python benchmarks/bench_end_to_end.py
    python benchmarks/bench_end_to_end.py --repeats 3 --threads 1
    python benchmarks/bench_end_to_end.py --quick       # 1 epoch: the accuracy target does not apply
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import add_common_args, paired_ratio, print_table, ratio_line, spread

ACCURACY_TARGET = 0.98

_HAND_SCRIPT = r"""
import sys, torch
from torch import nn
from ember.data import get_loaders
from ember.models import get_model

epochs, seed = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(seed)
loaders = get_loaders("digits", batch_size=64, eval_batch_size=256, seed=seed)
model = get_model("small_cnn", num_classes=10, in_channels=1)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=4e-4)
loss_func = nn.CrossEntropyLoss()

def accuracy(loader):
    model.train(False)
    correct, total = 0, 0
    with torch.inference_mode():
        for data, target in loader:
            correct += (model(data).argmax(1) == target).sum().item()
            total += len(target)
    return correct / total

for epoch in range(epochs):
    for data, target in loaders.train:
        model.train(True)
        optimizer.zero_grad()
        outputs = model(data)
        _, preds = torch.max(outputs.data, 1)
        loss = loss_func(outputs, target)
        loss.backward()
        optimizer.step()
    print(f"epoch {epoch + 1} val accuracy {accuracy(loaders.val):.4f}", file=sys.stderr)
print(f"test accuracy {accuracy(loaders.test)}")
"""


def _ember_train(overrides: list[str], env: dict[str, str]) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "ember", "train", *overrides, f"output_dir={tmp}"]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        match = re.search(r"^run folder: (.+)$", done.stdout, re.MULTILINE)
        summary = json.loads((Path(match.group(1)) / "summary.json").read_text())
    return wall, float(summary["test"]["accuracy"])


def _hand_script(epochs: int, seed: int, env: dict[str, str]) -> tuple[float, float]:
    cmd = [sys.executable, "-c", _HAND_SCRIPT, str(epochs), str(seed)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - start
    return wall, float(done.stdout.split()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None,
                        help="trainer.max_epochs (default: ember's own, 10; 1 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    add_common_args(parser, repeats=3, warmup=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.epochs = 1, args.epochs or 1
    epochs = args.epochs or 10
    env = dict(os.environ)
    threads = args.threads or (1 if args.quick else None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    base = [f"trainer.max_epochs={epochs}", f"seed={args.seed}"]
    lean = [*base, "tensorboard.enabled=false", "data.train_eval_size=0"]
    runners = {
        "hand-written script": lambda: _hand_script(epochs, args.seed, env),
        "ember train": lambda: _ember_train(base, env),
        "ember train, lean": lambda: _ember_train(lean, env),
    }
    for _ in range(args.warmup):
        for run in runners.values():
            run()
    walls: dict[str, list[float]] = {name: [] for name in runners}
    accuracy: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(args.repeats):
        names = list(runners)
        for name in names[r % len(names):] + names[: r % len(names)]:
            wall, acc = runners[name]()
            walls[name].append(wall)
            accuracy[name].append(acc)
    print(f"{epochs} epochs of small_cnn on digits, {args.repeats} runs each, threads: "
          f"{threads or 'torch default'}, "
          f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    baseline = walls["hand-written script"]
    rows = [[name, statistics.median(values), f"±{spread(values):.1%}", paired_ratio(values, baseline),
             statistics.median(accuracy[name])] for name, values in walls.items()]
    print_table(["candidate", "wall s", "spread", "ratio to hand", "test accuracy"], rows,
                title=f"end to end (target: ember train test accuracy >= {ACCURACY_TARGET}"
                      f"{', not applicable to 1 epoch' if epochs < 10 else ''})")
    print(ratio_line("ember train/hand-written wall time", paired_ratio(walls["ember train"], baseline)))
    acc = statistics.median(accuracy["ember train"])
    print(f"ember train test accuracy: {acc:.4f} (target >= {ACCURACY_TARGET}: "
          f"{'met' if acc >= ACCURACY_TARGET else 'MISSED'})")


if __name__ == "__main__":
    main()
