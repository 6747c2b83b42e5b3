"""GPU throughput, training and evaluation: ember against the hand loop, fp32 / bf16 / bf16+channels_last.

Run by ``benchmarks/gpu_check.sh`` on a machine with a CUDA GPU; ``--device cpu
--quick`` runs the same code on the CPU in seconds (the test suite does, so the
script does not rot while no GPU is at hand).

For each precision configuration, two candidates each with its own copy of the same
model (same seed) and Adam(lr=1e-3, weight_decay=4e-4), fed the same batches
already on the device (a few ``shapes`` batches, cycled), cuDNN autotuning on for
both (as ``ember train`` sets it for non-deterministic runs):

* the hand-written loop (``model.train(True); zero_grad; forward under
  torch.autocast when amp; torch.max; loss; backward; step``; channels-last model and
  inputs for that configuration);
* ``create_trainer(..., amp=..., channels_last=...)``.

The same for evaluation: ``create_evaluator`` against an ``inference_mode`` loop.
Timing brackets each pass with ``torch.cuda.synchronize()``; warm-up passes first
(cuDNN autotuning, the allocator), then ``--repeats`` interleaved rounds; medians.

Usage::

    python benchmarks/gpu_throughput.py --batch 256 --image-size 224 --iters 20
    python benchmarks/gpu_throughput.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from _common import interleaved, paired_ratio, print_table, ratio_line
from torch import nn
from torch.utils.data import DataLoader

from ember.data import get_dataset
from ember.engine import create_evaluator, create_trainer
from ember.models import get_model

CONFIGS = {
    "fp32": {"amp": None, "channels_last": False},
    "bf16": {"amp": "bf16", "channels_last": False},
    "bf16+channels_last": {"amp": "bf16", "channels_last": True},
    "fp16": {"amp": "fp16", "channels_last": False},
}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
Batch = tuple[torch.Tensor, torch.Tensor]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def _batches(args: argparse.Namespace, device: torch.device) -> list[Batch]:
    distinct = min(args.iters, 2)  # drawing 224 px shapes is slow on a CPU: draw two, cycle them
    dataset = get_dataset("shapes", split="train", image_size=args.image_size, length=args.batch * distinct)
    drawn = [(x.to(device), y.to(device)) for x, y in DataLoader(dataset, batch_size=args.batch)]
    return [drawn[i % len(drawn)] for i in range(args.iters)]


def _model(args: argparse.Namespace, device: torch.device, channels_last: bool) -> nn.Module:
    torch.manual_seed(0)
    model = get_model(args.model, num_classes=8).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=4e-4)


def _hand_train(model, optimizer, batches, device, amp, channels_last) -> Callable[[], None]:
    loss_func = nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None

    def run() -> None:
        for data, target in batches:
            if channels_last:
                data = data.contiguous(memory_format=torch.channels_last)
            model.train(True)
            optimizer.zero_grad()
            with _autocast(device, amp):
                outputs = model(data)
                loss = loss_func(outputs, target)
            _, preds = torch.max(outputs.data, 1)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()

    return run


def _hand_eval(model, batches, device, amp, channels_last) -> Callable[[], None]:
    def run() -> None:
        model.eval()
        correct = torch.zeros((), dtype=torch.long, device=device)
        with torch.inference_mode(), _autocast(device, amp):
            for data, target in batches:
                if channels_last:
                    data = data.contiguous(memory_format=torch.channels_last)
                correct += (model(data).argmax(1) == target).sum()
        correct.item()

    return run


def _synced(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    def run() -> None:
        _sync(device)
        fn()
        _sync(device)

    return run


def measure(args: argparse.Namespace, device: torch.device) -> list[dict]:
    batches = _batches(args, device)
    images = args.batch * args.iters
    results = []
    for config in args.configs:
        amp, channels_last = CONFIGS[config]["amp"], CONFIGS[config]["channels_last"]
        hand_model, ember_model = (_model(args, device, channels_last) for _ in range(2))
        hand_opt, ember_opt = _optimizer(hand_model), _optimizer(ember_model)
        trainer = create_trainer(ember_model, ember_opt, nn.CrossEntropyLoss(), device=device, amp=amp,
                                 channels_last=channels_last)
        evaluator = create_evaluator(ember_model, device=device, amp=amp, channels_last=channels_last)
        runners = {
            "train hand": _hand_train(hand_model, hand_opt, batches, device, amp, channels_last),
            "train ember": lambda trainer=trainer: trainer.run(batches, max_epochs=1),
            "eval hand": _hand_eval(hand_model, batches, device, amp, channels_last),
            "eval ember": lambda evaluator=evaluator: evaluator.run(batches),
        }
        runners = {name: _synced(fn, device) for name, fn in runners.items()}
        times = interleaved(runners, repeats=args.repeats, warmup=args.warmup)
        for kind in ("train", "eval"):
            base = times[f"{kind} hand"]
            for who in ("hand", "ember"):
                values = times[f"{kind} {who}"]
                results.append({
                    "config": config, "phase": kind, "candidate": who,
                    "median_s": statistics.median(values), "images_per_s": images / statistics.median(values),
                    "ratio_to_hand": paired_ratio(values, base), "times_s": values,
                })
        del hand_model, ember_model, hand_opt, ember_opt, trainer, evaluator
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def report(results: list[dict], args: argparse.Namespace) -> None:
    fp32 = {(r["phase"], r["candidate"]): r["images_per_s"] for r in results if r["config"] == "fp32"}
    rows = []
    for r in results:
        base = fp32.get((r["phase"], "hand"))
        speed = f"{r['images_per_s'] / base:.2f}x" if base else "—"
        rows.append([r["phase"], r["config"], r["candidate"], r["median_s"] * 1e3 / args.iters,
                     r["images_per_s"], r["ratio_to_hand"], speed])
    print_table(["phase", "config", "candidate", "ms/iter", "images/s", "time ratio to hand",
                 "speed vs fp32 hand"], rows,
                title=f"{args.model} {args.batch}x3x{args.image_size}² on {args.device_name}, {args.iters} "
                      f"iterations/pass, {args.repeats} repeats")
    for r in results:
        if r["candidate"] == "ember":
            print(ratio_line(f"ember/hand {r['phase']} {r['config']}", r["ratio_to_hand"], 1.02))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda",
                        help="cuda (default), cuda:N, or cpu (to test the script)")
    parser.add_argument("--model", default="alexnet", help="a registry model name (default alexnet)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=20, help="iterations per timed pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS),
                        default=["fp32", "bf16", "bf16+channels_last"])
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs)")
    parser.add_argument("--quick", action="store_true", help="tiny: small_cnn, 32 px, batch 4, 2 iterations")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.image_size, args.batch = "small_cnn", 32, 4
        args.iters, args.repeats, args.warmup = 2, 1, 1
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU here; use --device cpu to try the script", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        args.device_name = torch.cuda.get_device_name(device)
    else:
        args.device_name = "cpu"
    print(f"torch {torch.__version__}, device {args.device_name}, {torch.get_num_threads()} CPU threads")
    results = measure(args, device)
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                         "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
