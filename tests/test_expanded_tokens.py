"""Expanded weights across ViT and Swin blocks and channels-last layers (METHODS.md §7).

The references here share no code with :mod:`circuits.expanded`'s freezing: the original
model runs on the reference images with hooks that store every LayerNorm's input and every
attention pattern (ViT: computed here from the query/key projections of the recorded input;
Swin: the output of ``F.softmax`` inside each window attention, caught by swapping the
function for the call). A deep copy then gets its GELUs replaced by ``nn.Identity``, each
LayerNorm by a multiplication with the stored per-token statistics, each attention by its
stored pattern times the live value path; one autograd backward per output channel from
``to_layer``'s centre patch (read in the layer's own layout, by hand) gives the Jacobian,
averaged over the reference images.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VisionTransformer, get_model
from torchvision.models.swin_transformer import ShiftedWindowAttention, SwinTransformer

from expanded_reference import assert_close, frozen_layer_norm, per_channel_jacobian, replace_module, support

from circuits.expanded import connection_weights, expanded_weights, per_example_connections
from circuits.layers import centre
from circuits.layouts import clear_layout, get_layout, set_layout

pytestmark = pytest.mark.usefixtures("one_thread")

VIT_BLOCKS = "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"


# ----------------------------------------------------------------------------- helpers


def _layer_norm_inputs(model: nn.Module, images: torch.Tensor, extra_hooks=()) -> dict:
    """``{name: input [R, ...]}`` of every ``nn.LayerNorm`` on a forward pass over ``images``."""
    store, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm) and "2d" not in type(m).__name__.lower():  # over the last axis (timm's too)
            handles.append(m.register_forward_pre_hook(lambda _m, inp, n=name: store.__setitem__(n, inp[0].detach())))
    try:
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for h in extra_hooks:
                stack.enter_context(h)
            model(images)
    finally:
        for h in handles:
            h.remove()
    return store


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def _frozen_copy(model: nn.Module, ln_inputs: dict, r: int, attention: dict) -> nn.Module:
    """A copy linearised by hand at reference image ``r``: GELU → identity, every LayerNorm
    frozen at its recorded input, each attention module ``name`` replaced by
    ``attention[name](that module)``."""
    frozen = copy.deepcopy(model)
    for name, m in list(frozen.named_modules()):
        if isinstance(m, nn.GELU):
            replace_module(frozen, name, nn.Identity())
    for name, x in ln_inputs.items():
        replace_module(frozen, name, frozen_layer_norm(model.get_submodule(name), x[r : r + 1]))
    for name, make in attention.items():
        replace_module(frozen, name, make(frozen.get_submodule(name)))
    return frozen.eval()


# ----------------------------------------------------------------------------- ViT


def _vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    with torch.no_grad():  # torchvision starts the class token and the head at zero, the norms at 1, 0
        model.class_token.normal_()
        model.heads.head.weight.normal_(0, 0.1)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model.eval()


def _vit_pattern(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """``softmax(q kᵀ / √d)`` per head, ``[R, heads, T, T]``, from the batch-first input ``x``."""
    e, heads = mha.embed_dim, mha.num_heads
    d = e // heads
    w, b = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
    q = F.linear(x, w[:e], b[:e]).unflatten(-1, (heads, d)).transpose(1, 2)
    k = F.linear(x, w[e : 2 * e], b[e : 2 * e]).unflatten(-1, (heads, d)).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-2, -1) / d**0.5, -1)


class _FrozenMHA(nn.Module):
    """``out_proj(pattern @ V(x))``: attention with a constant pattern, the value path live."""

    def __init__(self, mha: nn.MultiheadAttention, pattern: torch.Tensor):
        super().__init__()
        self.mha, self.pattern = mha, pattern

    def forward(self, query, key, value, need_weights=False):
        e, heads = self.mha.embed_dim, self.mha.num_heads
        v = F.linear(value, self.mha.in_proj_weight[2 * e :], self.mha.in_proj_bias[2 * e :])
        v = v.unflatten(-1, (heads, e // heads)).transpose(1, 2)  # [B, heads, T, d]
        out = (self.pattern @ v).transpose(1, 2).flatten(2)
        return self.mha.out_proj(out), None


def _vit_by_hand(model: VisionTransformer, images: torch.Tensor) -> list[nn.Module]:
    """One hand-frozen copy of the ViT per reference image."""
    queries = {}
    hooks = [
        model.get_submodule(f"{name}.self_attention").register_forward_pre_hook(
            lambda _m, args, n=name: queries.__setitem__(n, args[0].detach())
        )
        for name in VIT_BLOCKS
    ]
    try:
        ln_inputs = _layer_norm_inputs(model, images)
    finally:
        for h in hooks:
            h.remove()

    def frozen_attention(r: int) -> dict:
        return {
            f"{n}.self_attention": lambda mha, q=q[r : r + 1]: _FrozenMHA(mha, _vit_pattern(mha, q))
            for n, q in queries.items()
        }

    return [_frozen_copy(model, ln_inputs, r, frozen_attention(r)) for r in range(len(images))]


def _split_tokens(g: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[C2, 1 + h*w, C1]`` → grid ``[C2, C1, h, w]`` and class-token rows ``[C2, 1, C1]``."""
    return g[:, 1:].unflatten(1, grid).permute(0, 3, 1, 2), g[:, :1]


