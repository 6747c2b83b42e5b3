"""A learning-rate sweep: one ``ember.experiment.run`` (one run folder) per value, then a table.

    python examples/sweep.py --lrs 3e-4,1e-3,3e-3 --epochs 5
    python examples/sweep.py --config configs/shapes_alexnet.yaml --lrs 1e-4,3e-4 --epochs 2
    python examples/sweep.py --lrs 1e-3,3e-3 data.batch_size=32 trainer.amp=bf16   # more overrides

Each value gets ``<output-dir>/sweep-lr<value>/<timestamp>/`` with the usual config.yaml,
checkpoints, metrics.jsonl and summary.json; the table is sorted by best val accuracy.
"""

from __future__ import annotations

import argparse
import logging
import sys

import ember
from ember.experiment import run


def float_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="more key=value overrides, as for `ember train`")
    p.add_argument("--config", default=None, help="YAML config (default: small_cnn on digits)")
    p.add_argument("--lrs", type=float_list, default=[3e-4, 1e-3, 3e-3],
                   help="comma-separated learning rates (default 3e-4,1e-3,3e-3)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--output-dir", default="runs")
    p.add_argument("--no-tensorboard", action="store_true", help="skip TensorBoard event files")
    p.add_argument("--quiet", action="store_true", help="print the table only, no progress lines")
    return p.parse_args(argv)


def sweep(args: argparse.Namespace) -> list[dict]:
    rows = []
    for lr in args.lrs:
        overrides = [
            *args.overrides,
            f"optimizer.lr={lr!r}",  # repr: full precision, and YAML reads it as a float
            f"trainer.max_epochs={args.epochs}",
            f"output_dir={args.output_dir}",
            f"name=sweep-lr{lr:g}",
        ]
        if args.no_tensorboard:
            overrides.append("tensorboard.enabled=false")
        summary = run(args.config, overrides)  # writes the run folder, returns its summary.json
        best = summary["best"]["val"]
        rows.append({
            "lr": lr,
            "metric": best["metric"],
            "best": best["value"],
            "epoch": best["epoch"],
            "test": summary["test"][best["metric"]],
            "run_dir": summary["run_dir"],
        })
    # best first: higher is better unless the checkpoint metric is a loss
    higher = summary["best"]["val"]["mode"] == "max"
    return sorted(rows, key=lambda r: -r["best"] if higher else r["best"])


def print_table(rows: list[dict]) -> None:
    metric = rows[0]["metric"]
    print(f"{'lr':>10}  {'best val ' + metric:>18}  {'epoch':>5}  {'test ' + metric:>14}  run folder")
    for r in rows:
        print(f"{r['lr']:>10g}  {r['best']:>18.4f}  {r['epoch']:>5d}  {r['test']:>14.4f}  {r['run_dir']}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.quiet:  # ember logs each epoch's metrics; show them on stderr
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        logging.getLogger("ignite").setLevel(logging.WARNING)
    print_table(sweep(args))


if __name__ == "__main__":
    try:
        main()
    except ember.EmberError as err:  # a bad key or value in the overrides: one line, nothing run
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, ember.ConfigError) else 1)  # as `ember train` does
