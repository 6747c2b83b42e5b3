"""Feature extraction: layer paths under any wrapper, FX pruning and hooks, in-place safety."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember.engine import create_evaluator, unwrap_model
from ember.errors import ConfigError
from ember.handlers.features import (
    FeatureExtractor,
    build_extractor,
    extract_features,
    get_submodule,
    list_layers,
)
from ember.models import get_model


@pytest.fixture(scope="module")
def alexnet():
    torch.manual_seed(0)
    return get_model("alexnet", num_classes=5).eval()


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(7)
    return TensorDataset(torch.randn(12, 3, 63, 63, generator=gen), torch.arange(12) % 5)


def _loader(data, batch_size=5):
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def _reference(module, data, batch_size=5):
    """What the classic loop gives: the module called batch by batch, in loader order."""
    with torch.no_grad():
        return torch.cat([module(x) for x, _ in _loader(data, batch_size)])


def _real_calls(module):
    """Count forward calls on real tensors (FX tracing calls modules with Proxies)."""
    calls = []
    handle = module.register_forward_hook(
        lambda m, args, out: calls.append(1) if isinstance(out, torch.Tensor) else None
    )
    return calls, handle


def test_list_layers_and_get_submodule_see_through_wrappers(alexnet):
    layers = list_layers(alexnet)
    assert layers[:3] == ["features", "features.0", "features.1"]
    assert "classifier.4" in layers and "" not in layers
    assert list_layers(nn.DataParallel(alexnet)) == layers
    for wrapped in (alexnet, nn.DataParallel(alexnet), torch.compile(alexnet)):
        assert get_submodule(wrapped, "features") is alexnet.features
        assert get_submodule(wrapped, "classifier.4") is alexnet.classifier[4]
    # the DataParallel habit `module.` is understood, not required
    assert get_submodule(nn.DataParallel(alexnet), "module.features") is alexnet.features


def test_unknown_layer_names_the_closest(alexnet):
    with pytest.raises(ConfigError, match=r"Layer 'featurs' is not a sub-module of AlexNet\. Closest: 'features'"):
        get_submodule(nn.DataParallel(alexnet), "featurs")
    with pytest.raises(ConfigError, match=r"Hint: `ember.handlers.list_layers\(model\)` lists all 23"):
        extract_features(alexnet, _loader(TensorDataset(torch.zeros(2, 3, 63, 63), torch.zeros(2))), "nope")
    with pytest.raises(ConfigError, match="A layer should be a dotted sub-module path"):
        get_submodule(alexnet, "")
    with pytest.raises(ConfigError, match="Argument `layers` should be a layer path or a list"):
        build_extractor(alexnet, [])


@pytest.mark.parametrize("wrap", ["plain", "data_parallel", "compiled"])
def test_features_equal_the_plain_sub_module_in_dataset_order(alexnet, images, wrap):
    model = {
        "plain": lambda m: m,
        "data_parallel": nn.DataParallel,
        "compiled": torch.compile,
    }[wrap](alexnet)
    result = extract_features(model, _loader(images), "features")
    expected = _reference(unwrap_model(model).features, images)
    assert result.layers == ["features"]
    assert torch.equal(result.features["features"], expected)
    assert torch.equal(result.labels, images.tensors[1])
    assert torch.equal(result.indices, torch.arange(12))


@pytest.mark.parametrize("method", ["fx", "hooks"])
def test_deep_layer_equals_its_output_in_a_normal_forward(alexnet, images, method):
    seen = []
    handle = alexnet.classifier[4].register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    with torch.no_grad():
        logits = alexnet(images.tensors[0])
    handle.remove()
    result = extract_features(alexnet, _loader(images), ["classifier.4", "classifier"], method=method)
    assert torch.allclose(result.features["classifier.4"], seen[0], atol=1e-5)
    assert torch.allclose(result.features["classifier"], logits, atol=1e-5)


@pytest.mark.parametrize("method", ["fx", "hooks"])
@pytest.mark.parametrize("layers", [["features.0"], ["features.0", "features"]])
def test_output_followed_by_inplace_relu_is_the_conv_output(alexnet, images, method, layers):
    # features.1 is ReLU(inplace=True): without a copy it would overwrite features.0's output
    assert isinstance(alexnet.features[1], nn.ReLU) and alexnet.features[1].inplace
    result = extract_features(alexnet, _loader(images), layers, method=method)
    conv = _reference(alexnet.features[0], images)
    assert (conv < 0).any()
    assert torch.allclose(result.features["features.0"], conv, atol=1e-5)


def test_fx_pruning_skips_the_classifier(alexnet, images):
    extractor = build_extractor(alexnet, "features")
    assert extractor.method == "fx"
    assert not hasattr(extractor.body, "classifier") and not hasattr(extractor.body, "avgpool")
    calls, handle = _real_calls(alexnet.classifier)
    try:
        extract_features(alexnet, _loader(images), "features")
        assert calls == []
        alexnet(images.tensors[0][:1])  # the counter does count real calls
        assert calls == [1]
    finally:
        handle.remove()


class _Branchy(nn.Module):
    """Data-dependent control flow: FX cannot trace it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.head(self.features(x).mean(dim=(2, 3)))