@pytest.fixture(scope="module")
def vit():
    model = _vit()
    images = torch.randn(2, 3, 32, 32) + torch.randn(2, 3, 1, 1)
    return model, images, _vit_by_hand(model, images)


def test_vit_block_to_block_equals_hand_frozen_per_channel_reference(vit):
    model, images, copies = vit
    src, dst = VIT_BLOCKS
    cy, cx = centre(4, 4)
    pick = lambda out, c: out[0, 1 + cy * 4 + cx, c]  # noqa: E731 - the centre patch token, feature c
    jac = torch.stack([per_channel_jacobian(m, src, dst, images[r : r + 1], pick, 32) for r, m in enumerate(copies)])
    jac = jac.mean(0)
    grid, cls = _split_tokens(jac, (4, 4))

    conn = connection_weights(model, src, dst, reference=images)
    assert conn.kind == "expanded" and conn.to_token is None
    assert conn.weights.shape == (32, 32, 4, 4)  # attention reaches the whole patch grid
    assert_close(conn.weights, grid)
    assert conn.prefix_weights.shape == (32, 1, 32)
    assert_close(conn.prefix_weights, cls)
    assert torch.equal(conn.class_token_weights, conn.prefix_weights[:, 0])
    assert [str(f) for f in conn.frozen] == [
        f"{dst}.ln_1: layer_norm()#0 statistics",
        f"{dst}.self_attention: multi_head_attention_forward()#0 attention pattern",
        f"{dst}.ln_2: layer_norm()#0 statistics",
    ]
    # the frozen values matter: one reference image alone gives other weights
    other = expanded_weights(model, src, dst, reference=images[:1])
    assert float((other - grid).abs().max()) > 1e-3 * float(grid.abs().max())


def test_vit_class_token_output_and_logits(vit):
    model, images, copies = vit
    src, dst = VIT_BLOCKS
    pick_cls = lambda out, c: out[0, 0, c]  # noqa: E731 - to_layer's class token
    jac = [per_channel_jacobian(m, src, dst, images[r : r + 1], pick_cls, 32) for r, m in enumerate(copies)]
    jac = torch.stack(jac).mean(0)
    grid, cls = _split_tokens(jac, (4, 4))
    conn = connection_weights(model, src, dst, reference=images, to_token=0)
    assert conn.to_token == 0 and conn.weights.shape == (32, 32, 4, 4)
    assert_close(conn.weights, grid)
    assert_close(conn.prefix_weights, cls)

    # the logits read the class token after encoder.ln: a dense head over the whole grid
    chans = [0, 7, 999]
    rows = []
    for r, m in enumerate(copies):
        with _narrowed(m.heads.head, chans):  # the head computes only these logits
            rows.append(per_channel_jacobian(m, src, "heads.head", images[r : r + 1], lambda out, c: out[0, c]))
    jac = torch.stack(rows).mean(0)
    grid, cls = _split_tokens(jac, (4, 4))
    head = connection_weights(model, src, "heads.head", channels=chans, reference=images)
    assert head.weights.shape == (3, 32, 4, 4) and head.channels == tuple(chans)
    assert_close(head.weights, grid)
    assert_close(head.prefix_weights, cls)
    assert str(head.frozen[-1]) == "encoder.ln: layer_norm()#0 statistics"


