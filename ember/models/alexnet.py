"""AlexNet as in the classic recipe, with torchvision's parameter names."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AlexNet", "alexnet", "ALEXNET_MIN_INPUT"]

# Smallest square input (pixels) for which the feature maps stay >= 1x1 through the
# three 3/2 max-pools; 224 px is the classic size (6x6 maps before the pool).
ALEXNET_MIN_INPUT = 63


class AlexNet(nn.Module):
    """AlexNet with sub-modules ``features``, ``avgpool`` and ``classifier``.

    Parameter names match ``torchvision.models.alexnet`` so state_dicts move both
    ways. The adaptive average pool to 6x6 (as torchvision has) lets any input of at
    least ``ALEXNET_MIN_INPUT`` pixels work; at 224 px it is the identity.

    Args:
        num_classes: outputs of the last Linear layer.
        in_channels: input channels (3 for RGB).
        dropout: dropout probability in the classifier.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def alexnet(*, num_classes: int, in_channels: int = 3, dropout: float = 0.5) -> AlexNet:
    """The classic AlexNet (inputs of at least 63x63 pixels; 224x224 as designed)."""
    return AlexNet(num_classes=num_classes, in_channels=in_channels, dropout=dropout)
