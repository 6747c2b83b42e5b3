"""A small convnet for 8x8 to 32x32 images with any number of channels."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN", "small_cnn"]


class SmallCNN(nn.Module):
    """Two conv blocks, an adaptive average pool to 2x2, and a two-layer classifier.

    The adaptive pool makes it independent of the input size (it trains well on 8x8
    digits as on 28x28 MNIST or 32x32 CIFAR images) while keeping a coarse layout of
    where strokes are, which a global pool would throw away.

    Args:
        num_classes: number of outputs.
        in_channels: input channels.
        width: channels of the first conv block (the second has twice as many).
        dropout: dropout probability before the last Linear layer.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, width: int = 32, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, kernel_size=3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, ceil_mode=True),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 4, 2 * width),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(2 * width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def small_cnn(*, num_classes: int, in_channels: int = 3, width: int = 32, dropout: float = 0.1) -> SmallCNN:
    """A small convnet: seconds per epoch on digits on a CPU."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, width=width, dropout=dropout)