@contextlib.contextmanager
def _narrowed(linear: nn.Linear, rows: list[int]):
    """The linear layer computes only ``rows`` of its output inside the block."""
    weight, bias = linear.weight, linear.bias
    linear.weight = nn.Parameter(weight.detach()[rows].clone())
    linear.bias = nn.Parameter(bias.detach()[rows].clone())
    try:
        yield
    finally:
        linear.weight, linear.bias = weight, bias


def test_vit_patch_embedding_to_block_has_no_prefix_rows(vit):
    """From the patch embedding (a conv map, no class token) the weights are on its grid only."""
    model, images, _ = vit
    conn = connection_weights(model, "conv_proj", VIT_BLOCKS[0], channels=[0, 3], reference=images)
    assert conn.weights.shape == (2, 32, 4, 4) and conn.prefix_weights is None
    with pytest.raises(ValueError) as exc:
        conn.class_token_weights
    assert "'conv_proj' has no class or register tokens" in _one_line(exc)


def test_vit_bad_input_is_one_line(vit):
    model, images, _ = vit
    src, dst = VIT_BLOCKS
    with pytest.raises(ValueError) as exc:
        connection_weights(model, src, dst, reference=images, to_token=1)
    assert "to_token=1 is not a prefix token" in _one_line(exc) and "valid: 0..0; 0 is the class token" in str(exc.value)
    with pytest.raises(ValueError) as exc:
        connection_weights(model, src, "heads.head", reference=images, to_token=0)
    assert "'heads.head' (dense [1000]) has no prefix tokens" in _one_line(exc)
    with pytest.raises(ValueError) as exc:  # a position on a dense layer
        per_example_connections(model, images[:1], src, "heads.head:3@1,1")
    assert "layer 'heads.head' is dense ([batch, 1000]); it has no positions: drop '@y,x'" in _one_line(exc)
    with pytest.raises(ValueError) as exc:  # a position off the patch grid
        per_example_connections(model, images[:1], src, f"{dst}:3@4,0")
    assert "outside layer" in _one_line(exc) and "patch grid is 4x4" in str(exc.value)


def test_vit_per_example_reads_the_patch_grid(vit):
    model, images, _ = vit
    src, dst = VIT_BLOCKS
    x = images[:1]
    pe = per_example_connections(model, x, src, f"{dst}:5@1,2")
    store = {}
    hooks = [
        model.get_submodule(src).register_forward_hook(
            lambda _m, _i, out: store.__setitem__("a", out.detach().requires_grad_(True)) or store["a"]
        ),
        model.get_submodule(dst).register_forward_hook(lambda _m, _i, out: store.__setitem__("b", out)),
    ]
    try:
        with torch.enable_grad():
            model(x)
            (g,) = torch.autograd.grad(store["b"][0, 1 + 1 * 4 + 2, 5], store["a"])
    finally:
        for h in hooks:
            h.remove()
    assert pe.shape == (1, 32, 4, 4)
    assert_close(pe[0], g[0, 1:].unflatten(0, (4, 4)).permute(2, 0, 1))


# ----------------------------------------------------------------------------- Swin


