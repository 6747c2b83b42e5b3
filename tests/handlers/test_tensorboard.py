import logging

import ignite.distributed as idist
import pytest
import torch
from ignite.engine import Engine, Events
from sklearn.metrics import confusion_matrix
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from ember.engine import create_evaluator, create_trainer
from ember.errors import ConfigError
from ember.handlers import tb_figures
from ember.handlers.tb_figures import EvaluationFigures, render_confusion_matrix, render_examples
from ember.handlers.tensorboard import attach_tensorboard, log_hparams

NAMES = ["zero", "one", "two", "three"]


def _data(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 4, (n,), generator=gen))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 4))


def _read(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={k: 0 for k in (
        "scalars", "images", "histograms", "tensors", "compressedHistograms", "audio")})
    acc.Reload()
    return acc


def _run(tmp_path, *, model=None, epochs=2, **options):
    """A tiny run: 48 training samples in batches of 8 (6 iterations/epoch), validation after each epoch."""
    model = model or _model()
    base = model.module if isinstance(model, nn.DataParallel) else model
    optimizer = torch.optim.SGD([{"params": base[1].weight, "lr": 0.1}, {"params": base[1].bias, "lr": 0.01}])
    trainer = create_trainer(model, optimizer, nn.CrossEntropyLoss())
    evaluator = create_evaluator(model, loss_fn=nn.CrossEntropyLoss())
    val = DataLoader(_data(40, 2), batch_size=16)
    seen = {"loss": {}, "val": {}}
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: seen["loss"].__setitem__(e.state.iteration, e.state.output["loss"].item()))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run(val))
    evaluator.add_event_handler(
        Events.COMPLETED, lambda e: seen["val"].__setitem__(trainer.state.iteration, dict(e.state.metrics)))
    tb = attach_tensorboard(tmp_path / "tb", trainer, optimizer=optimizer, evaluators={"val": evaluator},
                            model=model, class_names=NAMES, **options)
    trainer.run(DataLoader(_data(48, 1), batch_size=8), max_epochs=epochs)
    tb.close()
    return _read(tmp_path / "tb"), seen, val.dataset


def test_scalars_share_the_trainer_iteration_axis(tmp_path):
    acc, seen, _ = _run(tmp_path, log_every=5)
    tags = acc.Tags()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [5, 10]  # 12 iterations, every 5th
    assert [e.value for e in loss] == pytest.approx([seen["loss"][5], seen["loss"][10]], rel=1e-6)
    assert [e.step for e in acc.Scalars("lr/group_0")] == [5, 10]
    assert [e.value for e in acc.Scalars("lr/group_0")] == pytest.approx([0.1, 0.1])
    assert [e.value for e in acc.Scalars("lr/group_1")] == pytest.approx([0.01, 0.01])
    for metric in ("accuracy", "loss"):
        points = acc.Scalars(f"val/{metric}")
        assert [e.step for e in points] == [6, 12] == sorted(seen["val"])
        assert [e.value for e in points] == pytest.approx([seen["val"][s][metric] for s in (6, 12)], rel=1e-6)
    assert tags["histograms"] == [] and not tags["graph"]  # off unless asked


class _CountingLoss(torch.Tensor):
    items = 0

    def item(self):
        type(self).items += 1
        return super().item()


def test_loss_is_read_back_only_on_logged_iterations(tmp_path):
    _CountingLoss.items = 0
    trainer = Engine(lambda e, b: {"loss": torch.tensor(float(e.state.iteration)).as_subclass(_CountingLoss)})
    tb = attach_tensorboard(tmp_path, trainer, log_every=5)
    trainer.run(range(6), max_epochs=2)
    tb.close()
    assert _CountingLoss.items == 2  # iterations 5 and 10 of 12
    assert [(e.step, e.value) for e in _read(tmp_path).Scalars("train/loss")] == [(5, 5.0), (10, 10.0)]


def test_log_every_sets_the_number_of_loss_points(tmp_path):
    acc, _, _ = _run(tmp_path, log_every=1, figures=())
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 13))
    assert acc.Tags()["images"] == [] and acc.Tags()["tensors"] == []  # no figures, no PR curves


def test_figures_of_the_validation_split(tmp_path):
    acc, _, val = _run(tmp_path, log_every=50, max_pr_samples=30)
    images = acc.Tags()["images"]
    assert sorted(images) == ["val/confusion_matrix", "val/misclassified"]
    assert [e.step for e in acc.Images("val/confusion_matrix")] == [6, 12]
    assert acc.Images("val/misclassified")[0].width > 8 * 8  # a grid of upscaled tiles
    pr_tags = sorted(acc.PluginTagToContent("pr_curves"))
    assert pr_tags == ["val/pr_curve/0_zero", "val/pr_curve/1_one", "val/pr_curve/2_two", "val/pr_curve/3_three"]
    labels = val.tensors[1][:30]  # max_pr_samples: the first 30 samples
    for c, tag in enumerate(pr_tags):
        events = acc.Tensors(tag)
        assert [e.step for e in events] == [6, 12]
        data = torch.tensor(events[-1].tensor_proto.float_val).view(6, -1)  # TP FP TN FN P R per threshold
        tp, fp, tn, fn = data[:4, 0]
        assert tp + fn == (labels == c).sum() and tp + fp + tn + fn == 30


