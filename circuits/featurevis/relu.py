"""Redirected ReLU: Lucid's fix for neurons that start dead.

At initialisation many units of a randomly-initialised image are below zero, so the ReLU
gradient of a whole batch element can be exactly zero and the optimisation never starts.
While :func:`redirected_relu` is active, every ReLU computed through ``F.relu``,
``torch.relu``, ``Tensor.relu`` (and their in-place variants, and hence ``nn.ReLU``) uses
:class:`RedirectedReLUFunction`: where the ordinary ReLU gradient of a batch element is
zero everywhere, the upstream gradient is passed through anyway, except the part that would
push an already negative pre-activation further down. Elements that do get gradient use the
ordinary ReLU gradient. The forward value is always ``max(x, 0)``.

It is implemented as a ``torch.overrides.TorchFunctionMode``, so it works for any model and
cannot leak: leaving the ``with`` block (normally or by an exception) restores ordinary ReLU.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["RedirectedReLUFunction", "redirected_relu"]


class RedirectedReLUFunction(torch.autograd.Function):
    """``max(x, 0)`` whose backward redirects the gradient of batch elements that get none.

    ``x`` has a batch dimension first (``[B, ...]``); a gradient descent step moves ``x`` by
    ``-grad``, so "pushing lower" means ``grad > 0`` (Lucid's convention).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        off = x <= 0
        relu_grad = grad.masked_fill(off, 0)
        if x.ndim < 2:
            return relu_grad
        alive = relu_grad.flatten(1).ne(0).any(1)
        if bool(alive.all()):  # the common case: every element gets an ordinary gradient
            return relu_grad
        redirected = grad.masked_fill(off & (grad > 0), 0)
        return torch.where(alive.view(-1, *([1] * (x.ndim - 1))), relu_grad, redirected)


_RELUS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}
if hasattr(F, "relu_"):
    _RELUS.add(F.relu_)


class _RedirectMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _RELUS:
            x = args[0] if args else kwargs.get("input", kwargs.get("self"))
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                return RedirectedReLUFunction.apply(x)
        return func(*args, **kwargs)


@contextlib.contextmanager
def redirected_relu(enabled: bool = True) -> Iterator[None]:
    """Inside the block, every ReLU uses :class:`RedirectedReLUFunction` (when ``enabled``)."""
    if not enabled:
        yield
        return
    with _RedirectMode():
        yield
