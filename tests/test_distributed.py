"""Several processes on the CPU: gloo, 2 processes (slow: each spawn imports torch twice)."""

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ignite.distributed as idist
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ember import create_trainer, prepare_model, unwrap_model
from ember.cli import main
from ember.config import load_config
from ember.distributed import launch, resolve_backend
from ember.errors import ConfigError, DeviceError, EmberError
from ember.handlers import load_checkpoint
from ember.models import get_model

pytestmark = pytest.mark.slow

DDP = ["trainer.parallel=ddp", "distributed.nproc_per_node=2", "distributed.backend=gloo"]
FAST = ["trainer.max_epochs=2", "tensorboard.enabled=false", "data.train_eval_size=0"]


def _run_dir(root: Path) -> Path:
    return sorted(root.glob("*/*"))[-1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    assert main(["train", f"output_dir={root}", *DDP, *FAST]) == 0
    return _run_dir(root)


def test_two_process_run_loads_into_a_plain_model(ddp_run):
    summary = json.loads((ddp_run / "summary.json").read_text())
    model = get_model("small_cnn", num_classes=10, in_channels=1)
    checkpoint = torch.load(summary["checkpoints"]["best"], weights_only=True)
    model.load_state_dict(checkpoint["model"])  # plain keys: no "module." from DDP
    assert checkpoint["config"]["distributed"]["nproc_per_node"] == 2
    lines = (ddp_run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # rank 0 alone writes: one line per evaluation


def test_test_accuracy_equals_single_process_evaluate(ddp_run, capsys):
    summary = json.loads((ddp_run / "summary.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", str(ddp_run), "--split", "test"]) == 0
    single = json.loads(capsys.readouterr().out)
    # exact: eval shards are not padded, so no sample is counted twice
    assert single["metrics"]["accuracy"] == summary["test"]["accuracy"]
    assert single["metrics"]["loss"] == pytest.approx(summary["test"]["loss"], rel=1e-6)


def _data():
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen))


def _linear_model():
    torch.manual_seed(0)  # no BatchNorm: per-process batches then average like one big batch
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _ddp_sgd(local_rank, config, out):
    model = prepare_model(_linear_model(), parallel="ddp")
    data = _data()
    loader = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, shuffle=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    create_trainer(model, optimizer, nn.CrossEntropyLoss()).run(loader, max_epochs=2)
    if idist.get_rank() == 0:
        torch.save(unwrap_model(model).state_dict(), out)
    del model, optimizer
    gc.collect()  # free DDP before the process group goes (avoids a teardown abort)


def test_ddp_half_batches_equal_one_process_full_batch(tmp_path):
    config = load_config(None, DDP)
    out = tmp_path / "ddp.pt"
    launch(_ddp_sgd, config, out)
    model = _linear_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    create_trainer(model, optimizer, nn.CrossEntropyLoss()).run(
        DataLoader(_data(), batch_size=16), max_epochs=2
    )
    ddp = torch.load(out, weights_only=True)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-6)


def _raise_on_rank_1(local_rank, config):
    if idist.get_rank() == 1:
        raise ValueError("rank one is broken")
    idist.barrier()  # rank 0 would wait here forever if the failure did not stop it


def test_a_raising_rank_ends_the_run_with_its_message(tmp_path):
    config = load_config(None, DDP)
    start = time.monotonic()
    with pytest.raises(EmberError, match="rank 1 failed: ValueError: rank one is broken"):
        launch(_raise_on_rank_1, config)
    assert time.monotonic() - start < 120


def test_a_data_error_in_the_ranks_is_one_line_and_leaves_no_folder(tmp_path, capsys):
    code = main(["train", f"output_dir={tmp_path}", *DDP, *FAST, "data.name=cifar10", f"data.root={tmp_path}/none"])
    assert code == 1
    assert "not found" in capsys.readouterr().err
    assert not any(tmp_path.glob("*/*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_nccl_without_gpus_is_refused_before_spawning():
    with pytest.raises(DeviceError, match="distributed.backend=nccl needs CUDA GPUs and this machine has none"):
        resolve_backend(load_config(None, ["distributed.backend=nccl", "distributed.nproc_per_node=2"]))
    with pytest.raises(ConfigError, match="trainer.parallel=dp is the single-process multi-GPU mode"):
        resolve_backend(load_config(None, ["trainer.parallel=dp", "distributed.nproc_per_node=2"]))


@pytest.mark.gpu
def test_more_processes_than_gpus_with_nccl():
    n = torch.cuda.device_count() + 1
    with pytest.raises(DeviceError, match=f"nproc_per_node={n} processes with nccl need one GPU each"):
        resolve_backend(load_config(None, ["distributed.backend=nccl", f"distributed.nproc_per_node={n}"]))


def test_killed_two_process_run_resumes_and_finishes(tmp_path):
    args = [sys.executable, "-m", "ember", "train", f"output_dir={tmp_path}", *DDP,
            "trainer.max_epochs=3", "tensorboard.enabled=false", "data.train_eval_size=0",
            "checkpoint.every_iters=5"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    ckpts = None
    while time.monotonic() < deadline:  # kill everything once a mid-run checkpoint exists
        found = list(tmp_path.glob("*/*/checkpoints/last_iteration=*.pt"))
        if found and int(found[0].stem.split("=")[1]) >= 15:
            ckpts = found
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpts, "the run made no checkpoint to resume from"
    run_dir = _run_dir(tmp_path)
    assert not (run_dir / "summary.json").exists()
    assert main(["train", "--resume", str(run_dir)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["val"]["epoch"] == 3
    model = get_model("small_cnn", num_classes=10, in_channels=1)
    load_checkpoint(summary["checkpoints"]["last"], {"model": model})


def test_ctrl_c_stops_every_rank_with_a_checkpoint_and_resumes(tmp_path):
    args = [sys.executable, "-m", "ember", "train", f"output_dir={tmp_path}", *DDP, "trainer.max_epochs=8",
            "tensorboard.enabled=false", "data.train_eval_size=0", "trainer.log_every=2", "data.batch_size=16"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not list(tmp_path.glob("*/*/checkpoints/last_iteration=*.pt")):
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere in the middle of an epoch
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: every process gets it
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Interrupted by SIGINT: checkpoint saved to" in err and "ember train --resume" in err
    run_dir = _run_dir(tmp_path)
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["final"]["val"]["epoch"] == 8
