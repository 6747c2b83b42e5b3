"""CPU training and evaluation with glibc's malloc tuned not to hand memory back every step.

glibc serves allocations above ``M_MMAP_THRESHOLD`` (128 KiB to 32 MiB, adapting)
with fresh ``mmap`` pages and unmaps them on free. A training step frees and
reallocates its activations and, with ``zero_grad(set_to_none=True)`` (the default),
every gradient, so each step page-faults its way through zero-filled memory again:
for alexnet on 224 px images that is hundreds of MB per step, spent in the kernel.
Raising the thresholds (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_TOP_PAD_`` in the environment, or ``mallopt`` at run time) keeps freed memory
for reuse, as jemalloc or tcmalloc do. Numbers are unchanged; only speed and the
resident size (which stays at its peak) differ.

Each candidate is a fresh process (glibc reads the variables at start) that times
``--iters`` training steps of ember's trainer and ``--iters`` evaluation batches of
its evaluator after a warm-up, on preloaded batches; the processes alternate,
``--repeats`` times; medians of the per-process medians. Also shows the minor page
faults and kernel (sys) time per step.

Usage::

    python benchmarks/bench_malloc.py                       # alexnet 8x3x224², eval batch 32
    python benchmarks/bench_malloc.py --model small_cnn --image-size 32 --batch 64
    python benchmarks/bench_malloc.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from _common import add_common_args, print_table, ratio_line

TUNED_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),  # bytes: allocations up to 1 GiB come from the heap
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),  # keep up to 1 GiB of freed heap instead of trimming it
    "MALLOC_TOP_PAD_": str(64 << 20),  # grow the heap 64 MiB at a time
}

_CHILD = r"""
import json, resource, statistics, sys, time, torch
from torch import nn
from ember.engine import create_evaluator, create_trainer
from ember.models import get_model
model_name, size, batch, eval_batch, iters, threads = sys.argv[1], *map(int, sys.argv[2:7])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = get_model(model_name, num_classes=8)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=4e-4)
trainer = create_trainer(model, optimizer, nn.CrossEntropyLoss())
evaluator = create_evaluator(model)
train = [(torch.rand(batch, 3, size, size), torch.randint(0, 8, (batch,))) for _ in range(2)]
evaluate = [(torch.rand(eval_batch, 3, size, size), torch.randint(0, 8, (eval_batch,))) for _ in range(2)]
result = {}
for name, run, data in (("train", trainer.run, train), ("eval", evaluator.run, evaluate)):
    run(data[:1])  # warm-up
    walls, syss, faults = [], [], []
    for i in range(iters):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        run([data[i % 2]])
        after = resource.getrusage(resource.RUSAGE_SELF)
        walls.append(time.perf_counter() - start)
        syss.append(after.ru_stime - before.ru_stime)
        faults.append(after.ru_minflt - before.ru_minflt)
    result[name] = [statistics.median(walls), statistics.median(syss), statistics.median(faults)]
print("RESULT " + json.dumps(result))
"""


def _child(args: argparse.Namespace, tuned: bool) -> dict[str, list[float]]:
    env = {k: v for k, v in os.environ.items() if k not in TUNED_ENV}
    if tuned:
        env.update(TUNED_ENV)
    cmd = [sys.executable, "-c", _CHILD, args.model, str(args.image_size), str(args.batch),
           str(args.eval_batch), str(args.iters), str(args.threads or 1)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="alexnet")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8, help="training batch (default 8)")
    parser.add_argument("--eval-batch", type=int, default=32, help="evaluation batch (default 32)")
    parser.add_argument("--iters", type=int, default=5, help="timed steps per process (default 5)")
    add_common_args(parser, repeats=3, warmup=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.image_size, args.batch, args.eval_batch = "small_cnn", 32, 64, 256
        args.iters, args.repeats = 3, 1
    runs: dict[bool, list[dict[str, list[float]]]] = {False: [], True: []}
    for r in range(args.repeats):
        for tuned in ((False, True) if r % 2 == 0 else (True, False)):
            runs[tuned].append(_child(args, tuned))
    print(f"{args.model} {args.image_size} px, train batch {args.batch}, eval batch {args.eval_batch}, "
          f"{args.threads or 1} thread(s), {args.repeats} processes each, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    rows, ratios = [], {}
    for phase in ("train", "eval"):
        wall = {t: statistics.median(run[phase][0] for run in runs[t]) for t in runs}
        ratios[phase] = wall[True] / wall[False]
        for tuned in (False, True):
            sys_s = statistics.median(run[phase][1] for run in runs[tuned])
            faults = statistics.median(run[phase][2] for run in runs[tuned])
            rows.append([phase, "tuned" if tuned else "glibc default", wall[tuned] * 1e3, sys_s * 1e3,
                         f"{faults:.0f}", wall[tuned] / wall[False]])
    print_table(["phase", "malloc", "ms/step", "sys ms/step", "page faults/step", "ratio to default"], rows,
                title="glibc malloc defaults vs " + " ".join(f"{k}={v}" for k, v in TUNED_ENV.items()))
    for phase, ratio in ratios.items():
        print(ratio_line(f"tuned/default malloc, {phase} step", ratio))


if __name__ == "__main__":
    main()