def test_hparams_reach_the_hparams_dashboard(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    log_hparams(writer, {"optimizer": {"name": "adam", "lr": 1e-3}, "device_ids": [0, 1], "resume": None,
                         "amp": False}, {"val/accuracy": torch.tensor(0.75), "test/loss": 0.5, "skip": None})
    writer.close()
    acc = _read(tmp_path)
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    values = start.session_start_info.hparams
    assert values["optimizer.lr"].number_value == pytest.approx(1e-3)
    assert values["optimizer.name"].string_value == "adam"
    assert values["device_ids"].string_value == "[0, 1]" and values["resume"].string_value == "None"
    # no experiment summary: TensorBoard then builds the table from every run's session
    assert sorted(content) == ["_hparams_/session_end_info", "_hparams_/session_start_info"]
    assert sorted(acc.Tags()["scalars"]) == ["hparam/test/loss", "hparam/val/accuracy"]  # the metric columns
    assert acc.Scalars("hparam/val/accuracy")[0].value == pytest.approx(0.75)


def test_hparams_to_a_folder_and_to_nothing(tmp_path):
    log_hparams(tmp_path / "hp", {"seed": 3}, {"acc": 1.0})
    start = _read(tmp_path / "hp").PluginTagToContent("hparams")["_hparams_/session_start_info"]
    assert plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams["seed"].number_value == 3
    log_hparams(None, {"seed": 3}, {"acc": 1.0})  # what other ranks hold: nothing happens
    with pytest.raises(ConfigError, match="`logger_or_log_dir` should be a TensorboardLogger, a SummaryWriter"):
        log_hparams(3, {"seed": 3}, {"acc": 1.0})
    with pytest.raises(ConfigError, match="`hparams` and `metrics` should be mappings, got list and dict"):
        log_hparams(tmp_path, [("seed", 3)], {"acc": 1.0})


def test_histograms_have_no_module_prefix_under_data_parallel(tmp_path):
    acc, _, _ = _run(tmp_path, model=nn.DataParallel(_model()), histograms=True, figures=())
    tags = sorted(acc.Tags()["histograms"])
    assert tags == ["grads/1/bias", "grads/1/weight", "weights/1/bias", "weights/1/weight"]
    assert [e.step for e in acc.Histograms("weights/1/weight")] == [6, 12]
    assert acc.Histograms("weights/1/weight")[0].histogram_value.num == 4 * 64


def test_model_graph_and_a_model_that_does_not_trace(tmp_path, caplog):
    acc, _, _ = _run(tmp_path / "ok", graph_input=torch.zeros(2, 1, 8, 8), figures=())
    assert acc.Tags()["graph"]

    class Untraceable(nn.Sequential):
        def forward(self, x):
            if torch.jit.is_tracing():  # only add_graph traces: training must go on
                raise RuntimeError("cannot trace this")
            return super().forward(x)

    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="ember.handlers.tensorboard"):
        acc, _, _ = _run(tmp_path / "bad", model=Untraceable(nn.Flatten(), nn.Linear(64, 4)),
                         graph_input=torch.zeros(2, 1, 8, 8), figures=(), log_every=6)
    assert "graph was not written to TensorBoard: tracing failed (RuntimeError: cannot trace this)" in caplog.text
    assert not acc.Tags()["graph"] and len(acc.Scalars("train/loss")) == 2


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(idist, "get_rank", lambda: 1)
    trainer = Engine(lambda e, b: None)
    assert attach_tensorboard(tmp_path / "tb", trainer) is None
    log_hparams(tmp_path / "hp", {"a": 1}, {"m": 1.0})
    assert not (tmp_path / "tb").exists() and not (tmp_path / "hp").exists()
    assert not trainer._event_handlers[Events.ITERATION_COMPLETED]


def test_bad_arguments(tmp_path):
    trainer = Engine(lambda e, b: None)
    with pytest.raises(ConfigError, match="`log_every` should be a positive integer, got 0"):
        attach_tensorboard(tmp_path, trainer, log_every=0)
    with pytest.raises(ConfigError, match=r"need the model: pass attach_tensorboard\(..., model=\)"):
        attach_tensorboard(tmp_path, trainer, histograms=True)
    with pytest.raises(ConfigError, match="`evaluators` should map split names to engines"):
        attach_tensorboard(tmp_path, trainer, evaluators=[trainer])
    with pytest.raises(ConfigError, match="Evaluator names should be non-empty strings without '/', got 'a/b'"):
        attach_tensorboard(tmp_path, trainer, evaluators={"a/b": trainer})
    with pytest.raises(ConfigError, match="Evaluator 'val' should be an ignite Engine, got str"):
        attach_tensorboard(tmp_path, trainer, evaluators={"val": "evaluator"})


