"""InceptionV1 ("GoogLeNet" as trained for Lucid, a.k.a. ``inception5h``) with Lucid's layer names.

The state dict has exactly the keys and shapes of ``lucent.modelzoo.inceptionv1``, so the
public ``inception5h.pth`` loads with ``strict=True``. Differences from Lucent, on purpose:

* local response norm uses the TensorFlow graph's constants (depth radius 5, bias 2,
  alpha 1e-4, beta 0.5 → ``nn.LocalResponseNorm(size=11, alpha=11e-4, beta=0.5, k=2)``);
  ``lrn="lucent"`` reproduces Lucent's (``size=9, alpha≈1e-4, beta=0.5, k=1``);
* max pools and the first convolution use TensorFlow "SAME" padding computed from the input
  size, so inputs other than 224 px work;
* ``forward`` returns the 1008 logits (``softmax2_pre_activation_matmul``), not softmax.

Input convention: ``forward`` takes images already mapped by :meth:`preprocess_input`
(pixels in ``[0, 1]`` → ``x * 255 - 117``), exactly like Lucent's model. Use
``circuits.models.preprocess_input(model, x)`` to apply it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._blocks import InceptionMixin, MaxPool2dSame, same_padding

#: (name, in, 1x1, 3x3 bottleneck, 3x3, 5x5 bottleneck, 5x5, pool reduce)
MIXED_BLOCKS = [
    ("mixed3a", 192, 64, 96, 128, 16, 32, 32),
    ("mixed3b", 256, 128, 128, 192, 32, 96, 64),
    ("mixed4a", 480, 192, 96, 204, 16, 48, 64),
    ("mixed4b", 508, 160, 112, 224, 24, 64, 64),
    ("mixed4c", 512, 128, 128, 256, 24, 64, 64),
    ("mixed4d", 512, 112, 144, 288, 32, 64, 64),
    ("mixed4e", 528, 256, 160, 320, 32, 128, 128),
    ("mixed5a", 832, 256, 160, 320, 48, 128, 128),
    ("mixed5b", 832, 384, 192, 384, 48, 128, 128),
]
#: stride-2 max pools that come *before* a block
POOL_BEFORE = {"mixed4a": "maxpool4", "mixed5a": "maxpool10"}

LRN_CONSTANTS = {
    "tf": dict(size=11, alpha=11e-4, beta=0.5, k=2.0),
    "lucent": dict(size=9, alpha=9.99999974738e-05, beta=0.5, k=1.0),
}

INCEPTION5H_URL = "https://github.com/ProGamerGov/pytorch-old-tensorflow-models/raw/master/inception5h.pth"


class InceptionV1(InceptionMixin, nn.Module):
    """InceptionV1 with Lucid's layer names; input ``[batch, 3, H, W]`` after :meth:`preprocess_input`.

    Args:
        lrn: ``"tf"`` (correct constants, default) or ``"lucent"`` (Lucent's constants, for parity).
        num_classes: 1008 for ``inception5h``.

    Example:
        >>> model = InceptionV1().eval()
        >>> x = torch.rand(1, 3, 224, 224)
        >>> model(model.preprocess_input(x)).shape
        torch.Size([1, 1008])
    """

    input_shape = (3, 224, 224)

    def __init__(self, lrn: str = "tf", num_classes: int = 1008):
        super().__init__()
        if lrn not in LRN_CONSTANTS:
            raise ValueError(f"lrn must be one of {sorted(LRN_CONSTANTS)}, got {lrn!r}")
        self.lrn = lrn
        self.conv2d0_pre_relu_conv = nn.Conv2d(3, 64, 7, stride=2)
        self.conv2d0 = nn.ReLU()
        self.maxpool0 = MaxPool2dSame(3, 2)
        self.localresponsenorm0 = nn.LocalResponseNorm(**LRN_CONSTANTS[lrn])
        self.conv2d1_pre_relu_conv = nn.Conv2d(64, 64, 1)
        self.conv2d1 = nn.ReLU()
        self.conv2d2_pre_relu_conv = nn.Conv2d(64, 192, 3, padding=1)
        self.conv2d2 = nn.ReLU()
        self.localresponsenorm1 = nn.LocalResponseNorm(**LRN_CONSTANTS[lrn])
        self.maxpool1 = MaxPool2dSame(3, 2)
        for spec in MIXED_BLOCKS:
            if spec[0] in POOL_BEFORE:
                self.add_module(POOL_BEFORE[spec[0]], MaxPool2dSame(3, 2))
            self._add_mixed(*spec)
        self.avgpool0 = nn.AdaptiveAvgPool2d(1)
        self.softmax2_pre_activation_matmul = nn.Linear(1024, num_classes)

    @staticmethod
    def preprocess_input(x: torch.Tensor) -> torch.Tensor:
        """Map images with pixels in ``[0, 1]`` to the network's input range (``x * 255 - 117``)."""
        return x * 255.0 - 117.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[batch, 3, H, W]`` preprocessed images → ``[batch, 1008]`` logits."""
        (t, b), (l, r) = same_padding(x.shape[-2], 7, 2), same_padding(x.shape[-1], 7, 2)
        x = self.conv2d0(self.conv2d0_pre_relu_conv(F.pad(x, (l, r, t, b))))
        x = self.localresponsenorm0(self.maxpool0(x))
        x = self.conv2d1(self.conv2d1_pre_relu_conv(x))
        x = self.conv2d2(self.conv2d2_pre_relu_conv(x))
        x = self.maxpool1(self.localresponsenorm1(x))
        for name, *_ in MIXED_BLOCKS:
            if name in POOL_BEFORE:
                x = getattr(self, POOL_BEFORE[name])(x)
            x = self._mixed(name, x)
        x = torch.flatten(self.avgpool0(x), 1)
        return self.softmax2_pre_activation_matmul(x)