def _swin(seed: int = 0) -> SwinTransformer:
    torch.manual_seed(seed)
    model = SwinTransformer(
        patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4], stochastic_depth_prob=0.0
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
            if isinstance(m, ShiftedWindowAttention):  # sharper patterns than at init
                m.relative_position_bias_table.normal_(0, 1)
    return model.eval()


@contextlib.contextmanager
def _softmax_swapped(fn):
    """``torch.nn.functional.softmax`` is ``fn(original, input, dim)`` inside the block."""
    original = F.softmax

    def swapped(input, dim=None, **kwargs):
        return fn(original, input, dim, **kwargs)

    F.softmax = swapped
    try:
        yield
    finally:
        F.softmax = original


def _swin_patterns(model: SwinTransformer, images: torch.Tensor) -> tuple[dict, dict]:
    """LayerNorm inputs and each window attention's softmax output ``[R · windows, heads, N, N]``."""
    patterns, current, hooks = {}, [], []
    for name, m in model.named_modules():
        if isinstance(m, ShiftedWindowAttention):
            hooks.append(m.register_forward_pre_hook(lambda _m, _a, n=name: current.append(n)))

    def record(original, input, dim, **kwargs):
        out = original(input, dim, **kwargs)
        patterns[current[-1]] = out.detach()
        return out

    try:
        ln_inputs = _layer_norm_inputs(model, images, [_softmax_swapped(record)])
    finally:
        for h in hooks:
            h.remove()
    assert len(patterns) == 4
    return ln_inputs, patterns


class _FrozenWindowAttention(nn.Module):
    """torchvision's window attention with its softmax replaced by the recorded pattern."""

    def __init__(self, attn: ShiftedWindowAttention, pattern: torch.Tensor):
        super().__init__()
        self.attn, self.pattern = attn, pattern

    def forward(self, x):
        def constant(_original, input, dim, **kwargs):
            assert input.shape == self.pattern.shape
            return self.pattern

        with _softmax_swapped(constant):
            return self.attn(x)


def _swin_by_hand(model: SwinTransformer, images: torch.Tensor) -> list[nn.Module]:
    ln_inputs, patterns = _swin_patterns(model, images)

    def frozen_attention(r: int) -> dict:
        out = {}
        for name, p in patterns.items():
            windows = p.shape[0] // len(images)  # Swin folds its windows into the batch, image by image
            out[name] = lambda attn, p=p[r * windows : (r + 1) * windows]: _FrozenWindowAttention(attn, p)
        return out

    return [_frozen_copy(model, ln_inputs, r, frozen_attention(r)) for r in range(len(images))]


def _nhwc_centre(out: torch.Tensor, c: int) -> torch.Tensor:
    cy, cx = centre(out.shape[1], out.shape[2])
    return out[0, cy, cx, c]


@pytest.fixture(scope="module")
def swin():
    model = _swin()
    images = torch.randn(2, 3, 32, 32) + torch.randn(2, 3, 1, 1)
    return model, images, _swin_by_hand(model, images)


def _swin_reference(copies, images, src: str, dst: str, n_out: int) -> torch.Tensor:
    """Per-channel autograd from ``dst``'s centre patch ([B, h, w, C]) through the hand-frozen copies."""
    jac = [per_channel_jacobian(m, src, dst, images[r : r + 1], _nhwc_centre, n_out) for r, m in enumerate(copies)]
    jac = torch.stack(jac).mean(0)
    return jac.permute(0, 3, 1, 2) if jac.dim() == 4 else jac  # [C2, h, w, C1] → [C2, C1, h, w]


