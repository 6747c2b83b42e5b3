import pytest
import torch
from ignite.engine import Engine, Events

from ember.engine.optim import attach_lr_scheduler, build_optimizer
from ember.errors import ConfigError


def _params():
    return [torch.nn.Parameter(torch.zeros(2))]


@pytest.mark.parametrize(("name", "cls"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_optimizers(name, cls):
    opt = build_optimizer(name, _params(), lr=0.1, weight_decay=4e-4, momentum=0.8, nesterov=True)
    assert type(opt) is cls
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["weight_decay"] == 4e-4
    if name == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.8 and opt.param_groups[0]["nesterov"]


def test_unknown_optimizer():
    with pytest.raises(ConfigError, match="Unknown optimizer 'rmsprop': expected one of adam, adamw, sgd"):
        build_optimizer("rmsprop", _params(), lr=0.1)


def _lrs(name, **kwargs):
    opt = build_optimizer("sgd", _params(), lr=1.0)
    trainer = Engine(lambda e, b: None)
    lrs = []
    attach_lr_scheduler(trainer, opt, name, max_epochs=4, epoch_length=5, **kwargs)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: lrs.append(opt.param_groups[0]["lr"]))
    trainer.run(range(5), max_epochs=4)
    return lrs


def test_schedules_shape():
    assert _lrs("none") == [1.0] * 20
    step = _lrs("step", step_size=2, gamma=0.1)
    assert step[0] == 1.0 and step[9] == pytest.approx(1.0) and step[10] == pytest.approx(0.1)
    cosine = _lrs("cosine", min_lr=0.0)
    assert cosine[0] == 1.0 and cosine[-1] < 0.05 and all(a >= b for a, b in zip(cosine, cosine[1:]))
    warm = _lrs("warmup_cosine", warmup_epochs=1)
    assert warm[0] == pytest.approx(0.01) and max(warm) == pytest.approx(1.0, rel=0.05) and warm[-1] < 0.1
    linear = _lrs("linear_warmup", warmup_epochs=2)
    assert linear[0] == pytest.approx(0.01) and linear[-1] == pytest.approx(1.0)


def test_unknown_scheduler():
    opt = build_optimizer("sgd", _params(), lr=1.0)
    with pytest.raises(ConfigError, match="Unknown scheduler 'cyclic'"):
        attach_lr_scheduler(Engine(lambda e, b: None), opt, "cyclic", max_epochs=1, epoch_length=1)


def test_fused_adam_is_opt_in_and_for_adam_only():
    assert build_optimizer("adam", _params(), lr=0.1, fused=True).defaults["fused"] is True
    assert not build_optimizer("adam", _params(), lr=0.1).defaults.get("fused")
    with pytest.raises(ConfigError, match="optimizer.fused=true is for adam and adamw, got optimizer 'sgd'"):
        build_optimizer("sgd", _params(), lr=0.1, fused=True)
