"""The classic hand-written recipe ("训练测试 and 上GPU方法"), redone with ember step by step.

Each step quotes the recipe line it replaces (the whole loop is in README.md, "From the
classic hand-written loop to ember"). Read it top to bottom; run it as:

    python examples/recipe.py                                # AlexNet on 64 px shapes (minutes on a CPU)
    python examples/recipe.py --model small_cnn --epochs 3   # small CNN on 8x8 digits (seconds)
    python examples/recipe.py --device-ids 0,1,2             # DataParallel over GPUs 0-2 (with > 1 GPU)
    python examples/recipe.py --model small_cnn --parallel dp --checkpoint-dir /tmp/ckpt
"""

from __future__ import annotations

import argparse
import sys

import torch
from ignite.engine import Events
from torch import nn

import ember


def int_list(text: str) -> list[int]:
    return [int(i) for i in text.split(",")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["alexnet", "small_cnn"], default="alexnet",
                   help="alexnet trains on 64 px shapes, small_cnn on 8x8 digits")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-4 alexnet, 1e-3 small_cnn")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto (cuda:0 if available, else cpu), cpu, cuda:N")
    p.add_argument("--parallel", choices=["auto", "dp", "none"], default="auto",
                   help="auto: DataParallel when more than one GPU is visible, as in the recipe")
    p.add_argument("--device-ids", type=int_list, default=None,
                   help="GPUs DataParallel uses when it runs, e.g. 0,1,2 (default: all visible)")
    p.add_argument("--checkpoint-dir", default=None, help="also keep last/best checkpoints here")
    p.add_argument("--quick", action="store_true", help="256 training images: a smoke test")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    # device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = ember.resolve_device(args.device)  # a device that is not there: an error naming what is

    # Data. The recipe "assumes train_loader and test_loader"; ember builds them by name
    # (pinned memory when the device is a GPU, for the non-blocking copies of each step).
    # AlexNet needs at least 63 px, so it gets procedural shapes at 64 px.
    if args.model == "alexnet":
        n = 256 if args.quick else 3000  # training images; val and test get a sixth each
        length = {"train": n, "val": max(128, n // 6), "test": max(128, n // 6)}
        loaders = ember.get_loaders("shapes", batch_size=args.batch_size, eval_batch_size=128,
                                    device=device, seed=args.seed, image_size=64, length=length)
    else:
        loaders = ember.get_loaders("digits", batch_size=args.batch_size, eval_batch_size=256,
                                    device=device, seed=args.seed, train_subset=256 if args.quick else None)
    info = loaders.info
    # model = AlexNet()   (sub-modules `features` and `classifier`; small_cnn has both too)
    model = ember.get_model(args.model, num_classes=info.num_classes, in_channels=info.in_channels)

    # if torch.cuda.device_count() > 1: model = nn.DataParallel(model, device_ids=[0, 1, 2])
    # model.to(device)
    if args.parallel == "dp" or (args.parallel == "auto" and device.type == "cuda"
                                 and torch.cuda.device_count() > 1):
        model = ember.prepare_model(model, device=device, parallel="dp", device_ids=args.device_ids)
    else:
        model = ember.prepare_model(model, device=device, parallel="none")
    size = "x".join(str(n) for n in info.image_size)
    print(f"model {args.model} as {type(model).__name__} on {device} | data {size} px, "
          f"{len(loaders.train.dataset)} train / {len(loaders.test.dataset)} test images")

    # optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0.0004)
    # loss_func = torch.nn.CrossEntropyLoss()
    lr = args.lr if args.lr is not None else (1e-4 if args.model == "alexnet" else 1e-3)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=4e-4)
    loss_fn = nn.CrossEntropyLoss()
    # for epoch ...: model.train(True); for data, target in train_loader: data.to(device) ...;
    #   optimizer.zero_grad(); outputs = model(data); _, preds = torch.max(outputs.data, 1);
    #   loss = loss_func(outputs, target); loss.backward(); optimizer.step()
    # is one iteration of this trainer. Its output: {"y_pred": outputs, "y": target,
    # "pred": preds (torch.max(outputs, 1)), "loss": loss (detached: no .item(), no sync per step)}.
    trainer = ember.create_trainer(model, optimizer, loss_fn, device=device)

    # The recipe computes `preds` and drops them; here they count the epoch's train accuracy,
    # summed on the device so that no step waits for it.
    counts = {}

    @trainer.on(Events.EPOCH_STARTED)
    def reset_counts(engine):
        counts.update(right=torch.zeros((), device=device), seen=0)

    @trainer.on(Events.ITERATION_COMPLETED)
    def count_right(engine):
        out = engine.state.output
        counts["right"] += (out["pred"] == out["y"]).sum()
        counts["seen"] += len(out["y"])

    # model.train(False); for data, target in test_loader: outputs = model(data) ...
    # The evaluator switches to eval mode AND turns autograd off (the recipe forgets
    # torch.no_grad(), so its test loop builds a graph it never uses). Accuracy + loss attached.
    val_evaluator = ember.create_evaluator(model, loss_fn=loss_fn, device=device)

    @trainer.on(Events.EPOCH_COMPLETED)
    def validate(engine):
        val_evaluator.run(loaders.val)
        m = val_evaluator.state.metrics
        print(f"epoch {engine.state.epoch} | train loss {engine.state.output['loss'].item():.4f} "
              f"accuracy {counts['right'].item() / counts['seen']:.4f} "
              f"| val accuracy {m['accuracy']:.4f} loss {m['loss']:.4f}")

    if args.checkpoint_dir:  # optional: last + best-by-val-accuracy files, plain state_dicts
        manager = ember.attach_checkpoint(trainer, to_save={"model": model, "optimizer": optimizer,
                                          "trainer": trainer}, dirname=args.checkpoint_dir,
                                          evaluator=val_evaluator, metric="accuracy")

    trainer.run(loaders.train, max_epochs=args.epochs)

    # A second evaluator for test: runs of val_evaluator rank the best checkpoints.
    test_evaluator = ember.create_evaluator(model, loss_fn=loss_fn, device=device)
    test_evaluator.run(loaders.test)
    m = test_evaluator.state.metrics
    print(f"test accuracy {m['accuracy']:.4f} loss {m['loss']:.4f}")
    if args.checkpoint_dir:
        print(f"checkpoints: last {manager.last_path} best {manager.best_path}")

    # model.features(input) plain, model.module.features(input) under DataParallel.
    # extract_features finds the sub-module through any wrapper (and under DataParallel
    # still splits the batches over the GPUs); rows come back in dataset order.
    result = ember.extract_features(model, loaders.test, "features")
    rows = result.features["features"]
    print(f"features: {tuple(rows.shape)} rows from {len(result)} test images")
    # By hand, for one batch: unwrap_model gives `model.module` when wrapped, `model` when not
    # (under DataParallel this call runs on one GPU only: the recipe's silent slowdown).
    x, _ = next(iter(loaders.test))
    plain = ember.unwrap_model(model).eval()
    with torch.inference_mode():
        by_hand = plain.features(x.to(device)).cpu()
    diff = (by_hand - torch.as_tensor(rows[: len(x)]).cpu()).abs().max().item()
    same = by_hand.shape == rows[: len(x)].shape and diff <= 1e-4
    print(f"unwrap_model(model).features(x) on one batch: {tuple(by_hand.shape)}, "
          f"same rows: {same} (max abs difference {diff:.1e})")
    if not same:
        sys.exit("error: extract_features and unwrap_model(model).features(x) disagree")


if __name__ == "__main__":
    try:
        main()
    except ember.EmberError as err:  # a user mistake (a missing GPU, a bad device id): one line
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, ember.ConfigError) else 1)  # as `ember train` does
