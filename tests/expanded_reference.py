"""Independent references for the expanded-weights tests: hand-frozen copies and per-channel autograd.

Nothing here uses :mod:`circuits.expanded`; the tests build their references from these
pieces (a module replaced by a constant affine map, one backward per output channel) and
compare the batched result with them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where submodule ``name`` of ``root`` was."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


class Constant(nn.Module):
    """``x * scale + shift`` with stored constants: a frozen op."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor | float = 0.0):
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def frozen_layer_norm(ln: nn.LayerNorm, x: torch.Tensor) -> Constant:
    """LayerNorm over the last axis with the mean and variance of its recorded input ``x``."""
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    scale = ln.weight.detach() / torch.sqrt(var + ln.eps)
    return Constant(scale, ln.bias.detach() - mean * scale)


def centre_of_map(out: torch.Tensor, c: int) -> torch.Tensor:
    """Channel ``c`` of a ``[1, C, H, W]`` map at ``(H // 2, W // 2)``, or feature ``c`` of ``[1, F]``."""
    return out[0, c] if out.dim() == 2 else out[0, c, out.shape[2] // 2, out.shape[3] // 2]


def per_channel_jacobian(
    model: nn.Module,
    from_layer: str,
    to_layer: str,
    x: torch.Tensor,
    pick: Callable[[torch.Tensor, int], torch.Tensor] = centre_of_map,
    n_out: int | None = None,
) -> torch.Tensor:
    """``[n_out, *from_shape]``: one backward per output ``c`` of ``pick(to_out, c)`` (a scalar)
    w.r.t. ``from_layer``'s output made a free leaf, in that layer's own layout. ``n_out``
    defaults to dim 1 of ``to_layer``'s output."""
    store: dict[str, torch.Tensor] = {}

    def free(_m, _i, out):
        store["from"] = out.detach().clone().requires_grad_(True)
        return store["from"]

    handles = [
        model.get_submodule(from_layer).register_forward_hook(free),
        model.get_submodule(to_layer).register_forward_hook(lambda _m, _i, out: store.__setitem__("to", out)),
    ]
    try:
        with torch.enable_grad():
            model(x)
            out = store["to"]
            n = out.shape[1] if n_out is None else n_out
            rows = [torch.autograd.grad(pick(out, c), store["from"], retain_graph=True)[0][0] for c in range(n)]
    finally:
        for h in handles:
            h.remove()
    return torch.stack(rows)


def function_jacobian(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, out_channels: int) -> torch.Tensor:
    """``[C2, C1, h1, w1]``: one backward per output channel of ``f(z)`` at its centre."""
    z = z.detach().clone().requires_grad_(True)
    out = f(z)
    return torch.stack(
        [torch.autograd.grad(centre_of_map(out, c), z, retain_graph=True)[0][0] for c in range(out_channels)]
    )


def support(g: torch.Tensor) -> torch.Tensor:
    """``g [C2, C1, h, w]`` cropped to the bounding box of its nonzero support."""
    mask = g.abs().amax((0, 1)) > 0
    ys, xs = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    return g[..., ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Same shape, and max abs difference <= 1e-5 of the reference's largest value (not all zero)."""
    assert ours.shape == ref.shape
    scale = float(ref.abs().max())
    assert scale > 0 and float((ours - ref).abs().max()) <= 1e-5 * scale
