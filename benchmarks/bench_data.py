"""Does the ``shapes`` loader keep up with the model? Loader throughput against step time.

For each image size and model, three throughputs in images/s:

* ``loader``: iterating ``get_loaders("shapes", ...).train`` alone (images drawn on
  demand, collated), at ``num_workers`` 0, 1, 2 (worker start-up excluded: workers
  persist, and one untimed pass comes first);
* ``model``: ember's trainer on the same batches preloaded into memory (the ceiling);
* ``trainer+loader``: ember's trainer fed by that loader, what a run really gets.

``trainer+loader / model`` is the fraction of the model's speed a run keeps: well
below 1 means the loader starves the model. ``ember train``'s default is
``data.num_workers: 0``. Each timed unit is one pass of ``--batches`` batches; after a
warm-up pass, ``--repeats`` rounds time the candidates interleaved; medians. On a
machine with few cores the workers compete with the model's own threads, which the
table shows as it is.

Usage::

    python benchmarks/bench_data.py
    python benchmarks/bench_data.py --workers 0 2 4 --batches 20 --repeats 5
    python benchmarks/bench_data.py --quick
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _common import add_common_args, interleaved, print_table, ratio_line, setup
from torch import nn
from torch.utils.data import DataLoader

from ember.data import get_loaders
from ember.engine import create_trainer
from ember.models import get_model


@dataclass
class Case:
    model: str
    image_size: int
    batch_size: int


def _cases(args: argparse.Namespace) -> list[Case]:
    if args.quick:
        return [Case("small_cnn", 32, 32)]
    cases = [Case("small_cnn", 32, args.batch), Case("alexnet", args.alexnet_size, args.batch)]
    return [case for case in cases if case.model in args.models]


def _loader(case: Case, workers: int, batches: int) -> DataLoader:
    length = case.batch_size * batches
    loaders = get_loaders("shapes", batch_size=case.batch_size, num_workers=workers, device="cpu",
                          image_size=case.image_size, length={"train": length, "val": 8, "test": 8})
    return loaders.train


def _consume(loader: DataLoader) -> None:
    for _ in loader:
        pass


def run_case(case: Case, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = get_model(case.model, num_classes=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=4e-4)
    trainer = create_trainer(model, optimizer, nn.CrossEntropyLoss())
    loaders = {workers: _loader(case, workers, args.batches) for workers in args.workers}
    preloaded = [(x.clone(), y.clone()) for x, y in loaders[args.workers[0]]]

    runners: dict[str, Callable[[], None]] = {"model": lambda: trainer.run(preloaded, max_epochs=1)}
    for workers, loader in loaders.items():
        runners[f"loader w{workers}"] = lambda loader=loader: _consume(loader)
        runners[f"trainer+loader w{workers}"] = lambda loader=loader: trainer.run(loader, max_epochs=1)
    times = interleaved(runners, repeats=args.repeats, warmup=args.warmup, clock="wall")
    images = case.batch_size * args.batches
    rate = {name: images / statistics.median(values) for name, values in times.items()}
    rows = []
    for workers in args.workers:
        fed = rate[f"trainer+loader w{workers}"]
        rows.append([workers, rate[f"loader w{workers}"], rate["model"], fed, fed / rate["model"],
                     "yes" if fed / rate["model"] < 0.9 else "no"])
    print_table(["num_workers", "loader img/s", "model img/s", "trainer+loader img/s", "kept", "starved"],
                rows, title=f"shapes {case.image_size} px, batch {case.batch_size}, {case.model}: "
                            f"{args.batches} batches/pass, {args.repeats} repeats")
    for workers in args.workers:
        kept = rate[f"trainer+loader w{workers}"] / rate["model"]
        default = " (the default)" if workers == 0 else ""
        print(ratio_line(f"trainer+loader/model num_workers={workers}{default} "
                         f"[{case.model} {case.image_size} px]", kept, 0.9, higher_is_better=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="num_workers values")
    parser.add_argument("--models", nargs="+", choices=["small_cnn", "alexnet"],
                        default=["small_cnn", "alexnet"])
    parser.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--alexnet-size", type=int, default=64, help="alexnet image side, px (default 64)")
    parser.add_argument("--batches", type=int, default=10, help="batches per timed pass (default 10)")
    add_common_args(parser, repeats=5)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.batches, args.workers = 2, 1, 3, [0, 1]
    setup(args)
    for case in _cases(args):
        run_case(case, args)


if __name__ == "__main__":
    main()
