import pytest
import torch
import torchvision

from ember.errors import ConfigError
from ember.models import ALEXNET_MIN_INPUT, get_model, list_models


def test_registry_lists_own_and_torchvision():
    names = list_models()
    assert names[:2] == ["alexnet", "small_cnn"]
    assert {"resnet18", "mobilenet_v3_small"} <= set(names)
    assert len(names) == len(set(names))


def test_alexnet_submodules_match_the_recipe():
    model = get_model("alexnet", num_classes=7)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [
        (3, 64, 11), (64, 192, 5), (192, 384, 3), (384, 256, 3), (256, 256, 3)
    ]
    linears = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [
        (256 * 6 * 6, 4096), (4096, 4096), (4096, 7)
    ]
    assert model.features(torch.zeros(1, 3, 224, 224)).shape == (1, 256, 6, 6)


def test_alexnet_state_dict_moves_both_ways_with_torchvision():
    ours = get_model("alexnet", num_classes=10)
    theirs = torchvision.models.alexnet(weights=None, num_classes=10)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    ours2 = get_model("alexnet", num_classes=10)
    ours2.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 224, 224)
    ours.eval(), theirs.eval(), ours2.eval()
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours2(x), theirs(x))


def test_alexnet_smallest_input():
    model = get_model("alexnet", num_classes=3).eval()
    assert model(torch.zeros(1, 3, ALEXNET_MIN_INPUT, ALEXNET_MIN_INPUT)).shape == (1, 3)
    with pytest.raises(RuntimeError):
        model(torch.zeros(1, 3, ALEXNET_MIN_INPUT - 1, ALEXNET_MIN_INPUT - 1))


@pytest.mark.parametrize("size", [8, 28, 32])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_small_cnn_any_size_and_channels(size, channels):
    model = get_model("small_cnn", num_classes=5, in_channels=channels).eval()
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 5)
    assert hasattr(model, "features") and hasattr(model, "classifier")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
@pytest.mark.parametrize("channels", [1, 3])
def test_torchvision_by_name(name, channels):
    model = get_model(name, num_classes=4, in_channels=channels).eval()
    assert model(torch.zeros(2, channels, 64, 64)).shape == (2, 4)


def test_errors():
    with pytest.raises(ConfigError, match=r"Unknown model 'resnt18'. Did you mean 'resnet18'"):
        get_model("resnt18", num_classes=3)
    with pytest.raises(ConfigError, match="`num_classes` should be a positive integer, got 0"):
        get_model("small_cnn", num_classes=0)
    with pytest.raises(ConfigError, match="`in_channels` should be a positive integer, got -1"):
        get_model("small_cnn", num_classes=3, in_channels=-1)
    with pytest.raises(ConfigError, match="Model 'small_cnn' does not take these arguments"):
        get_model("small_cnn", num_classes=3, depth=50)
    with pytest.raises(ConfigError, match="pretrained `weights` are not downloaded"):
        get_model("resnet18", num_classes=3, weights="DEFAULT")
