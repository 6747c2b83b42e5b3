import pytest
import torch
from ignite.engine import DeterministicEngine, Engine
from ignite.metrics import Accuracy
from torch import nn
from torch.utils.data import DataLoader

from ember import create_evaluator, create_trainer, prepare_model, unwrap_model
from ember.errors import ConfigError
from ember.models import get_model


def _plain_model():
    # no dropout: the hand-written loop and the engine must draw no random numbers
    torch.manual_seed(0)
    return get_model("small_cnn", num_classes=10, in_channels=1, width=8, dropout=0.0)


def _hand_written(model, loader, epochs):
    """The classic recipe's loop, line for line."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.0004)
    loss_func = torch.nn.CrossEntropyLoss()
    for _epoch in range(epochs):
        model.train(True)
        for _step, (data, target) in enumerate(loader):
            optimizer.zero_grad()
            outputs = model(data)
            _, preds = torch.max(outputs.data, 1)
            loss = loss_func(outputs, target)
            loss.backward()
            optimizer.step()
    return model


@pytest.mark.parametrize("deterministic", [False, True])
def test_bitwise_parity_with_hand_written_loop(tiny_data, deterministic):
    loader = DataLoader(tiny_data, batch_size=16, shuffle=False)
    expected = _hand_written(_plain_model(), loader, epochs=3)

    model = _plain_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.0004)
    trainer = create_trainer(model, optimizer, nn.CrossEntropyLoss(), deterministic=deterministic)
    trainer.run(loader, max_epochs=3)

    for (name, a), b in zip(expected.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs"


def test_parity_with_dropout_when_not_deterministic(tiny_data):
    loader = DataLoader(tiny_data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    expected_model = get_model("small_cnn", num_classes=10, in_channels=1, width=8, dropout=0.5)
    torch.manual_seed(7)
    loader.generator.manual_seed(3)
    expected = _hand_written(expected_model, loader, epochs=2)

    torch.manual_seed(0)
    model = get_model("small_cnn", num_classes=10, in_channels=1, width=8, dropout=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.0004)
    trainer = create_trainer(model, optimizer, nn.CrossEntropyLoss())
    torch.manual_seed(7)
    loader.generator.manual_seed(3)
    trainer.run(loader, max_epochs=2)
    for a, b in zip(expected.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_deterministic_engine_type():
    model = _plain_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert isinstance(create_trainer(model, opt, nn.CrossEntropyLoss(), deterministic=True), DeterministicEngine)
    trainer = create_trainer(model, opt, nn.CrossEntropyLoss())
    assert type(trainer) is Engine and trainer.state.scaler is None
    fp16 = create_trainer(model, opt, nn.CrossEntropyLoss(), amp="fp16")
    assert isinstance(fp16.state.scaler, torch.amp.GradScaler)


def test_default_metrics(tiny_loader):
    model = _plain_model()
    evaluator = create_evaluator(model)
    evaluator.run(tiny_loader)
    assert set(evaluator.state.metrics) == {"accuracy"}
    evaluator = create_evaluator(model, loss_fn=nn.CrossEntropyLoss())
    evaluator.run(tiny_loader)
    assert set(evaluator.state.metrics) == {"accuracy", "loss"}

    # the same numbers by hand
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    with torch.no_grad():
        for x, y in tiny_loader:
            out = model(x)
            correct += (out.argmax(1) == y).sum().item()
            total += len(y)
            loss_sum += nn.functional.cross_entropy(out, y, reduction="sum").item()
    assert evaluator.state.metrics["accuracy"] == pytest.approx(correct / total)
    assert evaluator.state.metrics["loss"] == pytest.approx(loss_sum / total, rel=1e-5)


def test_metrics_by_name_and_object(tiny_loader):
    model = _plain_model()
    evaluator = create_evaluator(
        model, metrics={"acc": Accuracy(), "top5": "top5", "prec": "precision"}
    )
    evaluator.run(tiny_loader)
    assert set(evaluator.state.metrics) == {"acc", "top5", "prec"}
    assert evaluator.state.metrics["top5"] >= evaluator.state.metrics["acc"]


def test_metric_errors():
    model = _plain_model()
    with pytest.raises(ConfigError, match="Unknown metric 'f1'.*accuracy, loss, precision"):
        create_evaluator(model, metrics=["f1"])
    with pytest.raises(ConfigError, match="Metric 'loss' needs `loss_fn`"):
        create_evaluator(model, metrics=["loss"])
    with pytest.raises(ConfigError, match="Metric 'acc' should be an ignite Metric or a metric name, got int"):
        create_evaluator(model, metrics={"acc": 3})
    with pytest.raises(ConfigError, match="`optimizer` should be a torch.optim.Optimizer, got str"):
        create_trainer(model, "adam", nn.CrossEntropyLoss())


def test_dataparallel_trains_and_evaluates(tiny_loader):
    """On a machine without GPUs DataParallel runs the module directly: the .module
    paths (wrapping, unwrapping, state_dict keys) are exercised all the same."""
    model = prepare_model(_plain_model(), parallel="dp")
    assert isinstance(model, nn.DataParallel)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=4e-4)
    evaluator = create_evaluator(model, loss_fn=nn.CrossEntropyLoss())
    evaluator.run(tiny_loader)
    loss_before = evaluator.state.metrics["loss"]
    trainer = create_trainer(model, opt, nn.CrossEntropyLoss())
    trainer.run(tiny_loader, max_epochs=15)
    evaluator.run(tiny_loader)
    assert evaluator.state.metrics["loss"] < loss_before
    assert evaluator.state.metrics["accuracy"] > 0.25  # random labels: chance is 0.1
    assert list(unwrap_model(model).state_dict()) == list(_plain_model().state_dict())
    assert all(k.startswith("module.") for k in model.state_dict())
