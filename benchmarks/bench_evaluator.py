"""ember's evaluator against a hand-written ``torch.inference_mode()`` accuracy loop.

The baseline::

    model.eval()
    correct, total = 0, 0
    with torch.inference_mode():
        for data, target in batches:
            data, target = data.to(device), target.to(device)
            outputs = model(data)
            correct += (outputs.argmax(1) == target).sum()
            total += target.shape[0]
    accuracy = correct.item() / total

against ``create_evaluator(model)`` (ignite's ``Accuracy`` attached) run on the same
batches, preloaded into a list. For contrast, the classic recipe's test loop too:
``model.train(False)`` but no ``no_grad``, so every forward pass records an autograd
graph that nothing uses. All three must report the same accuracy (column
"accuracy"). One timed unit is one pass over ``--iters`` batches; after
``--warmup`` untimed passes, ``--repeats`` rounds time every candidate once, in
rotating order; medians, and the median of the per-round ratios to the
inference_mode loop. Target: ember / hand <= 1.02.

Usage::

    python benchmarks/bench_evaluator.py
    python benchmarks/bench_evaluator.py --case alexnet --batch 64 --iters 4
    python benchmarks/bench_evaluator.py --quick
"""

from __future__ import annotations

import argparse
import itertools
import statistics
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
from torch import nn
from torch.utils.data import DataLoader

from ember.data import get_dataset
from ember.engine import create_evaluator
from ember.models import get_model

TARGET = 1.02
Batch = tuple[torch.Tensor, torch.Tensor]


def _cases(args: argparse.Namespace) -> list[Case]:
    cases = {
        "overhead": Case(f"overhead: Linear(64, 10) digits {args.small_batch}x1x8x8", "linear", {}, "digits",
                         {}, args.small_batch, args.iters or 100),
        "small_cnn": Case(f"small_cnn digits {args.small_batch}x1x8x8", "small_cnn",
                          {"num_classes": 10, "in_channels": 1}, "digits", {}, args.small_batch,
                          args.iters or 40),
        "alexnet": Case(f"alexnet shapes {args.batch}x3x{args.image_size}²", "alexnet", {"num_classes": 8},
                        "shapes", {"image_size": args.image_size}, args.batch, args.iters or 4),
    }
    if args.quick:
        cases["overhead"].iters = 20
        cases["small_cnn"].iters = 5
        size = min(args.image_size, 64)
        cases["alexnet"] = Case(f"alexnet shapes 8x3x{size}²", "alexnet", {"num_classes": 8}, "shapes",
                                {"image_size": size}, 8, 2)
    return [cases[name] for name in args.case]


def _batches(case: Case) -> list[Batch]:
    if case.dataset == "shapes":
        length = case.batch_size * case.iters
        dataset = get_dataset("shapes", split="test", length=length, **case.dataset_kwargs)
    else:
        dataset = get_dataset(case.dataset, split="train", **case.dataset_kwargs)
    loader = DataLoader(dataset, batch_size=case.batch_size, shuffle=False, drop_last=True)
    return [(x.clone(), y.clone()) for x, y in itertools.islice(itertools.cycle(loader), case.iters)]


def _model(case: Case, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if case.model == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    return get_model(case.model, **case.model_kwargs)


def _hand_loop(model: nn.Module, batches: list[Batch], device: torch.device) -> float:
    model.eval()
    correct, total = 0, 0
    with torch.inference_mode():
        for data, target in batches:
            data, target = data.to(device), target.to(device)
            outputs = model(data)
            correct += (outputs.argmax(1) == target).sum()
            total += target.shape[0]
    return correct.item() / total


def _recipe_loop(model: nn.Module, batches: list[Batch], device: torch.device) -> float:
    """The classic test loop: eval mode, but autograd records every forward pass."""
    model.train(False)
    correct, total = 0, 0
    for data, target in batches:
        data, target = data.to(device), target.to(device)
        outputs = model(data)
        _, preds = torch.max(outputs.data, 1)
        correct += torch.sum(preds == target.data)
        total += target.shape[0]
    return correct.item() / total


def run_case(case: Case, args: argparse.Namespace) -> float:
    device = torch.device("cpu")
    batches = _batches(case)
    model = _model(case, args.seed)
    evaluator = create_evaluator(model, device=device)
    accuracy: dict[str, float] = {}

    def ember() -> None:
        evaluator.run(batches)
        accuracy["ember"] = evaluator.state.metrics["accuracy"]

    runners: dict[str, Callable[[], None]] = {
        "hand inference_mode": lambda: accuracy.__setitem__("hand inference_mode",
                                                           _hand_loop(model, batches, device)),
        "ember": ember,
        "recipe (no no_grad)": lambda: accuracy.__setitem__("recipe (no no_grad)",
                                                           _recipe_loop(model, batches, device)),
    }
    times = interleaved(runners, repeats=args.repeats, warmup=args.warmup, clock=args.clock)
    base = times["hand inference_mode"]
    samples = case.batch_size * case.iters
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append([name, median * 1e3, samples / median, f"±{spread(values):.1%}",
                     paired_ratio(values, base), f"{accuracy[name]:.4f}"])
    print_table(["candidate", "ms/pass", "images/s", "spread", "ratio to hand", "accuracy"], rows,
                title=f"{case.name}: {case.iters} batches/pass, {args.repeats} repeats")
    ratio = paired_ratio(times["ember"], base)
    print(ratio_line(f"ember/hand [{case.name}]", ratio, None if case.model == "linear" else TARGET))
    print(ratio_line(f"recipe/hand [{case.name}]", paired_ratio(times["recipe (no no_grad)"], base)))
    return ratio


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs="+", choices=["overhead", "small_cnn", "alexnet"],
                        default=["overhead", "small_cnn", "alexnet"],
                        help="overhead: a one-layer model (the engine's own cost per batch); small_cnn, "
                        "alexnet: the real cases (target <= 1.02)")
    parser.add_argument("--iters", type=int, default=None,
                        help="batches per timed pass (default 100 overhead, 40 small_cnn, 4 alexnet)")
    parser.add_argument("--small-batch", type=int, default=256, help="digits eval batch size (default 256)")
    parser.add_argument("--batch", type=int, default=32, help="alexnet batch size (default 32)")
    parser.add_argument("--image-size", type=int, default=224, help="alexnet image side, px (default 224)")
    parser.add_argument("--seed", type=int, default=0)
    add_common_args(parser, repeats=11)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 3, 1
    setup(args)
    for case in _cases(args):
        run_case(case, args)


if __name__ == "__main__":
    main()
