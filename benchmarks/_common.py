"""Timing helpers shared by the benchmark scripts (not part of the ember package).

Every benchmark compares candidates against a baseline measured in the same process:
after a warm-up, each repeat times every candidate once, in an order that alternates
between repeats (so slow drift of a shared machine hits all candidates alike), and
the tables report medians. The ratio of a candidate to its baseline is the median of
the per-repeat ratios (``candidate_r / baseline_r``), which cancels most of the noise
two neighbouring measurements share.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "CLOCKS",
    "add_common_args",
    "describe_machine",
    "setup",
    "interleaved",
    "paired_ratio",
    "print_table",
    "ratio_line",
    "spread",
]

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}



@dataclass
class Case:
    """One benchmark configuration: a registry model on batches of a data set."""

    name: str
    model: str
    model_kwargs: dict
    dataset: str
    dataset_kwargs: dict
    batch_size: int
    iters: int


def add_common_args(parser: argparse.ArgumentParser, *, repeats: int, warmup: int = 1) -> None:
    """``--repeats``, ``--warmup``, ``--threads``, ``--clock`` and ``--quick`` for every script."""
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed repeats (default {repeats})")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed warm-up runs (default {warmup})")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch.set_num_threads (default: torch's; 1 with --quick). On a shared machine 1 thread "
        "avoids OpenMP threads spinning while their partner waits for a core",
    )
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall",
        help="wall: time.perf_counter (default); cpu: time.process_time, the CPU time of this "
        "process, less disturbed by other processes on a shared machine (use with --threads 1)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a few seconds")


def setup(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (1 under ``--quick`` unless given) and print the machine line."""
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    print(describe_machine(args))


def describe_machine(args: argparse.Namespace) -> str:
    """One line: torch version, threads, clock and the load average (noise context)."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
            f"clock {args.clock}, load average {load}")


def interleaved(
    runners: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1, clock: str = "wall"
) -> dict[str, list[float]]:
    """Time each runner ``repeats`` times, interleaved, after ``warmup`` untimed rounds.

    Args:
        runners: name -> a callable doing one timed unit of work.
        repeats: timed rounds; each times every runner once.
        warmup: untimed rounds first (allocator, caches, lazy initialisation).
        clock: a key of :data:`CLOCKS`.

    Returns:
        ``{name: [seconds per repeat]}``.
    """
    now = CLOCKS[clock]
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        # rotate the order: no candidate always runs first (cold) or last
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            start = now()
            runners[name]()
            times[name].append(now() - start)
    return times


def paired_ratio(candidate: Sequence[float], baseline: Sequence[float]) -> float:
    """Median of the per-repeat ratios candidate / baseline."""
    return statistics.median(c / b for c, b in zip(candidate, baseline))


def spread(values: Sequence[float]) -> float:
    """Half the distance between the 25th and 75th percentiles, relative to the median."""
    if len(values) < 4:
        return (max(values) - min(values)) / 2 / statistics.median(values)
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / 2 / statistics.median(values)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> None:
    """A plain, aligned text table (markdown-compatible)."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    if title:
        print(f"\n{title}")
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        aligned = (v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths))
        print("| " + " | ".join(aligned) + " |")


def ratio_line(
    label: str, ratio: float, target: float | None = None, *, higher_is_better: bool = False
) -> str:
    """``ratio <label>: 1.004 (target <= 1.02: met)``; the line tests look for."""
    text = f"ratio {label}: {ratio:.3f}"
    if target is not None:
        sign = ">=" if higher_is_better else "<="
        met = ratio >= target if higher_is_better else ratio <= target
        text += f" (target {sign} {target:g}: {'met' if met else 'MISSED'})"
    return text


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.3f}"
        return f"{value:.4f}"
    return str(value)


def _numeric(text: str) -> bool:
    try:
        float(text.rstrip("%x").lstrip("+±"))
    except ValueError:
        return False
    return True
