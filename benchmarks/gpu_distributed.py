"""Single device vs DataParallel vs DDP (and bf16): images/s, and do the paths agree?

The same AlexNet (no dropout, no BatchNorm: every path must compute the same update)
trains from the same seed on the same global batches for a few SGD steps:

- ``single``: one device, the whole batch;
- ``dp``: ``nn.DataParallel`` over the visible GPUs (on a CPU machine: the module itself);
- ``ddp``: one process per GPU (nccl; gloo with ``--device cpu``), each rank a slice of
  every global batch, gradients averaged by DDP;
- ``single-bf16``: the single path under bf16 autocast (speed; agreement only loose).

Final weights are compared with the single path (max |diff| / max |w|) and images/s
printed side by side. ``python benchmarks/gpu_distributed.py --device cpu --quick``
runs the same code on a CPU (gloo, 2 processes), which keeps it from rotting.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Events
from torch import nn

from ember import create_trainer, prepare_model, unwrap_model
from ember.config import load_config
from ember.distributed import launch
from ember.logs import configure_logging
from ember.models import get_model


def _batches(n: int, batch: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(batch, 3, size, size, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
        for _ in range(n)
    ]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return get_model("alexnet", num_classes=10, dropout=0.0)


def _train(model: nn.Module, batches: list, amp: str | None = None) -> float:
    """Train on ``batches``; returns seconds for all but the first (warm-up) step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = create_trainer(model, optimizer, nn.CrossEntropyLoss(), amp=amp)
    marks: list[float] = []

    def mark(_: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    trainer.add_event_handler(Events.ITERATION_COMPLETED, mark)
    trainer.run(batches, max_epochs=1)
    return marks[-1] - marks[0]


def _ddp_worker(local_rank: int, config: object, args: argparse.Namespace, out: Path) -> None:
    rank, world = idist.get_rank(), idist.get_world_size()
    step = args.batch // world
    batches = [
        (x[rank * step : (rank + 1) * step], y[rank * step : (rank + 1) * step])
        for x, y in _batches(args.iters, args.batch, args.image_size)
    ]
    model = prepare_model(_model(), parallel="ddp")
    seconds = _train(model, batches)
    if rank == 0:
        torch.save({"seconds": seconds, "state": unwrap_model(model).state_dict()}, out)


def _disagreement(a: dict, b: dict) -> float:
    return max(
        ((a[k].float().cpu() - b[k].float().cpu()).abs().max() / b[k].abs().max().clamp_min(1e-12)).item()
        for k in b
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max relative weight difference")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    args = parser.parse_args(argv)
    configure_logging()
    if args.quick:
        args.batch, args.image_size, args.iters = 8, 64, 3
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU here; use --device cpu", file=sys.stderr)
        return 2
    # exact float32 math on every path, so that they can agree
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    device = "cuda:0" if args.device == "cuda" else "cpu"
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    batches = _batches(args.iters, args.batch, args.image_size)
    images = args.batch * (args.iters - 1)
    rows = []

    single = prepare_model(_model(), device=device, parallel="none")
    rows.append(("single", _train(single, batches)))
    reference = {k: v.detach().clone() for k, v in single.state_dict().items()}
    results = {"single": reference}

    dp = prepare_model(_model(), device=device, parallel="dp")
    rows.append((f"dp x{max(gpus, 1)}", _train(dp, batches)))
    results[rows[-1][0]] = unwrap_model(dp).state_dict()

    nproc = gpus if gpus else 2
    backend = "nccl" if gpus else "gloo"
    config = load_config(
        None,
        ["trainer.parallel=ddp", f"distributed.nproc_per_node={nproc}", f"distributed.backend={backend}"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.pt"
        launch(_ddp_worker, config, args, out)
        saved = torch.load(out, weights_only=True)
    rows.append((f"ddp x{nproc} ({backend})", saved["seconds"]))
    results[rows[-1][0]] = saved["state"]

    bf16 = prepare_model(_model(), device=device, parallel="none")
    rows.append(("single-bf16", _train(bf16, batches, amp="bf16")))
    results["single-bf16"] = bf16.state_dict()

    size = f"{args.batch}x3x{args.image_size}x{args.image_size}"
    print(f"alexnet {size}, {args.iters - 1} timed SGD steps, {device}")
    print(f"| path | images/s | ratio to single | max rel. weight diff | agrees (<= {args.tolerance}) |")
    print("|---|---|---|---|---|")
    failed = 0
    for name, seconds in rows:
        diff = _disagreement(results[name], reference)
        exact_path = name != "single-bf16"
        agrees = diff <= args.tolerance if exact_path else diff <= 0.1
        failed += not agrees
        print(
            f"| {name} | {images / seconds:.1f} | {rows[0][1] / seconds:.3f} | {diff:.2e} | "
            f"{'yes' if agrees else 'NO'}{'' if exact_path else ' (loose: bf16)'} |"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
