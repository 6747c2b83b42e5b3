"""Reading and loading checkpoints: safe, forgiving about wrappers, precise about mismatches."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest
import torch
from ignite.engine import Engine
from safetensors.torch import load_file
from torch import nn

from ember.errors import CheckpointError, ConfigError
from ember.handlers.checkpoint import (
    SAFETENSORS_NAME,
    attach_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
)
from ember.models import get_model

SPEC = {"name": "small_cnn", "num_classes": 3, "in_channels": 1, "kwargs": {"width": 4}}


def _model(num_classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return get_model("small_cnn", num_classes=num_classes, in_channels=1, width=4).eval()


@pytest.fixture
def saved(tmp_path):
    """An ember checkpoint of a small_cnn, its model and its folder."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Engine(lambda e, b: None)
    manager = attach_checkpoint(trainer, to_save={"model": model, "optimizer": optimizer, "trainer": trainer},
                                dirname=tmp_path / "ckpt", extra={"model_spec": SPEC})
    trainer.run([0, 1], max_epochs=1)
    return manager.last_path, model


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- plain tools read ember's files


def test_plain_torch_and_safetensors_read_ember_files(saved):
    path, model = saved
    checkpoint = torch.load(path, weights_only=True)
    plain = _model(seed=1)
    plain.load_state_dict(checkpoint["model"])
    assert _same_weights(plain, model)
    weights = load_file(path.parent / SAFETENSORS_NAME)
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_latest_checkpoint(tmp_path):
    for name in ("last_iteration=9.pt", "last_iteration=10.pt", "best_epoch=99_accuracy=1.0000.pt", "x.pt"):
        (tmp_path / name).write_bytes(b"")
    assert latest_checkpoint(tmp_path) == tmp_path / "last_iteration=10.pt"
    assert latest_checkpoint(tmp_path / "missing") is None


# ---------------------------------------------------------------- unreadable files


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"Checkpoint file '.*nope\.pt' does not exist"):
        read_checkpoint(tmp_path / "nope.pt")


def test_folder_instead_of_file(saved):
    path, _ = saved
    with pytest.raises(CheckpointError, match=r"is a folder, not a checkpoint file; its newest checkpoint is "
                                              r"'.*last_iteration=2\.pt'"):
        read_checkpoint(path.parent)


def _corrupt(content: str, good: bytes) -> bytes:
    if content.startswith("random"):  # random bytes break the unpickler in many different ways
        return random.Random(content).randbytes(4096)
    if content.startswith("flipped"):  # a valid zip whose pickle was damaged
        data = bytearray(good)
        start = data.find(b"data.pkl") + 40
        data[start:start + 64] = random.Random(content).randbytes(64)
        return bytes(data)
    return {"truncated": good[:1000], "empty": b""}[content]


@pytest.mark.parametrize("content", [*(f"random{i}" for i in range(12)), "flipped", "truncated", "empty"])
def test_corrupt_files(saved, tmp_path, content):
    path, _ = saved
    bad = tmp_path / "bad.pt"
    bad.write_bytes(_corrupt(content, path.read_bytes()))
    with pytest.raises(CheckpointError, match=r"is not a readable checkpoint \(truncated or corrupt\?\)"):
        read_checkpoint(bad)