class _Writer:
    def __init__(self):
        self.images, self.curves = {}, {}

    def add_image(self, tag, image, step):
        self.images[tag] = (image, step)

    def add_pr_curve(self, tag, labels, predictions, step):
        self.curves[tag] = (labels, predictions, step)


def _evaluate_with_figures(monkeypatch, dataset, **options):
    seen = {}
    monkeypatch.setattr(tb_figures, "render_confusion_matrix",
                        lambda m, names, title: seen.update(matrix=m) or torch.zeros(3, 4, 4))
    monkeypatch.setattr(tb_figures, "render_examples",
                        lambda x, t, p, names: seen.update(examples=(x, t, p)) or torch.zeros(3, 4, 4))
    model = _model()
    evaluator = create_evaluator(model)
    writer = _Writer()
    EvaluationFigures(writer, "test", global_step=lambda: 7, **options).attach(evaluator)
    evaluator.run(DataLoader(dataset, batch_size=16))
    with torch.no_grad():
        pred = model(dataset.tensors[0]).argmax(1)
    return seen, writer, pred


def test_confusion_counts_and_misclassified_examples(monkeypatch):
    dataset = _data(50, 3)
    seen, writer, pred = _evaluate_with_figures(monkeypatch, dataset, max_examples=5)
    y = dataset.tensors[1]
    expected = confusion_matrix(y.numpy(), pred.numpy(), labels=range(4))
    assert seen["matrix"].tolist() == expected.tolist()
    x, targets, preds = seen["examples"]
    wrong = (pred != y).nonzero().flatten()[:5]
    assert torch.equal(targets, y[wrong]) and torch.equal(preds, pred[wrong])
    assert torch.equal(x, dataset.tensors[0][wrong])
    assert sorted(writer.images) == ["test/confusion_matrix", "test/misclassified"]
    assert writer.images["test/confusion_matrix"][1] == 7
    assert sorted(writer.curves) == ["test/pr_curve/0", "test/pr_curve/1", "test/pr_curve/2", "test/pr_curve/3"]


def test_wrong_number_of_class_names_falls_back_to_indices(monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="ember.handlers.tb_figures"):
        _, writer, _ = _evaluate_with_figures(monkeypatch, _data(20, 4), class_names=["a", "b"])
    assert "2 class names given for 4 classes: the test figures show class indices" in caplog.text
    assert "test/pr_curve/0" in writer.curves


def test_figures_skip_outputs_that_are_not_class_indices(caplog):
    evaluator = Engine(lambda e, b: {"y_pred": torch.zeros(2, 3), "y": torch.zeros(2, 3)})
    writer = _Writer()
    EvaluationFigures(writer, "val", global_step=lambda: 1).attach(evaluator)
    with caplog.at_level(logging.WARNING, logger="ember.handlers.tb_figures"):
        evaluator.run([0, 1])
    assert "val figures skipped: the evaluator's output needs `y_pred` (N, C) logits" in caplog.text
    assert writer.images == {} and writer.curves == {}


def test_renderers_give_images_of_any_size():
    small = render_confusion_matrix(torch.tensor([[3, 1], [0, 4]]), ["cat", "dog"], title="t")
    assert small.dtype == torch.uint8 and small.shape[0] == 3
    big = render_confusion_matrix(torch.eye(100, dtype=torch.int64) * 5)
    assert big.shape[0] == 3 and 400 < big.shape[2] < 800  # cells shrink: the picture stays readable
    grid = render_examples(torch.randn(3, 3, 20, 10), torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0]), nrow=3)
    assert grid.shape[0] == 3 and 0 <= grid.min() and grid.max() <= 1
    assert grid.shape[2] == 3 * 48 + 4 * 2  # 3 tiles of 96 x 48 px (aspect kept), padding 2


def test_pr_curves_are_capped_for_many_classes(caplog):
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(16, 3, 4, 4, generator=gen), torch.randint(0, 60, (16,), generator=gen)) for _ in range(2)]
    evaluator = Engine(lambda e, b: {"y_pred": torch.randn(16, 60, generator=gen), "y": b[1]})
    writer = _Writer()
    EvaluationFigures(writer, "val", global_step=lambda: 1).attach(evaluator)
    with caplog.at_level(logging.INFO, logger="ember.handlers.tb_figures"):
        evaluator.run(batches)
    assert "val: 60 classes, PR curves written for the first 50" in caplog.text
    assert len(writer.curves) == 50 and "val/pr_curve/49" in writer.curves
    labels, probs, _ = writer.curves["val/pr_curve/07"]
    assert torch.equal(labels, torch.cat([b[1] for b in batches]) == 7) and probs.shape == (32,)