def test_untraceable_model_falls_back_to_hooks_and_stops_early(images):
    torch.manual_seed(0)
    model = _Branchy().eval()
    data = TensorDataset(torch.randn(9, 1, 8, 8), torch.arange(9))
    assert unwrap_model(build_extractor(model, "features")).method == "hooks"
    calls, handle = _real_calls(model.head)
    result = extract_features(model, _loader(data, 4), ["features.0", "features"])
    handle.remove()
    assert calls == []  # the forward stopped once the last layer had run
    with torch.no_grad():
        doubled = [x * 2 if x.sum() > 0 else x for x, _ in _loader(data, 4)]
        expected = torch.cat([model.features[0](x) for x in doubled])
    assert (expected < 0).any()
    assert torch.allclose(result.features["features.0"], expected, atol=1e-6)
    assert torch.allclose(result.features["features"], expected.clamp_min(0), atol=1e-6)
    assert not model.features[0]._forward_hooks and not model.features._forward_hooks
    with pytest.raises(ConfigError, match=r"FX cannot trace _Branchy \(TraceError"):
        build_extractor(model, "features", method="fx")


def test_data_parallel_extractor_keeps_the_device_ids(alexnet, monkeypatch):
    calls = []
    init = nn.DataParallel.__init__

    def recording_init(self, module, device_ids=None, output_device=None, dim=0):
        calls.append((module, device_ids, output_device, dim))
        init(self, module, device_ids=None, output_device=None, dim=dim)  # no GPU here

    dp = nn.DataParallel(alexnet)
    dp.device_ids, dp.output_device = [0, 1], 0  # as on a machine with two GPUs
    monkeypatch.setattr(nn.DataParallel, "__init__", recording_init)
    extractor = build_extractor(dp, "features")
    assert isinstance(extractor, nn.DataParallel)
    module, device_ids, output_device, dim = calls[-1]
    assert module is extractor.module and module.method == "fx"
    assert (device_ids, output_device, dim) == ([0, 1], 0, 0)
    assert not isinstance(build_extractor(alexnet, "features"), nn.DataParallel)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_data_parallel_extraction_on_gpus(images):
    from ember.engine import prepare_model

    torch.manual_seed(0)
    model = prepare_model(get_model("alexnet", num_classes=5).eval(), device="cuda:0", parallel="dp")
    extractor = build_extractor(model, "features")
    assert extractor.device_ids == model.device_ids and len(extractor.device_ids) > 1
    result = extract_features(model, _loader(images), "features")
    expected = _reference(model.module.features, TensorDataset(*(t.cuda() for t in images.tensors)))
    assert torch.allclose(result.features["features"], expected.cpu(), atol=1e-4)


def test_pool_modes(alexnet, images):
    result = extract_features(alexnet, _loader(images), ["features.0", "features.3"], pool="avg")
    conv = _reference(alexnet.features[0], images)
    assert torch.allclose(result.features["features.0"], conv.mean(dim=(2, 3)), atol=1e-5)
    assert result.features["features.3"].shape == (12, 192)
    flat = extract_features(alexnet, _loader(images), "features.0", pool="flatten")
    assert torch.allclose(flat.features["features.0"], conv.reshape(12, -1), atol=1e-5)
    with pytest.raises(ConfigError, match=r"Argument `pool` should be one of None, 'flatten', 'avg', got 'max'"):
        extract_features(alexnet, _loader(images), "features", pool="max")


class _Pair(nn.Module):
    def forward(self, x):
        return x, x + 1


class _Dict(nn.Module):
    def forward(self, x):
        return {"a": x}


