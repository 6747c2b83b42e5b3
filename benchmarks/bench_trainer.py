"""ember's trainer against the hand-written training loop (and ignite's own trainer).

The baseline is the classic loop, line for line::

    for data, target in batches:
        data, target = data.to(device), target.to(device)
        model.train(True)
        optimizer.zero_grad()
        outputs = model(data)
        _, preds = torch.max(outputs.data, 1)
        loss = loss_func(outputs, target)
        loss.backward()
        optimizer.step()

against ``create_trainer(model, optimizer, loss_func).run(batches)`` (plain
``Engine`` and, as ``ember train`` uses it, ``DeterministicEngine``) and ignite's
``create_supervised_trainer``. Every candidate has its own copy of the same model
(same seed), its own Adam(lr=1e-3, weight_decay=4e-4), the same batches, preloaded
into a list so that data loading is not measured, and the same RNG seed at the start
of each epoch; so after the run the plain ember trainer's weights must equal the hand
loop's bit for bit (column "same weights").

One timed unit is one epoch of ``--iters`` iterations (``trainer.run(batches,
max_epochs=1)`` for the engines, so the per-run set-up of an ``Engine`` is included).
After ``--warmup`` untimed epochs, ``--repeats`` rounds time every candidate once, in
rotating order. The table shows medians; the ratio is the median of the per-round
ratios to the hand loop. Target: ember / hand <= 1.02.

Usage::

    python benchmarks/bench_trainer.py                  # both cases
    python benchmarks/bench_trainer.py --case small_cnn --iters 200 --repeats 15
    python benchmarks/bench_trainer.py --quick          # smoke run, a few seconds (no alexnet
                                                        # unless --case names it)
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable

import torch
from _common import (
    Case,
    add_common_args,
    interleaved,
    paired_ratio,
    print_table,
    ratio_line,
    setup,
    spread,
)
from ignite.engine import create_supervised_trainer
from torch import nn
from torch.utils.data import DataLoader

from ember.data import get_dataset
from ember.engine import create_trainer
from ember.models import get_model

TARGET = 1.02
Batch = tuple[torch.Tensor, torch.Tensor]


def _cases(args: argparse.Namespace) -> list[Case]:
    cases = {
        "overhead": Case("overhead: Linear(64, 10) digits 64x1x8x8", "linear", {}, "digits", {},
                         args.small_batch, args.iters or 200),
        "small_cnn": Case("small_cnn digits 64x1x8x8", "small_cnn", {"num_classes": 10, "in_channels": 1},
                          "digits", {}, args.small_batch, args.iters or 100),
        "alexnet": Case(f"alexnet shapes {args.batch}x3x{args.image_size}²", "alexnet", {"num_classes": 8},
                        "shapes", {"image_size": args.image_size}, args.batch, args.iters or 6),
    }
    if args.quick:
        cases["overhead"].iters = 20
        cases["small_cnn"].iters = 10
        size = min(args.image_size, 64)
        cases["alexnet"] = Case(f"alexnet shapes 2x3x{size}²", "alexnet", {"num_classes": 8}, "shapes",
                                {"image_size": size}, 2, 1)
    return [cases[name] for name in args.case]


def _batches(case: Case) -> list[Batch]:
    """``case.iters`` batches in memory (cycling through the data set if it is smaller)."""
    if case.dataset == "shapes":
        length = case.batch_size * case.iters
        dataset = get_dataset("shapes", split="train", length=length, **case.dataset_kwargs)
    else:
        dataset = get_dataset(case.dataset, split="train", **case.dataset_kwargs)
    loader = DataLoader(dataset, batch_size=case.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    return [(x.clone(), y.clone()) for x, y in itertools.islice(itertools.cycle(loader), case.iters)]


def _model_and_optimizer(case: Case, seed: int, **adam: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    if case.model == "linear":  # almost no work: what remains is the per-iteration overhead
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    else:
        model = get_model(case.model, **case.model_kwargs)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=4e-4, **adam)
    return model, optimizer


def _hand_loop(model: nn.Module, optimizer: torch.optim.Optimizer, loss_func: nn.Module,
               batches: list[Batch], device: torch.device) -> None:
    for data, target in batches:
        data, target = data.to(device), target.to(device)
        model.train(True)
        optimizer.zero_grad()
        outputs = model(data)
        _, preds = torch.max(outputs.data, 1)
        loss = loss_func(outputs, target)
        loss.backward()
        optimizer.step()


def _runners(case: Case, batches: list[Batch], seed: int, device: torch.device, fused: bool
             ) -> tuple[dict[str, Callable[[], None]], dict[str, nn.Module]]:
    loss_func = nn.CrossEntropyLoss()
    models: dict[str, nn.Module] = {}
    runners: dict[str, Callable[[], None]] = {}

    model, optimizer = _model_and_optimizer(case, seed)
    models["hand loop"] = model

    def hand(model=model, optimizer=optimizer) -> None:
        torch.manual_seed(seed)
        _hand_loop(model, optimizer, loss_func, batches, device)

    runners["hand loop"] = hand
    candidates = [("ember", "plain"), ("ember deterministic", "deterministic"), ("ignite", "ignite")]
    if fused:
        candidates.append(("ember, fused Adam", "fused"))
    for name, kind in candidates:
        model, optimizer = _model_and_optimizer(case, seed, **({"fused": True} if kind == "fused" else {}))
        models[name] = model
        if kind == "ignite":
            engine = create_supervised_trainer(model, optimizer, loss_func, device=device)
        else:
            engine = create_trainer(model, optimizer, loss_func, device=device,
                                    deterministic=kind == "deterministic")

        def run(engine=engine) -> None:
            torch.manual_seed(seed)
            engine.run(batches, max_epochs=1)

        runners[name] = run
    return runners, models


def _same_weights(a: nn.Module, b: nn.Module, *, exact: bool = True) -> str:
    pairs = list(zip(a.state_dict().values(), b.state_dict().values()))
    if exact:
        return "yes" if all(torch.equal(p, q) for p, q in pairs) else "no"
    diff = max((p.float() - q.float()).abs().max().item() for p, q in pairs)
    return f"max |Δ| {diff:.0e}"


def _weights_column(name: str, models: dict[str, nn.Module]) -> str:
    if name == "hand loop":
        return "—"
    if name == "ember deterministic":
        return "n/a"  # reseeds every epoch: other dropout masks
    return _same_weights(models[name], models["hand loop"], exact="fused" not in name)


def _mode_switch_cost(model: nn.Module, calls: int = 1000) -> tuple[float, float]:
    """Seconds per ``model.train()`` call, and per call of ember's check-first version."""
    from ember.engine.steps import _set_mode  # private: measured, not used

    costs = []
    for switch in (model.train, lambda: _set_mode(model, True)):
        start = time.perf_counter()
        for _ in range(calls):
            switch()
        costs.append((time.perf_counter() - start) / calls)
    return costs[0], costs[1]


