"""Building blocks shared by the bundled models (TF-"SAME" max pool, concatenation)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) for one spatial axis."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class MaxPool2dSame(nn.Module):
    """Max pool with TensorFlow "SAME" padding (padded positions never win: they are -inf).

    The padding is expressed through ``F.max_pool2d``'s own ``padding``/``ceil_mode``
    arguments whenever possible (always, for the shapes InceptionV1 uses), so that a
    linearisation that swaps ``max_pool2d`` for ``avg_pool2d`` sees the same window,
    stride and padding.
    """

    def __init__(self, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size, self.stride
        (top, bottom), (left, right) = (same_padding(x.shape[-2], k, s), same_padding(x.shape[-1], k, s))
        if top == left and bottom == right and bottom - top in (0, 1) and top <= k // 2:
            ceil_mode = bottom > top
            out = F.max_pool2d(x, k, s, padding=top, ceil_mode=ceil_mode)
            want = (math.ceil(x.shape[-2] / s), math.ceil(x.shape[-1] / s))
            if tuple(out.shape[-2:]) == want:
                return out
        x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, k, s)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding=SAME"


class Concat(nn.Module):
    """Concatenate branch outputs along channels; a module so that the result is a named layer."""

    def forward(self, *branches: torch.Tensor) -> torch.Tensor:
        return torch.cat(branches, dim=1)


class InceptionMixin:
    """Shared forward logic for Lucid-style mixed blocks stored as flat, Lucid-named modules.

    A block ``name`` owns ``{name}_1x1_pre_relu_conv``, ``{name}_3x3_bottleneck_pre_relu_conv``,
    ``{name}_3x3_pre_relu_conv``, ``{name}_5x5_bottleneck_pre_relu_conv``,
    ``{name}_5x5_pre_relu_conv``, ``{name}_pool_reduce_pre_relu_conv`` (convolutions),
    ReLU layers without the ``_pre_relu_conv`` suffix, ``{name}_pool`` (3x3 SAME max pool)
    and ``{name}`` (the concatenation).
    """

    def _add_mixed(self, name: str, c_in: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int) -> int:
        add = self.add_module  # type: ignore[attr-defined]
        add(f"{name}_1x1_pre_relu_conv", nn.Conv2d(c_in, c1, 1))
        add(f"{name}_3x3_bottleneck_pre_relu_conv", nn.Conv2d(c_in, c3r, 1))
        add(f"{name}_5x5_bottleneck_pre_relu_conv", nn.Conv2d(c_in, c5r, 1))
        add(f"{name}_pool_reduce_pre_relu_conv", nn.Conv2d(c_in, cp, 1))
        add(f"{name}_3x3_pre_relu_conv", nn.Conv2d(c3r, c3, 3, padding=1))
        add(f"{name}_5x5_pre_relu_conv", nn.Conv2d(c5r, c5, 5, padding=2))
        add(f"{name}_pool", MaxPool2dSame(3, 1))
        for branch in ("1x1", "3x3_bottleneck", "5x5_bottleneck", "pool_reduce", "3x3", "5x5"):
            add(f"{name}_{branch}", nn.ReLU())
        add(name, Concat())
        return c1 + c3 + c5 + cp

    def _mixed(self, name: str, x: torch.Tensor) -> torch.Tensor:
        m = lambda suffix: getattr(self, f"{name}{suffix}")  # noqa: E731
        b1 = m("_1x1")(m("_1x1_pre_relu_conv")(x))
        b3 = m("_3x3_bottleneck")(m("_3x3_bottleneck_pre_relu_conv")(x))
        b3 = m("_3x3")(m("_3x3_pre_relu_conv")(b3))
        b5 = m("_5x5_bottleneck")(m("_5x5_bottleneck_pre_relu_conv")(x))
        b5 = m("_5x5")(m("_5x5_pre_relu_conv")(b5))
        bp = m("_pool_reduce")(m("_pool_reduce_pre_relu_conv")(m("_pool")(x)))
        return m("")(b1, b3, b5, bp)
