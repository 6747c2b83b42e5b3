"""Speed switches give the same results, and the trainer does not wait for the device.

Each switch is off unless asked for; each is checked here on the CPU for what it must
not change (results within tolerance, checkpoint keys) and for doing what it says
(autocast really runs in the low precision, a GradScaler really scales and skips
steps whose gradients overflow, weights and inputs really are channels-last).

Checked elsewhere: cudnn.benchmark only for non-deterministic CUDA runs
(tests/test_experiment.py), pinned memory only for CUDA devices (tests/data).
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from contextlib import contextmanager

import pytest
import torch
from ignite.engine import Engine, Events, create_supervised_trainer
from torch import nn
from torch.nn import functional as F

from ember.engine import create_evaluator, create_trainer, eval_step, unwrap_model
from ember.handlers.progress import attach_progress
from ember.models import get_model


def _cnn(in_channels: int = 1, width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return get_model("small_cnn", num_classes=10, in_channels=in_channels, width=width, dropout=0.0)


def _batches(n: int, in_channels: int = 1, size: int = 8, batch: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(batch, in_channels, size, size, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
        for _ in range(n)
    ]


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]


# --- automatic mixed precision -------------------------------------------------------


def test_bf16_autocast_runs_in_bf16_and_keeps_fp32_weights():
    model = _cnn()
    reference = copy.deepcopy(model)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), nn.CrossEntropyLoss(), amp="bf16")
    assert trainer.state.scaler is None  # bf16 has fp32's range: nothing to scale
    batches = _batches(3)
    trainer.run(batches, max_epochs=1)
    assert trainer.state.output["y_pred"].dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    create_trainer(reference, torch.optim.SGD(reference.parameters(), lr=0.05), nn.CrossEntropyLoss()).run(
        batches, max_epochs=1
    )
    assert 0 < _max_diff(model, reference) < 0.05  # low precision: close, not equal


def test_bf16_evaluation_agrees_with_fp32():
    model = _cnn().eval()
    batches = _batches(4)
    accuracy = {}
    for amp in (None, "bf16"):
        evaluator = create_evaluator(model, amp=amp)
        evaluator.run(batches)
        accuracy[amp] = evaluator.state.metrics["accuracy"]
    assert abs(accuracy[None] - accuracy["bf16"]) <= 2 / 64  # at most a borderline sample or two
    out = eval_step(model, amp="bf16")(Engine(lambda e, b: None), batches[0])
    assert out["y_pred"].dtype == torch.bfloat16


def test_fp16_grad_scaler_really_scales():
    model = _cnn()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), nn.CrossEntropyLoss(), amp="fp16")
    scaler = trainer.state.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    scale = scaler.get_scale()
    assert scale == 2.0**16
    weight = _conv_weights(model)[-1]
    seen = []
    weight.register_hook(lambda grad: seen.append(grad.detach().clone()))
    trainer.run(_batches(1), max_epochs=1)
    assert trainer.state.output["y_pred"].dtype == torch.float16
    # backward saw the scaled gradient; the optimizer stepped with the unscaled one
    assert torch.allclose(seen[0] / scale, weight.grad, rtol=1e-6, atol=0)
    assert weight.grad.abs().max() > 0
    assert scaler.get_scale() == scale  # a finite step leaves the scale (it grows every 2000)


def test_fp16_step_with_inf_gradients_is_skipped_and_scale_backs_off():
    model = _cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, target)
        return loss * float("inf") if trainer.state.iteration == 2 else loss

    trainer = create_trainer(model, optimizer, loss_fn, amp="fp16")
    scaler = trainer.state.scaler
    snapshots = {}

    @trainer.on(Events.ITERATION_COMPLETED)
    def snapshot(engine: Engine) -> None:
        # parameters only: BatchNorm's running statistics move with every forward pass
        snapshots[engine.state.iteration] = {n: p.detach().clone() for n, p in model.named_parameters()}

    trainer.run(_batches(3), max_epochs=1)
    assert _max_diff_dicts(snapshots[1], snapshots[2]) == 0  # the overflowing step was skipped
    assert _max_diff_dicts(snapshots[2], snapshots[3]) > 0  # the next one was not
    assert scaler.get_scale() == 2.0**15  # halved once


def _max_diff_dicts(a: dict, b: dict) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a.values(), b.values()))


# --- channels-last memory format -----------------------------------------------------


def test_channels_last_same_results_and_channels_last_weights_and_inputs():
    contiguous = _cnn(in_channels=3)
    channels_last = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(channels_last))
    assert not all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(contiguous))
    seen = []
    first_conv = next(m for m in channels_last.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    batches = _batches(3, in_channels=3)
    step = Engine(lambda e, b: None)
    expected = eval_step(contiguous)(step, batches[0])["y_pred"]
    got = eval_step(channels_last, channels_last=True)(step, batches[0])["y_pred"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    for model, flag in ((contiguous, False), (channels_last, True)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        create_trainer(model, optimizer, nn.CrossEntropyLoss(), channels_last=flag).run(batches, max_epochs=1)
    assert _max_diff(contiguous, channels_last) < 1e-5
    assert all(seen), "the model was fed contiguous (NCHW) inputs"
    # an optimizer step keeps the layout
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(channels_last))


def test_experiment_puts_weights_in_channels_last():
    from ember.build import build_experiment
    from ember.config import load_config

    config = load_config(None, ["trainer.channels_last=true", "trainer.device=cpu"])
    model = unwrap_model(build_experiment(config).model)
    convs = _conv_weights(model)
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert any(not w.is_contiguous() for w in convs)  # really NHWC, not a 1-channel no-op


# --- torch.compile ---------------------------------------------------------------------


def test_unwrap_compiled_model_gives_plain_state_dict_keys():
    model = _cnn()
    compiled = torch.compile(model)  # wrapping only; nothing is compiled until it runs
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    for wrapped in (compiled, nn.DataParallel(compiled), torch.compile(nn.DataParallel(model))):
        keys = list(unwrap_model(wrapped).state_dict())
        assert keys == list(model.state_dict())
        assert not any("_orig_mod." in k or k.startswith("module.") for k in keys)


@pytest.mark.slow
def test_compiled_model_same_outputs_and_training():
    eager = _cnn(width=4)
    plain = copy.deepcopy(eager)
    compiled = torch.compile(plain)
    batches = _batches(2)
    step = Engine(lambda e, b: None)
    torch.testing.assert_close(
        eval_step(compiled)(step, batches[0])["y_pred"], eval_step(eager)(step, batches[0])["y_pred"],
        rtol=1e-5, atol=1e-5,
    )
    for model in (eager, compiled):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        create_trainer(model, optimizer, nn.CrossEntropyLoss()).run(batches, max_epochs=1)
    assert _max_diff(eager, unwrap_model(compiled)) < 1e-5
    assert list(unwrap_model(compiled).state_dict()) == list(eager.state_dict())


# --- persistent workers ---------------------------------------------------------------


def test_loader_workers_persist_across_epochs():
    from ember.data import get_loaders

    length = {"train": 32, "val": 8, "test": 8}
    loaders = get_loaders("shapes", batch_size=16, num_workers=1, image_size=8, length=length)
    assert loaders.train.persistent_workers and loaders.val.persistent_workers
    first = iter(loaders.train)
    list(first)
    assert iter(loaders.train) is first  # the same worker processes serve the next epoch
    assert not get_loaders("shapes", batch_size=16, num_workers=0, image_size=8, length=length).train.persistent_workers


# --- train/eval mode switch each step ----------------------------------------------------


def test_step_switches_modes_back_like_the_hand_loop():
    model = _cnn()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), nn.CrossEntropyLoss())
    batches = _batches(2)
    model.eval()  # as an evaluator leaves it
    trainer.run(batches[:1], max_epochs=1)
    assert all(m.training for m in model.modules())
    model.features[1].eval()  # one sub-module only: model.train() each step resets it too
    trainer.run(batches[:1], max_epochs=1)
    assert all(m.training for m in model.modules())
    evaluator = create_evaluator(model)
    model.classifier.train()
    evaluator.run(batches)
    assert not any(m.training for m in model.modules())


def test_step_calls_an_overridden_train_every_time():
    class FrozenBatchNorm(nn.Module):
        """A model that keeps its BatchNorm in eval mode through its own train()."""

        def __init__(self) -> None:
            super().__init__()
            self.net = _cnn()
            self.calls = 0

        def train(self, mode: bool = True) -> FrozenBatchNorm:
            self.calls += 1
            super().train(mode)
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
            return self

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    model = FrozenBatchNorm()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), nn.CrossEntropyLoss())
    trainer.run(_batches(3), max_epochs=1)
    assert model.calls == 3
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


# --- host/device synchronisation ---------------------------------------------------------

# Python-level ways to bring a tensor's value to the host: each waits for the device.
_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextmanager
def _count_syncs():
    """Count calls of the tensor methods that read values back to the host, by tensor."""
    calls: list[tuple[str, torch.Tensor]] = []
    originals = {name: getattr(torch.Tensor, name) for name in _SYNCS}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            calls.append((name, self))
            return original(self, *args, **kwargs)

        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _device_syncs(calls, optimizer) -> Counter:
    # Adam reads its ``step`` counter with .item(); that tensor lives on the host even
    # when the model is on a GPU (unless capturable/fused), so it is no device sync.
    host_state = {id(s["step"]) for s in optimizer.state.values() if torch.is_tensor(s.get("step"))}
    return Counter(name for name, tensor in calls if id(tensor) not in host_state)


def _syncs_per_run(make_trainer, iterations: int) -> Counter:
    model = _cnn(width=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=4e-4)
    trainer = make_trainer(model, optimizer)
    batches = _batches(iterations)
    with _count_syncs() as calls:
        trainer.run(batches, max_epochs=1)
    return _device_syncs(calls, optimizer)


@pytest.mark.parametrize("deterministic", [False, True])
def test_trainer_does_not_sync_host_and_device_per_step(deterministic):
    def make(model, optimizer):
        return create_trainer(model, optimizer, nn.CrossEntropyLoss(), deterministic=deterministic)

    short, long = _syncs_per_run(make, 2), _syncs_per_run(make, 10)
    per_step = {name: (long[name] - short[name]) / 8 for name in set(short) | set(long)}
    assert all(n == 0 for n in per_step.values()), f"host syncs per step: {per_step}"


def test_sync_counter_sees_ignites_per_step_loss_item():
    """The counter can fail: ignite's own trainer reads the loss with .item() every step."""

    def make(model, optimizer):
        return create_supervised_trainer(model, optimizer, nn.CrossEntropyLoss())

    assert _syncs_per_run(make, 10)["item"] - _syncs_per_run(make, 2)["item"] == 8


def test_trainer_syncs_only_when_it_logs(caplog):
    def make(model, optimizer):
        trainer = create_trainer(model, optimizer, nn.CrossEntropyLoss())
        attach_progress(trainer, log_every=5, stream=_NotATerminal())
        return trainer

    with caplog.at_level(logging.INFO, logger="ember.handlers.progress"):
        syncs = _syncs_per_run(make, 20)
    logged = [r for r in caplog.records if " loss " in r.getMessage()]
    assert len(logged) == 4
    assert sum(syncs.values()) == 4, syncs  # one loss read per log line, none in between


class _NotATerminal:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False