class _Payload:
    """Unpickling this would create a file: what a malicious checkpoint could do."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_code_executing_pickle_is_refused_and_never_runs(tmp_path):
    target = tmp_path / "pwned"
    torch.save({"model": {"w": torch.ones(1)}, "payload": _Payload(str(target))}, tmp_path / "evil.pt")
    message = r"was not loaded: unpickling it would run code \(.*open\), which ember refuses for safety"
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "evil.pt", {"model": nn.Linear(1, 1)})
    assert not target.exists()


def test_not_a_dict(tmp_path):
    torch.save(torch.ones(2), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match=r"holds a Tensor, not a checkpoint \(a dict\)"):
        read_checkpoint(tmp_path / "tensor.pt")


# ---------------------------------------------------------------- model states in any format


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module.",
                                    "module.module."])
@pytest.mark.parametrize("bare", [True, False], ids=["bare", "ember"])
def test_prefixed_and_bare_state_dicts(saved, tmp_path, prefix, bare):
    _, model = saved
    state = OrderedDict((prefix + k, v) for k, v in model.state_dict().items())
    torch.save(state if bare else {"model": state}, tmp_path / "weights.pt")
    target = _model(seed=1)
    load_checkpoint(tmp_path / "weights.pt", {"model": nn.DataParallel(target)})
    assert _same_weights(target, model)


def test_a_model_with_a_real_module_prefix_keeps_it(tmp_path):
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(2, 2)

    source, target = Holder(), Holder()
    torch.save(source.state_dict(), tmp_path / "w.pt")  # keys "module.weight", "module.bias"
    load_checkpoint(tmp_path / "w.pt", {"model": target})
    assert _same_weights(target, source)


def test_bare_state_dict_with_more_than_a_model(saved, tmp_path):
    _, model = saved
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match=r"holds model weights alone \(a bare state_dict\): load it with "
                                              r"to_load=\{'model': model\}, not \['model', 'optimizer'\]"):
        load_checkpoint(tmp_path / "weights.pt", {"model": model, "optimizer": torch.optim.SGD(
            model.parameters(), lr=1)})


# ---------------------------------------------------------------- what does not fit


def test_other_architecture(saved):
    path, _ = saved
    other = nn.Sequential(nn.Linear(64, 3))
    message = (r"Checkpoint '.*' holds small_cnn\(num_classes=3, in_channels=1, width=4\), which does not fit "
               r"the model given \(Sequential\): missing keys: 0\.weight, 0\.bias; unexpected keys: "
               r"features\.0\.weight, features\.0\.bias, .* \(and \d+ more\)\. Build the model")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, {"model": other})


def test_other_num_classes(saved):
    path, _ = saved
    with pytest.raises(CheckpointError, match=r"shape mismatches: classifier\.4\.weight \(file \[3, 8\], "
                                              r"model \[5, 8\]\), classifier\.4\.bias \(file \[3\], model \[5\]\)"):
        load_checkpoint(path, {"model": _model(num_classes=5)})


def test_strict_false_loads_what_fits(saved, caplog):
    path, model = saved
    target = _model(num_classes=5, seed=1)
    head = target.classifier[4].weight.clone()
    load_checkpoint(path, {"model": target}, strict=False)
    assert torch.equal(target.features[0].weight, model.features[0].weight)
    assert torch.equal(target.classifier[4].weight, head)  # not touched
    assert "Loading 23 of 25 tensors" in caplog.text


def test_model_spec_change_is_refused(saved):
    path, _ = saved
    asked = {**SPEC, "num_classes": 5}
    with pytest.raises(CheckpointError, match=r"Resuming with a config that changes the model is refused: file has "
                                              r"small_cnn\(num_classes=3, in_channels=1, width=4\), config asks "
                                              r"small_cnn\(num_classes=5, in_channels=1, width=4\)"):
        load_checkpoint(path, {"model": _model()}, expected_model=asked)
    load_checkpoint(path, {"model": _model()}, expected_model={**SPEC, "kwargs": {"width": 4}})  # same model


def test_entry_missing_from_the_file(saved):
    path, model = saved
    scheduler = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(model.parameters(), lr=1), 1)
    with pytest.raises(CheckpointError, match=r"has no 'scheduler' entry; it holds: checkpoint_manager, "
                                              r"ember_version, model, model_spec, optimizer, rng, trainer"):
        load_checkpoint(path, {"model": model, "scheduler": scheduler})


def test_entry_that_does_not_fit_its_object(saved):
    path, _ = saved
    other = torch.optim.SGD([torch.zeros(1)], lr=1)
    with pytest.raises(CheckpointError, match=r"Could not load 'optimizer' from '.*last_iteration=2.pt': loaded "
                                              r"state dict contains a parameter group that doesn't match"):
        load_checkpoint(path, {"optimizer": other})


def test_to_load_must_be_a_mapping(saved):
    with pytest.raises(ConfigError, match=r"Argument `to_load` should be a mapping of names to objects, got list"):
        load_checkpoint(saved[0], [saved[1]])
