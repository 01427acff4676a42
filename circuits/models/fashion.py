"""The project's own trained model: a small InceptionV1-style network for Fashion-MNIST.

Architecture (Lucid-style names, so every tool treats it like InceptionV1)::

    input [B, 1, 28, 28] (after preprocess_input)
    conv2d0   3x3  1→32   28x28      maxpool0 → 14x14
    conv2d1   1x1 32→32   14x14
    conv2d2   3x3 32→64   14x14
    mixed3a   1x1 32 | 1x1 32 → 3x3 48 | 1x1 8 → 5x5 16 | pool → 1x1 16   = 112 @ 14x14
    mixed3b   1x1 48 | 1x1 48 → 3x3 64 | 1x1 12 → 5x5 24 | pool → 1x1 24  = 160 @ 14x14
    maxpool4  → 7x7
    mixed4a   1x1 64 | 1x1 48 → 3x3 96 | 1x1 12 → 5x5 32 | pool → 1x1 32  = 224 @ 7x7
    avgpool0 (global) → logits (224 → 10)

Trained by ``experiments/train_fashion.py``; the checkpoint and its model card live in
``circuits/models/weights/``.
"""

from __future__ import annotations

import torch
from torch import nn

from ._blocks import InceptionMixin, MaxPool2dSame

FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

MIXED_BLOCKS = [
    ("mixed3a", 64, 32, 32, 48, 8, 16, 16),
    ("mixed3b", 112, 48, 48, 64, 12, 24, 24),
    ("mixed4a", 160, 64, 48, 96, 12, 32, 32),
]


class FashionInception(InceptionMixin, nn.Module):
    """Small InceptionV1-style classifier; input ``[batch, 1, 28, 28]`` after :meth:`preprocess_input`.

    Example:
        >>> model = FashionInception().eval()
        >>> model(model.preprocess_input(torch.rand(2, 1, 28, 28))).shape
        torch.Size([2, 10])
    """

    input_shape = (1, 28, 28)
    class_names = FASHION_CLASSES

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv2d0_pre_relu_conv = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2d0 = nn.ReLU()
        self.maxpool0 = MaxPool2dSame(2, 2)
        self.conv2d1_pre_relu_conv = nn.Conv2d(32, 32, 1)
        self.conv2d1 = nn.ReLU()
        self.conv2d2_pre_relu_conv = nn.Conv2d(32, 64, 3, padding=1)
        self.conv2d2 = nn.ReLU()
        for spec in MIXED_BLOCKS:
            if spec[0] == "mixed4a":
                self.maxpool4 = MaxPool2dSame(2, 2)
            self._add_mixed(*spec)
        self.avgpool0 = nn.AdaptiveAvgPool2d(1)
        self.logits = nn.Linear(224, num_classes)

    @staticmethod
    def preprocess_input(x: torch.Tensor) -> torch.Tensor:
        """Map images with pixels in ``[0, 1]`` to the standardised input the model was trained on."""
        return (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[batch, 1, 28, 28]`` preprocessed images → ``[batch, 10]`` logits."""
        x = self.maxpool0(self.conv2d0(self.conv2d0_pre_relu_conv(x)))
        x = self.conv2d1(self.conv2d1_pre_relu_conv(x))
        x = self.conv2d2(self.conv2d2_pre_relu_conv(x))
        for name, *_ in MIXED_BLOCKS:
            if name == "mixed4a":
                x = self.maxpool4(x)
            x = self._mixed(name, x)
        return self.logits(torch.flatten(self.avgpool0(x), 1))
