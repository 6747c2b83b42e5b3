"""Models: a registry of ember's own (AlexNet, a small CNN) and torchvision's classifiers."""

from ember.models.alexnet import ALEXNET_MIN_INPUT, AlexNet, alexnet
from ember.models.registry import get_model, list_models, register_model
from ember.models.small_cnn import SmallCNN, small_cnn

__all__ = [
    "ALEXNET_MIN_INPUT",
    "AlexNet",
    "SmallCNN",
    "alexnet",
    "get_model",
    "list_models",
    "register_model",
    "small_cnn",
]
