import pytest
import torch
from ignite.engine import Engine
from torch import nn

from ember.engine import eval_step, make_grad_scaler, train_step
from ember.errors import ConfigError
from ember.models import get_model


def _model():
    torch.manual_seed(0)
    return get_model("small_cnn", num_classes=10, in_channels=1, width=8)


def _run_one(step, batch):
    engine = Engine(step)
    engine.state.iteration = 1
    return step(engine, batch)


def test_train_step_output(tiny_data):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = tiny_data[:16]
    out = _run_one(train_step(model, opt, nn.CrossEntropyLoss()), batch)
    assert set(out) == {"y_pred", "y", "pred", "loss"}
    assert out["y_pred"].shape == (16, 10)
    assert torch.equal(out["pred"], torch.max(out["y_pred"], 1)[1])
    assert out["loss"].dim() == 0 and not out["loss"].requires_grad
    assert not out["y_pred"].requires_grad
    assert model.training


def test_eval_step_output_no_autograd(tiny_data):
    model = _model()
    out = _run_one(eval_step(model, loss_fn=nn.CrossEntropyLoss()), tiny_data[:16])
    assert set(out) == {"y_pred", "y", "pred", "loss"}
    assert not model.training
    assert not out["y_pred"].requires_grad
    assert torch.equal(out["pred"], out["y_pred"].argmax(1))
    assert "loss" not in _run_one(eval_step(model), tiny_data[:16])


def test_eval_step_is_eval_mode(tiny_data):
    model = _model()
    model.train()
    out = _run_one(eval_step(model), tiny_data[:16])
    model.eval()
    with torch.no_grad():
        expected = model(tiny_data[:16][0])
    assert torch.equal(out["y_pred"], expected)


def test_grad_accum_steps_every_n(tiny_data):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = train_step(model, opt, nn.CrossEntropyLoss(), grad_accum=2)
    engine = Engine(step)
    before = [p.detach().clone() for p in model.parameters()]
    engine.state.iteration = 1
    step(engine, tiny_data[:8])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    engine.state.iteration = 2
    step(engine, tiny_data[8:16])
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_grad_accum_equals_big_batch(tiny_data):
    """Two half batches with accumulation = one full batch (mean loss, no BatchNorm)."""
    torch.manual_seed(0)
    big = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    small = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    small.load_state_dict(big.state_dict())
    opt_big = torch.optim.SGD(big.parameters(), lr=0.5)
    opt_small = torch.optim.SGD(small.parameters(), lr=0.5)
    _run_one(train_step(big, opt_big, nn.CrossEntropyLoss()), tiny_data[:16])
    step = train_step(small, opt_small, nn.CrossEntropyLoss(), grad_accum=2)
    engine = Engine(step)
    for it, sl in ((1, slice(0, 8)), (2, slice(8, 16))):
        engine.state.iteration = it
        step(engine, tiny_data[sl])
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b)


def test_clip_grad_norm_bounds_the_update(tiny_data):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    _run_one(train_step(model, opt, nn.CrossEntropyLoss(), clip_grad_norm=1e-3), tiny_data[:16])
    delta = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(before, model.parameters())))
    assert delta.item() <= 1e-3 + 1e-6


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_steps_run_and_learn(tiny_data, amp):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = make_grad_scaler(amp, torch.device("cpu"))
    assert (scaler is not None) == (amp == "fp16")
    step = train_step(model, opt, nn.CrossEntropyLoss(), amp=amp, scaler=scaler, clip_grad_norm=5.0)
    engine = Engine(step)
    losses = []
    for it in range(1, 31):
        engine.state.iteration = it
        losses.append(step(engine, tiny_data[:32])["loss"].float().item())
    assert losses[-1] < losses[0]
    assert _run_one(eval_step(model, amp=amp), tiny_data[:4])["y_pred"].dtype == torch.bfloat16 or amp == "fp16"


def test_channels_last_same_result(tiny_data):
    model = _model().eval()
    plain = _run_one(eval_step(model), tiny_data[:16])["y_pred"]
    cl = _run_one(eval_step(model, channels_last=True), tiny_data[:16])["y_pred"]
    torch.testing.assert_close(plain, cl)


def test_option_errors():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="`grad_accum` should be a positive integer, got 0"):
        train_step(model, opt, nn.CrossEntropyLoss(), grad_accum=0)
    with pytest.raises(ConfigError, match="`clip_grad_norm` should be a positive number or None, got -1"):
        train_step(model, opt, nn.CrossEntropyLoss(), clip_grad_norm=-1)
    with pytest.raises(ConfigError, match="`amp` should be one of None, 'bf16', 'fp16', got 'fp8'"):
        eval_step(model, amp="fp8")


def test_bad_batch_shape():
    model = _model()
    with pytest.raises(ConfigError, match=r"A batch should be a \(inputs, targets\) pair"):
        _run_one(eval_step(model), torch.zeros(2, 1, 8, 8))