def test_swin_shifted_block_equals_hand_frozen_per_channel_reference(swin):
    model, images, copies = swin
    assert get_layout(model, "features.1.0", (3, 32, 32)).kind == "nhwc"
    ref = _swin_reference(copies, images, "features.1.0", "features.1.1", 16)
    conn = connection_weights(model, "features.1.0", "features.1.1", reference=images)
    # the shifted block's window around the centre patch (8, 8) holds rows and columns 6..9
    assert ref.shape == (16, 16, 16, 16) and conn.weights.shape == (16, 16, 4, 4)
    mask = ref.abs().amax((0, 1)) > 0
    assert mask.nonzero().amin(0).tolist() == [6, 6] and mask.nonzero().amax(0).tolist() == [9, 9]
    assert_close(conn.weights, support(ref))
    assert conn.prefix_weights is None
    assert [str(f) for f in conn.frozen] == [
        "features.1.1.norm1: layer_norm()#0 statistics",
        "features.1.1.attn: softmax()#0 output",
        "features.1.1.norm2: layer_norm()#0 statistics",
    ]


@pytest.mark.filterwarnings("ignore:the receptive field")  # two stages at 32 px reach the border
def test_swin_stage_to_stage_and_logits(swin):
    """Stage outputs made by a Sequential are channels-last too (not misread as [B, C, H, W])."""
    model, images, copies = swin
    ref = _swin_reference(copies, images, "features.1", "features.3", 32)
    conn = connection_weights(model, "features.1", "features.3", reference=images)
    assert conn.weights.shape[:2] == (32, 16)
    assert_close(conn.weights, support(ref))
    assert sum(f.op == "softmax" for f in conn.frozen) == 2  # both blocks of stage 2 (stage 1 is before)

    chans = [0, 5, 999]
    rows = []
    for r, m in enumerate(copies):
        with _narrowed(m.head, chans):
            rows.append(per_channel_jacobian(m, "features.3", "head", images[r : r + 1], lambda out, c: out[0, c]))
    head_ref = torch.stack(rows).mean(0).permute(0, 3, 1, 2)
    head = connection_weights(model, "features.3", "head", channels=chans, reference=images)
    assert head.weights.shape == (3, 32, 8, 8)  # features.3 is [B, 8, 8, 32]: 32 channels on 8x8
    assert_close(head.weights, head_ref)
    assert [str(f) for f in head.frozen] == ["norm: layer_norm()#0 statistics"]


def test_swin_per_call_layers_branch_to_branch_is_the_mlp():
    """``stochastic_depth#1`` (attention branch) → ``#2`` (MLP branch) of one block: through the
    residual sum, norm2 frozen at the centre position and the MLP with GELU → identity."""
    model = _swin(seed=1)
    image = torch.randn(1, 3, 32, 32)
    block = model.features[1][0]
    conn = connection_weights(model, "features.1.0.stochastic_depth#1", "features.1.0.stochastic_depth#2", reference=image)
    store = {}
    h = block.norm2.register_forward_pre_hook(lambda _m, inp: store.__setitem__("x", inp[0].detach()))
    with torch.no_grad():
        model(image)
    h.remove()
    cy, cx = centre(16, 16)
    x = store["x"][0, cy, cx]
    scale = block.norm2.weight.detach() / torch.sqrt(x.var(unbiased=False) + block.norm2.eps)
    golden = (block.mlp[3].weight @ block.mlp[0].weight).detach() * scale
    assert conn.weights.shape == (16, 16, 1, 1)
    assert_close(conn.weights[:, :, 0, 0], golden)
    assert [str(f) for f in conn.frozen] == ["features.1.0.norm2: layer_norm()#0 statistics"]


# ----------------------------------------------------------------------------- timm (optional)


class _FrozenTimmAttention(nn.Module):
    """timm's ``Attention`` with a constant pattern: ``proj(pattern @ V(x))``."""

    def __init__(self, attn: nn.Module, pattern: torch.Tensor):
        super().__init__()
        self.attn, self.pattern = attn, pattern

    def forward(self, x, attn_mask=None, **kwargs):
        b, n, _ = x.shape
        v = self.attn.qkv(x).reshape(b, n, 3, self.attn.num_heads, self.attn.head_dim)[:, :, 2].transpose(1, 2)
        return self.attn.proj((self.pattern @ v).transpose(1, 2).reshape(b, n, -1))


