"""Drive the command line as a user would: ember.cli.main(argv) in-process, and the
installed `ember` command in a subprocess."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ember.cli import main

FAST = ["trainer.max_epochs=1", "tensorboard.enabled=false", "data.train_eval_size=64"]


def _train(tmp_path, *extra):
    code = main(["train", f"output_dir={tmp_path / 'runs'}", *FAST, *extra])
    assert code == 0
    runs = sorted((tmp_path / "runs").glob("*/*"))
    return runs[-1]


def test_train_writes_the_run_folder(tmp_path, capsys):
    run_dir = _train(tmp_path, "name=quick")
    out = capsys.readouterr().out
    assert f"run folder: {run_dir}" in out
    assert run_dir.parent.name == "quick"
    assert {p.name for p in run_dir.iterdir()} >= {
        "config.yaml", "checkpoints", "metrics.jsonl", "summary.json", "train.log"
    }
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["trainer"]["max_epochs"] == 1 and config["name"] == "quick"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0 <= summary["test"]["accuracy"] <= 1
    assert Path(summary["checkpoints"]["best"]).is_file()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["split"] for line in lines] == ["train", "val"]
    ckpt = torch.load(summary["checkpoints"]["best"], weights_only=True)
    assert ckpt["config"]["name"] == "quick" and ckpt["model_spec"]["name"] == "small_cnn"


def test_second_run_never_overwrites_the_first(tmp_path):
    first = _train(tmp_path)
    before = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    second = _train(tmp_path)
    assert first != second
    assert {p: p.read_bytes() for p in first.rglob("*") if p.is_file()} == before


def test_resume_continues_and_finished_run_says_so(tmp_path, capsys):
    run_dir = _train(tmp_path)
    assert main(["train", "--resume", str(run_dir)]) == 2
    assert "already finished: epoch 1 of trainer.max_epochs=1" in capsys.readouterr().err
    assert main(["train", "--resume", str(run_dir), "trainer.max_epochs=2"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["val"]["epoch"] == 2
    assert main(["train", "--resume", str(run_dir), "model.name=alexnet", "trainer.max_epochs=3"]) == 2
    assert "changes the model is refused" in capsys.readouterr().err


def test_evaluate_and_extract(tmp_path, capsys):
    run_dir = _train(tmp_path)
    capsys.readouterr()
    assert main(["evaluate", str(run_dir), "--split", "val"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "val" and result["samples"] == 270
    saved = json.loads((run_dir / "evaluation_val.json").read_text())
    assert saved["metrics"] == result["metrics"]
    out = tmp_path / "feats.pt"
    assert main(["extract", str(run_dir), "--layer", "features", "--output", str(out)]) == 0
    feats = torch.load(out, weights_only=True)
    assert feats["features"]["features"].shape[0] == 270
    before = out.read_bytes()
    assert main(["extract", str(run_dir), "--layer", "features", "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before


def test_models_and_datasets(capsys):
    assert main(["models"]) == 0
    assert "alexnet" in capsys.readouterr().out.split()
    assert main(["datasets"]) == 0
    assert {"digits", "shapes"} <= set(capsys.readouterr().out.split())


def test_errors_are_one_line_with_exit_codes(tmp_path, capsys):
    assert main(["train", f"output_dir={tmp_path}", "trainer.max_epoch=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Unknown config key 'trainer.max_epoch'") and err.count("\n") == 1
    assert not any(tmp_path.iterdir())
    assert main(["evaluate", str(tmp_path / "nope")]) == 2  # a path on the command line: usage
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["fly"])
    assert exit_info.value.code == 2


def test_debug_prints_traceback(tmp_path, capsys):
    assert main(["--debug", "evaluate", str(tmp_path / "nope")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_installed_command_end_to_end(tmp_path):
    exe = shutil.which("ember")
    assert exe, "the `ember` console script is not installed (pip install -e .)"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    help_run = subprocess.run([exe, "--help"], capture_output=True, text=True, env=env)
    help_s = time.perf_counter() - start
    assert help_run.returncode == 0 and "train" in help_run.stdout
    assert help_s < 2.0, f"ember --help took {help_s:.2f} s"  # torch must not be imported
    version = subprocess.run([sys.executable, "-m", "ember", "--version"], capture_output=True, text=True)
    assert version.stdout.startswith("ember ")
    result = subprocess.run(
        [exe, "train", f"output_dir={tmp_path}", *FAST], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "run folder:" in result.stdout and "test: accuracy" in result.stdout


def test_train_help_lists_every_config_key(capsys):
    import re

    from ember.config import Config, config_to_dict

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out.split("config sections and keys", 1)[1]
    blocks = re.split(r"\n  (?=\w+:)", text)  # one block per "  section: keys" entry
    for section, value in config_to_dict(Config()).items():
        if not isinstance(value, dict):
            assert section in blocks[0]
            continue
        block = next((b for b in blocks if b.startswith(f"{section}:")), None)
        assert block is not None, f"section {section} missing from `ember train --help`"
        for key in value:
            assert re.search(rf"\b{key}\b", block), f"{section}.{key} missing from `ember train --help`"
