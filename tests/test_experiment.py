"""ember.experiment.run from Python: the same experiment as `ember train`, with switches."""

import json

import pytest
import torch

from ember.build import build_experiment
from ember.config import load_config
from ember.experiment import run

FAST = ["trainer.max_epochs=1", "tensorboard.enabled=false", "data.train_eval_size=64"]


def _run(tmp_path, *overrides, config=None):
    return run(config, [f"output_dir={tmp_path}", *FAST, *overrides])


def test_run_returns_the_summary_it_writes(tmp_path):
    summary = _run(tmp_path, "name=api")
    on_disk = json.loads((tmp_path / "api").glob("*/summary.json").__next__().read_text())
    assert summary["test"] == on_disk["test"]
    assert summary["run_dir"].startswith(str(tmp_path / "api"))
    assert set(summary["final"]) == {"train", "val"}


def test_dict_config_and_scheduler_and_label_smoothing(tmp_path):
    summary = run(
        {"scheduler": {"name": "warmup_cosine", "warmup_epochs": 1}, "trainer": {"label_smoothing": 0.1}},
        [f"output_dir={tmp_path}", *FAST, "trainer.max_epochs=2"],
    )
    assert summary["final"]["val"]["epoch"] == 2


def test_early_stopping_stops_before_max_epochs(tmp_path):
    # lr so small nothing improves after the first evaluation: patience 1 stops at epoch 2
    summary = _run(tmp_path, "trainer.max_epochs=6", "early_stopping.patience=1", "optimizer.lr=1e-12",
                   "checkpoint.metric=loss")
    assert summary["final"]["val"]["epoch"] < 6


@pytest.mark.parametrize("switch", ["trainer.amp=bf16", "trainer.channels_last=true", "trainer.grad_accum=2",
                                    "trainer.clip_grad_norm=1.0", "optimizer.name=sgd", "trainer.deterministic=false"])
def test_switches_train_and_keep_checkpoints_plain(tmp_path, switch):
    summary = _run(tmp_path, switch)
    checkpoint = torch.load(summary["checkpoints"]["last"], weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in checkpoint["model"])
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0


@pytest.mark.slow
def test_compile_switch_keeps_checkpoints_plain(tmp_path):
    summary = _run(tmp_path, "trainer.compile=true", "data.options={}")
    checkpoint = torch.load(summary["checkpoints"]["best"], weights_only=True)
    assert not any("_orig_mod" in k for k in checkpoint["model"])


def test_features_layer_writes_features_and_projector(tmp_path):
    summary = _run(tmp_path, "features.layer=features", "tensorboard.enabled=true")
    from pathlib import Path

    features = Path(summary["features"])
    assert (features / "features.npy").is_file() and (features / "labels.npy").is_file()
    assert list(Path(summary["run_dir"]).glob("tensorboard/**/projector_config.pbtxt"))


def test_cudnn_benchmark_only_when_not_deterministic_on_cuda():
    build_experiment(load_config(None, ["trainer.deterministic=false", "trainer.device=cpu"]))
    assert torch.backends.cudnn.benchmark is False  # cpu: nothing to tune
    if torch.cuda.is_available():
        build_experiment(load_config(None, ["trainer.deterministic=false", "trainer.device=cuda"]))
        assert torch.backends.cudnn.benchmark is True
        build_experiment(load_config(None, ["trainer.deterministic=true", "trainer.device=cuda"]))
        assert torch.backends.cudnn.benchmark is False


def test_threads_setting_is_applied():
    before = torch.get_num_threads()
    try:
        build_experiment(load_config(None, ["trainer.threads=1"]))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_resume_refuses_a_new_length_for_a_run_length_schedule(tmp_path):
    from ember.errors import ConfigError

    summary = _run(tmp_path, "scheduler.name=cosine")
    with pytest.raises(ConfigError, match="trainer.max_epochs cannot change on resume with scheduler.name=cosine"):
        run(None, ["trainer.max_epochs=3"], resume=summary["run_dir"])
    config_before = (tmp_path / "digits-cnn").glob("*/config.yaml").__next__().read_bytes()
    assert b"max_epochs: 1" in config_before  # nothing was rewritten


def test_resume_errors(tmp_path):
    from ember.errors import CheckpointError, ConfigError

    summary = _run(tmp_path)
    with pytest.raises(ConfigError, match="Give either `config` or `resume`"):
        run({"seed": 1}, resume=summary["run_dir"])
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.yaml").write_text("name: x\n")
    with pytest.raises(CheckpointError, match="Run folder '.*empty_run' holds no last checkpoint to resume from"):
        run(None, resume=empty)


def test_evaluate_a_bare_state_dict_says_it_cannot_rebuild(tmp_path):
    from ember.errors import CheckpointError
    from ember.from_checkpoint import evaluate
    from ember.models import get_model

    path = tmp_path / "weights.pt"
    torch.save(get_model("small_cnn", num_classes=10, in_channels=1).state_dict(), path)
    with pytest.raises(CheckpointError, match="has no model_spec/config: it was not written by `ember train`"):
        evaluate(path)