def run_case(case: Case, args: argparse.Namespace) -> float:
    device = torch.device("cpu")
    batches = _batches(case)
    runners, models = _runners(case, batches, args.seed, device, args.fused)
    times = interleaved(runners, repeats=args.repeats, warmup=args.warmup, clock=args.clock)
    base = times["hand loop"]
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append([
            name,
            median * 1e3,
            median / case.iters * 1e3,
            f"±{spread(values):.1%}",
            paired_ratio(values, base),
            statistics.median(v - b for v, b in zip(values, base)) / case.iters * 1e6,
            _weights_column(name, models),
        ])
    print_table(["candidate", "ms/epoch", "ms/iter", "spread", "ratio to hand", "µs/iter over hand",
                 "same weights"], rows,
                title=f"{case.name}: {case.iters} iterations/epoch, {args.repeats} repeats")
    step_s = statistics.median(base) / case.iters
    train_s, check_s = _mode_switch_cost(models["ember"])
    print(f"mode switch per step: model.train() {train_s * 1e6:.1f} µs ({train_s / step_s:.2%} of a "
          f"hand-loop step); ember's check-first switch {check_s * 1e6:.1f} µs ({check_s / step_s:.2%})")
    ratio = paired_ratio(times["ember"], base)
    target = None if case.model == "linear" else TARGET
    print(ratio_line(f"ember/hand [{case.name}]", ratio, target))
    print(ratio_line(f"ember deterministic/hand [{case.name}]",
                     paired_ratio(times["ember deterministic"], base), target))
    print(ratio_line(f"ignite/hand [{case.name}]", paired_ratio(times["ignite"], base)))
    if "ember, fused Adam" in times:
        fused = paired_ratio(times["ember, fused Adam"], base)
        print(ratio_line(f"ember fused Adam/hand [{case.name}]", fused))
    return ratio


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs="+", choices=["overhead", "small_cnn", "alexnet"],
                        default=["overhead", "small_cnn", "alexnet"],
                        help="overhead: a one-layer model, so the table shows the per-iteration cost "
                        "of the engine itself; small_cnn and alexnet: the real cases (target <= 1.02)")
    parser.add_argument("--iters", type=int, default=None,
                        help="iterations per timed epoch (default 200 overhead, 100 small_cnn, 6 alexnet)")
    parser.add_argument("--small-batch", type=int, default=64, help="small_cnn batch size (default 64)")
    parser.add_argument("--batch", type=int, default=8, help="alexnet batch size (default 8)")
    parser.add_argument("--image-size", type=int, default=224, help="alexnet image side, px (default 224)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fused", action="store_true",
                        help="add a candidate: ember with Adam(fused=True) (faster; equal to the hand loop "
                        "only within rounding)")
    add_common_args(parser, repeats=11)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 3, 1
        if "--case" not in (argv if argv is not None else sys.argv):
            args.case = ["overhead", "small_cnn"]  # an alexnet step on this CPU takes seconds
    setup(args)
    for case in _cases(args):
        run_case(case, args)


if __name__ == "__main__":
    main()
