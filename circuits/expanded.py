"""Expanded weights: the effective linear connection between two layers (METHODS.md §3, §7).

Adjacent conv layers are connected by a kernel slice ``W[out, in, kh, kw]``. Non-adjacent
layers (``conv2d2 → mixed3b`` across the ``mixed3a`` bottlenecks, ``layer1 → layer2`` of a
ResNet, one EfficientNet or ConvNeXt block to the next) are connected through several
kernels and nonlinearities; their *expanded weights* are the connection of the
**linearised** path:

    E[c2, c1, dy, dx] = ∂ to_layer[c2, centre] / ∂ from_layer[c1, centre + (dy, dx)]

Linearisation (:func:`linearized`, METHODS.md §7) runs the model with every nonlinear
operation replaced by a stand-in, without touching the model. What each op becomes is a
**policy** (``policy=``):

* ``"default"``: ReLU-like activations (relu, relu6/hardtanh, leaky_relu, elu, celu, selu,
  gelu, silu, hardswish, mish, softplus, prelu, rrelu, threshold) → identity (the slope for
  large positive inputs: 1, or selu's scale); max pooling → average pooling; local response
  norm → identity; and the ops with no input-free stand-in are **frozen at a reference
  input** (below): normalisations whose statistics come from the input (layer norm, group
  norm, instance norm, RMS norm, ``F.normalize``, batch norm in training mode),
  multiplicative gates (``sigmoid``, ``hardsigmoid``: squeeze-excitation's
  ``x * sigmoid(f(x))``) and attention (``softmax``, ``scaled_dot_product_attention``,
  ``nn.MultiheadAttention``).
  Other nonlinear ops (tanh, clamp, products of two activations, ...) are refused. Under
  every policy an op on the model's parameters alone (Swin V2's clamped, exponentiated
  attention scale) is a constant of the model and runs unchanged.
* ``"article"``: the article's rule only (ReLU → identity, max pool → average pool,
  LRN → identity); anything else raises :class:`UnsupportedNonlinearityError`.
* a mapping from op name or module type to a rule, on top of ``"default"``:
  ``{"gelu": "identity", nn.LayerNorm: "freeze", "softmax": "freeze", "tanh": "identity"}``.
  Rules: ``"identity"``, ``"avg_pool"`` (max pools), ``"freeze"``, ``"keep"`` (run the op
  unchanged: the result may then depend on the input, which the linearity check reports)
  and ``"error"``. A module type's rule applies to the nonlinear ops that run inside
  modules of that type (the innermost such module wins) and takes precedence over op-name
  rules. :meth:`LinearisationPolicy.rules` lists every op name and its rule.

Max pooling becomes average pooling with the same window, stride, padding and
``ceil_mode``, averaging over the real (non-padded) inputs only (``count_include_pad=False``);
a ``F.pad(..., value=-inf)`` feeding a max pool (TensorFlow "SAME" pooling, as in
:class:`circuits.models._blocks.MaxPool2dSame`) becomes zero padding that is likewise
excluded. Local response norm → identity is the closest *linear* stand-in (LRN divides by
a local energy that is ≈ constant); Captum's unreleased ``optim`` branch kept LRN, which
makes its expanded weights depend on the input used; ``linearized(model, lrn="keep")``
does the same, for comparison.

**Freezing.** The original model runs once on the reference input (a :class:`Reference`);
each op to freeze records what makes it nonlinear: a normalisation its statistics (mean
and variance over its normalised axes, per example; batch norm in training mode over the
reference batch), a gate its output, ``softmax`` its output, attention its pattern
``softmax(QKᵀ·scale + mask)``. The linearised pass then uses those values as constants: a
frozen normalisation is ``(x − mean_ref) · (var_ref + eps)^-½ · weight + bias`` (its
affine part stays live; the mean is frozen too, so the frozen op is a multiplication by a
constant, connections stay local for group/instance norm and the per-channel copies in the
batch stay independent), a frozen gate or softmax is its recorded output (no gradient
flows into it), frozen attention is ``pattern_ref @ V`` (the value path stays live; for
``nn.MultiheadAttention`` ``out_proj(pattern_ref @ V)`` with ``V`` its value projection).
Recorded values are matched to the linearised pass by **call order per module**: the
``k``-th call of op ``o`` whose innermost module is ``m`` in one forward pass (functional
calls inside ``forward`` and module calls alike; a module called several times gets
``k = 0, 1, ...``). Both passes run the same ``forward`` code, so the keys agree unless
the model's control flow depends on its input, which is reported as an error (so is a
recorded shape that does not match). The reference is, by default, a fixed-seed batch of
smooth noise images (:meth:`Reference.noise`: low-frequency Fourier noise in the model's
input convention, :func:`circuits.models.preprocess_input`), and the expanded weights
are the **mean over the reference images of the Jacobians**; or the images of a data
loader (:meth:`Reference.from_loader`, again the mean of the per-image Jacobians); or
one given image. :func:`connection_weights` returns which ops were frozen
(:class:`FrozenOp`) and the reference used. When nothing on the path is frozen (ReLU-like
ops and pools only), no reference is used, the result does not depend on any input and it
is the article's, to the bit.

Convolution, linear layers, concatenation, addition, permutes and reshapes, average
pooling, eval-mode batch norm and eval-mode dropout (and stochastic depth) are already
affine and run unchanged; dropout in training mode is refused. Anything nonlinear that
still slips through (e.g. the product of two activations, or a gate whose sigmoid was
given ``"identity"``) is caught by a linearity check: the result must not depend on the
value of the free tensor. Because the linearised map is affine, **biases do not affect the
result** and the gradient does not depend on the activation it is taken at.

How it is computed (:func:`expanded_weights`): the activation of ``from_layer`` is replaced
by a free tensor (:func:`circuits.layers.replace_activation`) holding **one copy per output
channel in the batch dimension**; the forward pass runs only as far as ``to_layer``
(:func:`circuits.layers.run_until`); the sum over copies of each copy's *own* channel at the
centre is back-propagated **once**. Everything before ``from_layer`` runs on a single image
(the batch is only expanded at ``from_layer``). Paths with attention (ViT, Swin) are the
exception: their input size cannot shrink and their forward pass is mostly linear layers, so
a copy per output channel would cost a forward pass each; there the path runs forward once
(batch 1) and back-propagates once per output channel. The model input is as small as possible:
starting from the model's input size (``input_shape``; with frozen ops the reference's
size), we search the smallest input size whose result at the centre neuron is identical to
the full-size result, i.e. whose ``from_layer`` map holds the whole receptive field of the
centre neuron and whose borders (zero padding, average-pool divisors) do not reach the
paths into it. Frozen values recorded at the reference's size are replayed at the smaller
sizes only when they are one value per channel (gates after global pooling, group /
instance / batch norm statistics: the frozen op is then the same per-channel affine map at
any size); values that vary with the position (layer norm over the channels at each
position, softmax and attention patterns) keep the reference's size. The chosen geometry
is cached per model (weakly), keyed by the layers, size, crop, policy, reference and the
modules' train/eval flags. Once the path has been checked to be
linear, convolutions of tensors derived from the free tensor skip their forward arithmetic
(values do not enter the gradient of a linear map; only the input gradient is computed);
when all output channels are requested, the result is cross-checked against the planning
probe and recomputed the plain way on any mismatch.

The result is cropped to the receptive-field footprint of ``to_layer``'s centre neuron in
``from_layer`` (the bounding box of the gradient's support over all output channels: 5×5
for one 5×5 conv, 9×9 for two stacked 5×5 convs), or to a window of a given ``crop`` size
centred on that footprint. **Dense layers**: a ``to_layer`` with activation ``[B, F]``
(logits, a ``Linear`` output) has no position, so ``E[f, c1, y, x] = ∂ to_layer[f] / ∂
from_layer[c1, y, x]`` covers ``from_layer``'s **whole map** at the input size used
(``kh, kw`` = that map's size; ``crop`` takes a centred window of it); a dense
``from_layer`` is a ``1 × 1`` map.

**Layouts.** Both layers are read through their :class:`circuits.layouts.Layout` (detected
from the model, overridable with :func:`circuits.layouts.set_layout`): ``[B, C, H, W]``
maps as they are, channels-last ``[B, H, W, C]`` activations (Swin stages, ConvNeXt block
internals) permuted, token activations ``[B, n_prefix + H·W, C]`` (ViT blocks) as their
patch grid, dense ``[B, F]`` as ``1 × 1`` maps. So ``c1``, ``c2`` are always the feature
axes and ``(dy, dx)`` offsets on the spatial or patch grid; the free tensor that replaces
``from_layer`` is in the layer's own layout, and its gradient is read back through the
same layout. The centre is :func:`circuits.layers.centre` of the grid, everywhere.

* **ViT** (METHODS.md §7): ``E[d_out, d_in, dy, dx]`` on the patch grid at the centre patch
  of ``to_layer``. Attention mixes all patches, so the footprint is the whole grid (no
  border warning: there is nothing a larger input would add; the positional embedding
  fixes the grid anyway). ``from_layer``'s class and register tokens are input rows of
  their own, not positions: ``Connection.prefix_weights[d_out, p, d_in]`` (``p = 0`` the
  class token: METHODS' ``E_cls``). ``to_token=k`` asks for ``to_layer``'s ``k``-th prefix
  token (``0``: the class token, which the head reads) as the output instead: it has no
  position, so, like a dense ``to_layer``, its weights cover ``from_layer``'s whole grid
  (plus the prefix rows).
* **Swin**: stages are channels-last ``[B, h, w, c]`` and read through their layout. The
  window attention (shifted windows included) is frozen at the reference like any
  attention: its pattern is recorded per window (Swin folds the windows into the batch,
  ``[B · windows, heads, N, N]``; the recording keeps them per example), so the centre
  patch's weights reach exactly the patches its window (and, in a shifted block, its
  shifted window) let it see at the reference — the connections of the centre patch are
  those of *its* windows, and a patch elsewhere, in another window position, may see a
  differently shaped neighbourhood. The footprint is the bounding box of that support.
* **Dense heads** after either (``to_layer`` = the logits) cover the whole grid, as for CNNs.

**Known failure** (article, figures 11–12): where the nonlinear structure matters, e.g.
boundary detectors that are excited on one side and inhibited on the other, excitation and
inhibition cancel in the expanded weights. Use :func:`per_example_connections` (gradients
with the real nonlinearities at given inputs, optionally × activation, built on Captum) for
those neurons.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from .layers import centre, check_channel, get_layer, parse_neuron, parse_target, replace_activation, run_until
from .layouts import Layout, get_layouts
from .models import device_and_dtype
from .wiring import adjacent_conv, layer_graph

__all__ = [
    "UnsupportedNonlinearityError",
    "LinearisationPolicy",
    "Reference",
    "FrozenOp",
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


# --------------------------------------------------------------------------- ops and rules

RULES = ("identity", "avg_pool", "freeze", "keep", "error")

# Families of nonlinear ops (canonical names: in-place "_" and "_with_indices" stripped):
# (ops, rules allowed, rule of the default policy, rule of the article policy).
_RELU_LIKE = (
    "relu", "relu6", "hardtanh", "leaky_relu", "elu", "celu", "selu", "gelu", "silu", "hardswish",
    "mish", "softplus", "prelu", "rrelu", "threshold",
)
_GATES = ("sigmoid", "hardsigmoid")
_ELEMENTWISE_OPS = (
    "tanh", "softsign", "logsigmoid", "tanhshrink", "softshrink", "hardshrink", "exp", "log", "sqrt",
    "rsqrt", "abs", "sign", "erf", "square", "reciprocal", "clamp", "clamp_min", "clamp_max", "clip",
)
_SOFTMAX = ("softmax", "log_softmax", "softmin")
_ATTENTION = ("scaled_dot_product_attention", "multi_head_attention_forward")
# channels per batched pass where attention is on the path (the whole token grid travels: ~2 MB
# per channel and block for ViT-B/32)
_ATTENTION_BATCH = 128
_NORMS = ("layer_norm", "group_norm", "instance_norm", "rms_norm", "batch_norm", "normalize")
_MAX_POOLS = tuple(f"max_pool{d}d" for d in (1, 2, 3)) + tuple(f"adaptive_max_pool{d}d" for d in (1, 2, 3))
_LRN_OPS = ("local_response_norm",)
_OTHER = (
    "pow", "maximum", "minimum", "fmax", "fmin", "max", "min", "amax", "amin", "logsumexp", "norm", "sort",
    "topk", "glu", "max_unpool1d", "max_unpool2d", "max_unpool3d", "lp_pool1d", "lp_pool2d", "lp_pool3d",
    "fractional_max_pool2d", "fractional_max_pool3d",
)
_FAMILIES: tuple[tuple[tuple[str, ...], tuple[str, ...], str, str], ...] = (
    (_RELU_LIKE, ("identity", "freeze", "keep", "error"), "identity", "error"),
    (_GATES, ("freeze", "identity", "keep", "error"), "freeze", "error"),
    (_ELEMENTWISE_OPS, ("identity", "freeze", "keep", "error"), "error", "error"),
    (_SOFTMAX, ("freeze", "keep", "error"), "freeze", "error"),
    (_ATTENTION, ("freeze", "keep", "error"), "freeze", "error"),
    (_NORMS, ("freeze", "keep", "error"), "freeze", "error"),
    (_MAX_POOLS, ("avg_pool", "keep", "error"), "avg_pool", "avg_pool"),
    (_LRN_OPS, ("identity", "keep", "error"), "identity", "identity"),
    (_OTHER, ("freeze", "keep", "error"), "error", "error"),
)
_ALLOWED = {op: allowed for ops, allowed, _, _ in _FAMILIES for op in ops}
_DEFAULT_RULES = {op: default for ops, _, default, _ in _FAMILIES for op in ops}
_ARTICLE_RULES = {op: article for ops, _, _, article in _FAMILIES for op in ops}
_ARTICLE_RULES["relu"] = "identity"


def _raw_names() -> dict[str, str]:
    """torch function ``__name__`` → canonical op name (in-place and private spellings included)."""
    out = {}
    for op in _ALLOWED:
        for raw in (op, op + "_", "_" + op, "_" + op + "_"):
            out[raw] = op
    for op in _MAX_POOLS:
        out[op + "_with_indices"] = op
    out["__pow__"] = out["__ipow__"] = "pow"
    return out


_CANONICAL = _raw_names()
# in-place flag position per op (``F.relu(x, inplace)``, ``F.hardtanh(x, min, max, inplace)``...)
_INPLACE_ARG = {
    "relu": 1, "relu6": 1, "hardtanh": 3, "leaky_relu": 2, "elu": 2, "celu": 2, "selu": 1, "silu": 1,
    "hardswish": 1, "mish": 1, "threshold": 3, "rrelu": 4, "hardsigmoid": 1,
}
_SELU_SCALE = 1.0507009873554804934193349852946
_TRAIN_ONLY = {  # affine in eval mode, not in training mode: name -> index of the training flag
    "dropout": 2, "dropout_": 2, "dropout1d": 2, "dropout2d": 2, "dropout3d": 2,
    "alpha_dropout": 2, "feature_alpha_dropout": 2, "feature_dropout": 2,
}
_CAT = {"cat", "concat", "concatenate", "stack"}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_ADAPTIVE_AVG_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_POOL_PARAMS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_NORM_PARAMS = {
    "layer_norm": ("input", "normalized_shape", "weight", "bias", "eps"),
    "group_norm": ("input", "num_groups", "weight", "bias", "eps"),
    "instance_norm": ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps"),
    "rms_norm": ("input", "normalized_shape", "weight", "eps"),
    "batch_norm": ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    "normalize": ("input", "p", "dim", "eps", "out"),
}
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_MHA_PARAMS = (
    "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
    "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training", "key_padding_mask",
    "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
    "static_k", "static_v", "average_attn_weights", "is_causal",
)


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


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("input", "query", "self"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    tensors = _tensors(args) + _tensors(tuple(kwargs.values()))
    if not tensors:
        raise TypeError("the op has no tensor input")
    return tensors[0]


def _split_batch(op: str, x: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    """``(batch size, shape without the batch dim)`` of an op's first input: nn.MultiheadAttention
    hands ``F.multi_head_attention_forward`` sequence-first ``[L, B, E]`` (or unbatched ``[L, E]``)."""
    if op == "multi_head_attention_forward":
        return (x.shape[1], (x.shape[0], *x.shape[2:])) if x.dim() == 3 else (1, tuple(x.shape))
    return x.shape[0], tuple(x.shape[1:])


# set on the outputs of ops computed from the model's parameters alone (see _constant_call)
_CONSTANT_ATTR = "_circuits_model_constant"


def _constant_call(args: tuple, kwargs: dict) -> bool:
    """True for an op whose tensor arguments are all parameters of the model (or computed from
    them alone): its result is a constant of the model, not a function of the input, so it runs
    as it is whatever the policy (Swin V2 clamps and exponentiates its learned attention scale)."""
    tensors = _tensors(args) + _tensors(tuple(kwargs.values()))
    return bool(tensors) and all(isinstance(t, nn.Parameter) or getattr(t, _CONSTANT_ATTR, False) for t in tensors)


def _run_constant(func: Callable, args: tuple, kwargs: dict) -> object:
    out = func(*args, **kwargs)
    for t in _tensors(out if isinstance(out, (tuple, list)) else (out,)):
        if not isinstance(t, nn.Parameter):
            setattr(t, _CONSTANT_ATTR, True)
    return out


def _data_dependent(op: str, args: tuple, kwargs: dict) -> bool:
    """False for the ops that are affine in some calls: batch norm in eval mode, instance norm
    with running statistics."""
    if op == "batch_norm":
        return bool(_bind(_NORM_PARAMS[op], args, kwargs).get("training", False))
    if op == "instance_norm":
        return bool(_bind(_NORM_PARAMS[op], args, kwargs).get("use_input_stats", True))
    return True


def _is_inplace(op: str, name: str, args: tuple, kwargs: dict) -> bool:
    if name.endswith("_") and not name.endswith("__"):
        return True
    idx = _INPLACE_ARG.get(op)
    if idx is None:
        return False
    return bool(kwargs.get("inplace", args[idx] if len(args) > idx else False))


@dataclass(frozen=True, eq=False)
class LinearisationPolicy:
    """What linearisation does with each nonlinear op (METHODS.md §7); see the module docs.

    Build one with :meth:`of` from ``"default"``, ``"article"`` or a mapping; every function
    that linearises takes any of those as ``policy=``. ``rules()`` lists the op names a
    mapping may use and the rule each gets.

    Example:
        >>> p = LinearisationPolicy.of({"gelu": "identity", nn.LayerNorm: "freeze", "tanh": "identity"})
        >>> p.rules()["tanh"], p.rules()["sigmoid"], LinearisationPolicy.of("article").rules()["gelu"]
        ('identity', 'freeze', 'error')
    """

    name: str
    op_rules: Mapping[str, str]
    type_rules: tuple[tuple[type, str], ...] = ()

    @classmethod
    def of(
        cls, spec: Union[str, Mapping[Any, str], "LinearisationPolicy"] = "default", lrn: Optional[str] = None
    ) -> "LinearisationPolicy":
        """Resolve ``spec``; ``lrn`` (``"identity"``/``"keep"``) sets local response norm's rule
        unless the mapping names ``local_response_norm`` itself."""
        if isinstance(spec, LinearisationPolicy):
            policy = spec
        elif isinstance(spec, str):
            if spec not in ("default", "article"):
                raise ValueError(
                    f"policy must be 'default', 'article' or a mapping from op name / module type to a rule; got {spec!r}"
                )
            policy = cls(spec, dict(_DEFAULT_RULES if spec == "default" else _ARTICLE_RULES))
        elif isinstance(spec, Mapping):
            ops, types = dict(_DEFAULT_RULES), []
            for key, rule in spec.items():
                if rule not in RULES:
                    raise ValueError(f"unknown rule {rule!r} for {_key_name(key)} in policy; valid rules: {', '.join(RULES)}")
                if isinstance(key, type) and issubclass(key, nn.Module):
                    types.append((key, rule))
                elif isinstance(key, str) and key in _ALLOWED:
                    if rule not in _ALLOWED[key]:
                        raise ValueError(
                            f"rule {rule!r} does not apply to {key!r}; valid rules for {key!r}: {', '.join(_ALLOWED[key])}"
                        )
                    ops[key] = rule
                else:
                    close = difflib.get_close_matches(str(key), list(_ALLOWED), n=3) if isinstance(key, str) else []
                    hint = f" (did you mean {', '.join(close)}?)" if close else ""
                    raise ValueError(
                        f"unknown op {_key_name(key)} in policy{hint}; valid op names: {', '.join(sorted(_ALLOWED))}, "
                        "or a torch.nn.Module subclass"
                    )
            policy = cls("custom", ops, tuple(types))
        else:
            raise ValueError(
                "policy must be 'default', 'article' or a mapping from op name / module type to a rule; "
                f"got a {type(spec).__name__}"
            )
        if lrn is not None:
            if lrn not in ("identity", "keep"):
                raise ValueError(f"lrn must be 'identity' or 'keep', got {lrn!r}")
            named = isinstance(spec, Mapping) and "local_response_norm" in spec
            if not named and policy.op_rules["local_response_norm"] != lrn:
                policy = LinearisationPolicy(policy.name, {**policy.op_rules, "local_response_norm": lrn}, policy.type_rules)
        return policy

    def rules(self) -> dict[str, str]:
        """``{op name: rule}`` for every op name a policy mapping may use."""
        return dict(sorted(self.op_rules.items()))

    @property
    def key(self) -> tuple:
        """Hashable identity, for caches."""
        return (tuple(sorted(self.op_rules.items())), self.type_rules)

    def describe(self) -> str:
        """``"default"``, ``"article"``, or the rules that differ from the default policy."""
        if self.name != "custom":
            return self.name
        diff = [f"{op}: {rule}" for op, rule in sorted(self.op_rules.items()) if _DEFAULT_RULES[op] != rule]
        diff += [f"{t.__name__}: {rule}" for t, rule in self.type_rules]
        return "default" + (f" with {{{', '.join(diff)}}}" if diff else "")

    def rule(self, op: str, stack: Sequence[tuple[str, nn.Module]]) -> str:
        """The rule for ``op`` called inside the modules ``stack`` (outermost first)."""
        if self.type_rules:
            for module_name, module in reversed(stack):
                for typ, rule in self.type_rules:
                    if isinstance(module, typ):
                        if rule not in _ALLOWED[op]:
                            raise UnsupportedNonlinearityError(
                                f"policy rule {rule!r} for module type {typ.__name__} does not apply to {op}() (inside "
                                f"module {module_name!r}); valid rules for {op!r}: {', '.join(_ALLOWED[op])}"
                            )
                        return rule
        return self.op_rules[op]


def _key_name(key: object) -> str:
    return key.__name__ if isinstance(key, type) else repr(key)


# --------------------------------------------------------------------------- reference inputs


def _content_key(images: torch.Tensor) -> str:
    data = images.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]
    return f"{tuple(data.shape)}:{digest}"


@dataclass(frozen=True, eq=False)
class Reference:
    """The input at which ops without a linear stand-in are frozen (METHODS.md §7).

    ``images`` is ``[R, C, H, W]`` in the model's input convention (what ``model.forward``
    takes); frozen values are recorded per image and expanded weights are the mean over the
    ``R`` images of the Jacobians. ``description`` says what it is (recorded with results);
    ``key`` identifies its content (for caches).

    Example:
        >>> ref = Reference.noise(model, n=4, seed=0)            # doctest: +SKIP
        >>> ref = Reference.from_images(x)                       # one or more given inputs
        >>> ref = Reference.from_loader(loader, model, preprocess=True, max_images=32)  # doctest: +SKIP
    """

    images: torch.Tensor
    description: str
    key: str = field(default="")

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dim() != 4 or self.images.shape[0] < 1:
            got = tuple(self.images.shape) if isinstance(self.images, torch.Tensor) else type(self.images).__name__
            raise ValueError(f"reference images must be [R, C, H, W] with R >= 1, got {got}")
        if not torch.isfinite(self.images).all():
            raise ValueError("reference images contain NaN or Inf")
        if not self.key:
            object.__setattr__(self, "key", _content_key(self.images))

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """One image's ``(C, H, W)``."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def __str__(self) -> str:
        return self.description

    @classmethod
    def noise(
        cls, model: nn.Module, n: int = 4, seed: int = 0, shape: Optional[Sequence[int]] = None
    ) -> "Reference":
        """``n`` smooth noise images (the default reference), repeatable with ``seed``.

        Low-frequency Fourier noise: random complex coefficients scaled by ``1 / |f|^1.5``
        (:func:`circuits.featurevis.param.fft_scale`), inverse FFT, each image standardised
        to mean 0.5 and standard deviation 0.15 and clipped to ``[0, 1]``, then mapped to
        the model's input convention with :func:`circuits.models.preprocess_input`.
        ``shape`` is one image's ``(C, H, W)`` (default: the model's ``input_shape``).
        """
        from .featurevis.param import fft_scale
        from .models import input_shape as model_input_shape
        from .models import preprocess_input

        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive number of images, got {n!r}")
        c, h, w = _reference_shape(model, shape) if shape is not None else model_input_shape(model)
        g = torch.Generator().manual_seed(int(seed))
        coeffs = torch.view_as_complex(torch.randn((n, c, h, w // 2 + 1, 2), generator=g, dtype=torch.float64))
        img = torch.fft.irfft2(coeffs * fft_scale(h, w, decay_power=1.5).double(), s=(h, w), norm="ortho")
        img = img - img.mean((-3, -2, -1), keepdim=True)
        img = (0.5 + 0.15 * img / img.std((-3, -2, -1), keepdim=True).clamp_min(1e-12)).clamp(0, 1).float()
        images = preprocess_input(model, img)
        return cls(images, f"smooth noise: {n} image{'s' if n > 1 else ''} {c}x{h}x{w}, seed {seed}")

    @classmethod
    def from_images(
        cls, images: torch.Tensor, model: Optional[nn.Module] = None, preprocess: bool = False
    ) -> "Reference":
        """Given input(s) ``[R, C, H, W]`` or ``[C, H, W]`` in the model's input convention, or
        pixels in ``[0, 1]`` with ``preprocess=True`` (then ``model`` is required)."""
        if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"reference images must be [R, C, H, W] or [C, H, W], got {got}")
        x = images.detach().unsqueeze(0) if images.dim() == 3 else images.detach()
        if preprocess:
            if model is None:
                raise ValueError("preprocess=True needs the model (its input convention)")
            from .models import preprocess_input

            x = preprocess_input(model, x)
        n = x.shape[0]
        return cls(x, f"{n} given image{'s' if n > 1 else ''} {'x'.join(str(s) for s in x.shape[1:])}")

    @classmethod
    def from_loader(
        cls,
        loader: Iterable,
        model: Optional[nn.Module] = None,
        preprocess: bool = False,
        max_images: Optional[int] = 32,
    ) -> "Reference":
        """The first ``max_images`` images (``None``: all) of a data loader; each batch is a
        tensor, a ``(images, ...)`` tuple/list or a dict whose first tensor is the images.
        Expanded weights are then the mean over these images of the Jacobians, so the cost
        grows linearly with ``max_images``."""
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images must be positive or None, got {max_images!r}")
        chunks, total = [], 0
        for batch in loader:
            if isinstance(batch, Mapping):
                batch = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
            elif isinstance(batch, (tuple, list)):
                batch = batch[0] if batch else None
            if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
                got = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
                raise ValueError(f"the data loader must yield image batches [B, C, H, W] (or (images, labels)); got {got}")
            chunks.append(batch.detach())
            total += batch.shape[0]
            if max_images is not None and total >= max_images:
                break
        if not chunks:
            raise ValueError("the data loader yielded no images")
        x = torch.cat(chunks)[:max_images]
        ref = cls.from_images(x, model, preprocess)
        return cls(ref.images, f"{len(ref)} images of a data loader {'x'.join(str(s) for s in x.shape[1:])}", ref.key)


def _as_reference(model: nn.Module, reference: object, shape: tuple[int, int, int]) -> Reference:
    if reference is None:
        return Reference.noise(model, shape=shape)
    if isinstance(reference, Reference):
        return reference
    if isinstance(reference, torch.Tensor):
        return Reference.from_images(reference)
    if isinstance(reference, torch.utils.data.DataLoader):
        return Reference.from_loader(reference)
    raise ValueError(
        "reference must be a circuits.expanded.Reference, an input tensor [R, C, H, W] or a DataLoader; "
        f"got a {type(reference).__name__}"
    )


# --------------------------------------------------------------------------- frozen values


@dataclass(frozen=True)
class FrozenOp:
    """One op that was frozen at the reference: the ``call``-th call (from 0) of ``op`` inside
    module ``module`` in a forward pass; ``frozen`` is ``"output"`` (gates, softmax),
    ``"statistics"`` (normalisations) or ``"attention pattern"``."""

    module: str
    op: str
    call: int
    frozen: str

    def __str__(self) -> str:
        return f"{self.module}: {self.op}()#{self.call} {self.frozen}"


class _Entry(NamedTuple):
    op: str
    kind: str  # "output", "statistics" or "attention pattern"
    values: dict[str, torch.Tensor]
    batched: bool  # values have the op's batch as dim 0 (else shared by all examples)
    in_shape: tuple[int, ...]  # the op's first input, batch excluded
    # rows of the op's batch per model example: 1, or e.g. the number of windows where a Swin
    # block folds its windows into the batch ([B * windows, ...], example-major)
    fold: int = 1

    @property
    def size_free(self) -> bool:
        """One value per channel (or group): a gate after global pooling, group/instance/batch
        norm statistics. Replayed at another input size, the frozen op is the same per-channel
        affine map, so such values allow the input-size search."""
        if self.kind == "attention pattern":
            return False
        skip = 2 if self.batched else 1  # (batch,) channel
        return all(all(d == 1 for d in v.shape[skip:]) for v in self.values.values())


_Key = tuple[str, str, int]  # (module, op, call)


class _Recording:
    """Values recorded on the reference pass, keyed by (module, op, call)."""

    def __init__(self, entries: dict[_Key, _Entry], n: int):
        self.entries, self.n = entries, n

    def size_free(self, ops: Iterable[FrozenOp]) -> bool:
        return all(self.entries[(f.module, f.op, f.call)].size_free for f in ops)

    def select(self, r: int) -> "_Recording":
        """The values of reference image ``r`` alone (one example, replayed for any batch)."""
        out = {}
        for key, e in self.entries.items():
            values = {k: v[r * e.fold : (r + 1) * e.fold] for k, v in e.values.items()} if e.batched else e.values
            out[key] = e._replace(values=values)
        return _Recording(out, 1)


def _norm_statistics(op: str, b: dict) -> tuple[dict[str, torch.Tensor], bool]:
    """The input statistics a normalisation divides by, and whether they are per example."""
    x = b["input"].detach()
    if op in ("layer_norm", "rms_norm"):
        dims = tuple(range(-len(tuple(b["normalized_shape"])), 0))
        if op == "rms_norm":
            return {"mean_square": (x * x).mean(dims, keepdim=True)}, True
        return {"mean": x.mean(dims, keepdim=True), "var": x.var(dims, unbiased=False, keepdim=True)}, True
    if op == "group_norm":
        xg = x.reshape(x.shape[0], int(b["num_groups"]), -1)
        return {"mean": xg.mean(-1, keepdim=True), "var": xg.var(-1, unbiased=False, keepdim=True)}, True
    if op == "instance_norm":
        dims = tuple(range(2, x.dim()))
        return {"mean": x.mean(dims, keepdim=True), "var": x.var(dims, unbiased=False, keepdim=True)}, True
    if op == "batch_norm":
        dims = (0, *range(2, x.dim()))
        return {"mean": x.mean(dims), "var": x.var(dims, unbiased=False)}, False
    if op == "normalize":
        p, dim, eps = b.get("p", 2.0), b.get("dim", 1), b.get("eps", 1e-12)
        return {"denominator": x.norm(p, dim, keepdim=True).clamp_min(eps)}, True
    raise AssertionError(op)


def _channel_view(t: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    return None if t is None else t.reshape(1, -1, *([1] * (x.dim() - 2)))


def _frozen_norm(op: str, b: dict, s: dict[str, torch.Tensor]) -> torch.Tensor:
    """The normalisation with its statistics ``s`` as constants (affine in the input)."""
    x = b["input"]
    if op == "normalize":
        return x / s["denominator"]
    if op == "rms_norm":
        eps = b.get("eps")
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        y = x * torch.rsqrt(s["mean_square"] + eps)
        return y if b.get("weight") is None else y * b["weight"]
    eps = b.get("eps", 1e-5)
    weight, bias = b.get("weight"), b.get("bias")
    if op == "layer_norm":
        y = (x - s["mean"]) * torch.rsqrt(s["var"] + eps)
        y = y if weight is None else y * weight
        return y if bias is None else y + bias
    if op == "group_norm":
        xg = x.reshape(x.shape[0], s["mean"].shape[1], -1)
        y = ((xg - s["mean"]) * torch.rsqrt(s["var"] + eps)).reshape(x.shape)
    elif op == "batch_norm":
        y = (x - _channel_view(s["mean"], x)) * torch.rsqrt(_channel_view(s["var"], x) + eps)
    else:  # instance_norm
        y = (x - s["mean"]) * torch.rsqrt(s["var"] + eps)
    y = y if weight is None else y * _channel_view(weight, x)
    return y if bias is None else y + _channel_view(bias, x)


def _attention_inputs(b: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(key, value)`` of scaled dot-product attention, heads repeated for grouped-query attention."""
    q, k, v = b["query"], b["key"], b["value"]
    if b.get("enable_gqa", False) and q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    return k, v


def _attention_pattern(b: dict) -> torch.Tensor:
    """``softmax(q kᵀ · scale + mask)`` as ``F.scaled_dot_product_attention`` computes it."""
    q = b["query"].detach()
    k, _ = _attention_inputs(b)
    k = k.detach()
    scale = b.get("scale")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = q @ k.transpose(-2, -1) * scale
    length, source = q.shape[-2], k.shape[-2]
    if b.get("is_causal", False):
        keep = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~keep, float("-inf"))
    mask = b.get("attn_mask")
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    return logits.softmax(-1)


def _mha_pattern(func: Callable, b: dict) -> torch.Tensor:
    """Per-head attention weights ``[B, heads, L, S]`` (``[heads, L, S]`` unbatched) of
    ``F.multi_head_attention_forward``, asked of the function itself."""
    _, weights = func(**{**b, "need_weights": True, "average_attn_weights": False})
    return weights.detach()


def _frozen_mha(b: dict, pattern: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``F.multi_head_attention_forward`` with a frozen pattern: ``out_proj(pattern @ V)``, the
    value projection and the output projection live."""
    for name in ("bias_v", "static_v"):
        if b.get(name) is not None:
            raise UnsupportedNonlinearityError(f"cannot freeze attention with {name} (nn.MultiheadAttention(add_bias_kv=True) or static values)")
    if b.get("add_zero_attn", False):
        raise UnsupportedNonlinearityError("cannot freeze attention with add_zero_attn=True")
    value, dim, heads = b["value"], int(b["embed_dim_to_check"]), int(b["num_heads"])
    unbatched = value.dim() == 2
    if unbatched:
        value, pattern = value.unsqueeze(1), pattern.unsqueeze(0)
    if b.get("use_separate_proj_weight", False):
        w_v = b["v_proj_weight"]
    else:
        w_v = b["in_proj_weight"][2 * dim : 3 * dim]
    bias = b.get("in_proj_bias")
    v = F.linear(value, w_v, None if bias is None else bias[2 * dim : 3 * dim])  # [S, B, E]
    length, batch = v.shape[:2]
    v = v.reshape(length, batch, heads, dim // heads).permute(1, 2, 0, 3)  # [B, heads, S, d]
    out = pattern.to(v.dtype) @ v  # [B, heads, L, d]
    out = out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], dim)
    out = F.linear(out, b["out_proj_weight"], b.get("out_proj_bias"))
    weights = None
    if b.get("need_weights", True):
        weights = pattern.mean(1) if b.get("average_attn_weights", True) else pattern
        weights = weights[0] if unbatched else weights
    return (out.squeeze(1) if unbatched else out), weights


def _record_op(op: str, func: Callable, args: tuple, kwargs: dict, n_images: int = 1) -> tuple[object, _Entry]:
    """Run ``op`` as the original model does and record what freezing it needs, for a forward
    pass of the model on ``n_images`` examples.

    An op whose batch is a multiple ``n_images · k`` of the model's (a Swin block's window
    attention runs on ``[B · windows, ...]``) is taken to hold ``k`` rows per example, example
    by example; any other batch size means values shared by all examples (not per example).
    """
    out, entry = _record_values(op, func, args, kwargs)
    if entry.batched:
        batch = _split_batch(op, _first_input(args, kwargs))[0]
        if batch % n_images:
            entry = entry._replace(batched=False)
        else:
            entry = entry._replace(fold=batch // n_images)
    return out, entry


def _record_values(op: str, func: Callable, args: tuple, kwargs: dict) -> tuple[object, _Entry]:
    x = _first_input(args, kwargs)
    in_shape = _split_batch(op, x)[1]
    if op in _NORMS:
        stats, batched = _norm_statistics(op, _bind(_NORM_PARAMS[op], args, kwargs))
        return func(*args, **kwargs), _Entry(op, "statistics", stats, batched, in_shape)
    if op == "multi_head_attention_forward":
        b = _bind(_MHA_PARAMS, args, kwargs)
        if b.get("training", True) and float(b.get("dropout_p", 0.0) or 0.0) > 0:
            raise UnsupportedNonlinearityError(
                "cannot freeze multi_head_attention_forward() with dropout in training mode: call model.eval() first"
            )
        pattern = _mha_pattern(func, b)
        entry = _Entry(op, "attention pattern", {"pattern": pattern}, x.dim() == 3, in_shape)
        return func(*args, **kwargs), entry
    if op in _ATTENTION:
        b = _bind(_SDPA_PARAMS, args, kwargs)
        if float(b.get("dropout_p", 0.0) or 0.0) > 0:
            raise UnsupportedNonlinearityError(
                "cannot freeze scaled_dot_product_attention() with dropout_p > 0 (training mode): call model.eval() first"
            )
        pattern = _attention_pattern(b)
        return func(*args, **kwargs), _Entry(op, "attention pattern", {"pattern": pattern}, True, in_shape)
    out = func(*args, **kwargs)
    if not isinstance(out, torch.Tensor):
        raise UnsupportedNonlinearityError(f"cannot freeze {op}(): it returns a {type(out).__name__}, not one tensor")
    return out, _Entry(op, "output", {"out": out.detach().clone()}, True, in_shape)


@contextlib.contextmanager
def _preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Buffers (batch-norm running statistics, counters) are restored afterwards when any
    module is in training mode, so reference and linearised passes never change the model."""
    if not any(m.training for m in model.modules()):
        yield
        return
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


# --------------------------------------------------------------------------- the modes


class _NeedsReference(UnsupportedNonlinearityError):
    """A frozen op ran while no reference values were recorded (internal: the planner then
    records them; elsewhere it reaches the user as a clear error)."""


class _PolicyMode(TorchFunctionMode):
    """What the recording and linearising modes share: the policy, the running modules (for
    rules by module type and error messages) and the per-(module, op) call counters that key
    frozen values."""

    def __init__(self, policy: LinearisationPolicy):
        super().__init__()
        self.policy = policy
        self.module_stack: list[tuple[str, nn.Module]] = []
        self.calls: dict[tuple[str, str], int] = {}

    def _module(self) -> str:
        return self.module_stack[-1][0] if self.module_stack else ""

    def _where(self) -> str:
        return f" (inside module {self._module()!r})" if self.module_stack else ""

    def _freezes(self, op: str | None, args: tuple, kwargs: dict) -> bool:
        return op is not None and _data_dependent(op, args, kwargs) and self.policy.rule(op, self.module_stack) == "freeze"

    def _next_key(self, op: str) -> _Key:
        module = self._module()
        k = self.calls.get((module, op), 0)
        self.calls[(module, op)] = k + 1
        return module, op, k


class _RecordMode(_PolicyMode):
    """Runs the original model and records the values of every op the policy freezes."""

    def __init__(self, policy: LinearisationPolicy, recording: bool = True, n_images: int = 1):
        super().__init__(policy)
        self.recording = recording  # switched on by a hook once from_layer has run
        self.n_images = n_images  # the model's batch on the reference pass
        self.entries: dict[_Key, _Entry] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if _constant_call(args, kwargs):
            return _run_constant(func, args, kwargs)
        op = _CANONICAL.get(getattr(func, "__name__", ""))
        if not self._freezes(op, args, kwargs):
            return func(*args, **kwargs)
        key = self._next_key(op)  # type: ignore[arg-type]
        if not self.recording:
            return func(*args, **kwargs)
        out, entry = _record_op(op, func, args, kwargs, self.n_images)  # type: ignore[arg-type]
        self.entries[key] = entry
        return out


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


def _pair(v: object) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))  # type: ignore[index]


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


class _LinearizeMode(_PolicyMode):
    """Intercepts torch functions and applies the policy's rule to each nonlinear op.

    ``active`` switches the substitution on and off (off: everything passes through, only the
    frozen-op call counters advance), so the mode can be entered for a whole forward pass and
    switched on once ``from_layer`` has run. ``frozen``: the values recorded on the reference
    pass (``None``: a frozen op raises :class:`_NeedsReference`). ``broadcast_batch``
    (internal): concatenations that mix batch 1 and batch ``B`` expand the batch-1 tensors, so
    that only the free tensor needs the expanded batch.
    """

    def __init__(
        self,
        policy: LinearisationPolicy,
        active: bool = True,
        broadcast_batch: int | None = None,
        lazy: bool = False,
        frozen: _Recording | None = None,
    ):
        super().__init__(policy)
        self.active = active
        self.broadcast_batch = broadcast_batch
        self.frozen = frozen
        self.replayed: dict[_Key, FrozenOp] = {}
        self._neg_inf_padded: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        # lazy (internal, for a path already checked to be linear): convolutions of tensors derived
        # from the free tensor skip their forward computation (values are irrelevant to the
        # gradient of a linear map) and compute only the input gradient in backward.
        self.lazy = lazy
        self._derived: dict[int, weakref.ref] = {}
        self._constant_output = False

    def mark_derived(self, t: torch.Tensor) -> None:
        self._derived[id(t)] = weakref.ref(t)

    def is_derived(self, t: torch.Tensor) -> bool:
        ref = self._derived.get(id(t))
        return ref is not None and ref() is t

    # -- helpers
    def _unsupported(self, op: str, why: str = "") -> UnsupportedNonlinearityError:
        if op == "batch_norm" and not why:
            why = "it runs in training mode (call model.eval() first)"
        if self.policy.name == "article":
            why = why or "it is not linear and linearisation has no stand-in for it"
            return UnsupportedNonlinearityError(
                f"cannot linearise the model: it calls {op}(){self._where()}, and {why}. Linearisation "
                "supports ReLU (→ identity), max pooling (→ average pooling), local response norm "
                "(→ identity) and operations that are already affine (convolution, linear layers, "
                "concatenation, addition, average pooling, eval-mode batch norm and dropout)."
            )
        canonical = _CANONICAL.get(op, op)
        rules = [r for r in _ALLOWED.get(canonical, ()) if r != "error"]
        hint = f"; give it a rule with policy={{{canonical!r}: {' | '.join(map(repr, rules))}}}" if rules else ""
        why = why or f"the linearisation policy ({self.policy.describe()}) has no linear stand-in for it"
        return UnsupportedNonlinearityError(f"cannot linearise the model: it calls {op}(){self._where()}, and {why}{hint}")

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

    def _adaptive_max_to_avg(self, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
        b = _bind(("input", "output_size", "return_indices"), args, kwargs)
        if name.endswith("_with_indices") or b.get("return_indices", False):
            raise self._unsupported(name, "its indices have no meaning in a linear model")
        return _ADAPTIVE_AVG_POOL[int(name[len("adaptive_max_pool")])](b["input"], b["output_size"])

    def _pad(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        b = _bind(("input", "pad", "mode", "value"), args, kwargs)
        value = b.get("value")
        if b.get("mode", "constant") != "constant" or value is None or not math.isinf(value) or value > 0:
            return None
        if self.policy.rule("max_pool2d", self.module_stack) != "avg_pool":
            return None  # the max pool stays a max pool: keep its -inf padding
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

    def _identity(self, op: str, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
        x = _first_input(args, kwargs)
        inplace = _is_inplace(op, name, args, kwargs)
        if op == "selu":  # its slope for positive inputs
            return x.mul_(_SELU_SCALE) if inplace else x * _SELU_SCALE
        return x if inplace else x.clone()

    def _replay(self, op: str, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
        """The op with its recorded values as constants."""
        key = self._next_key(op)
        if self.frozen is None:
            raise _NeedsReference(
                f"{op}(){self._where()} is frozen at a reference input under the linearisation policy "
                f"({self.policy.describe()}), and no reference was given: pass reference=... (a "
                f"circuits.expanded.Reference or an input batch) or another rule with policy={{{op!r}: ...}}"
            )
        entry = self.frozen.entries.get(key)
        x = _first_input(args, kwargs)
        if entry is None or entry.op != op:
            raise ValueError(
                f"frozen values do not match this forward pass: call #{key[2]} of {op}(){self._where()} did not "
                "happen on the reference pass (does the model's forward depend on its input?)"
            )
        batch, shape = _split_batch(op, x)
        other_size = entry.size_free and len(shape) == len(entry.in_shape) and shape[:1] == entry.in_shape[:1]
        if shape != entry.in_shape and not other_size:
            raise ValueError(
                f"frozen values do not match this forward pass: {op}(){self._where()} gets input "
                f"{shape} (batch excluded) but {entry.in_shape} on the reference pass; use "
                "an input of the reference's size"
            )
        values = self._batch_values(op, entry, batch) if entry.batched else entry.values
        self.replayed.setdefault(key, FrozenOp(key[0], op, key[2], entry.kind))
        if entry.kind == "statistics":
            return _frozen_norm(op, _bind(_NORM_PARAMS[op], args, kwargs), values)
        if op == "multi_head_attention_forward":
            return _frozen_mha(_bind(_MHA_PARAMS, args, kwargs), values["pattern"])
        if entry.kind == "attention pattern":
            _, v = _attention_inputs(_bind(_SDPA_PARAMS, args, kwargs))
            return values["pattern"].to(v.dtype) @ v
        const = values["out"]
        self._constant_output = True
        if _is_inplace(op, name, args, kwargs):
            try:
                x.copy_(const)
                self._derived.pop(id(x), None)  # it holds the constant now
                return x
            except RuntimeError:  # e.g. a leaf that requires grad: no in-place, the value is what counts
                pass
        return const.expand(x.shape[0], *const.shape[1:]) if const.shape[0] == 1 else const

    def _batch_values(self, op: str, entry: _Entry, batch: int) -> dict[str, torch.Tensor]:
        """The recorded per-example values for an op batch of ``batch`` rows: as recorded, or
        one example's values repeated for every example (``fold`` rows each, example-major;
        with ``fold == 1`` they broadcast)."""
        rows = next(iter(entry.values.values())).shape[0]
        if rows == batch:
            return entry.values
        if rows == entry.fold and batch % entry.fold == 0:
            if entry.fold == 1:
                return entry.values
            reps = batch // entry.fold
            return {k: v.repeat(reps, *([1] * (v.dim() - 1))) for k, v in entry.values.items()}
        per = "" if entry.fold == 1 else f" ({entry.fold} rows of the op's batch per example)"
        raise ValueError(
            f"frozen values were recorded for {rows // entry.fold} reference images{per} but {op}(){self._where()} "
            f"runs on a batch of {batch} rows: use a batch of {rows // entry.fold} examples or a single reference image"
        )

    # -- the dispatch
    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if _constant_call(args, kwargs):
            return _run_constant(func, args, kwargs)
        name = getattr(func, "__name__", "")
        if not self.active:
            op = _CANONICAL.get(name)
            if op is not None and self._freezes(op, args, kwargs):
                self._next_key(op)  # keep the call keys aligned with the reference pass
            return func(*args, **kwargs)
        if not self.lazy:
            return self._dispatch(name, func, args, kwargs)
        if not any(self.is_derived(t) for t in _tensors(args) + _tensors(tuple(kwargs.values()))):
            return self._dispatch(name, func, args, kwargs)
        b = _bind(("input", "weight"), args, kwargs) if name == "conv2d" else {}
        self._constant_output = False
        if name == "conv2d" and self.is_derived(b["input"]) and not self.is_derived(b["weight"]):
            out = _lazy_conv2d(args, kwargs)
            if out is None:
                out = self._dispatch(name, func, args, kwargs)
        else:
            out = self._dispatch(name, func, args, kwargs)
        if not self._constant_output:  # a frozen output is a constant, whatever its input was
            for t in _tensors(out if isinstance(out, (tuple, list)) else (out,)):
                self.mark_derived(t)
        return out

    def _dispatch(self, name: str, func: Callable, args: tuple, kwargs: dict) -> object:
        op = _CANONICAL.get(name)
        if op is None:
            if name == "pad":
                out = self._pad(args, kwargs)
                if out is not None:
                    return out
            if name in _TRAIN_ONLY:
                idx = _TRAIN_ONLY[name]
                training = kwargs.get("training", kwargs.get("train", args[idx] if len(args) > idx else True))
                p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
                if training and p != 0:
                    raise self._unsupported(name, "it runs in training mode (call model.eval() first)")
            if name in _CAT and self.broadcast_batch:
                args, kwargs = self._broadcast_cat(args, kwargs)
            return func(*args, **kwargs)
        if not _data_dependent(op, args, kwargs):
            return func(*args, **kwargs)
        rule = self.policy.rule(op, self.module_stack)
        if rule == "keep":
            return func(*args, **kwargs)
        if rule == "identity":
            return self._identity(op, name, args, kwargs)
        if rule == "avg_pool":
            if op.startswith("adaptive"):
                return self._adaptive_max_to_avg(name, args, kwargs)
            return self._max_to_avg(name, args, kwargs)
        if rule == "freeze":
            return self._replay(op, name, args, kwargs)
        raise self._unsupported(name)


@contextlib.contextmanager
def _module_tracking(model: nn.Module, mode: _PolicyMode) -> Iterator[None]:
    """Keep ``mode.module_stack`` = the modules currently running; each forward pass of the
    whole model starts the frozen-op call counters afresh."""
    handles = []
    root = type(model).__name__

    def pre(name: str, module: nn.Module) -> Callable:
        def hook(_m: nn.Module, _i: object) -> None:
            if name == "":
                mode.module_stack.clear()
                mode.calls.clear()
            mode.module_stack.append((name or root, module))

        return hook

    def post(name: str) -> Callable:
        def hook(_m: nn.Module, _i: object, _o: object) -> None:
            if mode.module_stack and mode.module_stack[-1][0] == (name or root):
                mode.module_stack.pop()

        return hook

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(pre(name, module)))
            handles.append(module.register_forward_hook(post(name), always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()
        mode.module_stack.clear()


def _record(
    model: nn.Module,
    images: torch.Tensor,
    policy: LinearisationPolicy,
    from_layer: Optional[str] = None,
    to_layer: Optional[str] = None,
) -> _Recording:
    """Run the original model on ``images`` (as far as ``to_layer``) and record the values of
    the ops ``policy`` freezes (only those after ``from_layer``, when given)."""
    mode = _RecordMode(policy, recording=from_layer is None, n_images=images.shape[0])

    def start(out: torch.Tensor) -> torch.Tensor:
        mode.recording = True
        return out

    with contextlib.ExitStack() as stack:
        if from_layer is not None:  # a per-call name 'module#k' starts after that call
            stack.enter_context(replace_activation(model, from_layer, start))
        with torch.no_grad(), _preserved_buffers(model), _module_tracking(model, mode), mode:
            if to_layer is None:
                model(images)
            else:
                run_until(model, images, [to_layer])
    return _Recording(mode.entries, images.shape[0])


@contextlib.contextmanager
def linearized(
    model: nn.Module,
    lrn: Literal["identity", "keep"] = "identity",
    policy: Union[str, Mapping[Any, str], LinearisationPolicy] = "default",
    reference: Union["Reference", torch.Tensor, None] = None,
) -> Iterator[nn.Module]:
    """Run ``model`` linearised inside the block; the model itself is never modified.

    Inside the ``with`` block every torch call on this thread is intercepted (a
    :class:`torch.overrides.TorchFunctionMode`), so functional calls inside ``forward``
    (``F.relu(x)``, ``x.relu_()``, ``F.max_pool2d(...)``, ``x * torch.sigmoid(s)``) are
    caught as well as modules. Each nonlinear op gets its ``policy`` rule (see the module
    docs and :class:`LinearisationPolicy`): by default ReLU-like activations → identity,
    max pooling → average pooling (padded positions excluded, ``-inf`` "SAME" padding
    included), local response norm → identity (``lrn="keep"`` keeps it, as Captum's
    ``optim`` branch did), and normalisations, gates and attention are frozen at
    ``reference``: the original model runs once on ``reference`` (a :class:`Reference` or an
    input batch ``[R, C, H, W]``) when the block is entered, and each forward pass of the
    whole model inside the block uses the recorded values (batch ``R``, or any batch when
    ``R == 1``). Without a reference, a frozen op raises :class:`UnsupportedNonlinearityError`
    saying so; ``policy="article"`` refuses every op the article does not define.

    Weights, buffers, modules, hooks and the train/eval flag are the same afterwards, also
    when the block raises. Yields ``model``::

        with linearized(model):
            y = model(x)          # the linearised network's output
    """
    pol = LinearisationPolicy.of(policy, lrn=lrn)
    frozen = None
    if reference is not None:
        device, dtype = device_and_dtype(model)
        ref = _as_reference(model, reference, _reference_shape(model, None))
        frozen = _record(model, ref.images.to(device=device, dtype=dtype), pol)
    mode = _LinearizeMode(pol, frozen=frozen)
    with _preserved_buffers(model), _module_tracking(model, mode), mode:
        yield model


# --------------------------------------------------------------------------- geometry


def _reference_shape(model: nn.Module, input_shape: Optional[Sequence[int]]) -> tuple[int, int, int]:
    if input_shape is None:
        from .models import input_shape as model_input_shape

        input_shape = model_input_shape(model)
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be one example's (C, H, W), got {tuple(input_shape)}")
    return shape  # type: ignore[return-value]


def _layouts(model: nn.Module, from_layer: str, to_layer: str, shape: tuple[int, int, int]) -> tuple[Layout, Layout]:
    """The layouts (:mod:`circuits.layouts`) of both layers at input size ``shape``: how their
    activations are viewed as ``[B, C, H, W]`` (and, through autograd, their gradients)."""
    found = get_layouts(model, [from_layer, to_layer], input_shape=shape)
    return found[from_layer], found[to_layer]


def _check_to_token(to_layer: str, target: Layout, to_token: Optional[int]) -> None:
    if to_token is None:
        return
    if target.kind != "tokens" or target.n_prefix == 0:
        raise ValueError(
            f"to_token={to_token!r}: to_layer {to_layer!r} ({target}) has no prefix tokens; to_token picks a class/"
            "register token of a token layer (ViT blocks); leave it out for the centre position"
        )
    if not isinstance(to_token, int) or not 0 <= to_token < target.n_prefix:
        raise ValueError(
            f"to_token={to_token!r} is not a prefix token of {to_layer!r}, which has {target.n_prefix} "
            f"(valid: 0..{target.n_prefix - 1}; 0 is the class token)"
        )


class _Run(NamedTuple):
    free: torch.Tensor  # leaf that replaced from_layer (in its own layout)
    out: torch.Tensor  # to_layer activation (in its own layout)
    source: Layout  # from_layer's layout, fitted to this run's size
    target: Layout  # to_layer's layout, fitted to this run's size
    frozen_ops: tuple[FrozenOp, ...]  # frozen ops that ran after from_layer

    def outputs(self, to_token: Optional[int]) -> torch.Tensor:
        """``[B, C2, h2, w2]``: to_layer on its grid; a dense layer or ``to_token`` (that prefix
        token's features) as a ``1 × 1`` map."""
        if to_token is not None:
            return self.target.prefix(self.out)[:, to_token, :, None, None]
        return self.target.canonical(self.out)

    def gradients(self, grad: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A gradient w.r.t. the free tensor as ``([B, C1, h1, w1], [B, P, C1] or None)``: the
        grid part and the prefix tokens' rows (``None`` when from_layer has none)."""
        prefix = self.source.prefix(grad) if self.source.n_prefix else None
        return self.source.canonical(grad), prefix


def _run_linear(
    model: nn.Module,
    x: torch.Tensor,
    from_layer: str,
    to_layer: str,
    make_free: Callable[[torch.Tensor], torch.Tensor],
    policy: LinearisationPolicy,
    layouts: Callable[[], tuple[Layout, Layout]],
    frozen: _Recording | None = None,
    broadcast_batch: int | None = None,
    lazy: bool = False,
) -> _Run:
    """Forward ``x`` up to ``to_layer`` with ``from_layer``'s output replaced by ``make_free(out)``;
    linearised from ``from_layer`` on (what runs before it is irrelevant to the result).
    ``layouts()`` (from_layer's, to_layer's) are fitted to the activations of this run; it is
    called after the run, so a run that stops early (a frozen op without a reference) costs no
    layout detection."""
    mode = _LinearizeMode(policy, active=False, broadcast_batch=broadcast_batch, lazy=lazy, frozen=frozen)
    state: dict[str, Any] = {}

    def replace(out: torch.Tensor) -> torch.Tensor:
        state["free"] = make_free(out)
        mode.mark_derived(state["free"])
        mode.active = True
        return state["free"]

    with torch.enable_grad(), _preserved_buffers(model), _module_tracking(model, mode):
        with replace_activation(model, from_layer, replace), mode:
            acts = run_until(model, x, [to_layer])
    if "free" not in state:
        raise ValueError(
            f"to_layer {to_layer!r} is not downstream of from_layer {from_layer!r}: the forward pass "
            f"computes {to_layer!r} before {from_layer!r} runs"
        )
    out = acts[to_layer]
    source, target = layouts()
    source, target = source.fit(tuple(state["free"].shape[1:])), target.fit(tuple(out.shape[1:]))
    return _Run(state["free"], out, source, target, tuple(mode.replayed.values()))


def _not_downstream(from_layer: str, to_layer: str, frozen_ops: Sequence[FrozenOp] = ()) -> ValueError:
    outputs = [str(f) for f in frozen_ops if f.frozen == "output"]
    hint = (
        f"; frozen outputs pass no gradient, and these were frozen on the way: {', '.join(outputs[:5])} "
        "(a sigmoid used as an activation rather than a gate? give it another rule with policy=...)"
        if outputs
        else ""
    )
    return ValueError(
        f"to_layer {to_layer!r} is not downstream of from_layer {from_layer!r}: it does not depend "
        f"on {from_layer!r}'s activation (e.g. a parallel branch){hint}"
    )


class _Probe(NamedTuple):
    grad: torch.Tensor  # [C1, h1, w1]: from_layer's grid
    prefix: Optional[torch.Tensor]  # [P, C1]: from_layer's prefix tokens (None: it has none)
    position: tuple[int, int]
    to_shape: tuple[int, ...]  # (C2, h2, w2); (F, 1, 1) for a dense to_layer or a prefix token
    whole: bool  # the output has no position (dense to_layer, or a prefix token): whole from_layer grid
    source: Layout  # from_layer's layout at this size
    frozen_ops: tuple[FrozenOp, ...]


def _probe(
    model: nn.Module,
    from_layer: str,
    to_layer: str,
    hw: tuple[int, int],
    channels_in: int,
    policy: LinearisationPolicy,
    layouts: Callable[[], tuple[Layout, Layout]],
    frozen: _Recording | None = None,
    position: tuple[int, int] | None = None,
    value_seed: int | None = 0,
    to_token: Optional[int] = None,
) -> _Probe:
    """Gradient ``[C1, h1, w1]`` (and ``[P, C1]`` on from_layer's prefix tokens) of a fixed
    random mix of all to_layer channels at ``position`` (default: the centre; or prefix token
    ``to_token``) w.r.t. the from_layer activation (random with ``value_seed``, zeros with
    ``None``), batch 1; also the position used and the to_layer shape."""
    device, dtype = device_and_dtype(model)
    x = torch.zeros((1, channels_in, *hw), dtype=dtype, device=device)

    def make_free(out: torch.Tensor) -> torch.Tensor:
        if value_seed is None:
            free = torch.zeros_like(out)
        else:
            g = torch.Generator().manual_seed(value_seed)
            free = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
        return free.detach().requires_grad_(True)

    with torch.enable_grad():
        run = _run_linear(model, x, from_layer, to_layer, make_free, policy, layouts, frozen)
        whole = to_token is not None or run.target.kind == "dense"
        if position is not None:
            run.target.check_position(to_layer, position)
        out = run.outputs(to_token)
        pos = centre(*out.shape[-2:]) if position is None else position
        loss = (out[0, :, pos[0], pos[1]] * _mix(out.shape[1], out)).sum()
        if not loss.requires_grad:
            raise _not_downstream(from_layer, to_layer, run.frozen_ops)
        (grad,) = torch.autograd.grad(loss, run.free, allow_unused=True)
    if grad is None:
        raise _not_downstream(from_layer, to_layer, run.frozen_ops)
    grid, prefix = run.gradients(grad.detach())
    return _Probe(
        grid[0], None if prefix is None else prefix[0], pos, tuple(out.shape[1:]), whole, run.source, run.frozen_ops
    )


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
    centre: tuple[int, int]  # the neuron's position in to_layer at that size ((0, 0) when whole)
    window: tuple[int, int, int, int]  # (y0, x0, kh, kw) in from_layer at that size
    box: tuple[int, int]  # footprint size (bh, bw)
    window_offset: tuple[int, int]  # window origin minus footprint origin
    to_shape: tuple[int, ...]  # (C2, h2, w2) at that size
    from_channels: int  # model input channels
    pattern: torch.Tensor  # [C1, kh, kw]: the probe (all to_layer channels mixed by _mix), cropped
    layouts: tuple[Layout, Layout]  # from_layer's and to_layer's, at the planning size
    whole: bool = False  # the output has no position (dense to_layer, prefix token): whole from_layer grid
    frozen_ops: tuple[FrozenOp, ...] = ()  # frozen ops between from_layer and to_layer
    prefix_pattern: Optional[torch.Tensor] = None  # [P, C1]: the probe on from_layer's prefix tokens
    to_token: Optional[int] = None  # the output is to_layer's prefix token (None: its centre)


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


def _training_key(model: nn.Module) -> tuple[str, ...]:
    """The modules in training mode: batch norm (and dropout) are affine only in eval mode."""
    return tuple(name for name, m in model.named_modules() if m.training)


def _flat(p: _Probe) -> torch.Tensor:
    """A probe's gradient, grid and prefix rows, as one vector."""
    return p.grad.flatten() if p.prefix is None else torch.cat([p.grad.flatten(), p.prefix.flatten()])


def _plan(
    model: nn.Module,
    from_layer: str,
    to_layer: str,
    shape: tuple[int, int, int],
    crop: Union[int, Sequence[int], None],
    policy: LinearisationPolicy,
    frozen: _Recording | None = None,
    reference_key: str | None = None,
    to_token: Optional[int] = None,
) -> _Geometry:
    """Where to compute (input size, centre, window), checked linear; cached. With ``frozen``
    values (one set per reference image) the probe pattern is the mean over the references,
    and the size search runs only when every frozen value is one per channel. Raises
    :class:`_NeedsReference` when a frozen op is on the path and ``frozen`` is ``None``."""
    c, h, w = shape
    crop_hw = _normalise_crop(crop)
    key = (from_layer, to_layer, (c, h, w), crop_hw, policy.key, reference_key, _training_key(model), to_token)
    cache = _GEOMETRY_CACHE.setdefault(model, {})
    hit = cache.get(key)
    if hit is not None and hit.layouts == _layouts(model, from_layer, to_layer, shape):  # set_layout may have changed them
        return hit
    found: list[tuple[Layout, Layout]] = []

    def layouts() -> tuple[Layout, Layout]:  # detected once the first probe gets that far
        if not found:
            found.append(_layouts(model, from_layer, to_layer, shape))
            _check_to_token(to_layer, found[0][1], to_token)
        return found[0]

    def probe(hw: tuple[int, int], values: _Recording | None, value_seed: int | None = 0) -> _Probe:
        return _probe(model, from_layer, to_layer, hw, c, policy, layouts, values, value_seed=value_seed, to_token=to_token)

    refs = [None] if frozen is None else [frozen.select(r) for r in range(frozen.n)]
    first = probe((h, w), refs[0])
    # The size search needs a map that does not depend on the input size: nothing frozen, or
    # only values per channel (SE gates, group/instance/batch norm statistics); and no prefix
    # tokens (their rows sum over the whole grid). It compares reference image 0 only: the
    # others replay the same ops with other constants.
    search = not first.whole and first.prefix is None and (frozen is None or frozen.size_free(first.frozen_ops))
    probes = [first] if search else [first] + [probe((h, w), f) for f in refs[1:]]
    grads = torch.stack([p.grad for p in probes])
    if not bool(torch.isfinite(grads).all()):  # NaN fails every support test: say what it is, not "not downstream"
        raise ValueError(
            f"expanded weights {from_layer}→{to_layer} contain NaN or Inf: the path's weights or frozen values are "
            "non-finite (check the model's weights: circuits inspect)"
        )
    ref = grads.mean(0) if len(probes) > 1 else grads[0]
    prefix = None if first.prefix is None else torch.stack([p.prefix for p in probes]).mean(0)  # type: ignore[misc]
    h1, w1 = ref.shape[-2:]
    box = (0, h1, 0, w1) if first.whole else _support_box(grads.abs().amax(0))
    if box is None and prefix is not None and bool((prefix != 0).any()):
        box = (0, h1, 0, w1)  # only the prefix tokens reach the output: the grid rows are zeros
    if box is None:
        raise _not_downstream(from_layer, to_layer, first.frozen_ops)
    by0, by1, bx0, bx1 = box
    bh, bw = by1 - by0, bx1 - bx0
    if crop_hw is None:
        kh, kw, oy, ox = bh, bw, 0, 0
    else:
        kh, kw = crop_hw
        oy, ox = (by0 + by1 - 1) // 2 - (kh - 1) // 2 - by0, (bx0 + bx1 - 1) // 2 - (kw - 1) // 2 - bx0
    # token models attend over the whole grid by design: there, reaching the border says nothing
    global_by_design = "tokens" in (layouts()[0].kind, layouts()[1].kind)
    if not first.whole and not global_by_design and (by0 == 0 or bx0 == 0 or by1 == h1 or bx1 == w1):
        warnings.warn(
            f"the receptive field of {to_layer!r}'s centre neuron reaches the border of {from_layer!r} "
            f"at input size {h}x{w}; the expanded weights are clipped there (pass a larger input_shape"
            + (", or a larger reference: ops on the path are frozen at the reference's size)" if frozen else ")"),
            stacklevel=5,
        )
    pattern = _crop(ref, by0 + oy, bx0 + ox, kh, kw)
    tol = _TOLERANCE * float(pattern.abs().max())
    geometry = _Geometry(
        (h, w), first.position, (by0 + oy, bx0 + ox, kh, kw), (bh, bw), (oy, ox), first.to_shape, c, pattern,
        layouts(), first.whole, first.frozen_ops, prefix, to_token,
    )
    accepted = first
    if search:
        # start the search where the from_layer map is about as large as the footprint
        need, ratio = max(bh, kh), h1 / h
        candidates = [hw for hw in _candidate_sizes(h, w) if hw[0] * ratio >= need - 2]
        for hw in candidates:
            try:
                p = probe(hw, refs[0])
            except UnsupportedNonlinearityError:
                raise
            except (RuntimeError, ValueError):  # too small for some layer on the way
                continue
            b = _support_box(p.grad)
            if b is None or (b[1] - b[0], b[3] - b[2]) != (bh, bw):
                continue
            window = (b[0] + oy, b[2] + ox, kh, kw)
            if float((_crop(p.grad, *window) - pattern).abs().max()) <= tol:
                geometry = dataclasses.replace(geometry, hw=hw, centre=p.position, window=window, to_shape=p.to_shape,
                                               pattern=_crop(p.grad, *window))
                accepted = p
                break
        if len(refs) > 1:  # the probe of the result (checked after computing it): mean over the references
            others = [probe(geometry.hw, f).grad for f in refs[1:]]
            mixed = torch.stack([geometry.pattern] + [_crop(g, *geometry.window) for g in others]).mean(0)
            geometry = dataclasses.replace(geometry, pattern=mixed)
    # linearity: the gradient must not depend on the free tensor's value (random above, zeros here)
    g0 = _flat(probe(geometry.hw, refs[0], value_seed=None))
    if float((g0 - _flat(accepted)).abs().max()) > _TOLERANCE * float(g0.abs().max()) + 1e-12:
        raise UnsupportedNonlinearityError(
            f"the path from {from_layer!r} to {to_layer!r} is not linear after linearisation (its "
            "gradient depends on the activation): the model uses a nonlinear operation that "
            "linearisation does not know, e.g. a product of two activations or a gate that is not frozen"
        )
    cache[key] = geometry
    return geometry


class _Plan(NamedTuple):
    geometry: _Geometry
    policy: LinearisationPolicy
    frozen: _Recording | None  # values recorded at the reference (None: nothing frozen on the path)
    reference: Reference | None


def _plan_for(
    model: nn.Module,
    from_layer: str,
    to_layer: str,
    input_shape: Optional[Sequence[int]],
    crop: Union[int, Sequence[int], None],
    policy: Union[str, Mapping[Any, str], LinearisationPolicy],
    reference: object,
    to_token: Optional[int] = None,
) -> _Plan:
    """The plan without a reference when nothing on the path is frozen; else the reference's
    values, recorded afresh (they depend on the weights), and the plan at its size."""
    if from_layer == to_layer:
        raise ValueError(f"from_layer and to_layer are the same layer {from_layer!r}")
    get_layer(model, from_layer), get_layer(model, to_layer)  # UnknownLayerError early
    pol = LinearisationPolicy.of(policy)
    shape = _reference_shape(model, input_shape)
    cache = _GEOMETRY_CACHE.setdefault(model, {})
    needs_key = (
        "needs a reference", from_layer, to_layer, shape, _normalise_crop(crop), pol.key, _training_key(model), to_token
    )
    if needs_key not in cache:
        try:
            return _Plan(_plan(model, from_layer, to_layer, shape, crop, pol, to_token=to_token), pol, None, None)
        except _NeedsReference:
            cache[needs_key] = True
    ref = _as_reference(model, reference, shape)
    if input_shape is not None and ref.shape != shape:
        raise ValueError(
            f"the reference images are {ref.shape} but input_shape is {shape}: frozen values belong to the "
            "reference's size, so leave input_shape out or pass a reference of that size"
        )
    device, dtype = device_and_dtype(model)
    frozen = _record(model, ref.images.to(device=device, dtype=dtype), pol, from_layer, to_layer)
    geometry = _plan(model, from_layer, to_layer, ref.shape, crop, pol, frozen, ref.key, to_token)
    return _Plan(geometry, pol, frozen, ref)


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


PolicySpec = Union[str, Mapping[Any, str], LinearisationPolicy]
ReferenceSpec = Union[Reference, torch.Tensor, "torch.utils.data.DataLoader", None]


class _Result(NamedTuple):
    weights: torch.Tensor  # [out, in, kh, kw]
    prefix_weights: Optional[torch.Tensor]  # [out, P, in]: from_layer's prefix tokens (None: it has none)
    plan: _Plan


def _expanded(
    model: nn.Module,
    from_layer: str,
    to_layer: str,
    channels: Union[int, Sequence[int], torch.Tensor, None],
    crop: Union[int, Sequence[int], None],
    input_shape: Optional[Sequence[int]],
    batch_size: Optional[int],
    progress: bool,
    policy: PolicySpec,
    reference: ReferenceSpec,
    to_token: Optional[int] = None,
) -> _Result:
    plan = _plan_for(model, from_layer, to_layer, input_shape, crop, policy, reference, to_token)
    geo = plan.geometry
    chans = _channel_list(to_layer, channels, geo.to_shape[0])
    attention = any(f.op in _SOFTMAX + _ATTENTION for f in geo.frozen_ops)
    if batch_size is None:
        batch_size = min(len(chans), _ATTENTION_BATCH) if attention else len(chans)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device, dtype = device_and_dtype(model)
    x = torch.zeros((1, geo.from_channels, *geo.hw), dtype=dtype, device=device)
    y, xpos = geo.centre
    wy0, wx0, kh, kw = geo.window
    refs = [None] if plan.frozen is None else [plan.frozen.select(r) for r in range(plan.frozen.n)]
    chunks = [chans[i : i + batch_size] for i in range(0, len(chans), batch_size)]
    tasks = [(r, i) for r in range(len(refs)) for i in range(len(chunks))]
    desc = f"expanded weights {from_layer}→{to_layer}"
    with_prefix = geo.prefix_pattern is not None

    def layouts() -> tuple[Layout, Layout]:
        return geo.layouts

    def compute(chunk: list[int], lazy: bool, frozen: _Recording | None) -> torch.Tensor:
        """``[n, in * kh * kw (+ P * in)]``: the cropped grid rows (and the prefix rows), flat.

        One forward pass with a copy of the free tensor per output channel, one backward pass.
        With attention on the path (ViT, Swin) the input cannot shrink to the receptive field,
        but batched matrix products still beat one backward pass per channel from a batch-1
        forward (x1.2-x3 on ViT-B/32, 2 CPU cores; chunks of ``_ATTENTION_BATCH``).
        """
        n = len(chunk)

        def make_free(out: torch.Tensor) -> torch.Tensor:
            return out.new_zeros((n, *out.shape[1:])).requires_grad_(True)

        with torch.enable_grad():
            try:
                run = _run_linear(
                    model, x, from_layer, to_layer, make_free, plan.policy, layouts, frozen, broadcast_batch=n, lazy=lazy
                )
            except RuntimeError:  # something other than a concatenation mixed batch 1 and batch n
                xs = x.expand(n, *x.shape[1:])
                run = _run_linear(model, xs, from_layer, to_layer, make_free, plan.policy, layouts, frozen, lazy=lazy)
            out = run.outputs(geo.to_token)
            index = torch.tensor(chunk, device=out.device)
            selected = out[torch.arange(n, device=out.device), index, y, xpos]
            (grad,) = torch.autograd.grad(selected.sum(), run.free, allow_unused=True)
        if grad is None:
            grad = run.free.new_zeros((len(chunk), *run.free.shape[1:]))
        grid, prefix = run.gradients(grad.detach())
        rows = _crop(grid, wy0, wx0, kh, kw).flatten(1)
        return rows if prefix is None else torch.cat([rows, prefix.flatten(1)], 1)

    def compute_all(lazy: bool, show: bool) -> torch.Tensor:
        rows: list[Optional[torch.Tensor]] = [None] * len(chunks)
        for r, i in tqdm(tasks, desc=desc, disable=not show or len(tasks) < 2):
            part = compute(chunks[i], lazy, refs[r])
            rows[i] = part if rows[i] is None else rows[i] + part  # type: ignore[operator]
        out = torch.cat(rows, 0)  # type: ignore[arg-type]
        return out / len(refs) if len(refs) > 1 else out

    # The path was checked to be linear when planning, so convolutions on it skip their forward
    # computation (``lazy``). With all channels, the result is checked against the planning probe
    # (the same channels mixed with fixed weights) and recomputed the plain way on a mismatch.
    flat = compute_all(True, progress)
    if sorted(chans) == list(range(geo.to_shape[0])):
        pattern = geo.pattern.flatten()
        if with_prefix:
            pattern = torch.cat([pattern, geo.prefix_pattern.flatten()])  # type: ignore[union-attr]
        mixed = _mix(len(chans), flat)[chans] @ flat
        scale = float(pattern.abs().max())
        if float((mixed - pattern).abs().max()) > 10 * _TOLERANCE * scale + 1e-12:
            flat = compute_all(False, progress)
    if not torch.isfinite(flat).all():
        raise ValueError(
            f"expanded weights {from_layer}→{to_layer} contain NaN or Inf (frozen values at the reference "
            f"{plan.reference} may be degenerate, e.g. a zero variance)"
        )
    n_in = geo.pattern.shape[0]
    weights = flat[:, : n_in * kh * kw].reshape(len(chans), n_in, kh, kw)
    prefix_weights = flat[:, n_in * kh * kw :].reshape(len(chans), -1, n_in) if with_prefix else None
    return _Result(weights, prefix_weights, plan)


def expanded_weights(
    model: nn.Module,
    from_layer: str,
    to_layer: str,
    channels: Union[int, Sequence[int], torch.Tensor, None] = None,
    crop: Union[int, Sequence[int], None] = None,
    input_shape: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
    progress: bool = False,
    policy: PolicySpec = "default",
    reference: ReferenceSpec = None,
    to_token: Optional[int] = None,
) -> torch.Tensor:
    """Expanded weights ``[out, in, kh, kw]`` from ``from_layer`` to ``to_layer`` (linearised).

    ``E[c2, c1, dy, dx] = ∂ to_layer[c2, centre] / ∂ from_layer[c1, centre + (dy, dx)]`` for
    the output channels ``channels`` (default: all, in order) and all input channels,
    cropped to the receptive-field footprint of ``to_layer``'s centre neuron in
    ``from_layer`` (its bounding box) or to a ``crop`` window (``int`` or ``(kh, kw)``)
    centred on it (zeros outside the footprint). For a stride-1 path of odd kernels the
    footprint is centred on the neuron, so ``E[..., kh//2, kw//2]`` is the same position.
    A dense ``to_layer`` (``[B, F]``, e.g. the logits) gives ``[F, in, h, w]`` over
    ``from_layer``'s whole ``h × w`` map (see the module docs).

    Any layout (:mod:`circuits.layouts`): channels-last layers (Swin stages) and token layers
    (ViT blocks) are read on their spatial or patch grid, ``in``/``out`` being their feature
    axes. From a token layer, the rows of its class/register tokens are not positions; they
    are in :attr:`Connection.prefix_weights` (:func:`connection_weights`). ``to_token=k``
    connects to ``to_layer``'s ``k``-th prefix token (``0``: the class token) instead of its
    centre patch: like a dense layer, over ``from_layer``'s whole grid.

    The model is linearised from ``from_layer`` on with ``policy`` (``"default"``,
    ``"article"`` or a mapping; see :func:`linearized` and :class:`LinearisationPolicy`), so
    biases do not matter. Ops frozen by the policy (normalisations, gates, attention) are
    frozen at ``reference`` (a :class:`Reference`, an input batch in the model's input
    convention, or a ``DataLoader``; default :meth:`Reference.noise`), the result being the
    mean over the reference images; with nothing frozen on the path the result depends on no
    input and ``reference`` is not used. :func:`connection_weights` returns the same weights
    together with what was frozen and at which reference.

    All output channels are computed in one backward pass per ``batch_size`` chunk (default:
    all at once; 128 channels with attention on the path, where the whole token grid travels)
    and reference image: ``from_layer``'s activation is replaced by a zero tensor with one
    copy per output channel in the batch, the forward stops at ``to_layer``, and the sum of
    each copy's own centre output is back-propagated once. The input size is the smallest
    that gives the same result as ``input_shape`` (``(C, H, W)``, default the model's
    ``input_shape``) or, with frozen ops, as the reference's size (see the module docs).

    Memory is about ``batch_size`` × the activations between the two layers at that size;
    ``progress=True`` shows a tqdm bar over the chunks.

    Raises:
        UnknownLayerError: a layer name the model does not have.
        ValueError: ``to_layer`` not downstream of ``from_layer``; a layer with no layout (see
            :func:`circuits.layouts.set_layout`); a bad channel, ``crop``, ``input_shape``,
            ``policy``, ``reference`` or ``to_token``; NaN/Inf in the result.
        UnsupportedNonlinearityError: a nonlinear op on the path that the policy refuses.
    """
    return _expanded(
        model, from_layer, to_layer, channels, crop, input_shape, batch_size, progress, policy, reference, to_token
    ).weights


# --------------------------------------------------------------------------- direct connections


@dataclass(frozen=True)
class Connection:
    """Weights between two layers.

    ``weights`` is ``[out, in, kh, kw]``; ``kind`` is ``"direct"`` (the kernel of the one
    convolution that connects adjacent layers) or ``"expanded"`` (:func:`expanded_weights`);
    ``channels`` lists the output channels of ``to_layer`` the rows belong to (``None``: all).
    ``policy`` is the linearisation policy used (:meth:`LinearisationPolicy.describe`);
    ``frozen`` lists the ops between the layers that were frozen at ``reference`` (the
    :class:`Reference` whose Jacobians were averaged); both are empty/``None`` when nothing
    on the path is frozen, and then the weights depend on no input.

    Token layers (:mod:`circuits.layouts` kind ``"tokens"``, ViT blocks): ``weights`` are on
    ``from_layer``'s patch grid, and the class/register tokens of ``from_layer`` are input
    rows of their own, ``prefix_weights[out, p, in] = ∂ to_layer[out, centre] / ∂
    from_layer[token p, in]`` (``[out, n_prefix, in]``; ``None`` when ``from_layer`` has no
    prefix tokens). Token ``p = 0`` is the class token in torchvision's and timm's ViTs
    (timm: then the register tokens); :attr:`class_token_weights` is ``prefix_weights[:, 0]``,
    METHODS.md's ``E_cls[d_out, d_in]``. ``to_token`` is ``None`` when the rows are
    ``to_layer``'s centre position (or a dense layer's features), else the prefix token of
    ``to_layer`` they belong to (``0``: the class token); such a token has no position, so
    ``weights`` then cover ``from_layer``'s whole grid, as for a dense ``to_layer``.

    Example:
        >>> c = connection_weights(model, "features.2.0", "features.2.1")    # doctest: +SKIP
        >>> c.weights.shape, [str(f) for f in c.frozen], str(c.reference)    # doctest: +SKIP
        ((24, 24, 5, 5), ['features.2.1.block.2.scale_activation: sigmoid()#0 output'],
         'smooth noise: 4 images 3x224x224, seed 0')
        >>> v = connection_weights(vit, "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1")  # doctest: +SKIP
        >>> v.weights.shape, v.prefix_weights.shape, v.class_token_weights.shape  # doctest: +SKIP
        ((32, 32, 4, 4), (32, 1, 32), (32, 32))

    In a notebook it shows itself (``_repr_html_``): for each output channel (at most 8), its
    8 strongest inputs (L2) as red/blue weight maps (red excites, blue inhibits, one scale per
    row), thumbnails inlined as PNG; non-finite weights are flagged in red; the HTML stays
    under 200 KB (:mod:`circuits._display`).
    """

    weights: torch.Tensor
    kind: Literal["direct", "expanded"]
    from_layer: str
    to_layer: str
    channels: Optional[tuple[int, ...]] = None
    policy: str = "default"
    frozen: tuple[FrozenOp, ...] = ()
    reference: Optional[Reference] = None
    prefix_weights: Optional[torch.Tensor] = None
    to_token: Optional[int] = None

    def _title(self) -> str:
        return f"{self.from_layer} → {self.to_layer} ({self.kind}), weights {tuple(self.weights.shape)}"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython's text/plain: one line, not every tensor
        p.text(f"{type(self).__name__}({self._title()})")

    def _repr_html_(self) -> str:
        from . import _display as D

        w = self.weights.detach().float().cpu()
        out = w.shape[0]
        budget, shown = D.HtmlBudget(), min(out, 8)
        if w.dim() == 4:
            top = top_inputs(torch.nan_to_num(w, nan=0.0), 8)
            for j in range(shown):
                ch = self.channels[j] if self.channels is not None else j
                limit = D.shared_limit(w[j, top.indices[j]])
                cells = [(D.weights_html(w[j, int(i)], limit, alt=f"{self.from_layer}:{int(i)}"), f"{self.from_layer}:{int(i)}\n{float(n):.3g}")
                         for i, n in zip(top.indices[j], top.norms[j])]
                row = f"<div><b>{D.value_html(f'{self.to_layer}:{ch}')}</b> &larr; top {len(cells)} of {w.shape[1]} inputs{D.tile(cells)}</div>"
                if not budget.add(row):
                    budget.skip(shown - j - 1)
                    break
            budget.skip(out - shown)
        else:
            budget.add(D.tile([(D.weights_html(w.reshape(out, -1), size=192, alt="weights"), "[out, in]")]))
        notes = [f"policy: {self.policy}"]
        if self.frozen:
            notes.append(f"{len(self.frozen)} op(s) frozen at the reference ({self.reference}): "
                         + "; ".join(str(f) for f in self.frozen[:4]) + (" ..." if len(self.frozen) > 4 else ""))
        if self.prefix_weights is not None:
            notes.append(f"prefix-token rows: {tuple(self.prefix_weights.shape)}")
        return D.container("Connection", self._title(), budget, notes, D.nan_flag(*D.count_nonfinite(w), what="weights"))

    @property
    def class_token_weights(self) -> torch.Tensor:
        """``[out, in]``: the rows of ``from_layer``'s first prefix token (the class token of a
        ViT), ``prefix_weights[:, 0]``."""
        if self.prefix_weights is None or self.prefix_weights.shape[1] == 0:
            raise ValueError(
                f"from_layer {self.from_layer!r} has no class or register tokens, so this connection has no "
                "class-token rows (prefix_weights is None); only token layers (ViT blocks) have them"
            )
        return self.prefix_weights[:, 0]



def connection_weights(
    model: nn.Module,
    from_layer: str,
    to_layer: str,
    channels: Union[int, Sequence[int], torch.Tensor, None] = None,
    crop: Union[int, Sequence[int], None] = None,
    input_shape: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
    policy: PolicySpec = "default",
    reference: ReferenceSpec = None,
    to_token: Optional[int] = None,
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
    :func:`expanded_weights` with ``policy`` and ``reference`` (``kind="expanded"``), and the
    result says which ops were frozen at which reference. The two agree for adjacent
    stride-1 convs. From a token layer (ViT block), the class/register tokens' rows are in
    ``prefix_weights``; ``to_token`` picks a prefix token of ``to_layer`` as the output (see
    :class:`Connection` and :func:`expanded_weights`).
    """
    pol = LinearisationPolicy.of(policy)
    trace_shape = input_shape  # the tracing pass runs at the given size, else the reference's, else the model's
    if trace_shape is None and isinstance(reference, Reference):
        trace_shape = reference.shape
    elif trace_shape is None and isinstance(reference, torch.Tensor) and reference.dim() in (3, 4):
        trace_shape = tuple(reference.shape[-3:])
    ref_shape = _reference_shape(model, trace_shape)
    if from_layer == to_layer:
        raise ValueError(f"from_layer and to_layer are the same layer {from_layer!r}")
    conv = None
    if to_token is None:
        with _preserved_buffers(model):  # the tracing pass must not move training-mode batch-norm statistics
            conv = adjacent_conv(model, from_layer, to_layer, layer_graph(model, ref_shape))
    chan_tuple = None if channels is None else tuple(_as_int_list(channels))
    if conv is not None:
        chans = _channel_list(to_layer, channels, conv.out_channels)
        weights = conv.weight.detach()[chans].clone()
        return Connection(weights, "direct", from_layer, to_layer, chan_tuple, pol.describe())
    res = _expanded(model, from_layer, to_layer, channels, crop, input_shape, batch_size, False, pol, reference, to_token)
    return Connection(
        res.weights, "expanded", from_layer, to_layer, chan_tuple, pol.describe(), res.plan.geometry.frozen_ops,
        res.plan.reference, res.prefix_weights, to_token,
    )


def neuron_weights(
    model: nn.Module,
    from_layer: str,
    target: str,
    crop: Union[int, Sequence[int], None] = None,
    input_shape: Optional[Sequence[int]] = None,
    policy: PolicySpec = "default",
    reference: ReferenceSpec = None,
) -> torch.Tensor:
    """Weights ``[in, kh, kw]`` of one neuron (``"mixed3b:208"``) from ``from_layer``.

    Direct kernel slice when the layers are adjacent, expanded weights otherwise (see
    :func:`connection_weights`; ``policy`` and ``reference`` as there). A position
    (``"@y,x"``) is rejected: linearised weights are the same at every interior position;
    use :func:`per_example_connections` for positions.
    """
    layer, channel = parse_neuron(
        target, "linearised weights do not depend on it (per_example_connections(...) takes a position)"
    )
    conn = connection_weights(
        model, from_layer, layer, [channel], crop, input_shape, policy=policy, reference=reference
    )
    return conn.weights[0]


class TopInputs(NamedTuple):
    """Indices of the strongest input channels and their L2 norms, strongest first."""

    indices: torch.Tensor
    norms: torch.Tensor


def top_inputs(weights: Union[torch.Tensor, Connection], k: int) -> TopInputs:
    """Top-``k`` input channels by the L2 norm of their ``[kh, kw]`` weight slice.

    ``weights``: ``[in, kh, kw]`` (one neuron) → ``indices``/``norms`` ``[k]``; or
    ``[out, in, kh, kw]`` → ``[out, k]`` per output channel. ``k`` larger than the number of
    input channels returns them all. Ties keep channel order. This is the one L2 ranking of
    the package (:func:`circuits.figures.rank_inputs` is its NumPy face).
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
    indices = norms.argsort(dim=-1, descending=True, stable=True)[..., : min(k, norms.shape[-1])]
    return TopInputs(indices, norms.gather(-1, indices))


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
        target: ``"layer:channel"`` (the centre of the map) or ``"layer:channel@y,x"``; on a
            dense layer (``[B, F]``, e.g. the logits) ``"layer:feature"``, over the whole map.
            Any layout (:mod:`circuits.layouts`): ``channel`` is the feature axis, ``@y,x`` a
            position on the spatial or patch grid; the result is on ``from_layer``'s grid (a
            token layer's class/register tokens are left out).

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
    # the footprint comes from the linearised path (frozen at the first input where needed)
    plan = _plan_for(model, from_layer, t.layer, (c, h, w), None, "default", Reference.from_images(x[:1]))
    geo = plan.geometry
    check_channel(t.layer, t.channel, geo.to_shape[0])
    frozen = None if plan.frozen is None else plan.frozen.select(0)
    probe = _probe(model, from_layer, t.layer, (h, w), c, plan.policy, lambda: geo.layouts, frozen, position=t.position)
    if geo.whole:
        by0, bx0 = 0, 0
    else:
        box = _support_box(probe.grad)
        if box is None:  # pragma: no cover - the plan found a support already
            raise _not_downstream(from_layer, t.layer)
        (by0, by1, bx0, bx1), (bh, bw) = box, geo.box
        if by1 - by0 < bh and by0 == 0:  # clipped by the top/left border: anchor at the far side
            by0 = by1 - bh
        if bx1 - bx0 < bw and bx0 == 0:
            bx0 = bx1 - bw
    (oy, ox), (_, _, kh, kw) = geo.window_offset, geo.window
    to_layer = t.layer

    source, target_layout = geo.layouts
    # Captum attributes to a module's output; the tap is called once, on from_layer's output
    # of the named call (a module that runs several times has one 'module#k' per call)
    tap = nn.Identity()

    def forward(inp: torch.Tensor) -> torch.Tensor:  # to_layer as [B, C, H, W] ([B, F] when dense)
        with replace_activation(model, from_layer, tap):
            out = run_until(model, inp, [to_layer])[to_layer]
        lay = target_layout.fit(tuple(out.shape[1:]))
        return out if lay.kind == "dense" else lay.canonical(out)

    attr = LayerGradientXActivation(forward, tap, multiply_by_inputs=method == "gradient_x_activation")
    target_index = t.channel if geo.whole else (t.channel, probe.position[0], probe.position[1])
    with torch.enable_grad():
        result = attr.attribute(x, target=target_index).detach()
    result = _crop(source.fit(tuple(result.shape[1:])).canonical(result), by0 + oy, bx0 + ox, kh, kw)
    return result[0] if single else result
