"""The example scripts run end to end on tiny settings, and what they print is true."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ember

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # cwd: a temporary folder, so that nothing lands in the repository
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow  # a subprocess training 2 epochs, then a check in-process: ~13 s on a loaded 2-core CPU
def test_recipe_trains_evaluates_and_extracts_through_dataparallel(tmp_path):
    ckpt = tmp_path / "ckpt"
    out = _ok(_run("recipe.py", "--model", "small_cnn", "--epochs", "2", "--quick",
                   "--parallel", "dp", "--checkpoint-dir", str(ckpt), cwd=tmp_path))

    assert "as DataParallel on cpu" in out or "as DataParallel on cuda" in out
    assert len(re.findall(r"^epoch \d \| train loss [\d.]+ accuracy [\d.]+ \| val accuracy", out, re.M)) == 2
    test_acc = float(re.search(r"^test accuracy ([\d.]+) loss", out, re.M).group(1))
    assert 0.3 < test_acc <= 1.0  # 10 classes: chance is 0.1
    # digits test split: 270 images; small_cnn's `features` ends in a 64-channel 2x2 pool
    assert "features: (270, 64, 2, 2) rows from 270 test images" in out
    assert re.search(r"features\(x\) on one batch: \(256, 64, 2, 2\), same rows: True", out)

    # the last checkpoint holds the final weights, saved from DataParallel as a plain
    # state_dict: loaded into an unwrapped model it gives the printed test accuracy
    last = Path(re.search(r"^checkpoints: last (\S+) best (\S+)", out, re.M).group(1))
    state = torch.load(last, weights_only=True)
    assert not any(key.startswith("module.") for key in state["model"])
    model = ember.get_model("small_cnn", num_classes=10, in_channels=1)
    model.load_state_dict(state["model"])
    evaluator = ember.create_evaluator(model, device="cpu")
    evaluator.run(ember.get_loaders("digits", batch_size=256).test)
    assert round(evaluator.state.metrics["accuracy"], 4) == test_acc


@pytest.mark.skipif(torch.cuda.device_count() >= 3, reason="the error needs fewer than 3 GPUs")
def test_recipe_missing_gpus_is_one_line_error(tmp_path):
    result = _run("recipe.py", "--model", "small_cnn", "--quick", "--epochs", "1",
                  "--parallel", "dp", "--device-ids", "0,1,2", cwd=tmp_path)
    assert result.returncode == 1
    assert re.fullmatch(r"error: DataParallel was asked to use device_ids=\[0, 1, 2\], but .*\n", result.stderr)
    assert "epoch" not in result.stdout


@pytest.mark.slow  # two 1-epoch experiments in one subprocess: ~14-19 s on a loaded 2-core CPU
def test_sweep_writes_one_run_per_lr_and_a_true_table(tmp_path):
    runs = tmp_path / "runs"
    out = _ok(_run("sweep.py", "--lrs", "1e-3,3e-3", "--epochs", "1", "--output-dir", str(runs),
                   "--no-tensorboard", "--quiet", cwd=tmp_path))

    header, *lines = out.strip().splitlines()
    assert header.split()[:4] == ["lr", "best", "val", "accuracy"]
    rows = [line.split(maxsplit=4) for line in lines]
    assert sorted(float(r[0]) for r in rows) == [1e-3, 3e-3]
    assert [float(r[1]) for r in rows] == sorted((float(r[1]) for r in rows), reverse=True)
    for lr, best, epoch, test, run_dir in rows:
        run_dir = Path(run_dir)
        assert run_dir.parent == runs / f"sweep-lr{float(lr):g}"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert f"{summary['test']['accuracy']:.4f}" == test
        assert f"{summary['best']['val']['value']:.4f}" == best
        assert summary["best"]["val"]["epoch"] == int(epoch) == 1
        assert f"lr: {float(lr)}" in (run_dir / "config.yaml").read_text()
        assert not (run_dir / "tensorboard").exists()


def test_sweep_bad_override_is_refused_before_any_run(tmp_path):
    result = _run("sweep.py", "--lrs", "1e-3", "--output-dir", str(tmp_path / "runs"), "--quiet",
                  "optimizer.lrr=3", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "error: Unknown config key 'optimizer.lrr' (command line). Did you mean 'optimizer.lr'?\n"
    assert not (tmp_path / "runs").exists()
