"""Saved from any wrapping, loaded into any wrapping: plain, DataParallel, DDP, torch.compile."""

from __future__ import annotations

import shutil

import ignite.distributed as idist
import pytest
import torch
import torch.distributed as dist
from ignite.engine import Engine
from torch import nn

from ember.engine import prepare_model, unwrap_model
from ember.handlers.checkpoint import attach_checkpoint, load_checkpoint, read_checkpoint
from ember.models import get_model

WRAPPINGS = ("plain", "dp", "ddp", "compile")


@pytest.fixture(scope="module", autouse=True)
def process_group(tmp_path_factory):
    """A one-process gloo group, as a DDP run on one CPU has."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg')}/pg", rank=0, world_size=1)
    idist.set_local_rank(0)
    yield
    idist.finalize()


def _wrap(kind: str, model: nn.Module) -> nn.Module:
    if kind == "dp":
        return nn.DataParallel(model)
    if kind == "ddp":
        return prepare_model(model, device="cpu", parallel="ddp")
    if kind == "compile":
        if shutil.which("c++") is None and shutil.which("g++") is None:
            pytest.skip("torch.compile needs a C++ compiler for the CPU, and none is on PATH")
        return torch.compile(model)
    return model


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = get_model("small_cnn", num_classes=3, in_channels=1, width=4)
    with torch.no_grad():  # BatchNorm statistics that are not the defaults, so they must be loaded
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.mark.slow  # torch.compile's first compilation takes seconds
@pytest.mark.parametrize("source", WRAPPINGS)
@pytest.mark.parametrize("fmt", ["ember", "raw"])
def test_any_wrapping_into_any_wrapping(tmp_path, source, fmt):
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    original = _model(seed=0)
    with torch.no_grad():
        expected = original(x)
    saved = _wrap(source, original)
    if fmt == "ember":  # ember's checkpoint: always plain keys
        manager = attach_checkpoint(Engine(lambda e, b: None), to_save={"model": saved}, dirname=tmp_path)
        path = manager.save_now()
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in read_checkpoint(path)["model"])
    else:  # what torch.save(model.state_dict()) of the wrapped model gives
        path = tmp_path / "raw.pt"
        torch.save(saved.state_dict(), path)
    for target in WRAPPINGS:
        model = _wrap(target, _model(seed=1))
        load_checkpoint(path, {"model": model})
        with torch.no_grad():
            # compiled kernels round differently from eager ones, not from each other
            reference = _wrap("compile", _model(seed=0))(x) if target == "compile" else expected
            assert torch.equal(model(x), reference), f"{source} -> {target}"
        plain = unwrap_model(model).state_dict()
        assert all(torch.equal(v, original.state_dict()[k]) for k, v in plain.items())
