"""Start-up: ``ember --help`` and ``ember train`` up to its first iteration, against ``import torch``.

Every measurement is a fresh Python process (wall time from ``subprocess`` start to
its end, or to a marker it prints), repeated ``--repeats`` times interleaved; medians.

1. Commands: ``python -c "import torch"`` (the baseline: no PyTorch program starts
   faster), ``ember --help`` (target < 0.5 s: torch is not imported for it),
   ``python -c "import ember.experiment"``.
2. ``ember train`` (default config: small_cnn on digits, one epoch, output in a
   temporary folder) up to the end of its first iteration, with the time of each
   phase: interpreter up, ``ember.experiment`` imported, data/model/engines built,
   handlers attached (``trainer.run`` called), first iteration done. A small driver
   runs ``ember.cli.main(["train", ...])`` with ``Engine.run`` wrapped so that the first
   engine to run (the trainer) gets a handler on its first ``ITERATION_COMPLETED``
   that prints the times and ends the process.
3. Where the import time goes: a chain of fresh processes that import, cumulatively,
   torch; + ignite (engine, metrics, handlers, distributed); + torchvision;
   + ``torch.utils.tensorboard``; + ``sklearn.datasets`` (digits); the difference
   between neighbours is what each adds. (Not under ``--quick``.)

Usage::

    python benchmarks/bench_startup.py
    python benchmarks/bench_startup.py --repeats 9
    python benchmarks/bench_startup.py --quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _common import add_common_args, print_table, ratio_line

HELP_TARGET_S = 0.5

# cumulative imports; each step's cost is its time minus the previous step's
_IGNITE = "ignite.engine, ignite.metrics, ignite.handlers, ignite.distributed"
_IMPORT_CHAIN = [
    ("torch", "import torch"),
    ("+ ignite", f"import torch, {_IGNITE}"),
    ("+ torchvision", f"import torch, {_IGNITE}, torchvision"),
    ("+ torch.utils.tensorboard", f"import torch, {_IGNITE}, torchvision, torch.utils.tensorboard"),
    ("+ sklearn.datasets",
     f"import torch, {_IGNITE}, torchvision, torch.utils.tensorboard, sklearn.datasets"),
]

# Runs `ember train` and prints the time of each phase since `t0` (the parent's clock
# just before it started the process), then leaves at the end of the first iteration.
_DRIVER = r"""
import json, os, sys, time
t0 = float(sys.argv[1])
marks = {"interpreter up": time.time()}
import ember.experiment
from ignite.engine import Engine, Events
marks["ember.experiment imported"] = time.time()
_run = Engine.run

def first(engine):
    marks["first iteration done"] = time.time()
    print("MARKS " + json.dumps({k: v - t0 for k, v in marks.items()}), flush=True)
    os._exit(0)

def run(self, *args, **kwargs):  # the first Engine to run in `ember train` is the trainer
    if "data, model, engines, handlers built" not in marks:
        marks["data, model, engines, handlers built"] = time.time()
        self.add_event_handler(Events.ITERATION_COMPLETED(once=1), first)
    return _run(self, *args, **kwargs)

Engine.run = run
from ember.cli import main
sys.exit(main(["train", *sys.argv[2:]]))
"""


def _ember_command() -> list[str]:
    exe = shutil.which("ember")
    return [exe] if exe else [sys.executable, "-m", "ember"]


def _wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _first_iteration(overrides: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", _DRIVER, repr(time.time()), *overrides, f"output_dir={tmp}"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("MARKS "):
            return json.loads(line[len("MARKS "):])
    raise RuntimeError(f"the ember train driver printed no timings (exit {done.returncode}):\n{done.stderr}")


def _print_import_chain(repeats: int) -> None:
    chain = {name: [] for name, _ in _IMPORT_CHAIN}
    for _ in range(repeats):
        for name, code in _IMPORT_CHAIN:
            chain[name].append(_wall([sys.executable, "-c", code]))
    rows, previous = [], 0.0
    for name, values in chain.items():
        median = statistics.median(values)
        rows.append([name, median, median - previous])
        previous = median
    print_table(["imports (cumulative)", "median s", "added s"], rows,
                title=f"where import time goes, {repeats} runs each")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-overrides", nargs="*", default=["trainer.max_epochs=1"],
                        help="key=value overrides for the `ember train` run (default trainer.max_epochs=1)")
    add_common_args(parser, repeats=5, warmup=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 1, 0
    ember = _ember_command()
    commands = {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "ember --help": [*ember, "--help"],
    }
    if not args.quick:
        commands['python -c "import ember.experiment"'] = [sys.executable, "-c", "import ember.experiment"]
    for _ in range(args.warmup):  # fill the OS file cache
        for cmd in commands.values():
            _wall(cmd)
    times: dict[str, list[float]] = {name: [] for name in commands}
    phases: list[dict[str, float]] = []
    for _ in range(args.repeats):
        for name, cmd in commands.items():
            times[name].append(_wall(cmd))
        phases.append(_first_iteration(args.train_overrides))
    torch_s = statistics.median(times['python -c "import torch"'])
    rows = [[name, statistics.median(values), min(values), statistics.median(values) / torch_s]
            for name, values in times.items()]
    first = statistics.median(p["first iteration done"] for p in phases)
    rows.append(["ember train -> first iteration", first, min(p["first iteration done"] for p in phases),
                 first / torch_s])
    print_table(["command", "median s", "min s", "ratio to import torch"], rows,
                title=f"start-up, {args.repeats} runs each (fresh processes)")

    phase_rows, previous = [], 0.0
    for phase in phases[0]:
        at = statistics.median(p[phase] for p in phases)
        phase_rows.append([phase, at, at - previous])
        previous = at
    print_table(["ember train phase", "done at s", "phase s"], phase_rows,
                title=f"ember train {' '.join(args.train_overrides)}: phases up to the first iteration")

    if not args.quick:
        _print_import_chain(args.repeats)
    print(ratio_line("ember --help / import torch", statistics.median(times["ember --help"]) / torch_s))
    help_s = statistics.median(times["ember --help"])
    print(f"ember --help: {help_s:.3f} s (target < {HELP_TARGET_S} s: "
          f"{'met' if help_s < HELP_TARGET_S else 'MISSED'})")
    print(ratio_line("ember train first iteration / import torch", first / torch_s))


if __name__ == "__main__":
    main()