@pytest.mark.slow
def test_timm_vit_tiny_block_equals_hand_frozen_reference():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    image = torch.rand(1, 3, 224, 224)
    attn = model.blocks[4].attn
    store = {}
    hook = attn.register_forward_pre_hook(lambda _m, args: store.__setitem__("x", args[0].detach()))
    try:
        ln_inputs = _layer_norm_inputs(model, image)
    finally:
        hook.remove()
    x = store["x"]
    q, k, _ = attn.qkv(x).detach().reshape(1, 197, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    pattern = torch.softmax(q @ k.transpose(-2, -1) * attn.head_dim**-0.5, -1)
    frozen = copy.deepcopy(model)
    replace_module(frozen, "blocks.4.mlp.act", nn.Identity())
    replace_module(frozen, "blocks.4.attn", _FrozenTimmAttention(frozen.blocks[4].attn, pattern))
    for name in ("blocks.4.norm1", "blocks.4.norm2"):
        replace_module(frozen, name, frozen_layer_norm(model.get_submodule(name), ln_inputs[name]))
    cy, cx = centre(14, 14)
    jac = per_channel_jacobian(frozen, "blocks.3", "blocks.4", image, lambda out, c: out[0, 1 + cy * 14 + cx, c], 192)
    grid, cls = _split_tokens(jac, (14, 14))
    conn = connection_weights(model, "blocks.3", "blocks.4", reference=image)
    assert [f.op for f in conn.frozen] == ["layer_norm", "scaled_dot_product_attention", "layer_norm"]
    assert conn.weights.shape == (192, 192, 14, 14) and conn.prefix_weights.shape == (192, 1, 192)
    assert_close(conn.weights, grid)
    assert_close(conn.prefix_weights, cls)


# ----------------------------------------------------------------------------- channels-last CNN internals


@pytest.mark.parametrize("inner", ["features.1.0.block.1", "features.1.0.block.2", "features.1.0.block.3"])
def test_convnext_channels_last_internals_are_read_through_their_layout(inner):
    """Permute, LayerNorm and Linear outputs inside a ConvNeXt block are [B, h, w, C]."""
    torch.manual_seed(0)
    model = get_model("convnext_tiny", weights=None).eval()
    images = torch.randn(1, 3, 64, 64)
    ln_inputs = _layer_norm_inputs(model, images)
    frozen = copy.deepcopy(model)
    name = "features.1.0.block.2"
    replace_module(frozen, name, frozen_layer_norm(model.get_submodule(name), ln_inputs[name]))
    n_out = 384 if inner.endswith("3") else 96  # the Linear expands 96 → 384 channels
    ref = support(per_channel_jacobian(frozen, "features.0", inner, images, _nhwc_centre, n_out))  # features.0 is NCHW
    E = expanded_weights(model, "features.0", inner, reference=images)
    assert get_layout(model, inner, (3, 64, 64)).kind == "nhwc"
    assert E.shape == (n_out, 96, 7, 7)
    assert_close(E, ref)


def test_layout_overrides_are_obeyed_and_unknown_kinds_refused():
    model = _swin()
    image = torch.randn(1, 3, 32, 32)
    right = expanded_weights(model, "features.3", "head", channels=[0], reference=image)
    set_layout(model, "features.3", "nchw")  # wrong: it is [B, 8, 8, 32]; read as 8 channels on 8x32
    try:
        wrong = expanded_weights(model, "features.3", "head", channels=[0], reference=image)
    finally:
        clear_layout(model, "features.3")
    assert wrong.shape == (1, 8, 8, 32) and right.shape == (1, 32, 8, 8)  # the override is obeyed, then forgotten
    assert torch.equal(wrong, right.permute(0, 2, 3, 1))  # the same numbers, read the other way
    assert torch.equal(expanded_weights(model, "features.3", "head", channels=[0], reference=image), right)
    with pytest.raises(ValueError) as exc:
        set_layout(model, "features.3", "channels_last")
    assert "unknown layout 'channels_last'; valid: nchw, nhwc, tokens, dense" in _one_line(exc)
