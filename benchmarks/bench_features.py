"""Feature extraction at scale: peak memory when streaming to disk, and speed against a hand loop.

Two measurements, each printed as a table:

1. Peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) of a fresh process that
   extracts a layer for 10k and for 100k lazily drawn ``shapes`` samples, streamed to
   ``.npy`` files (``output=``) and, for contrast, kept in memory. Streaming should
   keep the peak flat while the in-memory peak grows with the rows.
2. Throughput of ``extract_features(model, loader, "features")`` against the classic
   hand-written loop ``with torch.inference_mode(): model.features(x)`` over the same
   loader, after a warm-up, repeats interleaved (order alternating), medians. The
   images are drawn once into memory first, so that drawing them does not hide the
   extraction's own overhead (``--lazy-data`` keeps them lazy). Target ratio <= 1.05.

Defaults (small images, a small CNN, one thread) run in about a minute on a laptop
CPU; ``--samples 10000 1000000 --model alexnet --image-size 64`` and the like make
bigger runs.

Usage::

    python benchmarks/bench_features.py
    python benchmarks/bench_features.py --samples 10000 100000 --layer features.6 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ember.handlers.features import extract_features
from ember.models import get_model


class _LazyImages(Dataset):
    """Stand-in for ``shapes`` when ember.data is not there: images drawn per index."""

    def __init__(self, length: int, image_size: int) -> None:
        self.length, self.image_size = length, image_size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng(index)
        image = rng.random((3, self.image_size, self.image_size), dtype=np.float32)
        return torch.from_numpy(image), index % 8


def _dataset(length: int, image_size: int) -> Dataset:
    try:
        from ember.data import get_dataset

        return get_dataset("shapes", split="train", image_size=image_size, length=length)
    except ImportError:
        pass
    try:
        from ember.data.shapes import ShapesDataset

        return ShapesDataset("train", image_size=image_size, length=length)
    except ImportError:
        return _LazyImages(length, image_size)


def _model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"width": args.width} if args.model == "small_cnn" else {}
    return get_model(args.model, num_classes=8, **kwargs).eval()


def _loader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def _child_rss(args: argparse.Namespace) -> None:
    """Run in a fresh process: extract, then report this process's peak RSS."""
    torch.set_num_threads(args.threads)
    loader = _loader(_dataset(args.child_samples, args.image_size), args.batch_size)
    model = _model(args)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "features" if args.child_mode == "streamed" else None
        result = extract_features(model, loader, args.layer, output=output)
        row_bytes = int(np.prod(result.features[args.layer].shape[1:])) * 4
        del result
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux
    print(json.dumps({"peak_mib": peak_mib, "seconds": seconds, "row_bytes": row_bytes}))


def _measure_rss(args: argparse.Namespace, samples: int, mode: str) -> dict:
    command = [sys.executable, __file__, *_shared_flags(args)]
    command += ["--child-samples", str(samples), "--child-mode", mode]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _shared_flags(args: argparse.Namespace) -> list[str]:
    return [
        "--model", args.model, "--width", str(args.width), "--image-size", str(args.image_size),
        "--batch-size", str(args.batch_size), "--layer", args.layer, "--threads", str(args.threads),
    ]  # fmt: skip


def _hand_written(model: torch.nn.Module, loader: DataLoader) -> torch.Tensor:
    """The classic loop: the sub-module called batch by batch, outputs kept on the host."""
    rows, labels = [], []
    with torch.inference_mode():
        for x, y in loader:
            rows.append(model.features(x).cpu())
            labels.append(y)
    return torch.cat(rows)


def _throughput(args: argparse.Namespace) -> tuple[float, float, float]:
    torch.set_num_threads(args.threads)
    dataset = _dataset(args.speed_samples, args.image_size)
    if not args.lazy_data:
        images, labels = zip(*(dataset[i] for i in range(len(dataset))))
        dataset = TensorDataset(torch.stack(images), torch.as_tensor(labels))
    loader = _loader(dataset, args.batch_size)
    model = _model(args)
    runs = {
        "hand": lambda: _hand_written(model, loader),
        "ember": lambda: extract_features(model, loader, "features").features["features"],
    }
    if not torch.equal(runs["hand"](), runs["ember"]()):  # warm-up, and the same rows
        raise SystemExit("extract_features and the hand-written loop disagree")
    times: dict[str, list[float]] = {"hand": [], "ember": []}
    for repeat in range(args.repeats):
        order = ["hand", "ember"] if repeat % 2 == 0 else ["ember", "hand"]
        for name in order:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    hand, ember = statistics.median(times["hand"]), statistics.median(times["ember"])
    return args.speed_samples / hand, args.speed_samples / ember, ember / hand


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[10_000, 100_000],
                        help="data set sizes for the peak-memory table")
    parser.add_argument("--speed-samples", type=int, default=5_000, help="samples per throughput pass")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per loop")
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--width", type=int, default=16, help="small_cnn width")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--layer", default="features.6",
                        help="layer for the memory table (small_cnn features.6: 4 KiB a row at 16 px)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--lazy-data", action="store_true", help="time with lazily drawn images")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--child-samples", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", choices=["streamed", "memory"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_samples:
        _child_rss(args)
        return
    if not args.skip_memory:
        print(f"Peak RSS, layer {args.layer!r}, {args.model} at {args.image_size} px, fresh process each")
        header = ("samples", "rows on disk", "streamed MiB", "in memory MiB", "time s")
        print("{:>10} {:>13} {:>13} {:>14} {:>7}".format(*header))
        for samples in args.samples:
            streamed = _measure_rss(args, samples, "streamed")
            memory = _measure_rss(args, samples, "memory")
            size = samples * streamed["row_bytes"] / 2**20
            print(f"{samples:>10} {size:>9.0f} MiB {streamed['peak_mib']:>13.0f} "
                  f"{memory['peak_mib']:>14.0f} {streamed['seconds']:>7.1f}")
    if not args.skip_speed:
        hand, ember, ratio = _throughput(args)
        print(f"\nThroughput, layer 'features', {args.speed_samples} samples, median of {args.repeats}")
        print(f"{'hand-written loop':>18} {'extract_features':>17} {'time ratio':>11}")
        print(f"{hand:>12.0f} /s {ember:>14.0f} /s {ratio:>11.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
