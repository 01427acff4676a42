"""Expanded weights: the effective linear connection between two layers (METHODS.md §3).

Adjacent conv layers are connected by a kernel slice ``W[out, in, kh, kw]``. Non-adjacent
layers (``conv2d2 → mixed3b`` across the ``mixed3a`` bottlenecks, ``mixed3a →
mixed3b_5x5`` across ``mixed3b_5x5_bottleneck``) are connected through several kernels and
nonlinearities; their *expanded weights* are the connection of the **linearised** path:

    E[c2, c1, dy, dx] = ∂ to_layer[c2, centre] / ∂ from_layer[c1, centre + (dy, dx)]

Linearisation (:func:`linearized`) swaps, without touching the model:

* ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu`` and the in-place variants)
  → identity;
* max pooling (``nn.MaxPool*d``, ``F.max_pool*d``, ``torch.max_pool*d``, adaptive max
  pooling) → average pooling with the same window, stride, padding and ``ceil_mode``,
  averaging over the real (non-padded) inputs only (``count_include_pad=False``). A
  ``F.pad(..., value=-inf)`` feeding a max pool (TensorFlow "SAME" pooling, as in
  :class:`circuits.models._blocks.MaxPool2dSame` for odd shapes) becomes zero padding that is
  likewise excluded from the average;
* local response norm → identity. This is the closest *linear* stand-in (LRN divides by a
  local energy that is ≈ constant); Captum's unreleased ``optim`` branch kept LRN, which makes
  its expanded weights depend on the input used. ``linearized(model, lrn="keep")`` does the
  same, for comparison.

Convolution, linear layers, concatenation, addition, average pooling, eval-mode batch norm
and eval-mode dropout are already affine and run unchanged. Other nonlinear operations
(GELU, sigmoid, tanh, softmax, ReLU6/hardtanh, leaky ReLU, clamp, layer/group norm,
batch norm or dropout in training mode, …) raise :class:`UnsupportedNonlinearityError`
naming the operation and the module it ran in. Anything that still slips through (e.g. the
product of two activations) is caught by a linearity check: the result must not depend on
the value of the free tensor.

Because the linearised map is affine, **biases do not affect the result** and the gradient
does not depend on the activation it is taken at, so the free tensor is simply zeros.

How it is computed (:func:`expanded_weights`): the activation of ``from_layer`` is replaced
by a free tensor (:func:`circuits.layers.replace_activation`) holding **one copy per output
channel in the batch dimension**; the forward pass runs only as far as ``to_layer``
(:func:`circuits.layers.run_until`); the sum over copies of each copy's *own* channel at the
centre is back-propagated **once**. Everything before ``from_layer`` runs on a single image
(the batch is only expanded at ``from_layer``), and the model input is as small as possible:
starting from the model's input size (``input_shape``; the reference), we search the
smallest input size whose result at the centre neuron is identical to the reference result,
i.e. whose ``from_layer`` map holds the whole receptive field of the centre neuron and
whose borders (zero padding, average-pool divisors) do not reach the paths into it. The
chosen geometry is cached per model (weakly). Once the path has been checked to be linear,
convolutions of tensors derived from the free tensor skip their forward arithmetic (values
do not enter the gradient of a linear map; only the input gradient is computed); when all
output channels are requested, the result is cross-checked against the planning probe and
recomputed the plain way on any mismatch.

The result is cropped to the receptive-field footprint of ``to_layer``'s centre neuron in
``from_layer`` (the bounding box of the gradient's support over all output channels: 5×5
for one 5×5 conv, 9×9 for two stacked 5×5 convs), or to a window of a given ``crop`` size
centred on that footprint.

**Known failure** (article, figures 11–12): where the nonlinear structure matters, e.g.
boundary detectors that are excited on one side and inhibited on the other, excitation and
inhibition cancel in the expanded weights. Use :func:`per_example_connections` (gradients
with the real nonlinearities at given inputs, optionally × activation, built on Captum) for
those neurons.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from .layers import centre, check_channel, get_layer, parse_target, replace_activation, run_until

__all__ = [
    "UnsupportedNonlinearityError",
    "linearized",
    "expanded_weights",
    "neuron_weights",
    "connection_weights",
    "Connection",
    "top_inputs",
    "TopInputs",
    "per_example_connections",
]


class UnsupportedNonlinearityError(ValueError):
    """The model runs a nonlinear operation that linearisation has no stand-in for."""


# --------------------------------------------------------------------------- linearisation

_RELU = {"relu", "relu_"}
_LRN = {"local_response_norm"}
_MAX_POOL = {f"max_pool{d}d" for d in (1, 2, 3)} | {f"max_pool{d}d_with_indices" for d in (1, 2, 3)}
_ADAPTIVE_MAX_POOL = {f"adaptive_max_pool{d}d" for d in (1, 2, 3)} | {
    f"adaptive_max_pool{d}d_with_indices" for d in (1, 2, 3)
}
_NONLINEAR = {
    # activations
    "gelu", "sigmoid", "sigmoid_", "tanh", "tanh_", "silu", "silu_", "elu", "elu_", "selu", "selu_",
    "celu", "celu_", "leaky_relu", "leaky_relu_", "hardtanh", "hardtanh_", "relu6", "softplus",
    "softsign", "mish", "hardswish", "hardsigmoid", "logsigmoid", "tanhshrink", "softshrink",
    "hardshrink", "threshold", "threshold_", "_threshold", "prelu", "rrelu", "rrelu_", "glu",
    "softmax", "log_softmax", "softmin", "_softmax", "_log_softmax",
    # elementwise maths
    "exp", "exp_", "log", "log_", "sqrt", "sqrt_", "rsqrt", "rsqrt_", "abs", "abs_", "sign", "erf",
    "pow", "pow_", "__pow__", "square", "square_", "reciprocal", "reciprocal_",
    "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "clip", "clip_",
    "maximum", "minimum", "fmax", "fmin",
    # reductions / selections
    "max", "min", "amax", "amin", "logsumexp", "norm", "sort", "topk",
    "max_unpool1d", "max_unpool2d", "max_unpool3d", "lp_pool1d", "lp_pool2d", "lp_pool3d",
    "fractional_max_pool2d", "fractional_max_pool3d",
    "fractional_max_pool2d_with_indices", "fractional_max_pool3d_with_indices",
    # data-dependent normalisation / attention
    "layer_norm", "group_norm", "instance_norm", "normalize", "rms_norm",
    "scaled_dot_product_attention", "multi_head_attention_forward",
}
_TRAIN_ONLY = {  # affine in eval mode, not in training mode: name -> index of the training flag
    "batch_norm": 5,
    "dropout": 2, "dropout_": 2, "dropout1d": 2, "dropout2d": 2, "dropout3d": 2,
    "alpha_dropout": 2, "feature_alpha_dropout": 2, "feature_dropout": 2,
}
_CAT = {"cat", "concat", "concatenate", "stack"}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_ADAPTIVE_AVG_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_POOL_PARAMS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _bind(names: Sequence[str], args: tuple, kwargs: dict) -> dict:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _tensors(values: tuple) -> list[torch.Tensor]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            out.extend(t for t in v if isinstance(t, torch.Tensor))
    return out


def _pair(v: object) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))  # type: ignore[index]


class _InputGradOnlyConv2d(torch.autograd.Function):
    """conv2d whose forward returns zeros of the right shape and whose backward computes the
    input gradient only (exactly as autograd's convolution backward does)."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation, groups):  # type: ignore[override]
        ctx.save_for_backward(weight)
        ctx.conf = (x.shape, stride, padding, dilation, groups)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = weight.shape[-2:], stride, padding, dilation
        h = (x.shape[-2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        w = (x.shape[-1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return x.new_zeros((*x.shape[:-3], weight.shape[0], h, w))

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conf
        g = torch.nn.grad.conv2d_input(shape, weight, grad.contiguous(), stride, padding, dilation, groups)
        return g, None, None, None, None, None


def _lazy_conv2d(args: tuple, kwargs: dict) -> torch.Tensor | None:
    b = _bind(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args, kwargs)
    x, weight = b["input"], b["weight"]
    padding, dilation = b.get("padding", 0), _pair(b.get("dilation", 1))
    if x.dim() != 4 or weight.dim() != 4:
        return None
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        elif padding == "same" and all(d * (k - 1) % 2 == 0 for d, k in zip(dilation, weight.shape[-2:])):
            padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, weight.shape[-2:]))
        else:
            return None
    return _InputGradOnlyConv2d.apply(
        x, weight, _pair(b.get("stride", 1)), _pair(padding), dilation, int(b.get("groups", 1))
    )


class _LinearizeMode(TorchFunctionMode):
    """Intercepts torch functions: ReLU → identity, max pool → average pool, LRN → identity.

    ``active`` switches the substitution on and off (off: everything passes through), so the
    mode can be entered for a whole forward pass and switched on once ``from_layer`` has run.
    ``broadcast_batch`` (internal): concatenations that mix batch 1 and batch ``B`` expand
    the batch-1 tensors, so that only the free tensor needs the expanded batch.
    """

    def __init__(
        self, lrn: str = "identity", active: bool = True, broadcast_batch: int | None = None, lazy: bool = False
    ):
        super().__init__()
        self.lrn = lrn
        self.active = active
        self.broadcast_batch = broadcast_batch
        self.module_stack: list[str] = []
        self._neg_inf_padded: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        # lazy (internal, for a path already checked to be linear): convolutions of tensors derived
        # from the free tensor skip their forward computation (values are irrelevant to the
        # gradient of a linear map) and compute only the input gradient in backward.
        self.lazy = lazy
        self._derived: dict[int, weakref.ref] = {}

    def mark_derived(self, t: torch.Tensor) -> None:
        self._derived[id(t)] = weakref.ref(t)

    def is_derived(self, t: torch.Tensor) -> bool:
        ref = self._derived.get(id(t))
        return ref is not None and ref() is t

    # -- helpers
    def _where(self) -> str:
        return f" (inside module {self.module_stack[-1]!r})" if self.module_stack else ""

    def _unsupported(self, op: str, why: str = "") -> UnsupportedNonlinearityError:
        why = why or "it is not linear and linearisation has no stand-in for it"
        return UnsupportedNonlinearityError(
            f"cannot linearise the model: it calls {op}(){self._where()}, and {why}. Linearisation "
            "supports ReLU (→ identity), max pooling (→ average pooling), local response norm "
            "(→ identity) and operations that are already affine (convolution, linear layers, "
            "concatenation, addition, average pooling, eval-mode batch norm and dropout)."
        )

    def _padded_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        entry = self._neg_inf_padded.get(id(x))
        if entry is not None and entry[0]() is x:
            return entry[1]
        return None

    def _max_to_avg(self, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
        b = _bind(_POOL_PARAMS, args, kwargs)
        if name.endswith("_with_indices") or b.get("return_indices", False):
            raise self._unsupported(name, "its indices have no meaning in a linear model")
        x = b["input"]
        dims = int(name[len("max_pool")])
        dilation = b.get("dilation", 1)
        if any(d != 1 for d in (dilation if isinstance(dilation, (tuple, list)) else [dilation])):
            raise self._unsupported(name, f"it is dilated (dilation={dilation}) and average pooling has no dilation")
        kernel = b["kernel_size"]
        stride = b.get("stride")
        if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0):
            stride = kernel
        padding, ceil_mode = b.get("padding", 0), bool(b.get("ceil_mode", False))
        avg = _AVG_POOL[dims]
        mask = self._padded_mask(x)
        if mask is None:
            return avg(x, kernel, stride, padding, ceil_mode, count_include_pad=False)
        # max pool over a -inf padded tensor: average over the real inputs only
        num = avg(x, kernel, stride, padding, ceil_mode, count_include_pad=True)
        den = avg(mask, kernel, stride, padding, ceil_mode, count_include_pad=True)
        return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))

    def _pad(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        b = _bind(("input", "pad", "mode", "value"), args, kwargs)
        value = b.get("value")
        if b.get("mode", "constant") != "constant" or value is None or not math.isinf(value) or value > 0:
            return None
        x = b["input"]
        out = F.pad(x, b["pad"], value=0.0)
        mask = F.pad(torch.ones_like(x), b["pad"], value=0.0)
        self._neg_inf_padded[id(out)] = (weakref.ref(out), mask)
        return out

    def _broadcast_cat(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        b = _bind(("tensors", "dim"), args, kwargs)
        tensors, dim = list(b["tensors"]), b.get("dim", 0)
        big = self.broadcast_batch
        if not tensors or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in tensors):
            return args, kwargs
        if not isinstance(dim, int) or dim % tensors[0].dim() == 0:
            return args, kwargs
        sizes = {t.shape[0] for t in tensors}
        if sizes != {1, big}:
            return args, kwargs
        tensors = [t.expand(big, *t.shape[1:]) if t.shape[0] == 1 else t for t in tensors]
        return (tensors, dim), {k: v for k, v in kwargs.items() if k not in ("tensors", "dim")}

    # -- the dispatch
    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if not self.active:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if not self.lazy:
            return self._dispatch(name, func, args, kwargs)
        if not any(self.is_derived(t) for t in _tensors(args) + _tensors(tuple(kwargs.values()))):
            return self._dispatch(name, func, args, kwargs)
        b = _bind(("input", "weight"), args, kwargs) if name == "conv2d" else {}
        if name == "conv2d" and self.is_derived(b["input"]) and not self.is_derived(b["weight"]):
            out = _lazy_conv2d(args, kwargs)
            if out is None:
                out = self._dispatch(name, func, args, kwargs)
        else:
            out = self._dispatch(name, func, args, kwargs)
        for t in _tensors(out if isinstance(out, (tuple, list)) else (out,)):
            self.mark_derived(t)
        return out

    def _dispatch(self, name: str, func: Callable, args: tuple, kwargs: dict) -> object:
        if name in _RELU:
            x = args[0] if args else kwargs["input"]
            inplace = name.endswith("_") or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
            return x if inplace else x.clone()
        if name in _MAX_POOL:
            return self._max_to_avg(name, args, kwargs)
        if name in _ADAPTIVE_MAX_POOL:
            b = _bind(("input", "output_size", "return_indices"), args, kwargs)
            if name.endswith("_with_indices") or b.get("return_indices", False):
                raise self._unsupported(name, "its indices have no meaning in a linear model")
            return _ADAPTIVE_AVG_POOL[int(name[len("adaptive_max_pool")])](b["input"], b["output_size"])
        if name in _LRN and self.lrn == "identity":
            x = args[0] if args else kwargs["input"]
            return x.clone()
        if name == "pad":
            out = self._pad(args, kwargs)
            if out is not None:
                return out
        if name in _TRAIN_ONLY:
            idx = _TRAIN_ONLY[name]
            default = args[idx] if len(args) > idx else name != "batch_norm"
            training = kwargs.get("training", kwargs.get("train", default))
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            if training and (name == "batch_norm" or p != 0):
                raise self._unsupported(name, "it runs in training mode (call model.eval() first)")
        if name in _NONLINEAR:
            raise self._unsupported(name)
        if name in _CAT and self.broadcast_batch:
            args, kwargs = self._broadcast_cat(args, kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _module_tracking(model: nn.Module, mode: _LinearizeMode) -> Iterator[None]:
    """Keep ``mode.module_stack`` = the modules currently running (for error messages)."""
    handles = []

    def pre(name: str) -> Callable:
        def hook(_m: nn.Module, _i: object) -> None:
            if name == "":
                mode.module_stack.clear()
            mode.module_stack.append(name or type(model).__name__)

        return hook

    def post(name: str) -> Callable:
        def hook(_m: nn.Module, _i: object, _o: object) -> None:
            if mode.module_stack and mode.module_stack[-1] == (name or type(model).__name__):
                mode.module_stack.pop()

        return hook

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(pre(name)))
            handles.append(module.register_forward_hook(post(name), always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()
        mode.module_stack.clear()


@contextlib.contextmanager
def linearized(model: nn.Module, lrn: Literal["identity", "keep"] = "identity") -> Iterator[nn.Module]:
    """Run ``model`` linearised inside the block; the model itself is never modified.

    Inside the ``with`` block every torch call on this thread is intercepted (a
    :class:`torch.overrides.TorchFunctionMode`), so functional calls inside ``forward``
    (``F.relu(x)``, ``x.relu_()``, ``F.max_pool2d(...)``) are caught as well as modules:

    * ReLU (all variants, in-place included) → identity;
    * max pooling → average pooling, same window/stride/padding/``ceil_mode``, padded
      positions excluded from the average (``-inf`` "SAME" padding included);
    * local response norm → identity (closest linear stand-in; ``lrn="keep"`` keeps it, as
      Captum's ``optim`` branch did, which makes results input-dependent);
    * other nonlinearities (GELU, sigmoid, tanh, softmax, ReLU6, leaky ReLU, clamp, layer
      norm, batch norm / dropout in training mode, …) raise
      :class:`UnsupportedNonlinearityError` naming the op and the module.

    Weights, buffers, modules, hooks and the train/eval flag are the same afterwards, also
    when the block raises. Yields ``model``::

        with linearized(model):
            y = model(x)          # the linearised network's output
    """
    if lrn not in ("identity", "keep"):
        raise ValueError(f"lrn must be 'identity' or 'keep', got {lrn!r}")
    mode = _LinearizeMode(lrn=lrn)
    with _module_tracking(model, mode), mode:
        yield model


# --------------------------------------------------------------------------- geometry


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (p.dtype, p.device) if p is not None else (torch.float32, torch.device("cpu"))


def _reference_shape(model: nn.Module, input_shape: Optional[Sequence[int]]) -> tuple[int, int, int]:
    if input_shape is None:
        from .models import input_shape as model_input_shape

        input_shape = model_input_shape(model)
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be one example's (C, H, W), got {tuple(input_shape)}")
    return shape  # type: ignore[return-value]


def _check_spatial(layer: str, shape: tuple[int, ...], role: str) -> None:
    if len(shape) != 4:
        raise ValueError(
            f"expanded weights connect spatial (conv) layers with activations [batch, channels, h, w]; "
            f"{role} {layer!r} has activation shape {tuple(shape)} ({len(shape)}-D). Dense layers "
            "mixed with spatial ones have no [out, in, kh, kw] connection"
        )


class _Run(NamedTuple):
    free: torch.Tensor  # [B, C1, h1, w1] leaf that replaced from_layer
    out: torch.Tensor  # to_layer activation [B, C2, h2, w2]


def _run_linear(
    model: nn.Module,
    x: torch.Tensor,
    from_layer: str,
    to_layer: str,
    make_free: Callable[[torch.Tensor], torch.Tensor],
    broadcast_batch: int | None = None,
    lazy: bool = False,
) -> _Run:
    """Forward ``x`` up to ``to_layer`` with ``from_layer``'s output replaced by ``make_free(out)``;
    linearised from ``from_layer`` on (what runs before it is irrelevant to the result)."""
    mode = _LinearizeMode(active=False, broadcast_batch=broadcast_batch, lazy=lazy)
    state: dict[str, torch.Tensor] = {}

    def replace(out: torch.Tensor) -> torch.Tensor:
        if "free" in state:
            raise ValueError(
                f"module {from_layer!r} runs more than once in one forward pass, so its output is not "
                "a single layer; pick a module that runs once"
            )
        _check_spatial(from_layer, tuple(out.shape), "from_layer")
        state["free"] = make_free(out)
        mode.mark_derived(state["free"])
        mode.active = True
        return state["free"]

    with torch.enable_grad(), _module_tracking(model, mode), replace_activation(model, from_layer, replace), mode:
        acts = run_until(model, x, [to_layer])
    if "free" not in state:
        raise ValueError(
            f"to_layer {to_layer!r} is not downstream of from_layer {from_layer!r}: the forward pass "
            f"computes {to_layer!r} before {from_layer!r} runs"
        )
    out = acts[to_layer]
    _check_spatial(to_layer, tuple(out.shape), "to_layer")
    return _Run(state["free"], out)


def _centre(out: torch.Tensor) -> tuple[int, int]:
    return centre(out.shape[-2], out.shape[-1])


def _not_downstream(from_layer: str, to_layer: str) -> ValueError:
    return ValueError(
        f"to_layer {to_layer!r} is not downstream of from_layer {from_layer!r}: it does not depend "
        f"on {from_layer!r}'s activation (e.g. a parallel branch)"
    )


def _probe(
    model: nn.Module,
    from_layer: str,
    to_layer: str,
    hw: tuple[int, int],
    channels_in: int,
    position: tuple[int, int] | None = None,
    value_seed: int | None = 0,
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, ...]]:
    """Gradient ``[C1, h1, w1]`` of a fixed random mix of all to_layer channels at ``position``
    (default: the centre) w.r.t. the from_layer activation (random with ``value_seed``, zeros
    with ``None``), batch 1; also the position used and the to_layer shape."""
    dtype, device = _model_dtype_device(model)
    x = torch.zeros((1, channels_in, *hw), dtype=dtype, device=device)

    def make_free(out: torch.Tensor) -> torch.Tensor:
        if value_seed is None:
            free = torch.zeros_like(out)
        else:
            g = torch.Generator().manual_seed(value_seed)
            free = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
        return free.detach().requires_grad_(True)

    with torch.enable_grad():
        run = _run_linear(model, x, from_layer, to_layer, make_free)
        pos = _centre(run.out) if position is None else position
        h2, w2 = run.out.shape[-2:]
        if not (0 <= pos[0] < h2 and 0 <= pos[1] < w2):
            raise ValueError(f"position {pos} is outside {to_layer!r}'s {h2}x{w2} map")
        loss = (run.out[0, :, pos[0], pos[1]] * _mix(run.out.shape[1], run.out)).sum()
        if not loss.requires_grad:
            raise _not_downstream(from_layer, to_layer)
        (grad,) = torch.autograd.grad(loss, run.free, allow_unused=True)
    if grad is None:
        raise _not_downstream(from_layer, to_layer)
    return grad[0].detach(), pos, tuple(run.out.shape[1:])


def _mix(n: int, like: torch.Tensor) -> torch.Tensor:
    """The fixed random weights ``[n]`` with which probes mix all to_layer channels."""
    return torch.randn(n, generator=torch.Generator().manual_seed(1234), dtype=like.dtype).to(like.device)


def _support_box(grad: torch.Tensor) -> tuple[int, int, int, int] | None:
    """Bounding box ``(y0, y1, x0, x1)`` (ends exclusive) of the nonzero support of ``[C, h, w]``."""
    mask = grad.abs().amax(0) > 0
    ys, xs = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    if len(ys) == 0:
        return None
    return int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1


def _crop(t: torch.Tensor, y0: int, x0: int, kh: int, kw: int) -> torch.Tensor:
    """``t[..., y0:y0+kh, x0:x0+kw]`` with zeros where the window leaves the map."""
    h, w = t.shape[-2:]
    out = t.new_zeros((*t.shape[:-2], kh, kw))
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y0 + kh, h), max(x0, 0), min(x0 + kw, w)
    if sy0 < sy1 and sx0 < sx1:
        out[..., sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = t[..., sy0:sy1, sx0:sx1]
    return out


@dataclass(frozen=True, eq=False)
class _Geometry:
    hw: tuple[int, int]  # model input size used for the computation
    centre: tuple[int, int]  # the neuron's position in to_layer at that size
    window: tuple[int, int, int, int]  # (y0, x0, kh, kw) in from_layer at that size
    box: tuple[int, int]  # footprint size (bh, bw)
    window_offset: tuple[int, int]  # window origin minus footprint origin
    to_shape: tuple[int, ...]  # (C2, h2, w2) at that size
    from_channels: int  # model input channels
    pattern: torch.Tensor  # [C1, kh, kw]: the probe (all to_layer channels mixed by _mix), cropped


_GEOMETRY_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_TOLERANCE = 1e-4  # relative to the largest reference value; float32 noise is ~1e-6


def _candidate_sizes(h: int, w: int) -> list[tuple[int, int]]:
    sizes, s = [], 8
    while s < h:
        sizes.append((s, max(1, round(s * w / h))))
        s = s + max(4, s // 4) if s < 64 else s + s // 4
    return sizes


def _normalise_crop(crop: Union[int, Sequence[int], None]) -> tuple[int, int] | None:
    if crop is None:
        return None
    kh, kw = (crop, crop) if isinstance(crop, int) else tuple(crop)
    if kh < 1 or kw < 1:
        raise ValueError(f"crop must be a positive size, got {crop!r}")
    return int(kh), int(kw)


def _plan(
    model: nn.Module,
    from_layer: str,
    to_layer: str,
    input_shape: Optional[Sequence[int]],
    crop: Union[int, Sequence[int], None],
) -> _Geometry:
    if from_layer == to_layer:
        raise ValueError(f"from_layer and to_layer are the same layer {from_layer!r}")
    get_layer(model, from_layer), get_layer(model, to_layer)  # UnknownLayerError early
    c, h, w = _reference_shape(model, input_shape)
    crop_hw = _normalise_crop(crop)
    key = (from_layer, to_layer, (c, h, w), crop_hw)
    cache = _GEOMETRY_CACHE.setdefault(model, {})
    if key in cache:
        return cache[key]

    ref, ref_pos, ref_to = _probe(model, from_layer, to_layer, (h, w), c)
    box = _support_box(ref)
    if box is None:
        raise _not_downstream(from_layer, to_layer)
    by0, by1, bx0, bx1 = box
    bh, bw = by1 - by0, bx1 - bx0
    if crop_hw is None:
        kh, kw, oy, ox = bh, bw, 0, 0
    else:
        kh, kw = crop_hw
        oy, ox = (by0 + by1 - 1) // 2 - (kh - 1) // 2 - by0, (bx0 + bx1 - 1) // 2 - (kw - 1) // 2 - bx0
    if by0 == 0 or bx0 == 0 or by1 == ref.shape[-2] or bx1 == ref.shape[-1]:
        warnings.warn(
            f"the receptive field of {to_layer!r}'s centre neuron reaches the border of {from_layer!r} "
            f"at input size {h}x{w}; the expanded weights are clipped there (pass a larger input_shape)",
            stacklevel=3,
        )
    pattern = _crop(ref, by0 + oy, bx0 + ox, kh, kw)
    tol = _TOLERANCE * float(pattern.abs().max())
    geometry = _Geometry((h, w), ref_pos, (by0 + oy, bx0 + ox, kh, kw), (bh, bw), (oy, ox), ref_to, c, pattern)
    # start the search where the from_layer map is about as large as the footprint
    need, ratio = max(bh, kh), ref.shape[-2] / h
    candidates = [hw for hw in _candidate_sizes(h, w) if hw[0] * ratio >= need - 2]
    accepted = ref
    for hw in candidates:
        try:
            g, pos, to_shape = _probe(model, from_layer, to_layer, hw, c)
        except (RuntimeError, ValueError):  # too small for some layer on the way
            continue
        b = _support_box(g)
        if b is None or (b[1] - b[0], b[3] - b[2]) != (bh, bw):
            continue
        window = (b[0] + oy, b[2] + ox, kh, kw)
        if float((_crop(g, *window) - pattern).abs().max()) <= tol:
            geometry = _Geometry(hw, pos, window, (bh, bw), (oy, ox), to_shape, c, _crop(g, *window))
            accepted = g
            break
    # linearity: the gradient must not depend on the free tensor's value (random above, zeros here)
    g0, _, _ = _probe(model, from_layer, to_layer, geometry.hw, c, value_seed=None)
    g1 = accepted
    if float((g0 - g1).abs().max()) > _TOLERANCE * float(g0.abs().max()) + 1e-12:
        raise UnsupportedNonlinearityError(
            f"the path from {from_layer!r} to {to_layer!r} is not linear after linearisation (its "
            "gradient depends on the activation): the model uses a nonlinear operation that "
            "linearisation does not know, e.g. a product of two activations"
        )
    cache[key] = geometry
    return geometry


# --------------------------------------------------------------------------- expanded weights


def _as_int_list(channels: Union[int, Sequence[int], torch.Tensor]) -> list[int]:
    if isinstance(channels, int):
        return [channels]
    if isinstance(channels, torch.Tensor):
        return [int(c) for c in channels.flatten().tolist()]
    return [int(c) for c in channels]


def _channel_list(layer: str, channels: Union[int, Sequence[int], torch.Tensor, None], n: int) -> list[int]:
    if channels is None:
        return list(range(n))
    out = _as_int_list(channels)
    if not out:
        raise ValueError(f"channels for {layer!r} is empty")
    for ch in out:
        check_channel(layer, ch, n)
    return out


def expanded_weights(
    model: nn.Module,
    from_layer: str,
    to_layer: str,
    channels: Union[int, Sequence[int], torch.Tensor, None] = None,
    crop: Union[int, Sequence[int], None] = None,
    input_shape: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
    progress: bool = False,
) -> torch.Tensor:
    """Expanded weights ``[out, in, kh, kw]`` from ``from_layer`` to ``to_layer`` (linearised).

    ``E[c2, c1, dy, dx] = ∂ to_layer[c2, centre] / ∂ from_layer[c1, centre + (dy, dx)]`` for
    the output channels ``channels`` (default: all, in order) and all input channels,
    cropped to the receptive-field footprint of ``to_layer``'s centre neuron in
    ``from_layer`` (its bounding box) or to a ``crop`` window (``int`` or ``(kh, kw)``)
    centred on it (zeros outside the footprint). For a stride-1 path of odd kernels the
    footprint is centred on the neuron, so ``E[..., kh//2, kw//2]`` is the same position.

    The model is linearised from ``from_layer`` on (see :func:`linearized`), so biases do not
    matter and the result does not depend on any input. All output channels are computed
    in one backward pass per ``batch_size`` chunk (default: all at once): ``from_layer``'s
    activation is replaced by a zero tensor with one copy per output channel in the batch,
    the forward stops at ``to_layer``, and the sum of each copy's own centre output is
    back-propagated once. The input size is the smallest that gives the same result as
    ``input_shape`` (``(C, H, W)``, default the model's ``input_shape``); see the module docs.

    Memory is about ``batch_size`` × the activations between the two layers at that size;
    ``progress=True`` shows a tqdm bar over the chunks.

    Raises:
        UnknownLayerError: a layer name the model does not have.
        ValueError: ``to_layer`` not downstream of ``from_layer``; a layer without spatial
            dims; a bad channel, ``crop`` or ``input_shape``.
        UnsupportedNonlinearityError: a nonlinear op on the path that has no linear stand-in.
    """
    geo = _plan(model, from_layer, to_layer, input_shape, crop)
    chans = _channel_list(to_layer, channels, geo.to_shape[0])
    if batch_size is None:
        batch_size = len(chans)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dtype, device = _model_dtype_device(model)
    x = torch.zeros((1, geo.from_channels, *geo.hw), dtype=dtype, device=device)
    y, xpos = geo.centre
    wy0, wx0, kh, kw = geo.window
    chunks = [chans[i : i + batch_size] for i in range(0, len(chans), batch_size)]
    desc = f"expanded weights {from_layer}→{to_layer}"
    iterator = tqdm(chunks, desc=desc, disable=not progress or len(chunks) < 2)

    def compute(chunk: list[int], lazy: bool) -> torch.Tensor:
        n = len(chunk)

        def make_free(out: torch.Tensor) -> torch.Tensor:
            return out.new_zeros((n, *out.shape[1:])).requires_grad_(True)

        with torch.enable_grad():
            try:
                run = _run_linear(model, x, from_layer, to_layer, make_free, broadcast_batch=n, lazy=lazy)
            except RuntimeError:  # something other than a concatenation mixed batch 1 and batch n
                run = _run_linear(model, x.expand(n, *x.shape[1:]), from_layer, to_layer, make_free, lazy=lazy)
            index = torch.tensor(chunk, device=run.out.device)
            selected = run.out[torch.arange(n, device=run.out.device), index, y, xpos]
            (grad,) = torch.autograd.grad(selected.sum(), run.free, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(run.free)
        return _crop(grad.detach(), wy0, wx0, kh, kw)

    # The path was checked to be linear when planning, so convolutions on it skip their forward
    # computation (``lazy``). With all channels, the result is checked against the planning probe
    # (the same channels mixed with fixed weights) and recomputed the plain way on a mismatch.
    result = torch.cat([compute(chunk, lazy=True) for chunk in iterator], 0)
    if sorted(chans) == list(range(geo.to_shape[0])):
        mixed = torch.einsum("c,cihw->ihw", _mix(len(chans), result)[chans], result)
        scale = float(geo.pattern.abs().max())
        if float((mixed - geo.pattern).abs().max()) > 10 * _TOLERANCE * scale + 1e-12:
            result = torch.cat([compute(chunk, lazy=False) for chunk in chunks], 0)
    return result


# --------------------------------------------------------------------------- direct connections


@dataclass(frozen=True)
class Connection:
    """Weights between two layers.

    ``weights`` is ``[out, in, kh, kw]``; ``kind`` is ``"direct"`` (the kernel of the one
    convolution that connects adjacent layers) or ``"expanded"`` (:func:`expanded_weights`);
    ``channels`` lists the output channels of ``to_layer`` the rows belong to (``None``: all).
    """

    weights: torch.Tensor
    kind: Literal["direct", "expanded"]
    from_layer: str
    to_layer: str
    channels: Optional[tuple[int, ...]] = None


_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity,
)


def _direct_conv(
    model: nn.Module, from_layer: str, to_layer: str, input_shape: tuple[int, int, int]
) -> nn.Conv2d | None:
    """The conv whose input *is* from_layer's output and whose output is to_layer (itself,
    or through one elementwise activation module), traced with forward hooks; else None."""
    from_module, to_module = get_layer(model, from_layer), get_layer(model, to_layer)
    seen: dict[str, object] = {}
    conv_calls: list[tuple[nn.Module, object, object]] = []
    to_inputs: list[object] = []
    handles = []

    def from_hook(_m: nn.Module, _i: tuple, out: object) -> None:
        seen.setdefault("from", out)

    def conv_hook(m: nn.Module, inputs: tuple, out: object) -> None:
        conv_calls.append((m, inputs[0] if inputs else None, out))

    def to_pre_hook(_m: nn.Module, inputs: tuple) -> None:
        to_inputs.append(inputs[0] if inputs else None)

    dtype, device = _model_dtype_device(model)
    try:
        handles.append(from_module.register_forward_hook(from_hook))
        handles.append(to_module.register_forward_pre_hook(to_pre_hook))
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                handles.append(m.register_forward_hook(conv_hook))
        with torch.no_grad():
            run_until(model, torch.zeros((1, *input_shape), dtype=dtype, device=device), [from_layer, to_layer])
    except RuntimeError:  # a layer that never runs: let expanded_weights explain
        return None
    finally:
        for h in handles:
            h.remove()
    source = seen.get("from")
    if source is None or len(to_inputs) != 1:
        return None

    def simple(conv: nn.Module) -> bool:
        return isinstance(conv, nn.Conv2d) and conv.groups == 1 and tuple(conv.dilation) == (1, 1)

    if simple(to_module):
        return to_module if to_inputs[0] is source else None  # type: ignore[return-value]
    if isinstance(to_module, _ELEMENTWISE):
        for conv, conv_in, conv_out in conv_calls:
            if conv_out is to_inputs[0] and conv_in is source and simple(conv):
                return conv  # type: ignore[return-value]
    return None


def connection_weights(
    model: nn.Module,
    from_layer: str,
    to_layer: str,
    channels: Union[int, Sequence[int], torch.Tensor, None] = None,
    crop: Union[int, Sequence[int], None] = None,
    input_shape: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
) -> Connection:
    """The weights from ``from_layer`` to ``to_layer``: direct kernel if adjacent, else expanded.

    Adjacent means (traced with forward hooks on one forward pass, so it works for any
    model): ``to_layer`` is a ``Conv2d`` (no groups, no dilation) whose input *is*
    ``from_layer``'s output tensor, or an elementwise activation module (ReLU, …) whose input
    *is* the output of such a conv applied to ``from_layer``'s output — e.g.
    ``mixed3b_3x3_bottleneck → mixed3b_3x3`` (a 3×3 conv + ReLU) or
    ``mixed3b_3x3_bottleneck → mixed3b_3x3_pre_relu_conv``. Then ``weights`` is that conv's
    kernel ``[out, in, kh, kw]`` (``kind="direct"``); ``crop`` is ignored. Anything else
    (several layers, concatenations, pooling, batch norm between) gives
    :func:`expanded_weights` (``kind="expanded"``). The two agree for adjacent stride-1 convs.
    """
    ref_shape = _reference_shape(model, input_shape)
    if from_layer == to_layer:
        raise ValueError(f"from_layer and to_layer are the same layer {from_layer!r}")
    conv = _direct_conv(model, from_layer, to_layer, ref_shape)
    if conv is not None:
        chans = _channel_list(to_layer, channels, conv.out_channels)
        weights = conv.weight.detach()[chans].clone()
        kind: Literal["direct", "expanded"] = "direct"
    else:
        weights = expanded_weights(model, from_layer, to_layer, channels, crop, input_shape, batch_size)
        kind = "expanded"
    chan_tuple = None if channels is None else tuple(_as_int_list(channels))
    return Connection(weights, kind, from_layer, to_layer, chan_tuple)


def neuron_weights(
    model: nn.Module,
    from_layer: str,
    target: str,
    crop: Union[int, Sequence[int], None] = None,
    input_shape: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Weights ``[in, kh, kw]`` of one neuron (``"mixed3b:208"``) from ``from_layer``.

    Direct kernel slice when the layers are adjacent, expanded weights otherwise (see
    :func:`connection_weights`). A position (``"@y,x"``) is rejected: linearised weights are
    the same at every interior position; use :func:`per_example_connections` for positions.
    """
    t = parse_target(target)
    if t.channel is None:
        raise ValueError(f"target {target!r} names a layer, not a neuron: use 'layer:channel'")
    if t.position is not None:
        raise ValueError(
            f"target {target!r} has a position, but linearised weights do not depend on it; use "
            "per_example_connections(...) for a neuron at a given position"
        )
    return connection_weights(model, from_layer, t.layer, [t.channel], crop, input_shape).weights[0]


class TopInputs(NamedTuple):
    """Indices of the strongest input channels and their L2 norms, strongest first."""

    indices: torch.Tensor
    norms: torch.Tensor


def top_inputs(weights: Union[torch.Tensor, Connection], k: int) -> TopInputs:
    """Top-``k`` input channels by the L2 norm of their ``[kh, kw]`` weight slice.

    ``weights``: ``[in, kh, kw]`` (one neuron) → ``indices``/``norms`` ``[k]``; or
    ``[out, in, kh, kw]`` → ``[out, k]`` per output channel. ``k`` larger than the number of
    input channels returns them all.
    """
    if isinstance(weights, Connection):
        weights = weights.weights
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a tensor or Connection, got {type(weights).__name__}")
    if weights.dim() not in (3, 4):
        raise ValueError(f"weights must be [in, kh, kw] or [out, in, kh, kw], got shape {tuple(weights.shape)}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    norms = weights.detach().flatten(-2).norm(dim=-1)
    values, indices = norms.topk(min(k, norms.shape[-1]), dim=-1)
    return TopInputs(indices, values)


# --------------------------------------------------------------------------- per example


def per_example_connections(
    model: nn.Module,
    inputs: torch.Tensor,
    from_layer: str,
    target: str,
    method: Literal["gradient", "gradient_x_activation"] = "gradient",
    preprocess: bool = False,
) -> torch.Tensor:
    """Connection of one neuron to ``from_layer`` at given inputs, with the real nonlinearities.

    ``method="gradient"``: ``∂ to[c, y, x] / ∂ from[:, y+dy, x+dx]`` at each input;
    ``"gradient_x_activation"``: that gradient times the activation (an attribution of the
    neuron to its upstream neurons). Computed with Captum's
    :class:`captum.attr.LayerGradientXActivation` at ``from_layer`` (``multiply_by_inputs``
    off for plain gradients); the forward stops at ``to_layer``.

    Args:
        inputs: ``[B, C, H, W]`` (→ result ``[B, in, kh, kw]``) or ``[C, H, W]`` (→ ``[in, kh, kw]``),
            already mapped to the model's input convention (as ``model.forward`` takes;
            :func:`circuits.models.preprocess_input`), or pixels in ``[0, 1]`` with
            ``preprocess=True``.
        target: ``"layer:channel"`` (the centre of the map) or ``"layer:channel@y,x"``.

    The window is the neuron's receptive-field footprint at that position (the same
    ``[kh, kw]`` as :func:`expanded_weights`; zeros where it leaves the map at borders).
    Use this where linearisation washes out (boundary detectors, article figures 11–12).
    The model's train/eval mode is used as is (call ``model.eval()``).
    """
    from captum.attr import LayerGradientXActivation

    if method not in ("gradient", "gradient_x_activation"):
        raise ValueError(f"method must be 'gradient' or 'gradient_x_activation', got {method!r}")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() not in (3, 4):
        got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be [B, C, H, W] or [C, H, W], got {got}")
    single = inputs.dim() == 3
    x = inputs.unsqueeze(0) if single else inputs
    if preprocess:
        from .models import preprocess_input

        x = preprocess_input(model, x)
    t = parse_target(target)
    if t.channel is None:
        raise ValueError(f"target {target!r} names a layer, not a neuron: use 'layer:channel'")
    c, h, w = x.shape[1:]
    geo = _plan(model, from_layer, t.layer, (c, h, w), None)
    check_channel(t.layer, t.channel, geo.to_shape[0])
    grad, pos, _ = _probe(model, from_layer, t.layer, (h, w), c, position=t.position)
    box = _support_box(grad)
    if box is None:  # pragma: no cover - the plan found a support already
        raise _not_downstream(from_layer, t.layer)
    (by0, by1, bx0, bx1), (bh, bw), (oy, ox) = box, geo.box, geo.window_offset
    if by1 - by0 < bh and by0 == 0:  # clipped by the top/left border: anchor at the far side
        by0 = by1 - bh
    if bx1 - bx0 < bw and bx0 == 0:
        bx0 = bx1 - bw
    _, _, kh, kw = geo.window
    to_layer = t.layer

    def forward(inp: torch.Tensor) -> torch.Tensor:
        return run_until(model, inp, [to_layer])[to_layer]

    attr = LayerGradientXActivation(
        forward, get_layer(model, from_layer), multiply_by_inputs=method == "gradient_x_activation"
    )
    with torch.enable_grad():
        result = attr.attribute(x, target=(t.channel, pos[0], pos[1]))
    result = _crop(result.detach(), by0 + oy, bx0 + ox, kh, kw)
    return result[0] if single else result