class _Unused(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.pair, self.dict, self.spare = _Pair(), _Dict(), nn.Linear(2, 2)
        self.inner = inner

    def forward(self, x):
        a, _ = self.pair(x)
        return self.inner(self.dict(a)["a"])


@pytest.mark.parametrize("method", ["auto", "hooks"])
@pytest.mark.parametrize(("layer", "kind"), [("pair", "tuple"), ("dict", "dict")])
def test_layer_that_is_not_a_tensor_is_refused(method, layer, kind):
    model = _Unused(nn.Flatten())
    data = TensorDataset(torch.randn(4, 2, 3), torch.zeros(4))
    with pytest.raises(ConfigError, match=f"Layer '{layer}' returns a {kind}, not a tensor"):
        extract_features(model, _loader(data), layer, method=method)


def test_layer_never_called_is_refused():
    model = _Unused(nn.Flatten())
    data = TensorDataset(torch.randn(4, 2, 3), torch.zeros(4))
    with pytest.raises(ConfigError, match=r"Layer\(s\) 'spare' gave no output: _Unused.forward never calls"):
        extract_features(model, _loader(data), "spare")


def test_handler_on_an_evaluator_records_copies_in_dataset_order(alexnet, images):
    for model in (alexnet, nn.DataParallel(alexnet)):
        evaluator = create_evaluator(model)
        handler = FeatureExtractor(model, ["features.0", "features"], pool="flatten")
        handler.attach(evaluator)
        state = evaluator.run(_loader(images))
        handler.detach()
        assert "accuracy" in state.metrics
        result = handler.result
        conv = _reference(alexnet.features[0], images)
        # the whole forward ran, in-place ReLU included: only a copy keeps the conv output
        assert torch.allclose(result.features["features.0"], conv.flatten(1), atol=1e-5)
        assert torch.allclose(result.features["features"], _reference(alexnet.features, images).flatten(1))
        assert torch.equal(result.labels, images.tensors[1])
        assert torch.equal(result.indices, torch.arange(12))
        assert not alexnet.features[0]._forward_hooks


def test_handler_ignores_forward_calls_outside_its_engine(alexnet, images):
    evaluator = create_evaluator(alexnet)
    handler = FeatureExtractor(alexnet, "features")
    handler.attach(evaluator)
    alexnet(images.tensors[0][:2])  # e.g. a training step between evaluations
    evaluator.run(_loader(images))
    handler.detach()
    assert len(handler.result) == 12


def test_loader_and_device_checks(alexnet, images):
    shuffled = DataLoader(images, batch_size=5, shuffle=True)
    with pytest.raises(ConfigError, match=r"use DataLoader\(\.\.\., shuffle=False\).*got sampler RandomSampler"):
        extract_features(alexnet, shuffled, "features")
    with pytest.raises(ConfigError, match="needs a torch DataLoader"):
        extract_features(alexnet, [images[0]], "features")
    with pytest.raises(ConfigError, match=r"The model is on cpu but `device` is meta: move it first"):
        extract_features(alexnet, _loader(images), "features", device="meta")
    with pytest.raises(ConfigError, match=r"Argument `amp` should be one of None, 'bf16', 'fp16', got 'fp8'"):
        extract_features(alexnet, _loader(images), "features", amp="fp8")
    with pytest.raises(ConfigError, match="Argument `method` should be one of auto, fx, hooks, got 'jit'"):
        extract_features(alexnet, _loader(images), "features", method="jit")


def test_extraction_runs_in_eval_mode_and_restores_modes(images):
    torch.manual_seed(0)
    model = get_model("small_cnn", num_classes=5, width=4, dropout=0.5)
    model.train()
    model.classifier.eval()  # a mixed state must come back as it was
    expected = _reference(model.eval().features, images)
    model.train()
    model.classifier.eval()
    result = extract_features(model, _loader(images), "features")
    assert torch.equal(result.features["features"], expected)  # BatchNorm used running stats
    assert model.training and model.features.training and not model.classifier.training
    # rows are ordinary tensors: they can feed a linear probe with autograd
    rows = result.features["features"].flatten(1)
    assert not rows.is_inference()
    nn.Linear(rows.shape[1], 2)(rows).sum().backward()


def test_bf16_autocast_stores_float32_rows(alexnet, images):
    result = extract_features(alexnet, _loader(images), "features", amp="bf16", pool="avg")
    expected = _reference(alexnet.features, images).mean(dim=(2, 3))
    assert result.features["features"].dtype == torch.float32
    assert torch.allclose(result.features["features"], expected, rtol=0.05, atol=0.05)
